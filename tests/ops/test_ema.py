"""sslseg.ops.ema_update_ / ema_decay: the fused kernel against its reference twin, and the API."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from torch import nn

import sslseg.ops
from sslseg.ops import _loader
from sslseg.ops.ema import _reference, ema_decay, ema_update_
from tests.devices import devices

OP = torch.ops.sslseg.ema_update_.default

# (teacher dtype, student dtype) -> tolerance of the comparison with the reference twin.
DTYPE_PAIRS = {
    (torch.float32, torch.float32): 1e-6,
    (torch.float64, torch.float64): 1e-12,
    (torch.float32, torch.bfloat16): 1e-6,
    (torch.float32, torch.float16): 1e-6,
    (torch.bfloat16, torch.bfloat16): 1e-2,
    (torch.float16, torch.float32): 1e-3,
}

# Shapes of one list: odd sizes, 0-dim, empty, above the CPU parallel grain (1 << 16).
SHAPES = [(3, 5, 7), (), (0, 4), (1,), (257,), (65537 * 2 + 3,), (16, 3, 3, 3)]


def _lists(shapes, device, t_dtype, s_dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    teacher = [torch.randn(s, generator=g, dtype=torch.float64).to(device=device, dtype=t_dtype) for s in shapes]
    student = [torch.randn(s, generator=g, dtype=torch.float64).to(device=device, dtype=s_dtype) for s in shapes]
    return teacher, student


def _assert_lists_close(a, b, tol):
    for i, (x, y) in enumerate(zip(a, b)):
        torch.testing.assert_close(x, y, rtol=tol, atol=tol, msg=lambda m, i=i: f"tensor {i}: {m}")


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("dtypes", list(DTYPE_PAIRS), ids=lambda d: f"{d[0]}-{d[1]}".replace("torch.", ""))
def test_matches_reference(device, dtypes):
    teacher, student = _lists(SHAPES, device, *dtypes)
    expected = [t.clone() for t in teacher]
    OP(teacher, student, 0.93)
    _reference(expected, student, 0.93)
    _assert_lists_close(teacher, expected, DTYPE_PAIRS[dtypes])


@pytest.mark.parametrize("device", devices())
def test_formula_exact_in_float64(device):
    teacher, student = _lists([(5, 9)], device, torch.float64, torch.float64)
    expected = 0.75 * teacher[0] + 0.25 * student[0]
    OP(teacher, student, 0.75)
    torch.testing.assert_close(teacher[0], expected, rtol=1e-15, atol=1e-15)


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("decay", [0.0, 1.0])
def test_decay_endpoints(device, decay):
    teacher, student = _lists([(33,), (4, 4)], device, torch.float32, torch.float32)
    before = [t.clone() for t in teacher]
    OP(teacher, student, decay)
    _assert_lists_close(teacher, student if decay == 0.0 else before, 0.0)


@pytest.mark.parametrize("device", devices())
def test_non_contiguous_and_channels_last(device):
    base_t, base_s = _lists([(6, 10), (2, 3, 5, 7)], device, torch.float32, torch.float32)
    teacher = [base_t[0].t(), base_t[1].to(memory_format=torch.channels_last)]  # transposed; dense NHWC
    student = [base_s[0].t().contiguous(), base_s[1]]  # different strides from the teacher in both
    expected = [t.clone() for t in teacher]
    OP(teacher, student, 0.6)
    _reference(expected, student, 0.6)
    _assert_lists_close(teacher, expected, 1e-6)
    # The update wrote through the views into their bases.
    torch.testing.assert_close(base_t[0].t(), teacher[0])


@pytest.mark.parametrize("device", devices())
def test_many_tensors_and_empty_list(device):
    # More tensors than one CUDA launch holds (48), each spanning several blocks.
    teacher, student = _lists([(40_000 + i,) for i in range(60)], device, torch.float32, torch.float32)
    expected = [t.clone() for t in teacher]
    OP(teacher, student, 0.9)
    _reference(expected, student, 0.9)
    _assert_lists_close(teacher, expected, 1e-6)
    ema_update_([], [], 0.5)  # no-op (the raw op needs a tensor to pick a backend)


@pytest.mark.needs_cuda
def test_cuda_tensor_larger_than_one_launch():
    # 320 blocks x 16384 elements per launch: this tensor spans two launches.
    teacher, student = _lists([(320 * 16384 + 1000,), (7,)], "cuda", torch.float32, torch.float32)
    expected = [t.clone() for t in teacher]
    OP(teacher, student, 0.9)
    _reference(expected, student, 0.9)
    _assert_lists_close(teacher, expected, 1e-6)


@pytest.mark.needs_cuda
def test_cuda_unaligned_views():
    base_t, base_s = _lists([(1001,)], "cuda", torch.float32, torch.bfloat16)
    teacher, student = [base_t[0][1:]], [base_s[0][3:1003]]  # misaligned for vector loads
    expected = [t.clone() for t in teacher]
    OP(teacher, student, 0.8)
    _reference(expected, student, 0.8)
    _assert_lists_close(teacher, expected, 1e-6)


# ---- errors --------------------------------------------------------------------------------------


@pytest.mark.parametrize("impl", ["op", "reference"])
@pytest.mark.parametrize(
    ("teacher", "student", "decay", "match"),
    [
        ([torch.zeros(2)], [], 0.5, r"same number of tensors, got 1 teacher tensors and 0 student tensors"),
        ([torch.zeros(2), torch.zeros(3, 4)], [torch.zeros(2), torch.zeros(4, 3)], 0.5,
         r"student\[1\] must have the shape of teacher\[1\] \[3, 4\], got \[4, 3\]"),
        ([torch.zeros(2, dtype=torch.int64)], [torch.zeros(2)], 0.5, r"teacher\[0\] must be float16, bfloat16, float32 or float64, got Long"),
        ([torch.zeros(2)], [torch.zeros(2, dtype=torch.int32)], 0.5, r"student\[0\] must be float16, .* got Int"),
        ([torch.zeros(2)], [torch.zeros(2)], 1.5, r"decay must be in \[0, 1\], got 1.5"),
    ],
)
def test_errors_name_the_tensor(impl, teacher, student, decay, match):
    fn = OP if impl == "op" else _reference
    with pytest.raises(RuntimeError, match=match.replace("Long", "(torch.)?int64").replace("Int", "(torch.)?int32")):
        fn(teacher, student, decay)


@pytest.mark.needs_cuda
def test_error_device_mismatch():
    with pytest.raises(RuntimeError, match=r"student\[0\] must be on the device of teacher\[0\]"):
        OP([torch.zeros(2, device="cuda")], [torch.zeros(2)], 0.5)


def test_wrapper_argument_errors():
    with pytest.raises(TypeError, match="both be nn.Module or both be sequences"):
        ema_update_(nn.Linear(2, 2), [torch.zeros(2)], 0.5)
    with pytest.raises(TypeError, match=r"student\[1\] must be a Tensor, got str"):
        ema_update_([torch.zeros(1), torch.zeros(1)], [torch.zeros(1), "x"], 0.5)
    with pytest.raises(ValueError, match=r"decay must be a float in \[0, 1\], got -0.1"):
        ema_update_([torch.zeros(1)], [torch.zeros(1)], -0.1)


# ---- module path ---------------------------------------------------------------------------------


def _net() -> nn.Module:
    return nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 2, 1))


@pytest.mark.parametrize("device", devices())
def test_module_update_params_and_buffers(device):
    torch.manual_seed(0)
    student = _net().to(device)
    teacher = copy.deepcopy(student)
    with torch.no_grad():
        for p in student.parameters():
            p.add_(torch.randn_like(p))
    student(torch.randn(2, 1, 8, 8, device=device))  # moves BN running stats and num_batches_tracked
    expected = {k: v.clone() for k, v in teacher.state_dict().items()}
    s_state = student.state_dict()
    for k, v in expected.items():
        expected[k] = s_state[k].clone() if not v.is_floating_point() else 0.9 * v + 0.1 * s_state[k]
    ema_update_(teacher, student, 0.9)
    for k, v in teacher.state_dict().items():
        torch.testing.assert_close(v, expected[k], rtol=1e-6, atol=1e-6, msg=lambda m, k=k: f"{k}: {m}")
    assert teacher[1].num_batches_tracked.item() == 1


def test_module_update_without_buffers():
    student, teacher = _net(), _net()
    student(torch.randn(2, 1, 8, 8))
    before = {k: v.clone() for k, v in teacher.named_buffers()}
    expected_w = 0.5 * teacher[0].weight.detach() + 0.5 * student[0].weight.detach()
    ema_update_(teacher, student, 0.5, include_buffers=False)
    torch.testing.assert_close(teacher[0].weight.detach(), expected_w, rtol=1e-6, atol=1e-6)
    for k, v in teacher.named_buffers():
        torch.testing.assert_close(v, before[k], rtol=0, atol=0)  # untouched buffers: exact


def test_module_fp32_teacher_follows_bf16_student():
    torch.manual_seed(0)
    student = _net().to(torch.bfloat16)
    teacher = _net()
    t_before = {k: v.clone() for k, v in teacher.state_dict().items()}
    ema_update_(teacher, student, 0.99)
    for (k, t), s in zip(teacher.state_dict().items(), student.state_dict().values()):
        if t.is_floating_point():
            assert t.dtype == torch.float32
            torch.testing.assert_close(t, 0.99 * t_before[k] + 0.01 * s.float(), rtol=1e-6, atol=1e-6)


def test_module_cache_follows_replaced_buffers_and_params():
    torch.manual_seed(0)
    student = _net()
    teacher = copy.deepcopy(student)
    ema_update_(teacher, student, 0.5)  # builds and caches the lists
    # .double() replaces buffer objects without any hook; parameters keep their objects.
    student.double()
    teacher.double()
    ema_update_(teacher, student, 0.5)
    assert teacher[1].running_var.dtype == torch.float64
    # Replacing a parameter object invalidates the cache too.
    teacher[3].weight = nn.Parameter(torch.zeros_like(teacher[3].weight))
    ema_update_(teacher, student, 0.5)
    torch.testing.assert_close(teacher[3].weight, 0.5 * student[3].weight)


def test_module_stale_shape_raises():
    student, teacher = _net(), _net()
    ema_update_(teacher, student, 0.5)
    teacher[3].weight.data = torch.zeros(5, 4, 1, 1)  # same object, new shape: the kernel re-checks
    with pytest.raises(RuntimeError, match=r"must have the shape of teacher\[\d+\] \[5, 4, 1, 1\]"):
        ema_update_(teacher, student, 0.5)


def test_module_mismatch_errors_name_the_parameter():
    with pytest.raises(ValueError, match=r"parameter '0.weight' has shape \(4, 1, 3, 3\) in teacher but \(4, 1, 5, 5\)"):
        ema_update_(_net(), nn.Sequential(nn.Conv2d(1, 4, 5), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 2, 1)), 0.5)
    with pytest.raises(ValueError, match=r"same parameters; missing in student: \['3.bias', '3.weight'\]"):
        ema_update_(_net(), nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4)), 0.5)


def test_params_requiring_grad_are_updated_without_autograd():
    student, teacher = _net(), _net()
    assert all(p.requires_grad for p in teacher.parameters())
    ema_update_(teacher, student, 0.5)  # in-place on leaves that require grad: must not raise
    ema_update_(list(teacher.parameters()), list(student.parameters()), 0.5)
    assert teacher[0].weight.grad_fn is None


# ---- ema_decay -----------------------------------------------------------------------------------


def test_ema_decay_warmup_rule():
    assert ema_decay(0, 0.99) == 0.0
    assert ema_decay(1, 0.99) == 0.5
    assert ema_decay(9, 0.99) == pytest.approx(0.9)
    assert ema_decay(10_000, 0.99) == 0.99
    with pytest.raises(ValueError, match=r"step must be an int >= 0, got -1"):
        ema_decay(-1, 0.99)
    with pytest.raises(ValueError, match=r"decay must be in \[0, 1\], got 2"):
        ema_decay(3, 2)


# ---- op contract: opcheck, torch.compile, fallback ----------------------------------------------


@pytest.mark.parametrize("device", devices())
def test_opcheck(device):
    teacher, student = _lists([(3, 5), (17,), ()], device, torch.float32, torch.float32)
    torch.library.opcheck(OP, (teacher, student, 0.7))
    teacher, student = _lists([(4,)], device, torch.float32, torch.bfloat16)
    torch.library.opcheck(OP, (teacher, student, 0.7))


@pytest.mark.parametrize("device", devices())
def test_torch_compile_fullgraph_matches_eager(device):
    teacher, student = _lists([(9, 4), (130,)], device, torch.float32, torch.float32)
    expected = [t.clone() for t in teacher]

    @torch.compile(fullgraph=True, dynamic=False)
    def step(ts, ss):
        torch.ops.sslseg.ema_update_(ts, ss, 0.8)
        return ts[0].sum()

    step(teacher, student)
    _reference(expected, student, 0.8)
    _assert_lists_close(teacher, expected, 1e-6)


def test_fallback_warns_once_then_uses_reference(monkeypatch):
    monkeypatch.setattr(_loader, "_load", lambda: (False, "ImportError: simulated"))
    monkeypatch.delenv("SSLSEG_OPS", raising=False)  # the automatic rule, not a forced backend
    monkeypatch.setenv("SSLSEG_REQUIRE_OPS", "0")
    _loader._warn_fallback_once.cache_clear()
    teacher, student = _lists([(5,)], "cpu", torch.float32, torch.float32)
    expected = [t.clone() for t in teacher]
    with pytest.warns(RuntimeWarning, match="compiled operators unavailable"):
        ema_update_(teacher, student, 0.5)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ema_update_(teacher, student, 0.5)  # second call: no second warning
    _reference(expected, student, 0.5)
    _reference(expected, student, 0.5)
    _assert_lists_close(teacher, expected, 1e-6)
    # The module path falls back too.
    t_mod, s_mod = _net(), _net()
    ema_update_(t_mod, s_mod, 0.0)
    torch.testing.assert_close(t_mod[0].weight, s_mod[0].weight)
    _loader._warn_fallback_once.cache_clear()


def test_require_ops_env_makes_missing_build_an_error(monkeypatch):
    monkeypatch.setattr(_loader, "_load", lambda: (False, "ImportError: simulated"))
    monkeypatch.delenv("SSLSEG_OPS", raising=False)  # the automatic rule, not a forced backend
    monkeypatch.setenv("SSLSEG_REQUIRE_OPS", "1")
    with pytest.raises(RuntimeError, match=r"(?s)could not be loaded.*ImportError: simulated.*pip install"):
        ema_update_([torch.zeros(1)], [torch.zeros(1)], 0.5)


def test_every_op_has_a_cpu_kernel_and_build_info():
    assert "sslseg::ema_update_" in sslseg.ops.list_ops()
    assert sslseg.ops.missing_kernels("CPU") == []
    info = sslseg.ops.build_info()
    assert info["cuda"] in ("0", "1")
    if info["cuda"] == "1":
        assert sslseg.ops.missing_kernels("CUDA") == []
