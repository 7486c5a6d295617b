"""``sslseg.data.fingerprint(data)``: what the planner needs to know about a dataset.

Per volume: shape, spacing, the bounding box of its nonzero voxels (the crop), whether it is
labeled and whether it is a test volume (``imagesTs``, or the test cases of the default split when
the folder has none; the test split does not depend on ``labeled`` or ``seed``). Per image
channel: intensity statistics over the *foreground* voxels (label > 0) of the labeled *non-test*
volumes (test data never shape the preprocessing): mean, std, min, max, median and the 0.5 / 99.5
percentiles, from at most
``samples_per_case`` voxels per volume, drawn without replacement with a seeded generator (so the
statistics do not depend on how many voxels a case has beyond that, and are reproducible).

The fingerprint is saved as JSON under ``<cache>/fingerprints/<data key>.json``; the data key
hashes the paths, sizes and modification times of every file of the dataset, so a fingerprint is
recomputed exactly when the data change. Reading a case here checks its geometry (image and label
grids agree, label values inside the dataset's label set): a bad case is a ``DataError`` naming
the file, from ``fingerprint``, ``plan``, ``preprocess`` and training alike.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from .cache import cache_root, files_key, save_json, stable_hash
from .errors import DataError
from .storage import H5Volume, NiftiVolume, VolumeRecord, image_files

if TYPE_CHECKING:
    from .dataset import CaseDataset

_FORMAT_VERSION = 2
#: Affine entries may differ by this much (mm, or direction cosines) between an image and its label.
AFFINE_TOLERANCE = 1e-3


def record_files(rec: VolumeRecord) -> list[Path]:
    """The files a volume is read from (empty for in-memory volumes)."""
    if isinstance(rec, NiftiVolume):
        paths = list(rec.image_paths) + ([rec.label_path] if rec.label_path is not None else [])
        return [f for p in paths for f in image_files(p)]  # a .mhd/.nhdr header and its data file
    if isinstance(rec, H5Volume):
        return ([rec.path] if rec.path is not None else []) + [Path(p) for p in rec.slices.values()]
    return []


def data_key(dataset: CaseDataset) -> str:
    """Hash of every file of ``dataset`` (paths, sizes, mtimes) plus ``dataset.json``; for
    in-memory data, of the dataset's name (its generation options)."""
    files: list[Path] = []
    for rec in dataset._volumes.values():
        files.extend(record_files(rec))
    if dataset.root is not None and (Path(dataset.root) / "dataset.json").is_file():
        files.append(Path(dataset.root) / "dataset.json")
    if not files:
        return stable_hash(["memory", dataset.name], 32)
    return files_key(files)


def has_label(rec: VolumeRecord) -> bool:
    """False for unlabeled images (a NIfTI image without label file, an unlabeled phantom)."""
    if isinstance(rec, NiftiVolume):
        return rec.label_path is not None
    return getattr(rec, "label", 0) is not None


def _check_grid(path: Path, ref_path: Path, shape, ref_shape, affine, ref_affine, what: str) -> None:
    if tuple(shape) != tuple(ref_shape):
        raise DataError(f"{path}: {what} grid {tuple(shape)} does not match the image grid {tuple(ref_shape)} of {ref_path}")
    if not np.allclose(affine, ref_affine, rtol=0, atol=AFFINE_TOLERANCE * max(1.0, float(np.abs(ref_affine[:3, :3]).max()))):
        raise DataError(
            f"{path}: {what} affine differs from the image affine of {ref_path} beyond {AFFINE_TOLERANCE} "
            f"(spacing, orientation or origin):\n{np.round(affine, 4)}\nvs\n{np.round(ref_affine, 4)}"
        )


def read_raw(rec: VolumeRecord, num_classes: int | None = None, *, with_label: bool = True
             ) -> tuple[np.ndarray, np.ndarray | None, tuple[float, ...]]:
    """Read one volume as stored (no normalisation) and check it.

    Returns:
        image ``(C, D, H, W)`` float32, label ``(D, H, W)`` int64 (None when unlabeled or not
        asked), spacing ``(D, H, W)``.

    Raises:
        DataError: naming the file, for image/label grids or affines that disagree, channel files
            of different grids, label values outside ``[0, num_classes)`` or not integers.
    """
    with_label = with_label and has_label(rec)
    if isinstance(rec, NiftiVolume):
        from .storage import open_image

        heads = [open_image(p) for p in rec.image_paths]  # NIfTI or NRRD/MetaImage, affines alike (RAS)
        ref = heads[0]
        for h, p in zip(heads[1:], rec.image_paths[1:]):
            _check_grid(Path(p), Path(rec.image_paths[0]), h.shape[:3], ref.shape[:3], h.affine, ref.affine, "channel")
        if with_label:
            lab = open_image(rec.label_path)
            _check_grid(Path(rec.label_path), Path(rec.image_paths[0]), lab.shape[:3], ref.shape[:3], lab.affine, ref.affine, "label")
        rec = dataclasses.replace(rec, intensity="none")
    image, label = rec.read(with_label=with_label)
    spacing = tuple(float(s) for s in rec.spacing(default=(1.0, 1.0, 1.0)))
    if label is not None:
        where = getattr(rec, "label_path", None) or rec.location
        if label.min() < 0 or (num_classes is not None and label.max() >= num_classes):
            values = np.unique(label)
            bad = values[(values < 0) | (values >= (num_classes or np.inf))]
            raise DataError(f"{where}: label values {bad[:5].tolist()} outside the dataset's label set 0..{(num_classes or 0) - 1}"
                            " (dataset.json labels)")
    return np.asarray(image, np.float32), label, spacing


def nonzero_bbox(image: np.ndarray) -> list[list[int]]:
    """``[[start, stop], ...]`` per spatial axis of the voxels nonzero in any channel (the whole
    volume if none is)."""
    mask = np.any(image != 0, axis=0)
    box = []
    for axis in range(mask.ndim):
        other = tuple(a for a in range(mask.ndim) if a != axis)
        hit = np.flatnonzero(mask.any(axis=other))
        box.append([int(hit[0]), int(hit[-1]) + 1] if hit.size else [0, int(mask.shape[axis])])
    return box


@dataclass
class Fingerprint:
    """Dataset fingerprint (see the module docstring).

    Attributes:
        data_key: hash of the dataset's files; the fingerprint belongs to exactly these files.
        name: the dataset's name.
        cases: volume id -> ``{"case", "shape", "spacing", "bbox", "labeled", "test"}``.
        channels: per image channel, the foreground intensity statistics.
        channel_names: modality per channel from ``dataset.json`` (``"CT"``, ``"T2"``, ...).
        num_classes: classes including background.
        class_names: one name per class.
    """

    data_key: str
    name: str
    cases: dict[str, dict[str, Any]]
    channels: list[dict[str, float]]
    channel_names: list[str]
    num_classes: int
    class_names: list[str] = field(default_factory=list)
    samples_per_case: int = 10000
    seed: int = 1234
    format_version: int = _FORMAT_VERSION

    @property
    def hash(self) -> str:
        """Hash of the whole fingerprint (data key and statistics)."""
        return stable_hash(self.to_dict(), 16)

    def _training(self) -> list[dict[str, Any]]:
        return [c for c in self.cases.values() if not c.get("test", False)] or list(self.cases.values())

    def shapes_after_crop(self) -> np.ndarray:
        """``(N, 3)`` crop sizes of the training (non-test) volumes."""
        return np.asarray([[b - a for a, b in c["bbox"]] for c in self._training()], dtype=np.int64)

    def spacings(self) -> np.ndarray:
        """``(N, 3)`` spacings of the training (non-test) volumes."""
        return np.asarray([c["spacing"] for c in self._training()], dtype=np.float64)

    def relative_size_after_crop(self) -> float:
        """Median over training volumes of (cropped voxels / all voxels)."""
        ratios = [np.prod([b - a for a, b in c["bbox"]]) / np.prod(c["shape"]) for c in self._training()]
        return float(np.median(ratios)) if ratios else 1.0

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def to_json(self, path: str | os.PathLike | None = None) -> str:
        """The fingerprint as JSON text (also written to ``path`` if given)."""
        text = json.dumps(self.to_dict(), indent=2)
        if path is not None:
            save_json(Path(path), self.to_dict())
        return text

    @classmethod
    def from_json(cls, text_or_path: str | os.PathLike) -> Fingerprint:
        """Inverse of :meth:`to_json` (JSON text or a file path)."""
        text = str(text_or_path)
        if not text.lstrip().startswith("{"):
            text = Path(text_or_path).read_text()
        d = json.loads(text)
        accepted = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - accepted)
        if unknown:
            raise TypeError(f"unknown fingerprint keys {unknown}; accepted: {sorted(accepted)}")
        return cls(**d)


def channel_names(dataset: CaseDataset) -> list[str]:
    """Modality names per channel from ``dataset.json`` (``channel_names`` or MSD ``modality``);
    ``[]`` when there is none."""
    if dataset.root is None:
        return []
    path = Path(dataset.root) / "dataset.json"
    if not path.is_file():
        return []
    try:
        meta = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise DataError(f"{path}: unreadable dataset.json ({exc})") from None
    names = meta.get("channel_names", meta.get("modality"))
    if not isinstance(names, dict):
        return []
    return [str(names[k]) for k in sorted(names, key=lambda k: int(k) if str(k).isdigit() else 0)]


def _stats(values: np.ndarray) -> dict[str, float]:
    if values.size == 0:
        return {"mean": 0.0, "std": 1.0, "min": 0.0, "max": 0.0, "median": 0.0, "percentile_00_5": 0.0, "percentile_99_5": 0.0}
    v = values.astype(np.float64)
    return {
        "mean": float(v.mean()), "std": float(v.std()), "min": float(v.min()), "max": float(v.max()),
        "median": float(np.median(v)), "percentile_00_5": float(np.percentile(v, 0.5)),
        "percentile_99_5": float(np.percentile(v, 99.5)),
    }


def fingerprint(data: CaseDataset | str | os.PathLike, *, samples_per_case: int = 10000, seed: int = 1234,
                recompute: bool = False) -> Fingerprint:
    """Fingerprint a dataset (cached; see the module docstring).

    Args:
        data: a dataset or a spec for :func:`sslseg.data.load`.
        samples_per_case: foreground voxels sampled per labeled volume for the statistics.
        seed: sampling seed.
        recompute: ignore a cached fingerprint.

    Returns:
        The :class:`Fingerprint`.

    Raises:
        DataError: a case fails the checks of :func:`read_raw` (the message names the file).
    """
    from .dataset import load

    dataset = load(data)
    if isinstance(samples_per_case, bool) or not isinstance(samples_per_case, int) or samples_per_case < 1:
        raise ValueError(f"samples_per_case must be an int >= 1, got {samples_per_case!r}")
    key = data_key(dataset)
    path = cache_root() / "fingerprints" / f"{stable_hash([key, samples_per_case, seed, _FORMAT_VERSION], 32)}.json"
    if path.is_file() and not recompute:
        try:
            fp = Fingerprint.from_json(path)
            if fp.data_key == key and fp.format_version == _FORMAT_VERSION:
                return fp
        except (ValueError, TypeError, json.JSONDecodeError):
            pass  # unreadable or old: recompute
    num_classes = dataset.num_classes
    try:
        test_cases = set(dataset.split().test_cases)
    except ValueError:  # no labeled training case at all: nothing is held out
        test_cases = set()
    cases: dict[str, dict[str, Any]] = {}
    samples: list[list[np.ndarray]] = []
    for i, vid in enumerate(dataset.volume_ids):
        rec = dataset.record(vid)
        image, label, spacing = read_raw(rec, num_classes)
        cases[vid] = {"case": rec.case, "shape": list(image.shape[1:]), "spacing": list(spacing),
                      "bbox": nonzero_bbox(image), "labeled": label is not None, "test": rec.case in test_cases}
        if not samples:
            samples = [[] for _ in range(image.shape[0])]
        if label is None or rec.case in test_cases:
            continue
        fg = np.flatnonzero(label.reshape(-1) > 0)
        if fg.size == 0:
            continue
        rng = np.random.default_rng(np.random.SeedSequence([seed, i]))
        take = fg if fg.size <= samples_per_case else rng.choice(fg, samples_per_case, replace=False)
        flat = image.reshape(image.shape[0], -1)
        for c in range(image.shape[0]):
            samples[c].append(flat[c, take])
    channels = [_stats(np.concatenate(s) if s else np.zeros(0, np.float32)) for s in samples]
    fp = Fingerprint(data_key=key, name=dataset.name, cases=cases, channels=channels,
                     channel_names=channel_names(dataset), num_classes=int(num_classes),
                     class_names=list(dataset.class_names or ()), samples_per_case=samples_per_case, seed=seed)
    fp.to_json(path)
    return fp
