"""The output contract, geometry, parameter counts and numerics of every segmentation network.

Parametrised over ``list_models(task="segmentation")``: a newly registered network is tested
automatically (and must add a ``cases.CASES`` entry). The per-model tests share a module-scoped,
parametrised fixture, so pytest runs all of them for one network before building the next: each
network is built once and copied per test.
"""

from __future__ import annotations

import copy

import pytest
import torch

from sslseg.models import SegmentationModel, create_model, list_models, model_info
from tests.devices import devices
from tests.models.cases import CASES, PARAM_COUNTS, build, count_parameters, example_input

SEGMENTATION = list_models(task="segmentation")
IN_CHANNELS, NUM_CLASSES = 2, 3


@pytest.fixture(scope="module", params=SEGMENTATION)
def built(request) -> tuple[str, SegmentationModel]:
    """(name, model with its light options); tests copy it before changing any state.

    The default architectures are exercised by the parameter counts and by test_export.py.
    """
    name = request.param
    return name, build(name, IN_CHANNELS, NUM_CLASSES, light=True)


def _check_outputs(model: SegmentationModel, outputs: dict, batch: int, size: tuple[int, ...]) -> None:
    assert tuple(outputs) == model.output_keys
    expected = (batch, NUM_CLASSES, *size)
    assert outputs["logits"].shape == expected
    if "aux" in outputs:
        assert isinstance(outputs["aux"], list) and len(outputs["aux"]) >= 1
        for aux in outputs["aux"]:
            assert aux.shape == expected
    if "sdf" in outputs:
        sdf = outputs["sdf"]
        assert sdf.shape[:1] + sdf.shape[2:] == (batch, *size) and sdf.shape[1] >= 1
        assert sdf.abs().max() <= 1.0


def test_every_model_has_a_case():
    assert set(SEGMENTATION) == set(CASES), "add an entry to tests/models/cases.py::CASES for each new model"
    counted = {row[0] for row in PARAM_COUNTS}
    assert set(list_models()) <= counted, "pin the parameter count of each new model in PARAM_COUNTS"


def test_geometry_attributes(built):
    name, model = built
    assert isinstance(model, SegmentationModel)
    assert model.dim == model_info(name).dim
    assert len(model.size_divisor) == model.dim and all(d >= 1 for d in model.size_divisor)
    assert (model.in_channels, model.num_classes) == (IN_CHANNELS, NUM_CLASSES)
    assert model.output_keys[0] == "logits"
    if model.input_size is not None:
        assert len(model.input_size) == model.dim
        assert all(s % d == 0 for s, d in zip(model.input_size, model.size_divisor))


def test_train_step(built):
    """Train mode: forward is the main logits at the input size, forward_all has the documented
    keys and shapes, and one loss over all outputs reaches every parameter (no dead heads)."""
    name, light = built
    model = copy.deepcopy(light).train()
    for size in CASES[name].sizes:
        x = example_input(name, size, batch=2, in_channels=IN_CHANNELS)
        logits = model(x)
        assert isinstance(logits, torch.Tensor) and logits.shape == (2, NUM_CLASSES, *size)
        outputs = model.forward_all(x)
        _check_outputs(model, outputs, 2, size)
    model.zero_grad()
    loss = outputs["logits"].float().square().mean()
    for aux in outputs.get("aux", []):
        loss = loss + aux.float().square().mean()
    if "sdf" in outputs:
        loss = loss + outputs["sdf"].float().square().mean()
    loss.backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None]
    assert not missing, f"parameters without gradient: {missing}"
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())


def test_unsupported_size_is_a_clear_error(built):
    name, model = built
    bad = CASES[name].bad_size
    x = example_input(name, bad or CASES[name].sizes[0], batch=1, in_channels=IN_CHANNELS)
    if bad is None:  # every size works (no downsampling): nothing to reject
        assert model.size_divisor == (1,) * model.dim and model.input_size is None
        return
    expected = "img_size" if model.input_size is not None else "multiple of"
    with pytest.raises(ValueError, match=expected):
        model(x)
    with pytest.raises(ValueError, match=expected):
        model.forward_all(x)


def test_eval_contract(built):
    """Eval mode is deterministic (training-only perturbations are off) and forward == logits;
    bfloat16 autocast and channels_last / channels_last_3d give the same contract."""
    name, light = built
    model = copy.deepcopy(light).eval()
    size = CASES[name].sizes[0]
    x = example_input(name, size, batch=1, in_channels=IN_CHANNELS)
    with torch.no_grad():
        first = model.forward_all(x)
        torch.manual_seed(123)  # a different RNG state must not matter
        second = model.forward_all(x)
        plain = model(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low = model.forward_all(x)
        fmt = torch.channels_last if x.dim() == 4 else torch.channels_last_3d
        last = model.to(memory_format=fmt)(x.contiguous(memory_format=fmt))
    _check_outputs(model, first, 1, size)
    # The same kernels on the same input in eval mode (no RNG use): bit-equal by construction.
    assert torch.equal(first["logits"], second["logits"])
    assert torch.equal(first["logits"], plain)
    for a, b in zip(first.get("aux", []), second.get("aux", [])):
        assert torch.equal(a, b)
    _check_outputs(model, low, 1, size)
    assert torch.isfinite(low["logits"].float()).all()
    # A layout change reorders float sums; InstanceNorm over few voxels amplifies that a little.
    torch.testing.assert_close(last, plain, rtol=1e-3, atol=1e-3)


def test_seeded_initialisation(built):
    name, light = built
    state_before = torch.get_rng_state()
    again = build(name, IN_CHANNELS, NUM_CLASSES, seed=0, light=True)
    assert torch.equal(torch.get_rng_state(), state_before), "seed= must not touch the global RNG"
    reference = light.state_dict()
    assert all(torch.equal(reference[k], v) for k, v in again.state_dict().items())  # same seed, same draws


def test_different_seeds_differ():
    a = create_model("unet", 1, 2, seed=0).state_dict()
    b = create_model("unet", 1, 2, seed=1).state_dict()
    assert not torch.equal(a["decoder.out_conv.weight"], b["decoder.out_conv.weight"])


@pytest.mark.parametrize(
    "name, in_channels, num_classes, options, expected, ssl4mis",
    PARAM_COUNTS,
    ids=[f"{r[0]}-in{r[1]}-c{r[2]}{'-opts' if r[3] else ''}" for r in PARAM_COUNTS],
)
def test_parameter_count(name, in_channels, num_classes, options, expected, ssl4mis):
    model = create_model(name, in_channels, num_classes, **options)
    assert count_parameters(model) == expected


@pytest.mark.parametrize("name", ["unet", "unet_3d"])
def test_wrong_rank_or_channels_is_a_clear_error(name):
    model = build(name).eval()
    size = CASES[name].sizes[0]
    with pytest.raises(ValueError, match="spatial axes"):
        model(torch.zeros(1, 1, *size[:-1]))
    with pytest.raises(ValueError, match=rf"^{name}: input must have 1 channel"):  # named as registered
        model(torch.zeros(1, 2, *size))


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("name", ["unet", "unet_3d", "swin_unet"])
def test_runs_on_device(name, device):
    model = build(name, light=True).to(device).eval()
    x = example_input(name, CASES[name].export_size, batch=1).to(device)
    with torch.no_grad():
        out = model(x)
    assert out.device.type == device
    assert out.shape == (1, 3, *CASES[name].export_size)


@pytest.mark.parametrize("name", ["unet_urpc", "unet_cct"])
def test_perturbations_act_in_training_only(name):
    # Without encoder dropout the main output depends on the mode only through BatchNorm, so any
    # train-mode randomness left in the auxiliary outputs comes from the perturbations.
    model = build(name, dropout=(0.0,) * 5).train()
    x = example_input(name, (32, 32), batch=2)
    with torch.no_grad():
        torch.manual_seed(0)
        a = model.forward_all(x)
        torch.manual_seed(1)
        b = model.forward_all(x)
        main = model(x)
    torch.testing.assert_close(a["logits"], b["logits"])
    torch.testing.assert_close(a["logits"], main)
    assert any(not torch.allclose(u, v) for u, v in zip(a["aux"], b["aux"]))


def test_vnet_sdf_head():
    x = example_input("vnet_sdf", (16, 16, 16), batch=1)
    model = build("vnet_sdf", num_classes=3).eval()
    assert model.output_keys == ("logits", "sdf")
    with torch.no_grad():
        assert model.forward_all(x)["sdf"].shape == (1, 2, 16, 16, 16)  # one map per foreground class
        assert build("vnet_sdf", sdf_channels=1).eval().forward_all(x)["sdf"].shape[1] == 1
    with pytest.raises(ValueError, match="sdf_channels must be >= 1, got 0"):
        build("vnet_sdf", sdf_channels=0)


def test_compiles_without_graph_breaks():
    """``torch.compile(fullgraph=True)`` captures forward_all with the training-only perturbations
    (every network does; checked here for the one with the most Python-level branching)."""
    model = build("unet_urpc", IN_CHANNELS, NUM_CLASSES).train()
    x = example_input("unet_urpc", (32, 32), batch=2, in_channels=IN_CHANNELS)
    compiled = torch.compile(model.forward_all, backend="eager", fullgraph=True)
    outputs = compiled(x)
    _check_outputs(model, outputs, 2, (32, 32))
