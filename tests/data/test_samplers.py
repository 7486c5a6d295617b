"""Two-stream batch sampler invariants."""

from __future__ import annotations

from collections import Counter

import pytest

from sslseg.data import DistributedTwoStreamBatchSampler, TwoStreamBatchSampler

LAB, UNL = list(range(10)), list(range(10, 40))


def _batches(sampler):
    return [list(b) for b in sampler]


def test_composition_and_epoch_length():
    s = TwoStreamBatchSampler(LAB, UNL, 3, 5, seed=0, with_seeds=False)
    batches = _batches(s)
    assert len(batches) == len(s) == 10 // 3
    for b in batches:
        assert len(b) == 8
        assert all(i in LAB for i in b[:3]) and all(i in UNL for i in b[3:])
    first = [i for b in batches for i in b[:3]]
    assert len(set(first)) == len(first)  # one permutation: no labeled repeat within an epoch


def test_seeds_are_paired_and_reproducible():
    a = _batches(TwoStreamBatchSampler(LAB, UNL, 2, 2, seed=1))
    b = _batches(TwoStreamBatchSampler(LAB, UNL, 2, 2, seed=1))
    assert a == b
    assert all(isinstance(x, tuple) and len(x) == 2 for batch in a for x in batch)
    seeds = [x[1] for batch in a for x in batch]
    assert len(set(seeds)) == len(seeds)


def test_set_epoch_changes_order_and_start_skips():
    s = TwoStreamBatchSampler(LAB, UNL, 2, 2, seed=0, with_seeds=False)
    e0 = _batches(s)
    s.set_epoch(1)
    e1 = _batches(s)
    assert e0 != e1
    s.set_epoch(0)
    assert _batches(s) == e0
    s.set_epoch(0, start=2)
    assert _batches(s) == e0[2:]


def test_labeled_set_smaller_than_batch_cycles():
    s = TwoStreamBatchSampler([0, 1], [2, 3, 4], 5, 2, seed=0, batches_per_epoch=3, with_seeds=False)
    batches = _batches(s)
    assert len(batches) == 3 and all(len(b) == 7 for b in batches)
    counts = Counter(i for b in batches for i in b[:5])
    assert set(counts) == {0, 1} and max(counts.values()) - min(counts.values()) <= 1


def test_zero_unlabeled_is_fully_supervised():
    s = TwoStreamBatchSampler(LAB, [], 4, 0, seed=0, with_seeds=False)
    assert all(len(b) == 4 and set(b) <= set(LAB) for b in s)
    assert len(s) == 2


def test_distributed_shards_disjoint_equal_length():
    world = 3
    samplers = [DistributedTwoStreamBatchSampler(LAB, UNL, 1, 2, seed=0, num_replicas=world, rank=r, with_seeds=False) for r in range(world)]
    lengths = {len(s) for s in samplers}
    assert lengths == {10 // world}
    per_rank = [[i for b in s for i in b[:1]] for s in samplers]
    for i in range(world):
        for j in range(i + 1, world):
            assert not set(per_rank[i]) & set(per_rank[j])


def test_errors():
    with pytest.raises(ValueError, match="unlabeled_bs=2 but there are no unlabeled samples; use unlabeled_bs=0"):
        TwoStreamBatchSampler(LAB, [], 2, 2)
    with pytest.raises(ValueError, match="labeled_bs must be an int >= 1, got 0"):
        TwoStreamBatchSampler(LAB, UNL, 0, 2)
    with pytest.raises(ValueError, match="labeled_indices is empty"):
        TwoStreamBatchSampler([], UNL, 1, 2)
    with pytest.raises(ValueError, match="labeled and unlabeled indices overlap"):
        TwoStreamBatchSampler([1, 2], [2, 3], 1, 1)
    with pytest.raises(ValueError, match="rank must be in \\[0, num_replicas=2\\), got 2"):
        TwoStreamBatchSampler(LAB, UNL, 1, 1, num_replicas=2, rank=2)
    with pytest.raises(ValueError, match="num_replicas and rank must be given when torch.distributed is not initialised"):
        DistributedTwoStreamBatchSampler(LAB, UNL, 1, 1)
