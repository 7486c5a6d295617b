"""No engine option vanishes: for every method, each weight option it ignores is refused (naming
the option and the method) and each option it uses changes the run. ``labeled_bs`` is taken by
every method: a labeled-only method labels the whole batch (SSL4MIS's supervised scripts)."""

from __future__ import annotations

import pytest

from sslseg.engine import EngineConfig
from sslseg.engine.config import resolve_method_options
from sslseg.engine.loop import Trainer
from sslseg.methods import get_method, list_methods
from sslseg.utils.schedules import consistency_weight

#: The value each engine option is set to; consistency_rampup > iterations so the ramp differs
#: from the default one (the whole run).
VALUES = {"consistency": 0.37, "consistency_rampup": 7.0, "labeled_bs": 1}
ITERATIONS = 3


def uses(name: str, key: str) -> bool:
    """Whether method ``name`` uses engine option ``key`` (what the engine enforces)."""
    cls = get_method(name)
    mode = cls.consistency_mode(cls.Config())
    return {"consistency": mode is not None, "consistency_rampup": mode == "ramp",
            "labeled_bs": True}[key]


def tiny_engine(name: str, **options) -> EngineConfig:
    """A seconds-long run on small phantoms: 2D when the method supports it, else 3D."""
    if 2 in get_method(name).dims:
        data, patch = "synthetic:acdc?cases=8&slices=3&size=32", [32, 32]
    else:
        data, patch = "synthetic:la?cases=6&size=24", [16, 16, 16]
    return EngineConfig(data=data, labeled=2, iterations=ITERATIONS, patch_size=patch, batch_size=4,
                        val_every=100, val_cases=1, log_every=1, progress=False, tensorboard=False, **options)


def test_every_method_declares_its_weight():
    # The documented split (docs/guide/training.md): who ramps, who is constant, who has no weight.
    modes = {n: get_method(n).consistency_mode(get_method(n).Config()) for n in list_methods()}
    assert {n for n, m in modes.items() if m is None} == {"bcp", "unimatch", "supervised"}
    assert modes["fixmatch"] == "constant"
    assert get_method("fixmatch").consistency_mode(get_method("fixmatch").Config(rampup=True)) == "ramp"


IGNORED = [(n, k) for n in list_methods() for k in sorted(VALUES) if not uses(n, k)]


def test_some_methods_ignore_engine_options():
    assert {n for n, _ in IGNORED} == {"bcp", "fixmatch", "supervised", "unimatch"}
    assert not any(k == "labeled_bs" for _, k in IGNORED)


@pytest.mark.parametrize(("name", "key"), IGNORED)
def test_ignored_engine_option_is_refused(name, key):
    with pytest.raises(ValueError) as err:
        Trainer(name, tiny_engine(name, **{key: VALUES[key]}))
    assert key in str(err.value) and repr(name) in str(err.value)


@pytest.mark.parametrize("name", list_methods())
def test_used_engine_options_change_the_run(name, tmp_path):
    used = {k: v for k, v in VALUES.items() if uses(name, k)}
    trainer = Trainer(name, tiny_engine(name, **used), out_dir=tmp_path / name)
    run = trainer.run()
    weights = [row["consistency_weight"] for row in run.history]
    assert [row["step"] for row in run.history] == list(range(1, ITERATIONS + 1))
    mode = get_method(name).consistency_mode(trainer.mcfg)
    if "consistency" in used:
        assert trainer.method.config.consistency == VALUES["consistency"]  # routed into the method
        length = VALUES["consistency_rampup"] if mode == "ramp" else None
        expected = [consistency_weight(s, VALUES["consistency"], length) if length else VALUES["consistency"]
                    for s in range(ITERATIONS)]
        assert weights == pytest.approx(expected)
        if mode == "ramp":  # the ramp length changed the weights too: not the whole-run ramp
            whole_run = [consistency_weight(s, VALUES["consistency"], ITERATIONS) for s in range(ITERATIONS)]
            assert weights != pytest.approx(whole_run)
    else:
        assert weights == [0.0] * ITERATIONS  # no weight: the log says so
    if get_method(name).uses_unlabeled:
        assert (trainer.labeled_bs, trainer.unlabeled_bs) == (1, 3)  # the default would be (2, 2)
    else:  # labeled data only: the whole batch is labeled whatever labeled_bs says
        assert (trainer.labeled_bs, trainer.unlabeled_bs) == (4, 0)


def test_engine_and_method_consistency_must_agree():
    cls = get_method("mean_teacher")
    same = resolve_method_options(EngineConfig(consistency=0.5), cls, cls.Config(consistency=0.5))
    assert same.consistency == 0.5
    with pytest.raises(ValueError, match=r"consistency=0\.5 \(engine\) and method\.consistency=0\.3"):
        resolve_method_options(EngineConfig(consistency=0.5), cls, cls.Config(consistency=0.3))
    # Without the engine's value, the method's own option is the weight.
    assert resolve_method_options(EngineConfig(), cls, cls.Config(consistency=0.3)).consistency == 0.3


def test_fixmatch_routes_consistency_to_its_constant_weight():
    cls = get_method("fixmatch")
    cfg = resolve_method_options(EngineConfig(consistency=0.25), cls, cls.Config())
    assert cfg.consistency == 0.25 and cls.consistency_mode(cfg) == "constant"
    with pytest.raises(ValueError, match="consistency_rampup.*'fixmatch'.*rampup=true"):
        resolve_method_options(EngineConfig(consistency_rampup=10), cls, cls.Config())
    assert resolve_method_options(EngineConfig(consistency_rampup=10), cls, cls.Config(rampup=True)).rampup


def test_cli_refuses_consistency_for_bcp(capsys):
    from sslseg.app.cli import main

    assert main(["fit", "bcp", "--iterations", "1", "--set", "consistency=0.5"]) == 2
    err = capsys.readouterr().err
    assert "consistency=0.5" in err and "'bcp'" in err and "Traceback" not in err
