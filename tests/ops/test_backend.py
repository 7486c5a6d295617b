"""The one dispatch rule of the ops: ``sslseg.ops.backend()``, ``set_backend`` and ``SSLSEG_OPS``.

The safety valve (``SSLSEG_OPS=reference`` or ``set_backend("reference")``) must send every op
to its pure-PyTorch twin, on every device, with the compiled op's results within the op tests'
tolerances.
"""

from __future__ import annotations

import copy
import importlib
import warnings

import pytest
import torch
from torch import nn

import sslseg.ops
from sslseg.inference import sliding_window, window_grid
from sslseg.ops import _loader
from tests.devices import devices

# The op modules (``sslseg.ops.edt`` the attribute is the function, hence import_module).
edt_module = importlib.import_module("sslseg.ops.edt")
ema_module = importlib.import_module("sslseg.ops.ema")
mc_module = importlib.import_module("sslseg.ops.mc_uncertainty")
sw_module = importlib.import_module("sslseg.ops.sliding_window")


@pytest.fixture(autouse=True)
def _automatic(monkeypatch):
    """Each test starts from the automatic rule (the suite may run under SSLSEG_OPS=reference)."""
    monkeypatch.delenv("SSLSEG_OPS", raising=False)
    monkeypatch.setattr(_loader, "_forced", None)


def _spy(monkeypatch, module, names: tuple[str, ...]) -> list[str]:
    """Record the calls of ``module``'s reference twins ``names`` (they still run)."""
    calls: list[str] = []
    for name in names:
        original = getattr(module, name)

        def wrapper(*args, _name=name, _original=original, **kwargs):
            calls.append(_name)
            return _original(*args, **kwargs)

        monkeypatch.setattr(module, name, wrapper)
    return calls


# Each op: a call on fresh inputs (returns what to compare), its module, its twins, the tolerance.
def _edt(device):
    g = torch.Generator().manual_seed(0)
    mask = (torch.rand((2, 9, 7, 5), generator=g) < 0.7).to(device)
    return [sslseg.ops.edt(mask, (1.0, 1.0, 1.0)), sslseg.ops.edt(mask, (2.0, 1.0, 0.5))]


def _ema_lists(device):
    g = torch.Generator().manual_seed(1)
    teacher = [torch.randn(s, generator=g).to(device) for s in ((3, 5), (17,))]
    student = [torch.randn(s, generator=g).to(device) for s in ((3, 5), (17,))]
    sslseg.ops.ema_update_(teacher, student, 0.7)
    return teacher


def _ema_module(device):
    torch.manual_seed(2)
    student = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4)).to(device)
    teacher = copy.deepcopy(student)
    with torch.no_grad():
        for p in student.parameters():
            p.add_(1.0)
    sslseg.ops.ema_update_(teacher, student, 0.9)
    return [t.detach() for t in teacher.state_dict().values() if t.is_floating_point()]


def _mc(device):
    g = torch.Generator().manual_seed(3)
    passes = [(4 * torch.randn((2, 3, 6, 5), generator=g)).to(device) for _ in range(3)]
    return list(sslseg.ops.predictive_entropy(passes, normalize=True))


def _sw(device):
    g = torch.Generator().manual_seed(4)
    vol = torch.randn((1, 2, 9, 8, 6), generator=g).to(device)
    grid = window_grid([9, 8, 6], [5, 4, 4], 0.5)
    windows = sslseg.ops.sw_gather(vol, grid.roi_size, grid.flat_starts, grid.counts, 0, grid.num_windows)
    out = torch.empty_like(vol)
    sslseg.ops.sw_accumulate_(out, windows * 2.0, grid.flat_starts, grid.counts, 0, softmax=True)
    return [windows, out]


OPS = {
    "edt": (_edt, edt_module, ("_reference",), 3e-7),
    "ema_lists": (_ema_lists, ema_module, ("_reference",), 1e-6),
    "ema_module": (_ema_module, ema_module, ("_reference",), 1e-6),
    "mc_uncertainty": (_mc, mc_module, ("_reference_accumulate", "_reference_finalize"), 1e-5),
    "sliding_window": (_sw, sw_module, ("_reference_gather", "_reference_accumulate"), 1e-5),
}


def test_automatic_rule_picks_the_compiled_ops():
    assert sslseg.ops.has_ops()
    assert sslseg.ops.backend() == "compiled"


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("op", list(OPS))
@pytest.mark.parametrize("how", ["set_backend", "environment"])
def test_forced_reference_runs_the_twins_with_the_compiled_results(op, how, device, monkeypatch):
    run, module, twins, tol = OPS[op]
    calls = _spy(monkeypatch, module, twins)
    compiled = run(device)
    assert calls == [], f"{op}: the automatic rule must use the compiled op, but ran {calls}"
    if how == "set_backend":
        sslseg.ops.set_backend("reference")
    else:
        monkeypatch.setenv("SSLSEG_OPS", "reference")
    assert sslseg.ops.backend() == "reference"
    reference = run(device)
    assert set(calls) == set(twins), f"{op}: forced reference ran {calls}, expected every one of {twins}"
    for got, want in zip(reference, compiled):
        torch.testing.assert_close(got, want, rtol=tol, atol=tol)


def test_set_backend_wins_over_the_environment_and_none_restores_it(monkeypatch):
    monkeypatch.setenv("SSLSEG_OPS", "reference")
    assert sslseg.ops.backend() == "reference"
    sslseg.ops.set_backend("compiled")
    assert sslseg.ops.backend() == "compiled"
    sslseg.ops.set_backend(None)
    assert sslseg.ops.backend() == "reference"
    monkeypatch.setenv("SSLSEG_OPS", " Compiled ")
    assert sslseg.ops.backend() == "compiled"
    monkeypatch.setenv("SSLSEG_OPS", "auto")
    assert sslseg.ops.backend() == "compiled"


def test_bad_values_are_errors(monkeypatch):
    with pytest.raises(ValueError, match=r"set_backend: name must be one of \['compiled', 'reference'\] or None, "
                                         r"got 'cuda'"):
        sslseg.ops.set_backend("cuda")
    assert sslseg.ops.backend() == "compiled"  # the bad value changed nothing
    monkeypatch.setenv("SSLSEG_OPS", "fast")
    with pytest.raises(ValueError, match=r"environment variable SSLSEG_OPS must be one of \['compiled', 'reference'\], "
                                         r"'auto' or unset, got 'fast'"):
        sslseg.ops.backend()
    with pytest.raises(ValueError, match="SSLSEG_OPS must be one of"):
        sslseg.ops.edt(torch.ones(3, 3, dtype=torch.bool))  # every op follows the same rule
    monkeypatch.delenv("SSLSEG_OPS")
    vol = torch.zeros(1, 1, 4, 4)
    with pytest.raises(ValueError, match=r"backend must be one of \['compiled', 'reference'\] or None, got 'ref'"):
        sslseg.ops.sw_gather(vol, [2, 2], [0, 2, 0, 2], [2, 2], 0, 4, backend="ref")


def test_missing_extension(monkeypatch):
    monkeypatch.setattr(_loader, "_load", lambda: (False, "ImportError: simulated"))
    monkeypatch.setenv("SSLSEG_REQUIRE_OPS", "1")
    with pytest.raises(RuntimeError, match="could not be loaded"):
        sslseg.ops.backend()  # required and missing: an error, as an op call would raise
    with pytest.raises(RuntimeError, match="could not be loaded"):
        sslseg.ops.set_backend("compiled")
    # The safety valve needs no extension, and asks for none even under SSLSEG_REQUIRE_OPS=1.
    monkeypatch.setenv("SSLSEG_OPS", "reference")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert sslseg.ops.backend() == "reference"
        mask = torch.zeros(5, 6, dtype=torch.bool)
        mask[1:4, 2:5] = True
        assert float(sslseg.ops.edt(mask).max()) == 2.0


def test_sliding_window_follows_the_rule(monkeypatch):
    """``sliding_window(use_ops=None)`` dispatches through the rule; use_ops=True/False stay explicit."""
    calls = _spy(monkeypatch, sw_module, ("_reference_gather", "_reference_accumulate"))
    net = nn.Conv3d(2, 3, 1)
    vol = torch.randn(1, 2, 11, 9, 7)
    with torch.no_grad():
        compiled = sliding_window(net, vol, (6, 5, 4), sw_batch_size=3, activation="softmax")
        assert calls == []
        sslseg.ops.set_backend("reference")
        reference = sliding_window(net, vol, (6, 5, 4), sw_batch_size=3, activation="softmax")
        assert {"_reference_gather", "_reference_accumulate"} <= set(calls)
        calls.clear()
        explicit = sliding_window(net, vol, (6, 5, 4), sw_batch_size=3, activation="softmax", use_ops=True)
        assert calls == []  # an explicit choice for this call wins over the forced backend
    torch.testing.assert_close(reference, compiled, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(explicit, compiled, rtol=0, atol=0)


def test_torch_compile_follows_a_forced_reference(monkeypatch):
    calls = _spy(monkeypatch, edt_module, ("_reference",))
    sslseg.ops.set_backend("reference")
    mask = torch.rand(2, 6, 9, 5, generator=torch.Generator().manual_seed(5)) < 0.7

    def f(m):
        return sslseg.ops.edt(m, (2.0, 1.0, 0.5))

    eager_reference = f(mask)
    compiled = torch.compile(f, dynamic=False)(mask)
    assert calls, "the reference twin was not used"
    sslseg.ops.set_backend(None)
    torch.testing.assert_close(compiled, eager_reference, rtol=3e-7, atol=0)
    torch.testing.assert_close(compiled, f(mask), rtol=3e-7, atol=0)


def test_window_origin():
    grid = window_grid([9, 8, 6], [5, 4, 4], 0.5)
    per_batch = grid.num_windows
    seen = []
    for w in range(2 * per_batch):
        b, start = sw_module.window_origin(grid.flat_starts, grid.counts, w)
        assert b == w // per_batch
        seen.append(tuple(start))
    # C order over the per-dimension starts, last dimension fastest, then the next batch element.
    expected = [(a, c, d) for a in grid.starts[0] for c in grid.starts[1] for d in grid.starts[2]]
    assert seen == expected * 2
    with pytest.raises(ValueError, match="window_origin: window must be >= 0, got -1"):
        sw_module.window_origin(grid.flat_starts, grid.counts, -1)
    with pytest.raises(RuntimeError, match=r"window_origin: starts must hold sum\(counts\) = 8 entries, got 2"):
        sw_module.window_origin([0, 1], grid.counts, 0)


def test_sslseg_ops_command_shows_the_backend(monkeypatch, capsys):
    from sslseg.app.cli import main

    monkeypatch.setenv("SSLSEG_OPS", "reference")
    assert main(["ops"]) == 0
    assert "ops run on: reference" in capsys.readouterr().out
    monkeypatch.setenv("SSLSEG_OPS", "gpu")
    assert main(["ops"]) == 2  # one clean line, no traceback
    assert "sslseg ops: error: environment variable SSLSEG_OPS must be one of" in capsys.readouterr().err
