"""Every registered method x every dimension it supports: a few CPU steps on tiny synthetic data."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from sslseg.engine import EngineConfig, Trainer
from sslseg.methods import SSLMethod, get_method, list_methods

TINY = {2: "synthetic:acdc?cases=6&slices=2&size=32", 3: "synthetic:la?cases=5&size=32"}
TINY_PATCH = {2: [32, 32], 3: [32, 32, 32]}
STEPS = 3

CASES = [(name, dim) for name in list_methods() for dim in get_method(name).dims]


def _trainer(name: str, dim: int, tmp_path, **engine) -> Trainer:
    cls = get_method(name)
    eng = EngineConfig(data=TINY[dim], labeled=2, iterations=STEPS, batch_size=4, labeled_bs=2, val_every=STEPS,
                       log_every=1, patch_size=TINY_PATCH[dim], progress=False, **engine)
    return Trainer(cls, eng, out_dir=tmp_path / f"{name}{dim}")


def _params(module: torch.nn.Module) -> list[torch.Tensor]:
    return [p.detach().clone() for p in module.parameters()]


@pytest.mark.parametrize(("name", "dim"), CASES, ids=[f"{n}-{d}d" for n, d in CASES])
def test_method_trains_a_few_steps(name, dim, tmp_path):
    trainer = _trainer(name, dim, tmp_path)
    method: SSLMethod = trainer.method
    assert isinstance(method.Config(), method.Config) and dataclasses.is_dataclass(method.Config)
    assert method.paper, f"{name}: the class must cite its paper"
    assert type(method).__doc__ and len(type(method).__doc__) > 80, f"{name}: document the method and its loss"
    before = {k: _params(v) for k, v in method.nets.items()}
    teachers_before = {k: _params(v) for k, v in method.teachers.items()}
    run = trainer.run()
    # Finite logged losses with the documented keys.
    row = run.history[-1]
    for key in ("loss", *method.log_keys):
        assert key in row, f"{name}: log key {key!r} missing from {sorted(row)}"
        assert math.isfinite(row[key]), f"{name}: {key} = {row[key]}"
    # Every trained network changed.
    for k, net in method.nets.items():
        changed = any(not torch.equal(a, b) for a, b in zip(before[k], net.parameters()))
        assert changed, f"{name}: network {k!r} did not change"
    # Teachers carry no gradient and moved.
    for k, net in method.teachers.items():
        assert all(not p.requires_grad and p.grad is None for p in net.parameters()), f"{name}: teacher {k} has grads"
        moved = any(not torch.equal(a, b) for a, b in zip(teachers_before[k], net.parameters()))
        assert moved, f"{name}: teacher {k!r} did not move"
    assert run.metrics["best_val"] is not None and 0.0 <= run.metrics["best_val"]["dice"] <= 1.0
    # The eval network follows the output contract on a patch.
    x = torch.randn(1, 1, *TINY_PATCH[dim])
    with torch.no_grad():
        assert run.model(x).shape == (1, trainer.spec.num_classes, *TINY_PATCH[dim])


class _Killed(Exception):
    pass


@pytest.mark.parametrize(("name", "dim"), CASES, ids=[f"{n}-{d}d" for n, d in CASES])
def test_method_is_reproducible_and_resumes_exactly(name, dim, tmp_path, monkeypatch):
    """Same seed -> same losses; a run killed after its step-2 checkpoint resumes to the same losses."""
    from sslseg.engine import fit

    opts = dict(batch_size=4, labeled_bs=2, val_every=2, log_every=1, patch_size=TINY_PATCH[dim], progress=False,
                deterministic=True)
    full = fit(name, TINY[dim], labeled=2, iterations=4, out_dir=tmp_path / "full", engine_options=opts)

    cls = get_method(name)
    original = cls.after_step

    def killed_at_step_3(self, ctx):
        if ctx.step == 2:  # zero-based: the 3rd step, after the checkpoint written at the end of step 2
            raise _Killed
        original(self, ctx)

    monkeypatch.setattr(cls, "after_step", killed_at_step_3)
    with pytest.raises(_Killed):
        fit(name, TINY[dim], labeled=2, iterations=4, out_dir=tmp_path / "killed", engine_options=opts)
    monkeypatch.setattr(cls, "after_step", original)
    resumed = fit(name, resume=tmp_path / "killed")
    assert [h["step"] for h in resumed.history] == [1, 2, 3, 4]
    # Steps 1-2 ran in the killed run (same seed -> same losses), steps 3-4 after the resume.
    assert [h["loss"] for h in resumed.history] == [h["loss"] for h in full.history], f"{name}: not reproducible"
