"""A run reports itself off a terminal: start header, one line per log window and per validation,
``validation.jsonl`` appended as validations happen, ``--quiet``; a NaN loss is a clean error."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

import sslseg.engine.loop as loop
from sslseg.app import cli
from sslseg.engine import EngineConfig, Trainer
from sslseg.engine.logger import RunLogger, format_train_line, format_validation_line
from sslseg.engine.loop import NonFiniteLossError
from sslseg.utils.precision import resolve_amp

DATA = "synthetic:acdc?cases=10&size=32&slices=3"
FIT = ["fit", "mean_teacher", "--data", DATA, "--labeled", "2", "--iterations", "4", "--set", "batch_size=4",
       "--set", "val_every=2", "--set", "log_every=2", "--set", "tensorboard=false"]


def _fit_piped(tmp_path, *extra: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1", SSLSEG_CACHE=str(tmp_path / "cache"))
    # stdout is a pipe, as under `| cat`, nohup or a batch scheduler.
    return subprocess.run([sys.executable, "-m", "sslseg", *FIT, "--out", str(tmp_path / "run"), *extra],
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, timeout=300, env=env)


def test_fit_off_a_terminal_prints_header_log_and_validation_lines(tmp_path):
    proc = _fit_piped(tmp_path)
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout.splitlines()
    assert out[0].startswith("sslseg ") and "mean_teacher on synthetic:acdc" in out[0] and "4 classes" in out[0]
    assert out[1].startswith("split: 2 labeled / ") and " val / " in out[1] and " test cases" in out[1]
    assert out[2].startswith("network: unet, ") and "parameters" in out[2]
    amp = resolve_amp("auto", "cpu").describe()  # the default, with what it chose on this CPU and why
    # 2D on the CPU: channels_last "auto" is on
    assert out[3].startswith("device: cpu") and "| threads " in out[3] and out[3].endswith(f"| AMP {amp} | channels_last")
    steps = [line for line in out if line.startswith("step ")]
    assert [s.split()[1] for s in steps] == ["2/4", "4/4"]
    for line in steps:
        assert "loss " in line and "loss_sup " in line and "| lr " in line and "it/s" in line and "ETA " in line
    vals = [line for line in out if line.startswith("val step ")]
    assert [v.split()[2] for v in vals] == ["2/4", "4/4"]
    for line in vals:
        assert "Dice " in line and "RV " in line and "HD95 " in line and "best " in line
    # Validation lines follow the log line of their step, in run order.
    assert out.index(vals[0]) > out.index(steps[0]) and out.index(vals[1]) > out.index(steps[1])
    records = [json.loads(line) for line in (tmp_path / "run" / "validation.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [2, 4]
    assert all({"dice", "dice_per_class", "hd95", "best_dice", "best_step"} <= set(r) for r in records)


def test_quiet_prints_nothing_but_writes_the_files(tmp_path):
    proc = _fit_piped(tmp_path, "--quiet")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == ""
    run = tmp_path / "run"
    assert len((run / "validation.jsonl").read_text().splitlines()) == 2
    assert len((run / "history.jsonl").read_text().splitlines()) == 2


def test_validation_records_are_written_when_they_happen(tmp_path, monkeypatch):
    eng = EngineConfig(data=DATA, labeled=2, iterations=6, batch_size=4, val_every=2, log_every=3,
                       tensorboard=False, quiet=True)
    trainer = Trainer("mean_teacher", eng, out_dir=tmp_path / "run")
    seen: list[tuple[int, list[int]]] = []
    save = loop.save_checkpoint

    def spy(state, path):
        # last.pt is written right after the validation: its record must already be on disk.
        if path.name == "last.pt":
            lines = (tmp_path / "run" / "validation.jsonl").read_text().splitlines()
            seen.append((state["step"], [json.loads(line)["step"] for line in lines]))
        save(state, path)

    monkeypatch.setattr(loop, "save_checkpoint", spy)
    trainer.run()
    assert seen == [(2, [2]), (4, [2, 4]), (6, [2, 4, 6])]


def test_resume_rewrites_validation_records_from_the_checkpoint(tmp_path):
    eng = EngineConfig(data=DATA, labeled=2, iterations=4, batch_size=4, val_every=2, log_every=2,
                       tensorboard=False, quiet=True)
    Trainer("mean_teacher", eng, out_dir=tmp_path / "run").run()
    path = tmp_path / "run" / "validation.jsonl"
    # A record a killed run wrote after its last checkpoint is dropped by the resume.
    path.write_text(path.read_text() + json.dumps({"step": 5, "dice": 0.5}) + "\n")
    longer = EngineConfig(**{**eng.__dict__, "iterations": 6})
    Trainer("mean_teacher", longer, out_dir=tmp_path / "run", resume=True).run()
    assert [json.loads(line)["step"] for line in path.read_text().splitlines()] == [2, 4, 6]


def test_on_a_terminal_only_validation_lines_and_header_print(tmp_path, capsys):
    logger = RunLogger(tmp_path, enabled=True, tensorboard=False, total=10, plain=False, class_names=("bg", "fg"))
    logger.header(["header line"])
    logger.log_train({"step": 5, "lr": 0.01, "consistency_weight": 0.1, "loss": 0.5, "it_per_s": 2.0})
    logger.log_validation({"dice": 0.5, "dice_per_class": [0.5], "cases": 1}, 5, {"dice": 0.5, "step": 5})
    out = capsys.readouterr().out.splitlines()
    assert out == ["header line", "val step 5/10 | Dice 0.5000 (fg 0.5000) | best 0.5000 @ step 5"]
    quiet = RunLogger(tmp_path, enabled=True, tensorboard=False, total=10, quiet=True, plain=True)
    quiet.header(["x"])
    quiet.log_train({"step": 6, "lr": 0.01, "loss": 0.5, "it_per_s": 2.0})
    assert capsys.readouterr().out == ""


def test_line_formats():
    line = format_train_line({"step": 20, "lr": 0.0098, "consistency_weight": 0.002, "loss": 0.4123,
                              "loss_sup": 0.4, "it_per_s": 4.0}, 100)
    assert line == ("step 20/100 (20%) | loss 0.4123 loss_sup 0.4000 | lr 9.80e-03 | lambda 0.0020 | "
                    "4.00 it/s | ETA 0:00:20")
    val = format_validation_line({"step": 20, "dice": 0.8, "dice_per_class": [0.7, 0.9], "hd95": 3.25,
                                  "best_dice": 0.8, "best_step": 20}, 100, ("bg", "a", "b"))
    assert val == "val step 20/100 | Dice 0.8000 (a 0.7000, b 0.9000) | HD95 3.25 | best 0.8000 @ step 20"


def test_non_finite_loss_names_the_step_and_the_last_good_checkpoint(tmp_path):
    eng = EngineConfig(data=DATA, labeled=2, iterations=8, batch_size=4, val_every=2, log_every=5,
                       tensorboard=False, quiet=True)
    trainer = Trainer("mean_teacher", eng, out_dir=tmp_path / "run")
    step = trainer.method.step

    def overflow_at_step_3(batch, ctx):
        out = step(batch, ctx)
        if ctx.step == 2:  # 0-based: the third step
            out.loss = out.loss * float("inf")
        return out

    trainer.method.step = overflow_at_step_3
    last = tmp_path / "run" / "last.pt"
    with pytest.raises(NonFiniteLossError, match=rf"not finite at step 3 of 8; last good checkpoint: {last} "
                                                 r"\(step 2; continue with --resume") as info:
        trainer.run()
    assert info.value.step == 3 and info.value.checkpoint == last
    # Refused before the checkpoint at step 4: last.pt still holds step 2's finite weights.
    state = torch.load(last, weights_only=True)
    assert state["step"] == 2
    weights = [v for net in state["networks"].values() for v in net.values() if v.is_floating_point()]
    assert weights and all(bool(torch.isfinite(v).all()) for v in weights)


def test_non_finite_loss_in_a_log_window_before_any_checkpoint(tmp_path):
    eng = EngineConfig(data=DATA, labeled=2, iterations=8, batch_size=4, val_every=8, log_every=2,
                       tensorboard=False, quiet=True)
    trainer = Trainer("mean_teacher", eng, out_dir=tmp_path / "run")
    step = trainer.method.step

    def nan_at_step_1(batch, ctx):
        out = step(batch, ctx)
        if ctx.step == 0:
            out.loss = out.loss * float("nan")
        return out

    trainer.method.step = nan_at_step_1
    with pytest.raises(NonFiniteLossError, match=r"not finite at step 1 of 8 \(loss=nan.* over steps 1-2\); "
                                                 r"no checkpoint was written before it \(the first is at step 8\)"):
        trainer.run()


def test_cli_reports_a_non_finite_loss_in_one_line(monkeypatch, capsys):
    import sslseg.engine

    def diverge(*args, **kwargs):
        raise NonFiniteLossError("mean_teacher: the training loss is not finite at step 7 of 20; ...", 7, None)

    monkeypatch.setattr(sslseg.engine, "fit", diverge)
    assert cli.main(["fit", "mean_teacher", "--iterations", "20"]) == 1
    err = capsys.readouterr().err
    assert err.splitlines() == ["sslseg fit: error: mean_teacher: the training loss is not finite at step 7 of 20; ..."]
