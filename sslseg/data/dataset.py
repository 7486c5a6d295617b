"""``load(spec)`` and the dataset object it returns.

A :class:`CaseDataset` is a catalogue of cases (patients) and their volumes, wherever the voxels
live (SSL4MIS h5 layouts, NIfTI folders, in-memory synthetic phantoms). It splits by case, reads
whole volumes for evaluation and feeds :func:`sslseg.data.make_train_loader` for training.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .errors import DataError, DataValidationError, check_choice, did_you_mean
from .layouts import DEFAULT_CLASSES, LAYOUTS, Index, detect_layout, index_layout
from .splits import Split, make_split
from .storage import VolumeRecord

INTENSITY_MODES = ("zscore", "minmax", "none")
_SPACING_WARNED: set[str] = set()


@dataclass
class Volume:
    """A whole volume for evaluation or inference.

    Attributes:
        image: ``(C, D, H, W)`` float32 tensor.
        label: ``(D, H, W)`` int64 tensor, or None when labels were not requested.
        volume_id: unique volume id (``patient001_frame01``; equal to ``case_id`` outside ACDC).
        case_id: the case (patient) the volume belongs to.
        spacing: voxel spacing in mm, ``(D, H, W)`` order.
        affine: 4x4 index-to-scanner matrix for this array order (NIfTI only; None for h5).
    """

    image: torch.Tensor
    label: torch.Tensor | None
    volume_id: str
    case_id: str
    spacing: tuple[float, ...]
    affine: np.ndarray | None = None


class EvalVolumes(torch.utils.data.Dataset):
    """Map-style dataset of whole :class:`Volume` s (use with ``batch_size=None``)."""

    def __init__(self, dataset: CaseDataset, volume_ids: Sequence[str], with_label: bool = True) -> None:
        self.dataset = dataset
        self.volume_ids = list(volume_ids)
        self.with_label = with_label

    def __len__(self) -> int:
        return len(self.volume_ids)

    def __getitem__(self, i: int) -> Volume:
        return self.dataset.read_volume(self.volume_ids[i], with_label=self.with_label)


class CaseDataset:
    """A segmentation dataset organised by case (patient); returned by :func:`load`.

    Attributes:
        name: the spec it was loaded from (``synthetic:acdc`` or the root path).
        layout: ``acdc``, ``brats``, ``la``, ``nifti`` or ``synthetic``.
        root: the data folder (None for in-memory synthetic data).
        dim: training dimensionality: 2 (slice-wise, ACDC-like) or 3 (patches of volumes).
        official: the layout's own split lists as case ids (``train``/``val``/``test`` keys,
            possibly missing or empty).
        class_names: one name per class, background first.
    """

    def __init__(
        self,
        index: Index,
        *,
        name: str,
        num_classes: int | None = None,
        dim: int | None = None,
        spacing: Sequence[float] | None = None,
    ) -> None:
        self.name = name
        self.layout = index.layout
        self.root = index.root
        self._index = index
        self._volumes: dict[str, VolumeRecord] = index.volumes
        self.official = {k: tuple(v) for k, v in index.official.items()}
        self.dim = int(dim if dim is not None else index.dim)
        self._spacing_override = tuple(float(s) for s in spacing) if spacing is not None else None
        for rec in self._volumes.values():
            rec.spacing_override = self._spacing_override
        self._num_classes = num_classes
        self.class_names = index.class_names
        if num_classes is not None and (self.class_names is None or len(self.class_names) != num_classes):
            self.class_names = ("background",) + tuple(f"class{i}" for i in range(1, num_classes))
        by_case: dict[str, list[str]] = {}
        for vid, rec in self._volumes.items():
            by_case.setdefault(rec.case, []).append(vid)
        self._by_case = {c: tuple(sorted(v)) for c, v in sorted(by_case.items())}
        self._spacing: tuple[float, ...] | None = None
        self._in_channels: int | None = None
        self._raw_volumes: dict[str, VolumeRecord] = dict(self._volumes)
        #: The :class:`~sslseg.data.Plan` whose preprocessed cache this dataset reads (after
        #: :meth:`prepare`), else None (volumes read as stored).
        self.plan = None
        self.cache_dir: Path | None = None

    # ---------------------------------------------------------------------------- preprocessing
    @property
    def needs_preprocessing(self) -> bool:
        """True for raw NIfTI folders (resampled and normalised by a plan before training); False
        for SSL4MIS h5 layouts and phantoms, which are stored preprocessed (identity plan)."""
        return self.layout == "nifti"

    def prepare(self, plan=None, *, jobs: int = 1, out: str | os.PathLike | None = None,
                progress: bool | None = None) -> CaseDataset:
        """Plan (unless given) and preprocess this dataset, then read it from the cache.

        Afterwards every read (training patches, whole volumes for validation) comes from the
        memory-mapped cache at the plan's target spacing, cropped and normalised; ``spacing`` is
        the target spacing and ``plan`` is set. Cheap when the cache is complete. A no-op for data
        that need no preprocessing (see :attr:`needs_preprocessing`).

        Args:
            plan: a :class:`~sslseg.data.Plan` or ``plan.json`` path; default ``plan(self, dim=self.dim)``.
            jobs: worker processes for preprocessing.
            out: cache folder (default: keyed by data and plan under the cache root).
            progress: progress bar (default: when stderr is a terminal).

        Returns:
            ``self``.
        """
        if not self.needs_preprocessing:
            return self
        from .planning import Plan
        from .planning import plan as make_plan
        from .preprocess import cached_records, preprocess

        if self.plan is not None and plan is None:
            return self
        self._volumes = self._raw_volumes  # plan and preprocess from the files
        if plan is None:
            plan = make_plan(self, dim=self.dim)
        elif not isinstance(plan, Plan):
            plan = Plan.from_json(plan)
        folder = preprocess(self, plan, out=out, jobs=jobs, progress=progress)
        self._volumes = dict(cached_records(self, plan, folder))
        self.plan, self.cache_dir = plan, folder
        self.dim = plan.dim
        self._spacing = None
        return self

    # ------------------------------------------------------------------------------- catalogue
    @property
    def cases(self) -> tuple[str, ...]:
        """Case (patient) ids, sorted. Splits are made over these."""
        return tuple(self._by_case)

    @property
    def volume_ids(self) -> tuple[str, ...]:
        """Every volume id, sorted by case."""
        return tuple(v for vs in self._by_case.values() for v in vs)

    @property
    def extra_images(self) -> tuple[str, ...]:
        """Unlabeled images found beside the dataset (NIfTI ``imagesTs`` without ``labelsTs``)."""
        return tuple(self._index.extra_images)

    def volumes_of(self, case: str) -> tuple[str, ...]:
        """Volume ids of ``case`` (two frames per ACDC patient, one volume elsewhere)."""
        if case not in self._by_case:
            raise KeyError(did_you_mean(case, self._by_case, "case"))
        return self._by_case[case]

    def raw_record(self, volume_id: str) -> VolumeRecord:
        """The record of a volume as stored (its files), even after :meth:`prepare`."""
        return self._lookup(self._raw_volumes, volume_id)

    def _lookup(self, volumes: dict[str, VolumeRecord], volume_id: str) -> VolumeRecord:
        rec = volumes.get(volume_id) or self._index.extra_images.get(volume_id)
        if rec is None:
            raise KeyError(did_you_mean(volume_id, [*volumes, *self._index.extra_images], "volume"))
        return rec

    @property
    def unlabeled_cases(self) -> tuple[str, ...]:
        """Cases whose images have no label (NIfTI ``imagesTr`` without label, ``imagesUnlabeled``)."""
        return tuple(self.official.get("unlabeled", ()))

    def record(self, volume_id: str) -> VolumeRecord:
        """The storage record of a volume (advanced use: reading slices, file locations); after
        :meth:`prepare`, its preprocessed cache record."""
        return self._lookup(self._volumes, volume_id)

    @property
    def num_classes(self) -> int:
        """Number of classes including background."""
        if self._num_classes is None:
            if self.class_names is not None and self.layout in DEFAULT_CLASSES:
                # An SSL4MIS layout's class count is a default, not a fact of the files: a folder in
                # the ACDC layout with 3 classes must not train (and score an empty class) as 4.
                self._num_classes = self._check_default_classes()
            elif self.class_names is not None:
                self._num_classes = len(self.class_names)
            else:
                # No dataset.json and no num_classes=: scan every label once, and say so.
                top = 0
                for rec in self._volumes.values():
                    if getattr(rec, "label_path", True) is None:
                        continue  # an unlabeled image
                    _, lab = rec.read(with_label=True)
                    top = max(top, int(lab.max()) if lab.size else 0)
                self._num_classes = top + 1
                warnings.warn(
                    f"{self.name}: num_classes not given and no dataset.json labels; scanned the labels "
                    f"and found {self._num_classes} classes (pass num_classes= to load() to set it)",
                    stacklevel=2,
                )
                self.class_names = ("background",) + tuple(f"class{i}" for i in range(1, self._num_classes))
        return self._num_classes

    def _check_default_classes(self) -> int:
        """The layout's default class count, after checking it against the labels' largest value.

        The largest label value of each volume is cached under ``<cache root>/label_max/`` keyed by
        its files' paths, sizes and modification times, so the scan reads each file once.

        A label value above the default (a corrupt file, or a dataset with more classes) is left
        to the data checks (:meth:`validate`, run by ``fit``), which name the file and the value.

        Raises:
            DataError: The labels hold fewer classes than the layout's default (the missing ones
                would be trained and scored as empty classes, Dice 1 in every mean).
        """
        from .cache import cache_root, files_key, read_memo, stable_hash, write_memo
        from .validate import _record_files

        default = len(DEFAULT_CLASSES[self.layout])
        store = cache_root() / "label_max" / f"{stable_hash([str(self.root or self.name)])}.json"
        known: dict[str, int] = read_memo(store)
        top, changed = 0, False
        for rec in self._raw_volumes.values():
            files = _record_files(rec)
            try:
                key = files_key(files) if files else None
            except OSError:
                key = None  # a missing file: the read below names it
            if key is not None and key in known:
                top = max(top, int(known[key]))
                continue
            try:
                _, lab = rec.read(with_label=True)
            except (DataError, OSError, KeyError, ValueError):
                continue  # an unreadable file: the data checks (validate) name it
            value = int(lab.max()) if lab is not None and lab.size else 0
            top = max(top, value)
            if key is not None:
                known[key], changed = value, True
        if changed:
            write_memo(store, known)
        if top + 1 < default:
            where = self.root or self.name
            raise DataError(
                f"{where}: the {self.layout} layout's default is {default} classes "
                f"({', '.join(DEFAULT_CLASSES[self.layout])}), but the labels' largest value is {top} "
                f"({top + 1} classes); give the count: num_classes={top + 1} "
                f"(`--set num_classes={top + 1}`, or load(..., num_classes={top + 1}))")
        return default

    @property
    def spacing(self) -> tuple[float, ...]:
        """Voxel spacing in mm, ``(D, H, W)``: the override, else stored (median over volumes).

        SSL4MIS h5 files store no spacing: then 1.0 mm is used and a warning says so once.
        """
        if self._spacing is None:
            if self._spacing_override is not None:
                self._spacing = self._spacing_override
            else:
                stored = [rec.stored_spacing() for rec in self._volumes.values()]
                known = [s for s in stored if s is not None]
                if known:
                    self._spacing = tuple(float(x) for x in np.median(np.asarray(known), axis=0))
                else:
                    self._spacing = (1.0, 1.0, 1.0)
                if len(known) < len(stored):
                    self._warn_spacing()
        return self._spacing

    def _warn_spacing(self) -> None:
        if self.name not in _SPACING_WARNED:
            _SPACING_WARNED.add(self.name)
            warnings.warn(
                f"{self.name}: the h5 files store no voxel spacing; using 1.0 mm per axis, so distances "
                "(HD95, ASD) are in voxels. Pass spacing=(d, h, w) to sslseg.data.load() to fix it.",
                stacklevel=3,
            )

    def volume_spacing(self, volume_id: str) -> tuple[float, ...]:
        """Spacing of one volume: the override, the stored value, else the dataset spacing."""
        rec = self.record(volume_id)
        sp = rec.spacing(default=())
        if not sp:
            sp = self.spacing
            self._warn_spacing()
        return tuple(sp)

    @property
    def intensity(self) -> str:
        """The per-volume normalisation convention of this dataset (``zscore``, ``minmax`` or ``none``).

        NIfTI folders read without a plan apply it on read, and models trained so record it for
        inference. Data stored normalised (SSL4MIS h5, phantoms) are read as they are: their
        models record ``none``, whatever the convention their preprocessing followed.

        NIfTI folders: the ``intensity`` given to :func:`load`. SSL4MIS h5 files are stored
        normalised by their preprocessing: min-max for ACDC, z-score for LA and BraTS (the
        synthetic phantoms follow the same conventions).
        """
        first = self._volumes[self.volume_ids[0]]
        mode = getattr(first, "intensity", None)
        if mode is not None:
            return mode
        kind = self.layout if self.layout != "synthetic" else self.name.split(":", 1)[-1].split("?", 1)[0]
        return "minmax" if kind == "acdc" else "zscore"

    @property
    def in_channels(self) -> int:
        """Number of image channels (1 for SSL4MIS h5 files)."""
        if self._in_channels is None:
            first = self._volumes[self.volume_ids[0]]
            img, _ = first.read_slice(first.slice_indices()[0], with_label=False)
            self._in_channels = int(img.shape[0])
        return self._in_channels

    # ------------------------------------------------------------------------------------ splits
    def split(
        self,
        labeled: int | float | str | None = None,
        *,
        seed: int = 0,
        order: str = "random",
        fold: int | None = None,
        folds: int = 5,
        fold_seed: int = 0,
        val_fraction: float = 0.1,
        test_fraction: float = 0.2,
    ) -> Split:
        """Split the cases into labeled / unlabeled / validation / test.

        Rules:

        * The layout's own lists give train/val/test (ACDC: 70/10/20 patients). Without lists
          (NIfTI folders), ``test_fraction`` then ``val_fraction`` of the cases are held out,
          seeded by ``fold_seed``. Without a val list (LA), ``val_fraction`` of train is held out.
          The test cases are never used for selection.
        * ``fold=k`` (k-fold cross-validation by case): train+val are pooled, cut into ``folds``
          seeded folds (``fold_seed``); fold ``k`` is validation, the rest is training.
        * ``labeled`` picks labeled training cases: an int is a number of cases (patients), a float
          in (0, 1] a fraction of them, None or ``"all"`` all (fully supervised). ``order="random"``
          draws them with ``seed``; ``order="ssl4mis"`` takes the first N in list order (SSL4MIS's legacy).
        * Images without labels (NIfTI ``imagesTr`` without a ``labelsTr`` file, ``imagesUnlabeled/``)
          are always unlabeled: validation is drawn from the labeled training cases, the test split
          is ``imagesTs`` with ``labelsTs`` when present (else drawn from the labeled cases),
          ``labeled=N`` takes N of the remaining labeled cases, and every image without a label
          joins ``unlabeled_cases``. Asking for more labeled cases than exist is a ``ValueError``
          giving the counts. The rule is recorded in ``split.meta`` (saved in ``split.json``).

        Args:
            labeled: number or fraction of training cases that are labeled; None for all.
            seed: seed of the labeled draw (vary it across repeated runs).
            order: ``"random"`` or ``"ssl4mis"``.
            fold: cross-validation fold in ``[0, folds)``, or None for the layout's split.
            folds: number of folds.
            fold_seed: seed of the fold assignment and of held-out carving (keep it fixed across
                seeds so that folds stay comparable).
            val_fraction: fraction held out for validation where the layout has no val list.
            test_fraction: fraction held out for testing where the layout has no lists at all.

        Returns:
            The :class:`Split`; save it with the run (``split.save(path)``).

        Example:
            >>> ds = load("synthetic:acdc?cases=10&slices=2&size=32")
            >>> s = ds.split(labeled=2, seed=0)
            >>> len(s.labeled_cases), len(s.unlabeled_cases), len(s.val_cases), len(s.test_cases)
            (2, 5, 1, 2)
        """
        return make_split(
            self.cases,
            self.official,
            labeled=labeled,
            seed=seed,
            order=order,
            fold=fold,
            folds=folds,
            fold_seed=fold_seed,
            val_fraction=val_fraction,
            test_fraction=test_fraction,
            dataset=self.name,
        )

    def check_split(self, split: Split) -> Split:
        """Raise a ``DataError`` if ``split`` names cases this dataset does not have."""
        known = set(self._by_case)
        for group in ("labeled_cases", "unlabeled_cases", "val_cases", "test_cases"):
            missing = [c for c in getattr(split, group) if c not in known]
            if missing:
                raise DataError(
                    f"split {group} names cases not in dataset {self.name!r}: {missing[:5]}"
                    + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
                )
        return split

    def load_split(self, path: str | os.PathLike) -> Split:
        """Read a split JSON saved with a run and check it against this dataset."""
        return self.check_split(Split.load(path))

    # ------------------------------------------------------------------------------------ access
    def _volume_ids_of(self, cases: Iterable[str]) -> list[str]:
        out: list[str] = []
        for c in cases:
            out.extend(self.volumes_of(c))
        return out

    def read_volume(self, volume_id: str, *, with_label: bool = True) -> Volume:
        """Read one whole volume (image, label, spacing, affine) as tensors."""
        rec = self.record(volume_id)
        image, label = rec.read(with_label=with_label)
        return Volume(
            image=torch.from_numpy(np.ascontiguousarray(image)),
            label=None if label is None else torch.from_numpy(np.ascontiguousarray(label)),
            volume_id=volume_id,
            case_id=rec.case,
            spacing=self.volume_spacing(volume_id),
            affine=rec.affine(),
        )

    def iter_volumes(self, cases: Iterable[str], *, with_label: bool = True) -> Iterator[Volume]:
        """Yield every volume of ``cases`` (e.g. ``split.val_cases``) in order."""
        for vid in self._volume_ids_of(cases):
            yield self.read_volume(vid, with_label=with_label)

    def eval_dataset(self, cases: Iterable[str], *, with_label: bool = True) -> EvalVolumes:
        """A map-style dataset of the volumes of ``cases``, for a ``DataLoader(batch_size=None)``."""
        return EvalVolumes(self, self._volume_ids_of(cases), with_label)

    def training_refs(self, cases: Iterable[str]) -> list[tuple[str, int | None]]:
        """Training items of ``cases``: ``(volume_id, slice)`` for 2D, ``(volume_id, None)`` for 3D."""
        refs: list[tuple[str, int | None]] = []
        for vid in self._volume_ids_of(cases):
            if self.dim == 2:
                refs.extend((vid, k) for k in self._volumes[vid].slice_indices())
            else:
                refs.append((vid, None))
        return refs

    # ------------------------------------------------------------------------------------- misc
    def validate(self, *, raise_on_error: bool = True):
        """Read every file once and report every problem (see :mod:`sslseg.data.validate`).

        Args:
            raise_on_error: raise :class:`DataValidationError` listing all problems if any.

        Returns:
            A :class:`~sslseg.data.validate.ValidationReport`.
        """
        from .validate import validate_dataset

        return validate_dataset(self, raise_on_error=raise_on_error)

    def summary(self) -> str:
        """A few lines describing the dataset."""
        lines = [
            f"{self.name} (layout {self.layout}, {self.dim}D training)",
            f"  {len(self.cases)} cases, {len(self._volumes)} volumes, {self.num_classes} classes "
            f"{list(self.class_names or ())}",
            f"  spacing {self.spacing} mm",
        ]
        if any(self.official.values()):
            sizes = ", ".join(f"{k} {len(v)}" for k, v in self.official.items())
            lines.append(f"  official lists: {sizes} cases")
        n_unl = len(self.unlabeled_cases)
        lines.append(f"  {len(self.cases) - n_unl} labeled, {n_unl} unlabeled cases")
        return "\n".join(lines)

    def __len__(self) -> int:
        return len(self._by_case)

    def __repr__(self) -> str:
        return f"CaseDataset({self.name!r}, layout={self.layout!r}, cases={len(self)}, dim={self.dim})"


def load(
    spec: str | os.PathLike | CaseDataset,
    *,
    layout: str | None = None,
    spacing: Sequence[float] | None = None,
    num_classes: int | None = None,
    dim: int | None = None,
    intensity: str = "zscore",
    strict: bool = True,
) -> CaseDataset:
    """Open a dataset: a data folder (layout detected) or ``synthetic:<kind>[?options]``.

    Synthetic specs generate phantoms in memory, deterministically, with no download:
    ``synthetic:acdc``, ``synthetic:la``, ``synthetic:brats``, with options as a query string, e.g.
    ``synthetic:acdc?cases=12&slices=6&size=64&seed=1`` (see :func:`sslseg.data.synthetic_options`).
    ``synthetic:ct`` (abdomen CT in HU, per-case spacing, unlabeled images) is written once into
    the cache as an nnU-Net raw folder and read like one.

    NIfTI folders (nnU-Net v2 raw: ``imagesTr``/``labelsTr``/``imagesTs``/``labelsTs`` and
    ``dataset.json``; MSD 4D files) may hold unlabeled images: in ``imagesTr`` without a label
    file, or in ``imagesUnlabeled/``. They are read as stored; training plans and preprocesses
    them on first use (:meth:`CaseDataset.prepare`).

    Args:
        spec: path to a data root, ``synthetic:<kind>[?k=v&...]``, or an already loaded dataset.
        layout: ``acdc``, ``brats``, ``la`` or ``nifti``; detected when None.
        spacing: voxel spacing ``(D, H, W)`` in mm for every volume; needed for mm-based metrics
            on SSL4MIS h5 files, which store none.
        num_classes: number of classes including background (default: the SSL4MIS value for
            acdc/brats/la, ``dataset.json`` for NIfTI, else a scan of the labels).
        dim: 2 for slice-wise training on the first axis, 3 for 3D patches (default: 2 for
            ACDC-like data, 3 otherwise).
        intensity: per-volume normalisation of NIfTI images (``zscore``, ``minmax``, ``none``);
            h5 files are already normalised by their preprocessing and are read as stored.
        strict: raise if the folder has structural problems (missing files named by lists,
            overlapping lists, unpaired images). ``sslseg data check`` uses False and reports
            them through :meth:`CaseDataset.validate` together with the voxel-level problems.

    Returns:
        The :class:`CaseDataset`.

    Raises:
        DataError: the folder does not exist, its layout cannot be detected, or (``strict``) it
            has structural problems; each message names the file and the problem.
    """
    if isinstance(spec, CaseDataset):
        return spec
    check_choice("intensity", intensity, INTENSITY_MODES)
    if dim is not None and dim not in (2, 3):
        raise ValueError(f"dim must be 2 or 3, got {dim!r}")
    if num_classes is not None and (isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 2):
        raise ValueError(f"num_classes must be an int >= 2, got {num_classes!r}")
    if spacing is not None:
        sp = tuple(spacing)
        if len(sp) != 3 or not all(isinstance(s, (int, float)) and s > 0 for s in sp):
            raise ValueError(f"spacing must be three positive numbers (D, H, W) in mm, got {spacing!r}")
    text = os.fspath(spec)
    if text.startswith("synthetic:"):
        from .synthetic import synthetic_index

        index, default_name = synthetic_index(text)
        return CaseDataset(index, name=default_name, num_classes=num_classes, dim=dim, spacing=spacing)
    root = Path(text).expanduser()
    if layout is None:
        layout = detect_layout(root)
    else:
        check_choice("layout", layout, LAYOUTS)
        if not root.is_dir():
            raise DataError(f"{root}: data folder not found")
    index = index_layout(layout, root, intensity)
    if strict and index.problems:
        raise DataValidationError(
            index.problems,
            header=f"{root}: {len(index.problems)} problem(s) in the {layout} layout "
            "(run `sslseg data check` for a full report)",
        )
    if index.warnings:
        first = index.warnings[0]
        warnings.warn(
            f"{root}: {len(index.warnings)} note(s) while reading the {layout} layout, e.g. {first[0]}: {first[1]}. "
            f"Run `sslseg data check {root}` to see them all.",
            stacklevel=2,
        )
    return CaseDataset(index, name=str(root), num_classes=num_classes, dim=dim, spacing=spacing)
