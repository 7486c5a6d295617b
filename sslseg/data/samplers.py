"""Two-stream (labeled + unlabeled) batch samplers and reproducible worker seeding.

Every batch holds exactly ``labeled_bs`` labeled and ``unlabeled_bs`` unlabeled samples. Each
stream is an endless concatenation of seeded permutations of its indices (so a labeled set
smaller than a batch is fine: it cycles), and both streams restart at every epoch from
``(seed, epoch)``. An epoch is ``len(labeled) // labeled_bs`` batches (SSL4MIS's definition, at
least 1) unless ``batches_per_epoch`` says otherwise.

Each index is paired with a per-sample seed drawn from ``(seed, epoch, rank)``; the training
dataset seeds its augmentation with it. Augmentations therefore depend only on the run seed, the
epoch and the position in the epoch: not on the number of workers or which worker loads a sample.
"""

from __future__ import annotations

import random
from collections.abc import Iterator, Sequence

import numpy as np
import torch


def derive_seed(*keys: int) -> int:
    """A 63-bit seed mixed from non-negative integer ``keys`` (NumPy ``SeedSequence``)."""
    lo, hi = np.random.SeedSequence([int(k) for k in keys]).generate_state(2, np.uint32)
    return (int(hi) << 31) ^ int(lo)


def seed_worker(worker_id: int) -> None:
    """``worker_init_fn`` that seeds NumPy and ``random`` from the worker's torch seed.

    PyTorch seeds each worker's torch RNG with ``base_seed + worker_id``, where ``base_seed`` is
    drawn from the DataLoader's generator at every epoch. SSL4MIS seeded only ``random``, so its
    NumPy augmentations repeated across workers; here user transforms that draw from NumPy or
    ``random`` also differ across workers and epochs, reproducibly from the run seed.
    """
    s = torch.initial_seed() % 2**32
    np.random.seed(s)
    random.seed(s)


def _check_int(name: str, value: object, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low:
        raise ValueError(f"{name} must be an int >= {low}, got {value!r}")
    return int(value)


class TwoStreamBatchSampler(torch.utils.data.Sampler):
    """Batches of ``labeled_bs`` labeled then ``unlabeled_bs`` unlabeled indices.

    Args:
        labeled_indices: dataset indices of labeled samples (at least one).
        unlabeled_indices: dataset indices of unlabeled samples (may be empty when
            ``unlabeled_bs == 0``: fully supervised training).
        labeled_bs: labeled samples per batch (>= 1).
        unlabeled_bs: unlabeled samples per batch (>= 0).
        seed: run seed.
        batches_per_epoch: epoch length; default ``max(1, len(labeled) // labeled_bs)`` (per rank).
        num_replicas: number of ranks sharing the streams (distributed training).
        rank: this rank; each epoch's permutations are cut into disjoint per-rank shards.
        with_seeds: yield ``(index, sample_seed)`` pairs (what :class:`TrainSamples` expects);
            False yields plain indices for use with any map-style dataset.

    Example:
        >>> s = TwoStreamBatchSampler(range(3), range(3, 10), 2, 4, seed=0, with_seeds=False)
        >>> len(s), [len(b) for b in s]
        (1, [6])
    """

    def __init__(
        self,
        labeled_indices: Sequence[int],
        unlabeled_indices: Sequence[int],
        labeled_bs: int,
        unlabeled_bs: int,
        *,
        seed: int = 0,
        batches_per_epoch: int | None = None,
        num_replicas: int = 1,
        rank: int = 0,
        with_seeds: bool = True,
    ) -> None:
        self.labeled = [int(i) for i in labeled_indices]
        self.unlabeled = [int(i) for i in unlabeled_indices]
        self.labeled_bs = _check_int("labeled_bs", labeled_bs, 1)
        self.unlabeled_bs = _check_int("unlabeled_bs", unlabeled_bs, 0)
        self.seed = _check_int("seed", seed, 0)
        self.num_replicas = _check_int("num_replicas", num_replicas, 1)
        self.rank = _check_int("rank", rank, 0)
        if self.rank >= self.num_replicas:
            raise ValueError(f"rank must be in [0, num_replicas={self.num_replicas}), got {rank}")
        if not self.labeled:
            raise ValueError("labeled_indices is empty: at least one labeled sample is needed")
        if self.unlabeled_bs > 0 and not self.unlabeled:
            raise ValueError(
                f"unlabeled_bs={unlabeled_bs} but there are no unlabeled samples; "
                "use unlabeled_bs=0 for fully supervised training"
            )
        overlap = set(self.labeled) & set(self.unlabeled)
        if overlap:
            raise ValueError(f"labeled and unlabeled indices overlap (e.g. {sorted(overlap)[:5]})")
        if batches_per_epoch is not None:
            batches_per_epoch = _check_int("batches_per_epoch", batches_per_epoch, 1)
        self.batches_per_epoch = batches_per_epoch
        self.with_seeds = bool(with_seeds)
        self.epoch = 0
        self.start = 0

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        """Select the epoch (streams and seeds depend on it) and skip its first ``start`` batches."""
        self.epoch = _check_int("epoch", epoch, 0)
        self.start = _check_int("start", start, 0)

    def __len__(self) -> int:
        if self.batches_per_epoch is not None:
            return self.batches_per_epoch
        per_rank = max(1, len(self.labeled) // self.num_replicas)
        return max(1, per_rank // self.labeled_bs)

    def _stream(self, indices: list[int], stream: int) -> Iterator[int]:
        # Same permutation on every rank (the seed excludes the rank), then disjoint shards.
        g = torch.Generator().manual_seed(derive_seed(self.seed, self.epoch, stream))
        n, r, world = len(indices), self.rank, self.num_replicas
        while True:
            perm = torch.randperm(n, generator=g).tolist()
            shard = perm[r::world] if n >= world else perm[r % n :] + perm[: r % n]
            for j in shard:
                yield indices[j]

    def __iter__(self) -> Iterator[list]:
        lab = self._stream(self.labeled, 0)
        unl = self._stream(self.unlabeled, 1) if self.unlabeled_bs else None
        seeds = torch.Generator().manual_seed(derive_seed(self.seed, self.epoch, 2, self.rank))
        size = self.labeled_bs + self.unlabeled_bs
        for b in range(len(self)):
            batch = [next(lab) for _ in range(self.labeled_bs)]
            if unl is not None:
                batch += [next(unl) for _ in range(self.unlabeled_bs)]
            sample_seeds = torch.randint(0, 2**62, (size,), generator=seeds).tolist()
            if b < self.start:
                continue
            yield list(zip(batch, sample_seeds)) if self.with_seeds else batch


class DistributedTwoStreamBatchSampler(TwoStreamBatchSampler):
    """:class:`TwoStreamBatchSampler` with ``num_replicas``/``rank`` from ``torch.distributed``.

    Batch sizes are per rank. Every rank sees disjoint shards of the same per-epoch permutations,
    and every rank has the same number of batches per epoch (DDP needs equal step counts).
    """

    def __init__(
        self,
        labeled_indices: Sequence[int],
        unlabeled_indices: Sequence[int],
        labeled_bs: int,
        unlabeled_bs: int,
        *,
        seed: int = 0,
        batches_per_epoch: int | None = None,
        num_replicas: int | None = None,
        rank: int | None = None,
        with_seeds: bool = True,
    ) -> None:
        if num_replicas is None or rank is None:
            dist = torch.distributed
            if not (dist.is_available() and dist.is_initialized()):
                raise ValueError(
                    "num_replicas and rank must be given when torch.distributed is not initialised "
                    f"(got num_replicas={num_replicas!r}, rank={rank!r})"
                )
            num_replicas = dist.get_world_size() if num_replicas is None else num_replicas
            rank = dist.get_rank() if rank is None else rank
        super().__init__(
            labeled_indices,
            unlabeled_indices,
            labeled_bs,
            unlabeled_bs,
            seed=seed,
            batches_per_epoch=batches_per_epoch,
            num_replicas=num_replicas,
            rank=rank,
            with_seeds=with_seeds,
        )


# ------------------------------------------------------------------------------ patch locations
def patch_start(
    shape: Sequence[int],
    patch: Sequence[int],
    generator: torch.Generator,
    foreground: np.ndarray | None = None,
) -> list[int]:
    """Lower corner of a training patch inside a volume of ``shape``.

    With ``foreground`` rows ``(class, *index)`` (e.g. a cached volume's sampled foreground
    voxels), a class is drawn uniformly among those present, then one of its voxels, and the
    patch is centred on it (nnU-Net's oversampling: rare small organs are seen as often as large
    ones). Without, the corner is uniform. Corners may be negative or overhang where the volume is
    smaller than the patch (the reader zero-pads); otherwise the patch stays inside the volume.
    """
    lo = [min(0, s - p) for s, p in zip(shape, patch)]
    hi = [max(0, s - p) for s, p in zip(shape, patch)]
    if foreground is not None and len(foreground):
        classes = np.unique(foreground[:, 0])
        c = classes[int(torch.randint(len(classes), (1,), generator=generator))]
        rows = np.flatnonzero(foreground[:, 0] == c)
        centre = foreground[rows[int(torch.randint(len(rows), (1,), generator=generator))], 1:]
        return [int(min(max(int(x) - p // 2, a), b)) for x, p, a, b in zip(centre, patch, lo, hi)]
    return [int(torch.randint(a, b + 1, (1,), generator=generator)) for a, b in zip(lo, hi)]


class PatchSampler:
    """Reads training patches from preprocessed (memory-mapped) volumes.

    Labeled samples are centred on a foreground voxel of a random present class with probability
    ``foreground_prob`` (default one in three); otherwise, and always for unlabeled samples (whose
    labels are never read), the patch position is uniform. Only the patch is read from disk.

    Args:
        patch_size: ``(D, H, W)``.
        foreground_prob: probability of a foreground-centred patch for labeled samples.
    """

    def __init__(self, patch_size: Sequence[int], foreground_prob: float = 0.33) -> None:
        self.patch_size = tuple(int(p) for p in patch_size)
        if len(self.patch_size) != 3 or min(self.patch_size) < 1:
            raise ValueError(f"patch_size must be three positive ints (D, H, W), got {tuple(patch_size)!r}")
        if not 0 <= foreground_prob <= 1:
            raise ValueError(f"foreground_prob must be in [0, 1], got {foreground_prob}")
        self.foreground_prob = float(foreground_prob)

    def __call__(self, record, labeled: bool, generator: torch.Generator) -> tuple[np.ndarray, np.ndarray | None]:
        """Image ``(C, *patch)`` and label ``(*patch)`` (None when unlabeled) of one sample."""
        fg = None
        if labeled and float(torch.rand((), generator=generator)) < self.foreground_prob:
            fg = record.foreground()
        starts = patch_start(record.shape(), self.patch_size, generator, fg)
        return record.read_patch(starts, self.patch_size, with_label=labeled)

    def __repr__(self) -> str:
        return f"PatchSampler(patch_size={self.patch_size}, foreground_prob={self.foreground_prob})"
