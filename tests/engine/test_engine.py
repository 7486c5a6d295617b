"""The engine: schedules, configs, checkpoints, runs, validation."""

from __future__ import annotations

import json
import math

import pytest
import torch
import yaml

from sslseg.engine import EngineConfig, Run, fit, poly_lr, sigmoid_rampup
from sslseg.engine.checkpoint import capture_rng, load_checkpoint, restore_rng, save_checkpoint
from sslseg.engine.config import parse_set
from sslseg.methods import get_method, list_methods
from sslseg.losses.segmentation import dice_loss, supervised_loss

TINY = "synthetic:acdc?cases=6&slices=2&size=32"
OPTS = dict(batch_size=4, labeled_bs=2, val_every=2, log_every=1, patch_size=[32, 32], progress=False)


def test_schedules():
    assert sigmoid_rampup(0, 0) == 1.0
    assert sigmoid_rampup(0, 100) == pytest.approx(math.exp(-5))
    assert sigmoid_rampup(100, 100) == 1.0 and sigmoid_rampup(500, 100) == 1.0
    assert poly_lr(0.01, 0, 100) == 0.01
    assert poly_lr(0.01, 50, 100) == pytest.approx(0.01 * 0.5**0.9)
    assert poly_lr(0.01, 100, 100) == 0.0
    with pytest.raises(ValueError, match="length must be >= 0"):
        sigmoid_rampup(1, -1)


def test_dice_loss_matches_definition():
    probs = torch.softmax(torch.randn(2, 3, 5, 4), 1)
    target = torch.randint(0, 3, (2, 5, 4))
    onehot = torch.nn.functional.one_hot(target, 3).permute(0, 3, 1, 2).float()
    expected = torch.stack([1 - (2 * (probs[:, c] * onehot[:, c]).sum() + 1e-5) /
                            ((probs[:, c] ** 2).sum() + (onehot[:, c] ** 2).sum() + 1e-5) for c in range(3)]).mean()
    torch.testing.assert_close(dice_loss(probs, target), expected)
    perfect = onehot.clone()
    assert dice_loss(perfect, target).item() == pytest.approx(0.0, abs=1e-6)
    with pytest.raises(ValueError, match=r"target must be \(B, \*spatial\)"):
        supervised_loss(torch.randn(2, 3, 5, 4), torch.zeros(2, 4, 5, dtype=torch.long))


def test_unknown_method_and_options_errors(tmp_path):
    with pytest.raises(ValueError, match="unknown method 'mean_teachr'. Did you mean 'mean_teacher'"):
        get_method("mean_teachr")
    with pytest.raises(TypeError, match=r"unknown option\(s\) 'ema_decy' \(did you mean 'ema_decay'\?\); accepted: .*consistency"):
        fit("mean_teacher", TINY, labeled=2, iterations=1, out_dir=tmp_path, ema_decy=0.9)
    with pytest.raises(TypeError, match=r"unknown option\(s\) 'bach_size' \(did you mean 'batch_size'\?\)"):
        fit("supervised", TINY, labeled=2, iterations=1, out_dir=tmp_path, engine_options={"bach_size": 2})
    with pytest.raises(ValueError, match="iterations must be an int > 0, got 0"):
        EngineConfig(iterations=0)
    with pytest.raises(ValueError, match="amp='fp16' needs a CUDA device"):
        fit("supervised", TINY, labeled=2, iterations=1, out_dir=tmp_path, amp="fp16", device="cpu")


def test_parse_set_routes_and_types():
    eng, meth = parse_set(["iterations=5", "base_lr=1", "ema_decay=0.9", "patch_size=[48, 48]"], EngineConfig(),
                          get_method("mean_teacher").Config())
    assert eng == {"iterations": 5, "base_lr": 1.0, "patch_size": [48, 48]} and isinstance(eng["base_lr"], float)
    assert meth == {"ema_decay": 0.9}
    with pytest.raises(TypeError, match="unknown option 'emadecay'"):
        parse_set(["emadecay=1"], EngineConfig(), get_method("mean_teacher").Config())


def test_checkpoint_atomic_and_weights_only(tmp_path):
    path = tmp_path / "c.pt"
    save_checkpoint({"a": torch.ones(2), "rng": capture_rng()}, path)
    state = load_checkpoint(path)
    assert torch.equal(state["a"], torch.ones(2))
    assert not list(tmp_path.glob(".*tmp*")), "temporary file left behind"
    restore_rng(state["rng"])
    x = torch.rand(3)
    restore_rng(state["rng"])
    assert torch.equal(torch.rand(3), x)


def test_fit_writes_a_complete_run_dir(tmp_path):
    run = fit("mean_teacher", TINY, labeled=2, iterations=4, out_dir=tmp_path / "r", engine_options=OPTS)
    for f in ("config.yaml", "split.json", "history.jsonl", "metrics.json", "best_val.pt", "last.pt"):
        assert (run.dir / f).is_file(), f
    cfg = yaml.safe_load((run.dir / "config.yaml").read_text())
    assert cfg["method_name"] == "mean_teacher" and cfg["engine"]["iterations"] == 4 and cfg["method"]["ema_decay"] == 0.99
    metrics = json.loads((run.dir / "metrics.json").read_text())
    assert metrics["last"]["step"] == 4 and metrics["best_val"]["dice"] >= metrics["last"]["dice"]
    split = json.loads((run.dir / "split.json").read_text())
    assert not set(split["labeled_cases"]) & set(split["test_cases"])
    again = Run.load(run.dir)
    assert again.record["model"] == "unet" and again.record["num_classes"] == 4
    # The saved config reproduces the run.
    rerun = fit("mean_teacher", config=run.dir / "config.yaml", out_dir=tmp_path / "r2")
    assert [h["loss"] for h in rerun.history] == [h["loss"] for h in run.history]


def test_ema_teacher_follows_the_rule(tmp_path):
    """After step t the teacher equals decay_t * teacher + (1 - decay_t) * student, decay_t = min(1 - 1/(t+1), 0.99)."""
    from sslseg.engine import EngineConfig as E
    from sslseg.engine import Trainer

    cls = get_method("mean_teacher")
    tr = Trainer(cls, E(data=TINY, labeled=2, iterations=3, **OPTS), cls.Config(ema_buffers=False), out_dir=tmp_path)
    student, teacher = tr.method.nets["student"], tr.method.teachers["teacher"]
    snapshots = []

    original = cls.after_step

    def spy(self, ctx):
        t_before = [p.detach().clone() for p in teacher.parameters()]
        original(self, ctx)
        d = min(1 - 1 / (ctx.step + 1), 0.99)
        for tb, t, s in zip(t_before, teacher.parameters(), student.parameters()):
            torch.testing.assert_close(t, d * tb + (1 - d) * s, rtol=1e-6, atol=1e-7)
        snapshots.append(ctx.step)

    cls.after_step = spy
    try:
        tr.run()
    finally:
        cls.after_step = original
    assert snapshots == [0, 1, 2]


def test_trainer_is_built_from_a_name_or_a_class(tmp_path):
    """``Trainer`` (the public builder behind ``fit``) takes a method name or class; bad arguments fail first."""
    from sslseg.engine import Trainer

    eng = EngineConfig(data=TINY, labeled=2, iterations=1, **OPTS)
    tr = Trainer("mean_teacher", eng, out_dir=tmp_path / "by-name")
    assert type(tr.method) is get_method("mean_teacher") and tr.dir == tmp_path / "by-name"
    assert set(tr.method.nets) == {"student"} and tr.optimizer.param_groups and not (tmp_path / "by-name").exists()
    with pytest.raises(ValueError, match="mean_teachr"):
        Trainer("mean_teachr", eng)
    with pytest.raises(TypeError, match="Trainer: method must be a method name or an SSLMethod subclass, got 3"):
        Trainer(3, eng)
    with pytest.raises(TypeError, match="Trainer: engine must be an EngineConfig, got dict"):
        Trainer("mean_teacher", {"data": TINY})
    with pytest.raises(TypeError, match="config must be a"):
        Trainer("mean_teacher", eng, get_method("cps").Config(), out_dir=tmp_path / "wrong-config")


def test_methods_are_registered():
    names = list_methods()
    assert {"supervised", "mean_teacher", "cps"} <= set(names)


def test_fit_restores_global_determinism_setting(tmp_path):
    before = torch.are_deterministic_algorithms_enabled()
    fit("supervised", TINY, labeled=2, iterations=1, out_dir=tmp_path / "d", engine_options={**OPTS, "deterministic": True})
    assert torch.are_deterministic_algorithms_enabled() == before


@pytest.mark.parametrize(("data", "patch", "setting", "expected"), [
    (TINY, [32, 32], "auto", True),  # 2D on the CPU: channels_last
    (TINY, [32, 32], False, False),
    ("synthetic:la?cases=4&size=32", [32, 32, 32], "auto", False),  # 3D on the CPU: contiguous
    ("synthetic:la?cases=4&size=32", [32, 32, 32], True, True),
])
def test_channels_last_auto_is_2d_on_the_cpu(tmp_path, capsys, data, patch, setting, expected):
    """``channels_last="auto"`` (the default) trains 2D networks on the CPU in channels_last, where
    oneDNN's NHWC convolutions are faster; student and teacher alike, and the header says so."""
    from sslseg.engine import Trainer

    assert EngineConfig().channels_last == "auto"
    eng = EngineConfig(data=data, labeled=0.5, iterations=1, device="cpu", channels_last=setting,
                       **dict(OPTS, patch_size=patch))
    tr = Trainer("mean_teacher", eng, out_dir=tmp_path / "run")
    fmt = torch.channels_last if len(patch) == 2 else torch.channels_last_3d
    for net in (tr.method.nets["student"], tr.method.teachers["teacher"]):
        weights = [p for p in net.parameters() if p.dim() == len(patch) + 2 and p.shape[1] > 1 and p.shape[-1] > 1]
        assert weights and all(w.is_contiguous(memory_format=fmt) is expected for w in weights)
    assert tr.channels_last is expected
    tr.run()
    device_line = next(line for line in capsys.readouterr().out.splitlines() if "device: cpu" in line)
    assert device_line.endswith("| channels_last") is expected
    with pytest.raises(ValueError, match=r"channels_last must be True, False or 'auto', got 'yes'"):
        EngineConfig(channels_last="yes")
