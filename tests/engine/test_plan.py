"""The engine on raw NIfTI folders: plan + preprocessing on first use, the plan saved with the run and
in every model file, plan overrides, resume on the saved plan."""

from __future__ import annotations

import json

import pytest

from sslseg.data import Plan, load
from sslseg.engine import fit
from sslseg.engine.checkpoint import load_checkpoint
from sslseg.engine.config import EngineConfig, parse_set
from sslseg.methods import get_method

CT = "synthetic:ct?cases=4&unlabeled=1&test=2&size=32"
OPTS = dict(val_every=2, log_every=1, progress=False, model_options=dict(channels=[4, 8]))


def test_fit_plans_a_nifti_folder_and_saves_the_plan(tmp_path):
    run = fit("mean_teacher", CT, labeled=2, iterations=2, out_dir=tmp_path / "r", engine_options=OPTS)
    saved = Plan.from_json(run.dir / "plan.json")
    assert not saved.identity and saved.normalization == ["ct"]
    # Patch and batch come from the plan when not given; the data were read from its cache.
    cfg = (run.dir / "config.yaml").read_text()
    assert f"patch_size:\n  - {saved.patch_size[0]}" in cfg
    assert run.record["patch_size"] == saved.patch_size and run.record["spacing"] == saved.target_spacing
    assert run.record["plan"] == saved.to_dict() and run.record["intensity"] == "none"
    for name in ("best_val.pt", "last_model.pt"):
        record = json.loads(load_checkpoint(run.dir / name)["record"])
        assert record["plan"] == saved.to_dict()
    # Resume continues on the saved plan (same cache, same arrays).
    again = fit("mean_teacher", resume=run.dir, iterations=4)
    assert again.metrics["last"]["step"] == 4 and Plan.from_json(again.dir / "plan.json") == saved


def test_plan_overrides_and_the_planless_path(tmp_path):
    run = fit("supervised", CT, labeled=2, iterations=1, out_dir=tmp_path / "o",
              engine_options=dict(OPTS, plan={"patch_size": [16, 32, 32], "batch_size": 2}))
    assert run.record["patch_size"] == [16, 32, 32] and run.record["plan"]["batch_size"] == 2
    raw = fit("supervised", CT, labeled=2, iterations=1, out_dir=tmp_path / "n",
              engine_options=dict(OPTS, use_plan=False, patch_size=[16, 16, 16], batch_size=2))
    assert raw.record["plan"] is None and raw.record["intensity"] == load(CT).intensity == "zscore"
    assert not (raw.dir / "plan.json").exists()
    with pytest.raises(ValueError, match="stored preprocessed"):
        fit("supervised", "synthetic:acdc?cases=6&slices=2&size=32", labeled=2, iterations=1, out_dir=tmp_path / "h",
            engine_options=dict(OPTS, plan={"patch_size": [32, 32]}))
    with pytest.raises(TypeError, match="unknown plan fields"):
        fit("supervised", CT, labeled=2, iterations=1, out_dir=tmp_path / "u", engine_options=dict(OPTS, plan={"patch": 1}))


def test_set_plan_fields_on_the_command_line():
    eng, meth = parse_set(["plan.patch_size=[16, 32, 32]", "plan.batch_size=3", "batch_size=4"], EngineConfig(),
                          get_method("supervised").Config())
    assert eng == {"plan": {"patch_size": [16, 32, 32], "batch_size": 3}, "batch_size": 4} and meth == {}


def test_model_files_from_before_plans_read_h5_data_as_stored(tmp_path):
    """Files written before plans recorded the dataset's convention ("minmax" for ACDC) as the input
    normalisation; h5 layouts and phantoms are stored normalised, so they are read as they are."""
    from sslseg.engine.checkpoint import save_checkpoint
    from sslseg.engine.run import load_model

    run = fit("supervised", "synthetic:acdc?cases=6&slices=2&size=32", labeled=2, iterations=1, out_dir=tmp_path / "a",
              engine_options=dict(OPTS, batch_size=2, patch_size=[32, 32],
                                  model_options=dict(channels=[4, 8], dropout=[0.0, 0.0])))
    assert run.record["intensity"] == "none" and run.record["plan"] is None
    ckpt = load_checkpoint(run.dir / "best_val.pt")
    for data, expected in (("synthetic:acdc?cases=6&slices=2&size=32", "none"), (str(tmp_path / "gone"), "minmax")):
        record = json.loads(ckpt["record"])
        del record["plan"]
        record.update(intensity="minmax", data=data)
        save_checkpoint({**ckpt, "record": json.dumps(record)}, tmp_path / "old.pt")
        _, loaded = load_model(tmp_path / "old.pt")
        assert loaded["plan"] is None and loaded["intensity"] == expected, data
