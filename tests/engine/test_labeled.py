"""``labeled``: a count, a fraction in (0, 1) or ``"all"``, from Python and the command line."""

from __future__ import annotations

import json

import pytest

from sslseg.app.cli import build_parser, main
from sslseg.engine import EngineConfig, Trainer

TINY = "synthetic:acdc?cases=8&slices=2&size=32"
OPTS = dict(data=TINY, iterations=1, batch_size=2, patch_size=[32, 32], val_every=1, progress=False,
            tensorboard=False, quiet=True)


@pytest.mark.parametrize("value", ["all", "ALL", None])
def test_all_labels_every_training_case(value):
    split = Trainer("supervised", EngineConfig(labeled=value, **OPTS)).split
    assert not split.unlabeled_cases and len(split.labeled_cases) == len(split.train_cases) > 2


def test_count_and_fraction():
    assert len(Trainer("supervised", EngineConfig(labeled=2, **OPTS)).split.labeled_cases) == 2
    assert len(Trainer("supervised", EngineConfig(labeled=1.0, **OPTS)).split.labeled_cases) == 1  # a count


@pytest.mark.parametrize("value", ["most", 0, -3, True])
def test_bad_values_are_refused_naming_the_choices(value):
    with pytest.raises(ValueError, match=r"labeled must be a case count >= 1, a fraction in \(0, 1\) or 'all'"):
        Trainer("supervised", EngineConfig(labeled=value, **OPTS))


def test_cli_takes_all(tmp_path, capsys):
    out = tmp_path / "run"
    rc = main(["fit", "supervised", "--data", TINY, "--labeled", "all", "--iterations", "1", "--out", str(out),
               "--quiet", "--set", "batch_size=2", "--set", "patch_size=[32,32]", "--set", "val_every=1",
               "--set", "tensorboard=false"])
    assert rc == 0, capsys.readouterr().err
    split = json.loads((out / "split.json").read_text())
    assert split["unlabeled_cases"] == [] and len(split["labeled_cases"]) > 2
    with pytest.raises(SystemExit):
        build_parser().parse_args(["fit", "supervised", "--labeled", "most"])
    assert "expected a case count, a fraction in (0, 1) or 'all', got 'most'" in capsys.readouterr().err
