"""``CaseDataset.validate()`` and ``sslseg data check``: read every file once, report every problem.

Checked: structural problems found while indexing (list entries naming missing files, cases in
two lists, training slices of held-out volumes, unpaired NIfTI images and labels, channel gaps),
then per file: empty or unreadable files, missing h5 keys, image/label shape mismatch, labels
outside ``[0, num_classes)`` or not integer-valued, NaN/Inf images, slices that disagree with their
volume, NIfTI (or NRRD/MetaImage) label grids that disagree with the image grid. Nothing is skipped
silently: unused files and classes never seen are reported as warnings.

:func:`check_cases` runs the same per-file checks on the volumes a training run uses, before its
first step, and remembers each volume's verdict in the cache (keyed by the files' paths, sizes and
modification times), so a second run on unchanged files reads nothing.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from collections.abc import Iterable
from typing import TYPE_CHECKING

import numpy as np

from .cache import cache_root, files_key, read_memo, stable_hash, write_memo
from .errors import DataError, DataValidationError
from .storage import (IMAGE_KEY, LABEL_KEY, H5Volume, MemoryVolume, MissingReaderError, NiftiVolume, image_files,
                      is_itk_file, open_image)

if TYPE_CHECKING:
    from .dataset import CaseDataset


@dataclass
class ValidationReport:
    """What :meth:`CaseDataset.validate` found.

    Attributes:
        problems: errors as ``(file, message)``; the dataset is not usable as is.
        warnings: things worth knowing (unused files, classes never seen, assumed spacing).
        files_checked: number of files read.
        classes_seen: label values found across the dataset.
    """

    problems: list[tuple[str, str]] = field(default_factory=list)
    warnings: list[tuple[str, str]] = field(default_factory=list)
    files_checked: int = 0
    classes_seen: set[int] = field(default_factory=set)
    labeled: int = 0
    unlabeled: int = 0

    @property
    def ok(self) -> bool:
        """True when no problem was found."""
        return not self.problems

    def raise_if_problems(self) -> None:
        """Raise :class:`DataValidationError` listing every problem, if any."""
        if self.problems:
            raise DataValidationError(self.problems)

    def __str__(self) -> str:
        lines = [f"checked {self.files_checked} files: {len(self.problems)} problem(s), {len(self.warnings)} warning(s); "
                 f"{self.labeled} labeled, {self.unlabeled} unlabeled volume(s)"]
        lines += [f"ERROR   {p}: {m}" for p, m in self.problems]
        lines += [f"WARNING {p}: {m}" for p, m in self.warnings]
        return "\n".join(lines)


class _Checker:
    def __init__(self, num_classes: int | None) -> None:
        self.report = ValidationReport()
        self.num_classes = num_classes
        self.h5_without_spacing = 0

    def problem(self, where: object, msg: str) -> None:
        self.report.problems.append((str(where), msg))

    def arrays(self, where: object, image: np.ndarray, label: np.ndarray | None, spatial_ndim: int) -> None:
        """Voxel-level checks of one image/label pair."""
        if image.size == 0:
            self.problem(where, f"image is empty (shape {tuple(image.shape)})")
            return
        if image.ndim not in (spatial_ndim, spatial_ndim + 1):
            self.problem(where, f"image is {image.ndim}D {tuple(image.shape)}, expected {spatial_ndim}D (or channel-first {spatial_ndim + 1}D)")
            return
        if not np.issubdtype(image.dtype, np.number):
            self.problem(where, f"image has non-numeric dtype {image.dtype}")
            return
        bad = int(np.count_nonzero(~np.isfinite(image))) if np.issubdtype(image.dtype, np.floating) else 0
        if bad:
            self.problem(where, f"image has {bad} NaN/Inf value(s)")
        if label is None:
            return
        if label.size == 0:
            self.problem(where, f"label is empty (shape {tuple(label.shape)})")
            return
        spatial = tuple(image.shape[-spatial_ndim:])
        if tuple(label.shape) != spatial or (image.ndim == spatial_ndim + 1 and image.shape[1:] != label.shape):
            self.problem(where, f"image shape {tuple(image.shape)} does not match label shape {tuple(label.shape)}")
        if not np.issubdtype(label.dtype, np.number):
            self.problem(where, f"label has non-numeric dtype {label.dtype}")
            return
        if np.issubdtype(label.dtype, np.floating):
            finite = np.isfinite(label)
            if not finite.all():
                self.problem(where, f"label has {int((~finite).sum())} NaN/Inf value(s)")
                label = np.where(finite, label, 0)
            frac = label != np.round(label)
            if frac.any():
                self.problem(where, f"label has non-integer values (e.g. {float(label[frac].flat[0])})")
            label = np.round(label)
        values = np.unique(label).astype(np.int64)
        if self.num_classes is not None:
            out = values[(values < 0) | (values >= self.num_classes)]
            if out.size:
                shown = ", ".join(str(v) for v in out[:5])
                self.problem(where, f"label values [{shown}] outside [0, {self.num_classes}) (num_classes={self.num_classes})")
        self.report.classes_seen.update(int(v) for v in values)

    def h5(self, path: Path, spatial_ndim: int) -> tuple[np.ndarray, np.ndarray] | None:
        """Open, read and check one SSL4MIS h5 file; None if it could not be read."""
        import h5py

        self.report.files_checked += 1
        if not path.is_file():
            self.problem(path, "file not found")
            return None
        if path.stat().st_size == 0:
            self.problem(path, "file is empty (0 bytes)")
            return None
        try:
            with h5py.File(path, "r") as f:
                missing = [k for k in (IMAGE_KEY, LABEL_KEY) if k not in f]
                if missing:
                    self.problem(path, f"missing h5 key(s) {missing} (keys present: {sorted(f.keys())})")
                    return None
                image, label = np.asarray(f[IMAGE_KEY][()]), np.asarray(f[LABEL_KEY][()])
                if "spacing" not in f.attrs:
                    self.h5_without_spacing += 1
        except OSError as exc:
            self.problem(path, f"unreadable h5 file ({exc})")
            return None
        if label.ndim != spatial_ndim:
            kind = "slice" if spatial_ndim == 2 else "volume"
            self.problem(path, f"label is {label.ndim}D {tuple(label.shape)}, expected a {spatial_ndim}D {kind}")
        self.arrays(path, image, label, spatial_ndim)
        return image, label

    def nifti(self, path: Path):
        """Open and read one image file of a NIfTI folder (NIfTI, or NRRD/MetaImage through
        SimpleITK); ``(image, voxels in file order)``, or None if it could not be read."""
        import nibabel as nib

        self.report.files_checked += 1
        if not path.is_file():
            self.problem(path, "file not found")
            return None
        if path.stat().st_size == 0:
            self.problem(path, "file is empty (0 bytes)")
            return None
        if is_itk_file(path):
            try:
                img = open_image(path)
                data = np.asanyarray(img.dataobj)
            except MissingReaderError:
                raise  # not a problem of this file: every such file needs the extra
            except DataError as exc:
                self.problem(path, str(exc).removeprefix(f"{path}: "))
                return None
            return img, data
        try:
            img = nib.load(str(path))
            data = np.asanyarray(img.dataobj)
        except Exception as exc:  # nibabel raises several exception types for corrupt files
            self.problem(path, f"unreadable NIfTI file ({exc})")
            return None
        return img, data


def _check_h5_volume(ck: _Checker, rec: H5Volume) -> None:
    vol = ck.h5(rec.path, 3) if rec.path is not None else None
    for k, path in sorted(rec.slices.items()):
        res = ck.h5(path, 2)
        if res is None or vol is None:
            continue
        image, label = res
        vshape = vol[1].shape
        if label.ndim == 2 and len(vshape) == 3:
            if k >= vshape[0]:
                ck.problem(path, f"slice index {k} is beyond volume {rec.path} with {vshape[0]} slices")
            elif tuple(label.shape) != tuple(vshape[1:]):
                ck.problem(path, f"slice shape {tuple(label.shape)} differs from the in-plane shape {tuple(vshape[1:])} of {rec.path}")


def _check_nifti_volume(ck: _Checker, rec: NiftiVolume) -> None:
    loaded = [ck.nifti(p) for p in rec.image_paths]
    lab = ck.nifti(rec.label_path) if rec.label_path is not None else None
    if any(x is None for x in loaded):
        return
    first_img, first = loaded[0]
    for (img, data), path in zip(loaded, rec.image_paths):
        if data.shape[:3] != first.shape[:3]:
            ck.problem(path, f"channel shape {data.shape} differs from {rec.image_paths[0]} {first.shape}")
        ck.arrays(path, np.asarray(data, dtype=np.float32), None, 3 if data.ndim >= 3 else 2)
    if lab is None:
        return
    lab_img, lab_data = lab
    nd = 3 if first.ndim >= 3 else 2
    image = np.asarray(first, dtype=np.float32)
    if first.ndim == 4:
        image = np.moveaxis(image, -1, 0)
    ck.arrays(rec.label_path, image, np.asarray(lab_data), nd)
    zi = np.asarray(first_img.header.get_zooms()[:3], dtype=np.float64)
    zl = np.asarray(lab_img.header.get_zooms()[:3], dtype=np.float64)
    if zi.shape == zl.shape and not np.allclose(zi, zl, rtol=1e-3, atol=1e-4):
        ck.problem(rec.label_path, f"label spacing {tuple(zl)} differs from image spacing {tuple(zi)}")
    elif not np.allclose(first_img.affine, lab_img.affine, rtol=1e-3, atol=1e-3):
        ck.problem(rec.label_path, f"label affine differs from the image affine of {rec.image_paths[0]} (orientation/origin) "
                   "beyond 1e-3")


def _check_record(ck: _Checker, rec: object) -> None:
    """Every per-file check of one volume record (its files, or its arrays for in-memory data)."""
    if isinstance(rec, H5Volume):
        _check_h5_volume(ck, rec)
    elif isinstance(rec, NiftiVolume):
        _check_nifti_volume(ck, rec)
    elif isinstance(rec, MemoryVolume):
        ck.report.files_checked += 1
        ck.arrays(rec.location, np.asarray(rec.image), rec.label, 3)


def _record_files(rec: object) -> list[Path]:
    """The files a record reads (empty for in-memory volumes, which are never cached)."""
    if isinstance(rec, H5Volume):
        return ([rec.path] if rec.path is not None else []) + list(rec.slices.values())
    if isinstance(rec, NiftiVolume):
        paths = list(rec.image_paths) + ([rec.label_path] if rec.label_path is not None else [])
        return [f for p in paths for f in image_files(p)]  # a .mhd/.nhdr header and its data file
    return []


#: Bump when the checks change, so verdicts cached by an older version are not trusted.
_CHECKS_VERSION = 1


def check_cases(dataset: CaseDataset, cases: Iterable[str], *, cache: bool = True) -> int:
    """Check the files of ``cases`` as stored (before any preprocessing) and refuse bad data.

    The checks are those of :func:`validate_dataset` (unreadable or empty files, missing h5 keys,
    image/label shape mismatches, labels outside ``[0, num_classes)``, NaN/Inf images, slices that
    disagree with their volume), per volume. With ``cache``, each volume's verdict is stored under
    ``<cache root>/checked/`` keyed by its files' paths, sizes and modification times and the class
    count, so unchanged files are not read again; in-memory (synthetic) volumes are always checked.

    Args:
        dataset: The dataset the cases belong to.
        cases: Case ids (e.g. a split's labeled, unlabeled and validation cases).
        cache: Reuse and store verdicts in the cache.

    Returns:
        The number of files read (0 when every verdict came from the cache).

    Raises:
        DataError: One line naming the first bad file and its problem, and how many more were found.
    """
    num_classes = dataset.num_classes
    ids = [vid for case in dict.fromkeys(cases) for vid in dataset.volumes_of(case)]
    store = cache_root() / "checked" / f"{stable_hash([str(dataset.root or dataset.name), num_classes])}.json"
    verdicts: dict[str, list[list[str]]] = read_memo(store) if cache else {}
    problems: list[tuple[str, str]] = []
    files_read, changed = 0, False
    for vid in ids:
        rec = dataset.raw_record(vid)
        files = _record_files(rec)
        key = None
        if cache and files:
            try:
                key = stable_hash([files_key(files), num_classes, _CHECKS_VERSION], 32)
            except OSError:
                key = None  # a missing file: the check below names it
        if key is not None and key in verdicts:
            problems.extend((str(p), str(m)) for p, m in verdicts[key])
            continue
        ck = _Checker(num_classes)
        _check_record(ck, rec)
        files_read += ck.report.files_checked
        problems.extend(ck.report.problems)
        if key is not None:
            verdicts[key] = [list(pm) for pm in ck.report.problems]
            changed = True
    if cache and changed:
        write_memo(store, verdicts)
    if problems:
        path, msg = problems[0]
        more = len(problems) - 1
        where = dataset.root or dataset.name
        tail = (f" (and {more} more problem(s); `sslseg data check {where}` lists them all)" if more
                else "")
        raise DataError(f"{path}: {msg}{tail}")
    return files_read


def validate_dataset(dataset: CaseDataset, *, raise_on_error: bool = True) -> ValidationReport:
    """Check every file of ``dataset`` once; see the module docstring for the checks."""
    index = dataset._index
    known = dataset._num_classes if dataset._num_classes is not None else (
        len(dataset.class_names) if dataset.class_names is not None else None
    )
    ck = _Checker(known)
    ck.report.problems.extend(index.problems)
    ck.report.warnings.extend(index.warnings)
    for rec in dataset._raw_volumes.values():
        _check_record(ck, rec)
    unlabeled = [v for v, r in dataset._raw_volumes.items() if getattr(r, "label_path", 0) is None]
    ck.report.labeled = len(dataset._raw_volumes) - len(unlabeled)
    ck.report.unlabeled = len(unlabeled)
    for vid, rec in index.extra_images.items():
        if isinstance(rec, NiftiVolume):
            for p in rec.image_paths:
                res = ck.nifti(p)
                if res is not None:
                    ck.arrays(p, np.asarray(res[1], dtype=np.float32), None, 3 if res[1].ndim >= 3 else 2)
    if ck.h5_without_spacing and dataset._spacing_override is None:
        ck.report.warnings.append(
            (
                str(dataset.root),
                f"{ck.h5_without_spacing} h5 file(s) store no voxel spacing; 1.0 mm will be assumed "
                "unless load(..., spacing=...) is given",
            )
        )
    if known is not None and ck.report.classes_seen:
        never = sorted(set(range(known)) - ck.report.classes_seen)
        if never:
            ck.report.warnings.append((str(dataset.root or dataset.name), f"classes {never} never appear in any label"))
    if not dataset._volumes and not ck.report.problems:
        ck.problem(dataset.root or dataset.name, "dataset has no volumes")
    if raise_on_error:
        ck.report.raise_if_problems()
    return ck.report
