"""Distributed training: DDP on CPU with the gloo backend and 2 processes.

One 2-process spawn (module fixture) runs every 2-rank training the tests inspect and ends with a
run that the fixture kills (SIGKILL) after its first checkpoint; ``torchrun -m sslseg fit --resume``
then finishes that run.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import sslseg.data
from sslseg.data import Batch
import sslseg.engine.loop
from sslseg.engine import Trainer, fit
from sslseg.engine import distributed as process_group
from sslseg.engine.checkpoint import load_checkpoint
from sslseg.engine.loop import combine_validation
from sslseg.utils import distributed as dist
from sslseg.models import create_model

TINY = "synthetic:acdc?cases=6&slices=2&size=32"
OPTS = dict(batch_size=4, labeled_bs=2, val_every=2, log_every=1, patch_size=[32, 32], progress=False,
            tensorboard=False, device="cpu")
# InstanceNorm and no dropout: a sample's forward does not depend on the rest of its batch, so the
# two shards of a batch give exactly the whole batch's outputs (plain BatchNorm would not: its
# batch statistics are per rank, and SyncBatchNorm has no CPU kernel). The aux heads stay unused
# by forward(), which exercises DDP's unused-parameter handling.
NET_OPTIONS = {"features": [8, 16], "strides": [2]}
# float32: the comparison is of the collectives to float tolerance; bf16 rounding of two shards
# against one batch would differ by more than that for reasons that have nothing to do with DDP.
EQUAL_OPTS = {**OPTS, "val_cases": 1, "model_options": NET_OPTIONS, "amp": "none"}
# Teacher input noise off: noise is drawn per rank, so it cannot match a single process's draw.
EQUAL = {"supervised": {}, "mean_teacher": {"noise_std": 0.0}, "cps": {}}
# Two DDP steps of the methods with something distributed-specific (besides EQUAL's two networks
# and EMA teacher): an extra optimizer outside DDP (adversarial), gathered CTAugment rewards
# (fixmatch), a global mask count (uamt), one network called twice (unimatch), aux heads through
# forward_all and a differentiable global normaliser (urpc).
SMOKE = ("adversarial", "fixmatch", "uamt", "unimatch", "urpc")
WORLD = 2
RUN_ITERS = 8
RUN_OPTS = {**OPTS, "val_cases": 1, "deterministic": True}


def _shard(batch: Batch, rank: int, world: int) -> Batch:
    """Rank ``rank``'s part of a global batch: every ``world``-th labeled and unlabeled sample."""
    changes = {}
    for f in dataclasses.fields(batch):
        value = getattr(batch, f.name)
        if value is not None and f.name.startswith(("labeled", "unlabeled")):
            changes[f.name] = value[rank::world]
    return dataclasses.replace(batch, **changes)


class _FixedLoader:
    """The same batch at every step (what ``TrainLoader.forever`` is to the loop)."""

    def __init__(self, batch: Batch) -> None:
        self.batch = batch

    def forever(self, start_step: int = 0):
        while True:
            yield self.batch


def _fixed_batches(original):
    """A ``make_train_loader`` whose batch is the first global batch of the real loader, sharded per rank."""

    def make(dataset, split, *, labeled_bs, unlabeled_bs, distributed=False, **kwargs):
        world, rank = distributed if distributed else (1, 0)
        loader = original(dataset, split, labeled_bs=labeled_bs * world, unlabeled_bs=unlabeled_bs * world, **kwargs)
        return _FixedLoader(_shard(next(iter(loader)), rank, world))

    return make


def _save_rank_networks(out: Path, rank: int):
    """Wrap ``Trainer._finish`` to save this rank's networks before the run ends."""
    original = Trainer._finish

    def finish(self):
        torch.save({k: v.state_dict() for k, v in self.method.networks().items()}, Path(self.dir) / f"rank{rank}.pt")
        return original(self)

    return finish


def _worker(rank: int, world: int, init_file: str, out: str) -> None:
    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world,
                                         timeout=datetime.timedelta(seconds=120))
    out_dir = Path(out)
    real_loader = sslseg.data.make_train_loader
    Trainer._finish = _save_rank_networks(out_dir, rank)
    try:
        sslseg.data.make_train_loader = _fixed_batches(real_loader)
        for name, options in EQUAL.items():
            fit(name, TINY, labeled=2, iterations=2, model="nnunet", out_dir=out_dir / f"equal-{name}",
                engine_options=EQUAL_OPTS, **options)
        sslseg.data.make_train_loader = real_loader
        for name in SMOKE:
            fit(name, TINY, labeled=2, iterations=2, out_dir=out_dir / f"smoke-{name}",
                engine_options={**OPTS, "val_cases": 1, "model_options": {"channels": [4, 8, 16, 32, 64]}})
        assert torch.distributed.is_initialized(), "fit() must leave a caller's process group alone"
        fit("mean_teacher", TINY, labeled=2, iterations=RUN_ITERS, out_dir=out_dir / "uninterrupted",
            engine_options=RUN_OPTS)
        # Its twin, killed by the test after its first checkpoint (torchrun resumes it).
        fit("mean_teacher", TINY, labeled=2, iterations=RUN_ITERS, out_dir=out_dir / "killed", engine_options=RUN_OPTS)
    finally:
        torch.distributed.destroy_process_group()


@pytest.fixture(scope="module")
def ddp_runs(tmp_path_factory):
    """Every 2-rank run the tests inspect; the last one is killed (SIGKILL) after its first checkpoint."""
    out = tmp_path_factory.mktemp("ddp")
    procs = torch.multiprocessing.start_processes(_worker, args=(WORLD, str(out / "init"), str(out)), nprocs=WORLD,
                                                  join=False, start_method="spawn")
    deadline = time.monotonic() + 300
    while not (out / "killed" / "last.pt").is_file() and all(p.is_alive() for p in procs.processes):
        assert time.monotonic() < deadline, "the 2-rank runs did not reach the killed run's first checkpoint"
        time.sleep(0.01)
    if not all(p.is_alive() for p in procs.processes):  # a worker failed: join() raises with its traceback
        while not procs.join():
            pass
    for pid in procs.pids():  # the training processes die mid-run, as on a crash or an OOM kill
        os.kill(pid, signal.SIGKILL)
    with pytest.raises(torch.multiprocessing.ProcessExitedException, match="SIGKILL"):
        while not procs.join():
            pass
    return out


def _assert_same_states(a: dict, b: dict, **tol) -> None:
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], msg=lambda m, k=k: f"{k}: {m}", **tol)


@pytest.mark.parametrize("name", list(EQUAL))
def test_ddp_step_equals_one_process_with_the_whole_batch(name, ddp_runs, tmp_path, monkeypatch):
    monkeypatch.setattr(sslseg.data, "make_train_loader", _fixed_batches(sslseg.data.make_train_loader))
    single = fit(name, TINY, labeled=2, iterations=2, model="nnunet", out_dir=tmp_path, engine_options=EQUAL_OPTS,
                 **EQUAL[name])
    ddp_dir = ddp_runs / f"equal-{name}"
    ref = load_checkpoint(single.dir / "last.pt")
    got = load_checkpoint(ddp_dir / "last.pt")
    assert got["step"] == ref["step"] == 2 and got["world_size"] == WORLD
    for net in ref["networks"]:
        _assert_same_states(got["networks"][net], ref["networks"][net], rtol=1e-4, atol=1e-6)
    # The weights moved far beyond that tolerance, so the comparison means something.
    first = next(k for k in ref["networks"] if k.startswith("nets."))
    init = create_model("nnunet", 1, 4, seed=0, **NET_OPTIONS).state_dict()
    moved = max((ref["networks"][first][k] - v).abs().max().item() for k, v in init.items() if v.is_floating_point())
    assert moved > 1e-3, f"{name}: {first} barely moved ({moved})"
    # Logged losses are the global batch's (window means all-reduced over the ranks).
    for row_ref, row_got in zip(single.history, json.loads(got["history"])):
        assert row_got["loss"] == pytest.approx(row_ref["loss"], rel=1e-5)


@pytest.mark.parametrize("name", [*EQUAL, *SMOKE])
def test_ranks_hold_identical_networks_and_rank0_writes_the_run(name, ddp_runs):
    run_dir = ddp_runs / (f"equal-{name}" if name in EQUAL else f"smoke-{name}")
    r0, r1 = torch.load(run_dir / "rank0.pt"), torch.load(run_dir / "rank1.pt")
    assert r0.keys() == r1.keys()
    for net in r0:  # students by DDP, teachers by EMA of identical students plus the buffer broadcast
        _assert_same_states(r0[net], r1[net], rtol=0, atol=0)
    for f in ("config.yaml", "split.json", "history.jsonl", "metrics.json", "best_val.pt", "last.pt"):
        assert (run_dir / f).is_file(), f
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["last"]["step"] == 2 and 0.0 <= metrics["best_val"]["dice"] <= 1.0
    rows = [json.loads(line) for line in (run_dir / "history.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2], "one history, written once (rank 0)"


# ---- one process: helpers, merge, errors --------------------------------------------------------------

def test_without_a_process_group_everything_is_local(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    state, device = process_group.init_distributed("cpu")
    assert state == process_group.DistributedState() and not state.enabled and state.is_main and device == torch.device("cpu")
    t = torch.ones(3, requires_grad=True)
    assert dist.all_reduce_mean(t) is t and dist.all_reduce_sum(t) is t
    with dist.global_batch_statistics():
        assert dist.global_batch_sum(t) is t
    assert dist.all_gather_object({"a": 1}) == [{"a": 1}] and dist.broadcast_object(5) == 5
    buf = torch.arange(3.0)
    dist.average_tensors([buf])
    assert torch.equal(buf, torch.arange(3.0))
    dist.barrier()
    process_group.cleanup(state)


def test_torchrun_environment_errors(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    for var in ("RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("RANK", "0")
    with pytest.raises(ValueError, match="WORLD_SIZE=2 but LOCAL_RANK, MASTER_ADDR, MASTER_PORT is not set; start"):
        process_group.init_distributed("cpu")
    monkeypatch.setenv("LOCAL_RANK", "zero")
    monkeypatch.setenv("MASTER_ADDR", "localhost")
    monkeypatch.setenv("MASTER_PORT", "29500")
    with pytest.raises(ValueError, match="LOCAL_RANK must be an integer, got 'zero'"):
        process_group.init_distributed("cpu")


def test_global_batch_must_split_evenly_over_the_ranks(tmp_path, monkeypatch):
    # Rank 0 of 2 as far as the engine knows; every check below fails before the first collective.
    monkeypatch.setattr(sslseg.engine.loop, "init_distributed",
                        lambda device: (process_group.DistributedState(0, 2), torch.device("cpu")))
    opts = dict(OPTS, model_options={"channels": [4, 8, 16, 32, 64]})
    with pytest.raises(ValueError, match=r"batch_size=5 must be divisible by the number of processes \(2\)"):
        fit("supervised", TINY, labeled=2, iterations=1, out_dir=tmp_path, engine_options=dict(opts, batch_size=5))
    with pytest.raises(ValueError, match=r"labeled_bs=3 must be divisible by the number of processes \(2\)"):
        fit("mean_teacher", TINY, labeled=2, iterations=1, out_dir=tmp_path,
            engine_options=dict(opts, batch_size=6, labeled_bs=3))
    with pytest.raises(ValueError, match="sync_bn=True needs CUDA devices"):
        fit("supervised", TINY, labeled=2, iterations=1, out_dir=tmp_path, engine_options=dict(opts, sync_bn=True))
    assert not list(tmp_path.iterdir()), "nothing written before the checks"


def test_sharded_validation_merges_to_the_whole_validation():
    from sslseg.engine.validation import validate

    ds = sslseg.data.load(TINY)
    cases = list(ds.split(labeled=2).val_cases) + list(ds.split(labeled=2).test_cases)
    model = create_model("unet", 1, 4, seed=0, channels=[4, 8, 16, 32, 64])
    kw = dict(dim=2, patch_size=[32, 32], num_classes=4, device=torch.device("cpu"))
    whole = validate(model, ds.iter_volumes(cases), **kw)
    shards = [validate(model, ds.iter_volumes(cases[r::2]), **kw) for r in range(2)]
    merged = combine_validation([*shards, None])  # None: a rank without validation cases
    assert merged.keys() == whole.keys()
    for key, value in whole.items():
        assert merged[key] == pytest.approx(value, rel=1e-12, abs=1e-12), key
    with pytest.raises(ValueError, match="no rank validated any case"):
        combine_validation([None, None])


def test_torchrun_resumes_a_killed_run_to_the_uninterrupted_result(ddp_runs):
    killed = ddp_runs / "killed"
    stopped_at = load_checkpoint(killed / "last.pt")["step"]
    assert 0 < stopped_at < RUN_ITERS and not (killed / "metrics.json").exists()
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(WORLD),
           "-m", "sslseg", "fit", "mean_teacher", "--resume", str(killed)]
    proc = subprocess.run(cmd, env={**os.environ, "OMP_NUM_THREADS": "1"}, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout
    assert f"run: {killed}" in proc.stdout and "validation Dice" in proc.stdout
    a, b = load_checkpoint(ddp_runs / "uninterrupted" / "last.pt"), load_checkpoint(killed / "last.pt")
    assert a["step"] == b["step"] == RUN_ITERS
    # Deterministic CPU run, per-rank RNG states in the checkpoint: the resumed run is the same run.
    for net in a["networks"]:
        _assert_same_states(a["networks"][net], b["networks"][net], rtol=0, atol=0)
    assert [r["loss"] for r in json.loads(a["history"])] == [r["loss"] for r in json.loads(b["history"])]
    rows = [json.loads(line) for line in (killed / "history.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, RUN_ITERS + 1)), "rows logged after the checkpoint dropped"
    assert (killed / "best_val.pt").is_file() and json.loads((killed / "metrics.json").read_text())["last"]["step"] == RUN_ITERS
