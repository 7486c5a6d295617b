"""Readers for the on-disk layouts: SSL4MIS ACDC, SSL4MIS BraTS2019, UA-MT LA, NIfTI folders.

NIfTI folders (nnU-Net raw / MSD) may also hold NRRD or MetaImage files (``.nrrd``, ``.nhdr``,
``.mha``, ``.mhd``, ``dataset.json``'s ``file_ending``), read through SimpleITK.

Each ``index_<layout>(root)`` walks the folder once, without reading voxels, and returns an
:class:`Index`: the volume records, the official split lists (as case ids) and every structural
problem found (list entries naming missing files, overlapping lists, ...). Voxel-level checks
(shapes, label values, NaN) are in :mod:`sslseg.data.validate`.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

from .storage import IMAGE_EXTENSIONS, H5Volume, NiftiVolume, VolumeRecord, image_extension

LAYOUTS = ("acdc", "brats", "la", "nifti")

_SLICE_RE = re.compile(r"^(?P<vol>.+)_slice_(?P<k>\d+)$")
_FRAME_RE = re.compile(r"^(?P<case>.+?)_frame\d+$")
#: nnU-Net channel files: ``<case>_<4-digit channel>`` (``case_0000.nii.gz``).
CHANNEL_RE = re.compile(r"^(?P<case>.+)_(?P<ch>\d{4})$")
_NIFTI_EXT = IMAGE_EXTENSIONS
# Detached headers: their voxels are in a data file beside them (``case.mhd`` + ``case.raw``,
# ``case.nhdr`` + ``case.raw.gz``), which is not a stray file.
_DETACHED_HEADERS = (".mhd", ".nhdr")

# Facts of the SSL4MIS datasets (used when num_classes is not given).
DEFAULT_CLASSES = {
    "acdc": ("background", "RV", "myocardium", "LV"),
    "brats": ("background", "whole tumour"),
    "la": ("background", "left atrium"),
}


@dataclass
class Index:
    """What a layout reader found under a root folder."""

    layout: str
    root: Path
    volumes: dict[str, VolumeRecord] = field(default_factory=dict)
    official: dict[str, list[str]] = field(default_factory=dict)
    problems: list[tuple[str, str]] = field(default_factory=list)
    warnings: list[tuple[str, str]] = field(default_factory=list)
    class_names: tuple[str, ...] | None = None
    dim: int = 3
    extra_images: dict[str, VolumeRecord] = field(default_factory=dict)


def case_of(volume_id: str) -> str:
    """ACDC volumes ``patient001_frame01`` belong to case ``patient001``; others are their own case."""
    m = _FRAME_RE.match(volume_id)
    return m.group("case") if m else volume_id


def _read_list(path: Path, index: Index) -> list[str]:
    """Entries of a list file: stripped, blank lines dropped, text after the first comma ignored."""
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as exc:
        index.problems.append((str(path), f"unreadable list file ({exc})"))
        return []
    entries = [line.split(",")[0].strip() for line in text.splitlines()]
    entries = [e for e in entries if e]
    if not entries:
        index.warnings.append((str(path), "list file is empty"))
    seen: set[str] = set()
    for e in entries:
        if e in seen:
            index.problems.append((str(path), f"entry {e!r} is listed twice"))
        seen.add(e)
    return list(dict.fromkeys(entries))


def _unique_cases(volume_ids: Iterable[str]) -> list[str]:
    return list(dict.fromkeys(case_of(v) for v in volume_ids))


def _check_disjoint(index: Index, where: dict[str, str]) -> None:
    """Cases shared between train/val/test lists leak test data into training: an error."""
    groups = list(index.official.items())
    for i, (a, ca) in enumerate(groups):
        for b, cb in groups[i + 1 :]:
            for c in sorted(set(ca) & set(cb)):
                index.problems.append(
                    (where.get(b, b), f"case {c!r} is in both the {a} and the {b} list (lists must be disjoint)")
                )


def _h5_files(folder: Path) -> dict[str, Path]:
    return {p.name[: -len(".h5")]: p for p in sorted(folder.glob("*.h5"))} if folder.is_dir() else {}


# ---------------------------------------------------------------------------------------------- ACDC
def index_acdc(root: Path) -> Index:
    """SSL4MIS ACDC: ``data/slices/*.h5``, ``data/*.h5``, ``train_slices.list``, ``{train,val,test}.list``."""
    index = Index("acdc", root, dim=2, class_names=DEFAULT_CLASSES["acdc"])
    data, slices_dir = root / "data", root / "data" / "slices"
    if not data.is_dir():
        index.problems.append((str(data), "folder not found (expected data/*.h5 volumes and data/slices/*.h5)"))
    lists = {n: root / f"{n}.list" for n in ("train_slices", "train", "val", "test")}
    entries = {n: _read_list(p, index) for n, p in lists.items() if p.is_file()}
    volume_files, slice_files = _h5_files(data), _h5_files(slices_dir)

    by_volume: dict[str, dict[int, Path]] = {}
    slice_source = str(lists["train_slices"]) if "train_slices" in entries else str(slices_dir)
    slice_names = entries.get("train_slices", list(slice_files))
    for name in slice_names:
        m = _SLICE_RE.match(name)
        if m is None:
            index.problems.append((slice_source, f"slice name {name!r} is not of the form '<volume>_slice_<k>'"))
            continue
        path = slice_files.get(name)
        if path is None:
            index.problems.append((slice_source, f"names slice {name!r} but {slices_dir / (name + '.h5')} does not exist"))
            continue
        by_volume.setdefault(m.group("vol"), {})[int(m.group("k"))] = path
    if "train_slices" in entries:
        for name in sorted(set(slice_files) - set(slice_names)):
            index.warnings.append((str(slice_files[name]), "slice file not named by train_slices.list; unused"))

    train_vols = entries.get("train", list(by_volume))
    val_vols, test_vols = entries.get("val", []), entries.get("test", [])
    held_out = set(val_vols) | set(test_vols)
    for vid in by_volume:
        if vid in held_out:
            index.problems.append(
                (slice_source, f"training slices of volume {vid!r}, which the val/test list holds out (label leak)")
            )
    for group, vids in (("train", train_vols), ("val", val_vols), ("test", test_vols)):
        source = str(lists[group]) if group in entries else slice_source
        for vid in vids:
            path, slices = volume_files.get(vid), by_volume.get(vid, {})
            if group != "train" and path is None and not slices:
                index.problems.append((source, f"names volume {vid!r} but {data / (vid + '.h5')} does not exist"))
                continue
            if group == "train" and path is None and not slices:
                index.problems.append(
                    (source, f"names volume {vid!r} but neither {data / (vid + '.h5')} nor slices data/slices/{vid}_slice_*.h5 exist")
                )
                continue
            index.volumes[vid] = H5Volume(vid, case_of(vid), path=path, slices=slices if (group == "train" or path is None) else {})
    listed = set(train_vols) | held_out
    for vid in sorted(set(volume_files) - listed):
        if entries.get("train") is not None or val_vols or test_vols:
            index.warnings.append((str(volume_files[vid]), "volume not named by any list; unused"))
    index.official = {
        "train": _unique_cases(v for v in train_vols if v in index.volumes),
        "val": _unique_cases(v for v in val_vols if v in index.volumes),
        "test": _unique_cases(v for v in test_vols if v in index.volumes),
    }
    if not index.volumes and not index.problems:
        index.problems.append((str(root), "no ACDC volumes or slices found"))
    _check_disjoint(index, {n: str(lists[n]) for n in ("train", "val", "test")})
    return index


# --------------------------------------------------------------------------------------------- BraTS
def _find_list(folders: Iterable[Path], name: str) -> Path | None:
    for folder in folders:
        for ext in (".txt", ".list"):
            p = folder / f"{name}{ext}"
            if p.is_file():
                return p
    return None


def index_brats(root: Path) -> Index:
    """SSL4MIS BraTS2019: ``data/<id>.h5`` and ``{train,val,test}.txt`` (``.list`` accepted)."""
    index = Index("brats", root, dim=3, class_names=DEFAULT_CLASSES["brats"])
    data = root / "data" if (root / "data").is_dir() else root
    files = _h5_files(data)
    lists = {n: _find_list([root], n) for n in ("train", "val", "test")}
    return _index_per_case_files(index, files, lists, lambda vid: data / f"{vid}.h5",
                                 missing=(str(data), "no .h5 files found"))


def _index_per_case_files(index: Index, files: dict[str, Path], lists: dict[str, Path | None],
                          expected: Callable[[str], Path], missing: tuple[str, str]) -> Index:
    """Fill ``index`` from one h5 file per case (BraTS, LA) and the optional train/val/test lists:
    without lists every file is a case; with lists, each named case must exist (a problem
    otherwise, showing the ``expected`` path) and unlisted files are noted as unused."""
    if not any(lists.values()):
        for vid, path in files.items():
            index.volumes[vid] = H5Volume(vid, case_of(vid), path=path)
        if not files:
            index.problems.append(missing)
        return index
    for group, lst in lists.items():
        if lst is None:
            continue
        kept = []
        for vid in _read_list(lst, index):
            path = files.get(vid)
            if path is None:
                index.problems.append((str(lst), f"names case {vid!r} but {expected(vid)} does not exist"))
                continue
            index.volumes[vid] = H5Volume(vid, case_of(vid), path=path)
            kept.append(vid)
        index.official[group] = _unique_cases(kept)
    for vid in sorted(set(files) - set(index.volumes)):
        index.warnings.append((str(files[vid]), "case not named by any list; unused"))
    _check_disjoint(index, {n: str(p) for n, p in lists.items() if p is not None})
    return index


# ------------------------------------------------------------------------------------------------ LA
LA_FILE = "mri_norm2.h5"


def index_la(root: Path) -> Index:
    """UA-MT LA: a folder per case holding ``mri_norm2.h5``; ``train.list`` / ``test.list`` beside."""
    index = Index("la", root, dim=3, class_names=DEFAULT_CLASSES["la"])
    found = sorted(root.glob(f"*/{LA_FILE}")) + sorted(root.glob(f"*/*/{LA_FILE}"))
    files = {p.parent.name: p for p in found}
    parents = list(dict.fromkeys([root] + [p.parent.parent for p in found] + [p.parent.parent.parent for p in found]))
    lists = {n: _find_list(parents, n) for n in ("train", "val", "test")}
    case_parent = found[0].parent.parent if found else root
    return _index_per_case_files(index, files, lists, lambda vid: case_parent / vid / LA_FILE,
                                 missing=(str(root), f"no <case>/{LA_FILE} files found"))


# --------------------------------------------------------------------------------------------- NIfTI
def _nifti_stem(path: Path) -> str | None:
    ext = image_extension(path)
    return path.name[: -len(ext)] if ext is not None else None


def _nifti_files(folder: Path, index: Index) -> dict[str, Path]:
    out: dict[str, Path] = {}
    if not folder.is_dir():
        return out
    entries = sorted(folder.iterdir())
    detached = {p.name[: -len(ext)] for p in entries for ext in _DETACHED_HEADERS if p.name.lower().endswith(ext)}
    for p in entries:
        if p.name.startswith("._"):  # macOS resource forks ship inside MSD tarballs
            index.warnings.append((str(p), "macOS '._' metadata file ignored"))
            continue
        stem = _nifti_stem(p)
        if stem is None:
            if any(p.name.startswith(h + ".") for h in detached):
                continue  # the voxels of a .mhd/.nhdr header beside it
            if p.is_file() and not p.name.startswith("."):
                index.warnings.append((str(p), f"not an image file ({'/'.join(IMAGE_EXTENSIONS)}); ignored"))
            continue
        if stem in out:
            index.problems.append((str(p), f"case file {stem!r} exists twice, as {out[stem].name} and {p.name} "
                                   "(keep one format per case)"))
            continue
        out[stem] = p
    return out


def _group_channels(images: dict[str, Path], labels: dict[str, Path], folder: Path, index: Index) -> dict[str, list[Path]]:
    """Map case id -> channel files; nnU-Net names channels ``<case>_0000``, MSD uses one 4D file."""
    groups: dict[str, dict[int, Path]] = {}
    for stem, path in images.items():
        m = CHANNEL_RE.match(stem)
        if m is not None and (m.group("case") in labels or stem not in labels):
            groups.setdefault(m.group("case"), {})[int(m.group("ch"))] = path
        else:
            groups.setdefault(stem, {})[0] = path
    out: dict[str, list[Path]] = {}
    counts = {len(ch) for ch in groups.values()}
    expected = max(counts) if counts else 0
    for case, ch in sorted(groups.items()):
        if sorted(ch) != list(range(len(ch))) or len(ch) != expected:
            index.problems.append(
                (str(folder / case), f"channel files {sorted(ch)} are not 0..{expected - 1} (expected {expected} channels like the other cases)")
            )
            continue
        out[case] = [ch[i] for i in range(len(ch))]
    return out


def _read_dataset_json(root: Path, index: Index) -> tuple[str, ...] | None:
    path = root / "dataset.json"
    if not path.is_file():
        return None
    try:
        meta = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        index.problems.append((str(path), f"unreadable dataset.json ({exc})"))
        return None
    labels = meta.get("labels")
    if not isinstance(labels, dict) or not labels:
        return None
    pairs: dict[int, str] = {}
    for k, v in labels.items():
        # nnU-Net v2: {"background": 0, "tumour": 1}; MSD: {"0": "background", "1": "tumour"}
        if isinstance(v, int):
            pairs[v] = str(k)
        elif isinstance(v, (list, tuple)):
            index.problems.append((str(path), f"region-based label {k!r} ({v}) is not supported"))
        elif str(k).isdigit():
            pairs[int(k)] = str(v)
    if not pairs:
        return None
    if sorted(pairs) != list(range(len(pairs))):
        index.problems.append((str(path), f"label values {sorted(pairs)} are not 0..{len(pairs) - 1}"))
        return None
    return tuple(pairs[i] for i in range(len(pairs)))


#: Folder of extra unlabeled training images beside ``imagesTr`` (sslseg's extension of nnU-Net).
UNLABELED_DIR = "imagesUnlabeled"


def index_nifti(root: Path, intensity: str = "zscore") -> Index:
    """nnU-Net / MSD folders: ``imagesTr/``, ``labelsTr/``, optional ``imagesTs/`` (+ ``labelsTs/``).

    Unlabeled images are part of the dataset, never an error: a training image in ``imagesTr``
    without a file in ``labelsTr``, and every image in ``imagesUnlabeled/`` (same naming as
    ``imagesTr``), is an unlabeled case (``official["unlabeled"]``): the split puts it in the
    unlabeled group, never in labeled, validation or test. ``imagesTs`` without ``labelsTs`` are
    kept aside for inference (``extra_images``).
    """
    index = Index("nifti", root, dim=3)
    index.class_names = _read_dataset_json(root, index)
    official: dict[str, list[str]] = {}
    unlabeled: list[str] = []
    n_train_volumes = 0
    folders = (("imagesTr", "labelsTr", "train"), ("imagesTs", "labelsTs", "test"), (UNLABELED_DIR, None, "unlabeled"))
    for img_dir, lab_dir, group in folders:
        images = _nifti_files(root / img_dir, index)
        labels = _nifti_files(root / lab_dir, index) if lab_dir else {}
        if not images:
            if group == "train":
                index.problems.append((str(root / img_dir), f"no images found (expected {'/'.join(IMAGE_EXTENSIONS)} files)"))
            continue
        groups = _group_channels(images, labels, root / img_dir, index)
        if group == "test" and not labels:
            # Unlabeled test images: usable for inference, not for splits or metrics.
            for vid, paths in groups.items():
                index.extra_images[vid] = NiftiVolume(vid, case_of(vid), image_paths=paths, intensity=intensity)
            continue
        kept = []
        for vid, paths in groups.items():
            label = labels.get(vid)
            if vid in index.volumes:
                index.problems.append((str(paths[0]), f"case {vid!r} appears in both {img_dir} and another images folder"))
                continue
            if label is None and group == "test":
                ending = image_extension(paths[0]) or ".nii.gz"
                index.problems.append((str(paths[0]), f"test image of case {vid!r} has no label {root / lab_dir / (vid + ending)} "
                                       f"(labelsTs exists, so every imagesTs case needs one)"))
                continue
            # ACDC-style names (patient001_frame01) group the frames of a patient into one case.
            index.volumes[vid] = NiftiVolume(vid, case_of(vid), image_paths=paths, label_path=label, intensity=intensity)
            if label is None:
                unlabeled.append(vid)
            else:
                kept.append(vid)
        for stem in sorted(set(labels) - set(groups)):
            index.problems.append((str(labels[stem]), f"label of case {stem!r} has no image in {root / img_dir}"))
        if group != "unlabeled":
            official[group] = _unique_cases(kept)
        if group == "train":
            n_train_volumes = len(kept)
    unlabeled_cases = _unique_cases(unlabeled)
    labeled_cases = {c for g in official.values() for c in g}
    for c in sorted(set(unlabeled_cases) & labeled_cases):
        index.problems.append((str(root), f"case {c!r} has both labeled and unlabeled volumes (label every frame or none)"))
    if "test" in official:
        index.official = official  # val is carved from train at split time
    if unlabeled_cases:
        index.official["unlabeled"] = unlabeled_cases
    _check_dataset_json(root, index, n_train_volumes, len(unlabeled))
    return index


def _check_dataset_json(root: Path, index: Index, labeled: int, unlabeled: int) -> None:
    """A ``dataset.json`` that disagrees with the files is a problem naming it."""
    path = root / "dataset.json"
    if not path.is_file():
        return
    try:
        meta = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return  # reported by _read_dataset_json
    channels = meta.get("channel_names", meta.get("modality"))
    if isinstance(channels, dict) and index.volumes:
        first = next(iter(index.volumes.values()))
        n_files = len(first.image_paths)
        if n_files > 1 and len(channels) != n_files:
            index.problems.append((str(path), f"channel_names lists {len(channels)} channel(s) {sorted(channels.values())} "
                                   f"but the cases have {n_files} channel files (_0000.._{n_files - 1:04d})"))
    ending = meta.get("file_ending")
    if isinstance(ending, str) and ending not in _NIFTI_EXT:
        index.problems.append((str(path), f"file_ending {ending!r} is not read by sslseg (expected one of {list(_NIFTI_EXT)})"))
    elif isinstance(ending, str):
        other = [rec.image_paths[0] for rec in index.volumes.values() if not str(rec.image_paths[0]).endswith(ending)]
        if other:
            index.problems.append((str(path), f"file_ending {ending!r} does not match the files: {other[0]} "
                                   f"(and {len(other) - 1} more) end differently"))
    n = meta.get("numTraining")
    if isinstance(n, int) and not isinstance(n, bool) and n not in (labeled, labeled + unlabeled):
        index.problems.append((str(path), f"numTraining is {n} but imagesTr/labelsTr hold {labeled} labeled image(s)"
                               + (f" (+ {unlabeled} unlabeled)" if unlabeled else "")))


def detect_layout(root: Path) -> str:
    """Guess the layout of ``root``; raise a ``DataError`` saying what was looked for."""
    from .errors import DataError

    if not root.exists():
        raise DataError(f"{root}: data folder not found")
    if not root.is_dir():
        raise DataError(f"{root}: expected a data folder, got a file")
    if (root / "train_slices.list").is_file() or (root / "data" / "slices").is_dir():
        return "acdc"
    if (root / "imagesTr").is_dir():
        return "nifti"
    if any(root.glob(f"*/{LA_FILE}")) or any(root.glob(f"*/*/{LA_FILE}")):
        return "la"
    if _find_list([root], "train") is not None or any((root / "data").glob("*.h5")):
        return "brats"
    raise DataError(
        f"{root}: cannot detect the data layout. Expected one of: acdc (train_slices.list, data/slices/), "
        f"nifti (imagesTr/, labelsTr/), la (<case>/{LA_FILE}), brats (train.txt, data/*.h5). "
        "Pass layout=... to load() to choose explicitly."
    )


def index_layout(layout: str, root: Path, intensity: str = "zscore") -> Index:
    if layout == "acdc":
        return index_acdc(root)
    if layout == "brats":
        return index_brats(root)
    if layout == "la":
        return index_la(root)
    return index_nifti(root, intensity)
