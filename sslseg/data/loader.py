"""Training and evaluation loaders: the one entry point the engine calls.

``make_train_loader(dataset, split, ...)`` returns a :class:`TrainLoader` that yields
:class:`~sslseg.data.Batch` objects; ``make_eval_loader(dataset, cases)`` yields whole
:class:`~sslseg.data.Volume` s.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

import numpy as np
import torch

from .batch import Batch, collate
from .dataset import CaseDataset, Volume, load
from .errors import did_you_mean
from .policies import RandAugment, StrongAugment
from .samplers import DistributedTwoStreamBatchSampler, PatchSampler, TwoStreamBatchSampler, derive_seed, seed_worker
from .splits import Split
from .transforms import Augment2D, Augment3D

STRONG_AUGMENTS = {"jitter": StrongAugment, "randaugment": RandAugment}


@contextlib.contextmanager
def _single_thread() -> Iterator[None]:
    """Run data preparation on one intra-op thread when in the main process.

    Workers already run single-threaded. In the main process (``num_workers=0``) the per-sample
    ops are small; handing them to the intra-op thread pool costs milliseconds per op on a busy
    CPU (measured: a 2-sample ``torch.stack`` of 48^3 patches took 36 ms), so they run on one
    thread and the pool is restored for the model.
    """
    if torch.utils.data.get_worker_info() is not None:
        yield
        return
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _collate(samples: Sequence[dict[str, Any]]) -> Batch:
    with _single_thread():
        return collate(samples)


class TrainSamples(torch.utils.data.Dataset):
    """Training samples of a split: indices ``[0, n_labeled)`` labeled, the rest unlabeled.

    Items are dicts: ``image`` ``(C, *P)``, ``label`` ``(*P)`` (labeled only: unlabeled samples
    have no ``label`` key and their label files are never read), ``labeled``, ``id``, ``case``, ``spacing``
    and ``strong0``/``strong1`` strong views when a strong augmentation is set. 2D datasets
    contribute one item per slice of every training volume; 3D datasets one item per volume.

    Args:
        dataset: the dataset.
        labeled_cases: cases whose labels are used.
        unlabeled_cases: cases used without labels.
        augment: geometric augment ``(image, label, *, generator, spacing) -> (image, label, spacing)``.
        strong: photometric strong augment ``(image, *, generator) -> image``, or None.
        strong_views: strong views per unlabeled sample (1 or 2); labeled samples get one.
        seed: seed used when an index comes without a per-sample seed.
        patch_sampler: reads 3D samples as patches (a :class:`~sslseg.data.samplers.PatchSampler`,
            for preprocessed, memory-mapped volumes: foreground oversampling, only the patch read)
            before ``augment``; None reads whole volumes.
    """

    def __init__(
        self,
        dataset: CaseDataset,
        labeled_cases: Sequence[str],
        unlabeled_cases: Sequence[str],
        augment: Callable,
        strong: Callable | None = None,
        strong_views: int = 1,
        seed: int = 0,
        patch_sampler: PatchSampler | None = None,
    ) -> None:
        self.dataset = dataset
        self.patch_sampler = patch_sampler
        self.labeled_refs = dataset.training_refs(labeled_cases)
        self.unlabeled_refs = dataset.training_refs(unlabeled_cases)
        self.refs = self.labeled_refs + self.unlabeled_refs
        self.n_labeled = len(self.labeled_refs)
        self.augment = augment
        self.strong = strong
        self.strong_views = strong_views
        self.seed = seed
        vids = dict.fromkeys(v for v, _ in self.refs)
        self._spacing = {v: dataset.volume_spacing(v) for v in vids}

    def __len__(self) -> int:
        return len(self.refs)

    def __getitems__(self, keys: Sequence[int | tuple[int, int]]) -> list[dict[str, Any]]:
        """Fetch a batch (the DataLoader calls this instead of ``__getitem__`` per item)."""
        with _single_thread():
            return [self[k] for k in keys]

    def __getitem__(self, key: int | tuple[int, int]) -> dict[str, Any]:
        index, seed = key if isinstance(key, tuple) else (int(key), derive_seed(self.seed, int(key)))
        if not 0 <= index < len(self.refs):
            raise IndexError(f"sample index {index} out of range [0, {len(self.refs)})")
        labeled = index < self.n_labeled
        vid, k = self.refs[index]
        record = self.dataset.record(vid)
        spacing = self._spacing[vid]
        g = torch.Generator().manual_seed(int(seed))
        if k is None and self.patch_sampler is not None:
            image, label = self.patch_sampler(record, labeled, g)
            sid = vid
        elif k is None:
            image, label = record.read(with_label=labeled)
            sid = vid
        else:
            image, label = record.read_slice(k, with_label=labeled)
            spacing = spacing[1:]
            sid = f"{vid}_slice_{k}"
        img_t = torch.from_numpy(np.ascontiguousarray(image))
        lab_t = torch.from_numpy(np.ascontiguousarray(label)) if labeled else None
        img_t, lab_t, spacing = self.augment(img_t, lab_t, generator=g, spacing=tuple(spacing))
        sample: dict[str, Any] = {
            "image": img_t.float().contiguous(),
            "labeled": labeled,
            "id": sid,
            "case": record.case,
            "spacing": spacing,
        }
        if labeled:
            sample["label"] = lab_t.long().contiguous()
        if self.strong is not None:
            views = 1 if labeled else self.strong_views
            for i in range(views):
                sample[f"strong{i}"] = self.strong(sample["image"], generator=g).contiguous()
        return sample


class TrainLoader:
    """Iterable of :class:`~sslseg.data.Batch` built by :func:`make_train_loader`.

    ``for batch in loader`` runs ONE epoch (``len(loader)`` batches) and then advances the epoch,
    so a second loop sees fresh permutations and augmentations. :meth:`forever` yields batches
    without end, which suits iteration-based training; ``forever(start_step=t)`` resumes exactly
    where step ``t`` would have been (same batches, same augmentations).

    Attributes:
        samples: the :class:`TrainSamples` dataset.
        sampler: the two-stream batch sampler.
        dataloader: the underlying ``torch.utils.data.DataLoader``.
        epoch: the epoch the next iteration will run.
    """

    def __init__(self, dataloader: torch.utils.data.DataLoader, sampler: TwoStreamBatchSampler, samples: TrainSamples) -> None:
        self.dataloader = dataloader
        self.sampler = sampler
        self.samples = samples
        self.epoch = 0
        self._start = 0

    @property
    def num_labeled_samples(self) -> int:
        """Labeled training samples (slices in 2D, volumes in 3D)."""
        return self.samples.n_labeled

    @property
    def num_unlabeled_samples(self) -> int:
        """Unlabeled training samples."""
        return len(self.samples) - self.samples.n_labeled

    def __len__(self) -> int:
        return len(self.sampler)

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        """Run ``epoch`` next, skipping its first ``start`` batches (for resuming)."""
        self.sampler.set_epoch(epoch, start)
        self.epoch, self._start = epoch, start

    def __iter__(self) -> Iterator[Batch]:
        self.sampler.set_epoch(self.epoch, self._start)
        yield from self.dataloader
        self.epoch += 1
        self._start = 0

    def forever(self, start_step: int = 0) -> Iterator[Batch]:
        """Yield batches endlessly, starting at global step ``start_step``."""
        if start_step < 0:
            raise ValueError(f"start_step must be >= 0, got {start_step}")
        epoch, start = divmod(int(start_step), len(self))
        self.set_epoch(epoch, start)
        while True:
            yield from self

    def __repr__(self) -> str:
        s = self.sampler
        return (
            f"TrainLoader({self.num_labeled_samples} labeled + {self.num_unlabeled_samples} unlabeled samples, "
            f"labeled_bs={s.labeled_bs}, unlabeled_bs={s.unlabeled_bs}, {len(self)} batches/epoch)"
        )


def _strong(strong_aug: bool | str | Callable | None) -> Callable | None:
    if strong_aug is None or strong_aug is False:
        return None
    if strong_aug is True:
        return StrongAugment()
    if isinstance(strong_aug, str):
        if strong_aug not in STRONG_AUGMENTS:
            raise ValueError(did_you_mean(strong_aug, STRONG_AUGMENTS, "strong_aug"))
        return STRONG_AUGMENTS[strong_aug]()
    if callable(strong_aug):
        return strong_aug
    raise TypeError(f"strong_aug must be a bool, 'jitter', 'randaugment' or a callable, got {strong_aug!r}")


def make_train_loader(
    dataset: CaseDataset | str,
    split: Split,
    *,
    patch_size: Sequence[int] | int | None,
    labeled_bs: int,
    unlabeled_bs: int,
    seed: int = 0,
    num_workers: int = 0,
    strong_aug: bool | str | Callable | None = False,
    strong_views: int = 1,
    augment: Callable | None = None,
    batches_per_epoch: int | None = None,
    pin_memory: bool = False,
    distributed: bool | tuple[int, int] = False,
    persistent_workers: bool | None = None,
    use_plan: bool = True,
) -> TrainLoader:
    """Build the training loader of a split: two-stream batches with augmentation.

    2D datasets (ACDC-like) train on slices of the training cases (``data/slices`` in the h5
    layout) with :class:`Augment2D` (rot90+flip or small rotation, resize to the patch); 3D
    datasets on volumes with :class:`Augment3D` (foreground-aware random crop, rot90, flips).

    Raw NIfTI folders are planned and preprocessed on first use (:meth:`CaseDataset.prepare`:
    crop, normalise, resample to the plan's spacing, cached as memory-mapped arrays); 3D patches
    are then read from the cache, one in three labeled patches (the plan's
    ``foreground_oversample``) centred on a foreground voxel of a random present class, unlabeled
    patches uniformly. SSL4MIS h5 layouts and phantoms are read exactly as stored.

    Args:
        dataset: a :class:`CaseDataset` (or a spec for :func:`load`).
        split: the split; its labeled cases feed the labeled stream, its unlabeled cases the
            unlabeled stream (their labels are never read).
        patch_size: training patch, ``(H, W)`` in 2D or ``(D, H, W)`` in 3D (an int for a
            square/cube). May be None only when ``augment`` is given.
        labeled_bs: labeled samples per batch (per rank when distributed).
        unlabeled_bs: unlabeled samples per batch; 0 for fully supervised training.
        seed: run seed; batches and augmentations are reproducible from it, independently of
            ``num_workers``.
        num_workers: DataLoader worker processes.
        strong_aug: strong views for weak/strong methods: False (none), True or ``"jitter"``
            (:class:`StrongAugment`), ``"randaugment"`` (:class:`RandAugment`), or a callable
            ``(image, *, generator) -> image``.
        strong_views: 1, or 2 for two independent unlabeled strong views (UniMatch).
        augment: replaces the default geometric pipeline (same call signature as
            :class:`Augment2D`).
        batches_per_epoch: epoch length (default ``max(1, labeled samples // labeled_bs)``).
        pin_memory: pin batches (when training on a GPU).
        distributed: True to shard streams across ``torch.distributed`` ranks, or an explicit
            ``(num_replicas, rank)``.
        persistent_workers: keep workers alive across epochs (default: True when
            ``num_workers > 0``).
        use_plan: plan and preprocess raw NIfTI folders (default); False reads them as stored
            (per-volume normalisation on read, no resampling, uniform crops of whole volumes),
            the path of sslseg before plans, kept for comparisons.

    Returns:
        A :class:`TrainLoader`: ``for batch in loader`` is one epoch; ``loader.forever()`` is
        endless.

    Example:
        >>> ds = load("synthetic:acdc?cases=6&slices=2&size=32")
        >>> loader = make_train_loader(ds, ds.split(labeled=2), patch_size=32, labeled_bs=2, unlabeled_bs=2)
        >>> batch = next(iter(loader))
        >>> tuple(batch.labeled_image.shape), tuple(batch.labeled_label.shape), tuple(batch.unlabeled_image.shape)
        ((2, 1, 32, 32), (2, 32, 32), (2, 1, 32, 32))
    """
    dataset = load(dataset)
    if not isinstance(split, Split):
        raise TypeError(f"split must be a sslseg.data.Split, got {type(split).__name__}")
    dataset.check_split(split)
    if isinstance(num_workers, bool) or not isinstance(num_workers, int) or num_workers < 0:
        raise ValueError(f"num_workers must be an int >= 0, got {num_workers!r}")
    if strong_views not in (1, 2):
        raise ValueError(f"strong_views must be 1 or 2, got {strong_views!r}")
    if not split.labeled_cases:
        raise ValueError("split has no labeled cases; a training loader needs at least one")
    if use_plan:
        dataset.prepare()
    patch_sampler = None
    if dataset.plan is not None and dataset.dim == 3:
        if patch_size is None:
            patch_size = dataset.plan.patch_size
        ps = (int(patch_size),) * 3 if isinstance(patch_size, int) else tuple(patch_size)
        patch_sampler = PatchSampler(ps, dataset.plan.foreground_oversample)
        if augment is None:  # the patch is already cut (foreground-aware): flips and rot90 only
            augment = Augment3D(ps, foreground_prob=0.0)
    if augment is None:
        if patch_size is None:
            raise ValueError("patch_size must be given unless augment is")
        augment = Augment2D(patch_size) if dataset.dim == 2 else Augment3D(patch_size)
    strong = _strong(strong_aug)
    if isinstance(unlabeled_bs, int) and not isinstance(unlabeled_bs, bool) and unlabeled_bs > 0 and not split.unlabeled_cases:
        raise ValueError(
            f"unlabeled_bs={unlabeled_bs} but the split has no unlabeled cases (labeled={len(split.labeled_cases)} "
            "of all training cases); use unlabeled_bs=0 for fully supervised training"
        )
    unlabeled_cases = split.unlabeled_cases if unlabeled_bs else ()
    samples = TrainSamples(dataset, split.labeled_cases, unlabeled_cases, augment, strong, strong_views, seed,
                           patch_sampler=patch_sampler)
    labeled_idx = range(samples.n_labeled)
    unlabeled_idx = range(samples.n_labeled, len(samples))
    kwargs = dict(seed=seed, batches_per_epoch=batches_per_epoch)
    if distributed is True:
        sampler: TwoStreamBatchSampler = DistributedTwoStreamBatchSampler(labeled_idx, unlabeled_idx, labeled_bs, unlabeled_bs, **kwargs)
    elif distributed:
        world, rank = distributed
        sampler = DistributedTwoStreamBatchSampler(
            labeled_idx, unlabeled_idx, labeled_bs, unlabeled_bs, num_replicas=world, rank=rank, **kwargs
        )
    else:
        sampler = TwoStreamBatchSampler(labeled_idx, unlabeled_idx, labeled_bs, unlabeled_bs, **kwargs)
    if persistent_workers is None:
        persistent_workers = num_workers > 0
    dataloader = torch.utils.data.DataLoader(
        samples,
        batch_sampler=sampler,
        num_workers=num_workers,
        collate_fn=_collate,
        pin_memory=pin_memory,
        worker_init_fn=seed_worker if num_workers else None,
        generator=torch.Generator().manual_seed(derive_seed(seed, 7)),
        persistent_workers=bool(persistent_workers and num_workers > 0),
    )
    return TrainLoader(dataloader, sampler, samples)


def _identity(x: Volume) -> Volume:
    return x


def make_eval_loader(
    dataset: CaseDataset | str, cases: Iterable[str], *, num_workers: int = 0, with_label: bool = True
) -> torch.utils.data.DataLoader:
    """Loader of whole :class:`Volume` s (one per item, unbatched) for validation or testing.

    Args:
        dataset: the dataset.
        cases: e.g. ``split.val_cases`` or ``split.test_cases``.
        num_workers: worker processes reading volumes ahead.
        with_label: read labels (False for inference-only use).
    """
    dataset = load(dataset)
    return torch.utils.data.DataLoader(
        dataset.eval_dataset(cases, with_label=with_label), batch_size=None, num_workers=num_workers, collate_fn=_identity
    )
