"""Where a volume's voxels live: SSL4MIS h5 files, NIfTI files, or memory (synthetic phantoms).

Every record answers the same questions (shape, spacing, affine, whole volume, one slice) so the
rest of the data layer never branches on the file format. Array conventions, everywhere:

* image ``(C, D, H, W)`` float32 (``C`` channels; h5 files hold one), label ``(D, H, W)`` int64;
* a 2D slice is index ``k`` of the first spatial axis ``D``: image ``(C, H, W)``, label ``(H, W)``;
* spacing is in mm and in the same axis order as the array, ``(D, H, W)``;
* NIfTI arrays are transposed from nibabel's ``(x, y, z)`` to ``(z, y, x)`` (SimpleITK's order, the
  order SSL4MIS wrote its h5 files in), and the affine is permuted to match, so
  ``affine @ (d, h, w, 1)`` is the scanner position of voxel ``[d, h, w]`` of the returned array.
* NRRD and MetaImage files (``.nrrd``, ``.nhdr``, ``.mha``, ``.mhd``) are read through SimpleITK
  (the optional ``[itk]`` extra, imported only when such a file is met) into the same arrays,
  spacing order and affine convention as NIfTI files (see :class:`ItkImageFile`).
"""

from __future__ import annotations

import os
import threading
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .errors import DataError

IMAGE_KEY = "image"
LABEL_KEY = "label"


def _as_image(array: np.ndarray, label_ndim: int | None, where: str) -> np.ndarray:
    """Return ``array`` as a channel-first float32 image ``(C, *S)``."""
    arr = np.asarray(array)
    if arr.size == 0:
        raise DataError(f"{where}: image is empty (shape {tuple(arr.shape)})")
    if label_ndim is not None and arr.ndim == label_ndim + 1:
        pass  # already channel-first
    else:
        arr = arr[None]
    return np.ascontiguousarray(arr, dtype=np.float32)


def _h5_open(path: Path):
    import h5py

    if not path.is_file():
        raise DataError(f"{path}: file not found")
    if path.stat().st_size == 0:
        raise DataError(f"{path}: file is empty (0 bytes)")
    try:
        return h5py.File(path, "r")
    except OSError as exc:
        raise DataError(f"{path}: unreadable h5 file ({exc})") from None


def _h5_dataset(f, key: str, path: Path):
    if key not in f:
        raise DataError(f"{path}: missing h5 key {key!r} (keys present: {sorted(f.keys())})")
    return f[key]


def _h5_spacing(f) -> tuple[float, ...] | None:
    """Spacing stored by ``make_synthetic`` as a root attribute; SSL4MIS files have none."""
    value = f.attrs.get("spacing")
    if value is None:
        return None
    return tuple(float(v) for v in np.asarray(value).ravel())


@dataclass
class VolumeRecord:
    """One volume of a dataset (an ACDC frame, a BraTS case, an LA case, a NIfTI case).

    Subclasses implement the reads; this base holds identity and the dataset-level fallbacks.

    Attributes:
        id: unique volume id (e.g. ``patient001_frame01``).
        case: the case (patient) it belongs to; splits are made over cases.
        spacing_override: spacing forced by ``load(..., spacing=...)``.
    """

    id: str
    case: str
    spacing_override: tuple[float, ...] | None = field(default=None, kw_only=True)

    # -- to implement ---------------------------------------------------------------------------
    @property
    def location(self) -> str:  # pragma: no cover - abstract
        """Where the volume lives (a path for messages)."""
        raise NotImplementedError

    def shape(self) -> tuple[int, ...]:  # pragma: no cover - abstract
        """Spatial shape ``(D, H, W)`` without reading voxels where the format allows."""
        raise NotImplementedError

    def read(self, with_label: bool = True) -> tuple[np.ndarray, np.ndarray | None]:  # pragma: no cover
        """Image ``(C, D, H, W)`` float32 and label ``(D, H, W)`` int64 (None if not asked)."""
        raise NotImplementedError

    def read_slice(self, k: int, with_label: bool = True) -> tuple[np.ndarray, np.ndarray | None]:
        """Slice ``k`` of the first spatial axis: image ``(C, H, W)``, label ``(H, W)``."""
        image, label = self.read(with_label)
        return image[:, k], (None if label is None else label[k])

    def stored_spacing(self) -> tuple[float, ...] | None:
        """Spacing stored with the data, or None where the format has none (SSL4MIS h5)."""
        return None

    def affine(self) -> np.ndarray | None:
        """4x4 index-to-scanner matrix for the returned array order, where the format has one."""
        return None

    def slice_indices(self) -> list[int]:
        """Slices that 2D training uses (all of them unless a slice list says otherwise)."""
        return list(range(self.shape()[0]))

    def spacing(self, default: tuple[float, ...]) -> tuple[float, ...]:
        """The override, else the stored spacing, else ``default``."""
        if self.spacing_override is not None:
            return self.spacing_override
        stored = self.stored_spacing()
        return stored if stored is not None else default


@dataclass
class H5Volume(VolumeRecord):
    """A volume in the SSL4MIS h5 format (keys ``image`` and ``label``).

    Attributes:
        path: the volume file (``data/<id>.h5``, ``<case>/mri_norm2.h5``); None when only slices
            exist (ACDC training volumes are distributed as slices only).
        slices: slice index -> slice file (``data/slices/<id>_slice_<k>.h5``), ACDC only.
    """

    path: Path | None = None
    slices: dict[int, Path] = field(default_factory=dict)

    @property
    def location(self) -> str:
        if self.path is not None:
            return str(self.path)
        first = min(self.slices) if self.slices else None
        return str(self.slices[first]) if first is not None else self.id

    def shape(self) -> tuple[int, ...]:
        if self.path is not None:
            with _h5_open(self.path) as f:
                return tuple(_h5_dataset(f, LABEL_KEY, self.path).shape)
        ks = sorted(self.slices)
        with _h5_open(self.slices[ks[0]]) as f:
            hw = tuple(_h5_dataset(f, LABEL_KEY, self.slices[ks[0]]).shape)
        return (len(ks), *hw)

    def slice_indices(self) -> list[int]:
        if self.slices:
            return sorted(self.slices)
        return super().slice_indices()

    def stored_spacing(self) -> tuple[float, ...] | None:
        path = self.path if self.path is not None else self.slices[min(self.slices)]
        with _h5_open(path) as f:
            sp = _h5_spacing(f)
        if sp is not None and self.path is None and len(sp) == 2:
            return None  # a slice file stores in-plane spacing only; no slice distance known
        return sp

    def read(self, with_label: bool = True) -> tuple[np.ndarray, np.ndarray | None]:
        if self.path is None:
            # Training-only volumes exist as slice files: stack them in slice order.
            parts = [self.read_slice(k, with_label) for k in sorted(self.slices)]
            image = np.stack([p[0] for p in parts], axis=1)
            label = np.stack([p[1] for p in parts]) if with_label else None
            return image, label
        with _h5_open(self.path) as f:
            label = None
            lab_ds = _h5_dataset(f, LABEL_KEY, self.path) if with_label else None
            img_ds = _h5_dataset(f, IMAGE_KEY, self.path)
            nd = lab_ds.ndim if lab_ds is not None else (3 if img_ds.ndim <= 3 else img_ds.ndim - 1)
            image = _as_image(img_ds[()], nd, str(self.path))
            if lab_ds is not None:
                label = np.asarray(lab_ds[()]).astype(np.int64, copy=False)
        return image, label

    def read_slice(self, k: int, with_label: bool = True) -> tuple[np.ndarray, np.ndarray | None]:
        path = self.slices.get(k)
        if path is None:
            if self.path is None:
                raise DataError(f"{self.location}: volume {self.id!r} has no slice {k}")
            # Partial read of one slice from the volume file (h5 reads only that hyperslab).
            with _h5_open(self.path) as f:
                img_ds = _h5_dataset(f, IMAGE_KEY, self.path)
                lab_ds = _h5_dataset(f, LABEL_KEY, self.path) if with_label else None
                if img_ds.ndim == 4:
                    image = np.asarray(img_ds[:, k], dtype=np.float32)
                else:
                    image = np.asarray(img_ds[k], dtype=np.float32)[None]
                label = None if lab_ds is None else np.asarray(lab_ds[k]).astype(np.int64, copy=False)
            return np.ascontiguousarray(image), label
        with _h5_open(path) as f:
            img_ds = _h5_dataset(f, IMAGE_KEY, path)
            lab_ds = _h5_dataset(f, LABEL_KEY, path) if with_label else None
            image = _as_image(img_ds[()], 2, str(path))
            label = None if lab_ds is None else np.asarray(lab_ds[()]).astype(np.int64, copy=False)
        return image, label


class _VolumeCache:
    """A small per-process LRU of decoded NIfTI volumes (gzip decoding dominates 2D training)."""

    def __init__(self, max_items: int = 8) -> None:
        self.max_items = max_items
        self._items: OrderedDict[tuple, tuple] = OrderedDict()
        self._lock = threading.Lock()
        self._pid = os.getpid()

    def get(self, key: tuple):
        with self._lock:
            if self._pid != os.getpid():  # forked worker: start empty rather than share
                self._items.clear()
                self._pid = os.getpid()
            value = self._items.get(key)
            if value is not None:
                self._items.move_to_end(key)
            return value

    def put(self, key: tuple, value: tuple) -> None:
        with self._lock:
            self._items[key] = value
            self._items.move_to_end(key)
            while len(self._items) > self.max_items:
                self._items.popitem(last=False)


_NIFTI_CACHE = _VolumeCache()

# Index permutation that reverses (x, y, z) -> (z, y, x); applied on the right of the affine.
_REVERSE = np.array([[0, 0, 1, 0], [0, 1, 0, 0], [1, 0, 0, 0], [0, 0, 0, 1]], dtype=np.float64)


def normalize_intensity(image: np.ndarray, mode: str) -> np.ndarray:
    """Normalise a ``(C, *S)`` image per channel: ``zscore``, ``minmax`` or ``none``."""
    if mode == "none":
        return image
    out = np.empty_like(image)
    for c in range(image.shape[0]):
        x = image[c]
        if mode == "zscore":
            std = float(x.std())
            out[c] = (x - float(x.mean())) / (std if std > 0 else 1.0)
        else:
            lo, hi = float(x.min()), float(x.max())
            out[c] = (x - lo) / (hi - lo if hi > lo else 1.0)
    return out


#: Files read by nibabel (the default reader).
NIFTI_EXTENSIONS = (".nii.gz", ".nii")
#: Files read by SimpleITK (``pip install 'sslseg[itk]'``); ``.nhdr``/``.mhd`` are detached headers
#: whose voxels live in a data file beside them.
ITK_EXTENSIONS = (".nrrd", ".nhdr", ".mha", ".mhd")
#: Every image file type the data layer reads.
IMAGE_EXTENSIONS = NIFTI_EXTENSIONS + ITK_EXTENSIONS

# ITK's physical space is LPS (x grows to the patient's left, y to the posterior), NIfTI's as
# nibabel reports it is RAS. sslseg keeps every affine in nibabel's RAS convention, so an ITK
# affine is flipped on its first two rows; image/label checks and the affines stored with
# preprocessed cases then compare alike whatever the format.
_LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])


def image_extension(path: str | os.PathLike) -> str | None:
    """The extension of ``path`` among :data:`IMAGE_EXTENSIONS` (``.nii.gz`` whole), else None."""
    name = Path(path).name.lower()
    for ext in IMAGE_EXTENSIONS:
        if name.endswith(ext) and len(name) > len(ext):
            return ext
    return None


def is_itk_file(path: str | os.PathLike) -> bool:
    """True for the file types read through SimpleITK (:data:`ITK_EXTENSIONS`)."""
    return image_extension(path) in ITK_EXTENSIONS


def _detached_data_file(header: Path) -> Path | None:
    """The data file a ``.mhd``/``.nhdr`` header names (``ElementDataFile = case.raw``,
    ``data file: case.raw.gz``), when it is one existing file; None otherwise (voxels in the
    header's own file, file lists and patterns, unreadable headers)."""
    mhd = header.name.lower().endswith(".mhd")
    try:
        with open(header, "rb") as f:
            text = f.read(1 << 16).decode("latin-1")
    except OSError:
        return None
    for line in text.splitlines():
        name, sep, value = line.partition("=" if mhd else ":")
        if sep and name.strip().lower().replace(" ", "") == ("elementdatafile" if mhd else "datafile"):
            value = value.strip()
            if not value or value.upper() in ("LOCAL", "LIST") or "%" in value or " " in value:
                return None
            data = header.parent / value
            return data if data.is_file() else None
    return None


def image_files(path: str | os.PathLike) -> list[Path]:
    """Every file an image is read from: ``path``, plus the data file of a detached header
    (``.mhd``, ``.nhdr``), so that cache keys change when either changes."""
    path = Path(path)
    if image_extension(path) in (".mhd", ".nhdr"):
        data = _detached_data_file(path)
        if data is not None:
            return [path, data]
    return [path]


class MissingReaderError(DataError, ImportError):
    """An image file needs an optional reader that is not installed (SimpleITK)."""


def import_sitk(path: str | os.PathLike):
    """The SimpleITK module, imported on first need.

    Raises:
        MissingReaderError: naming ``path`` and the install command when SimpleITK is missing.
    """
    try:
        import SimpleITK as sitk
    except ImportError:
        ext = image_extension(path) or Path(path).suffix
        raise MissingReaderError(
            f"{path}: reading {ext} files needs SimpleITK, which is not installed; "
            "install it with: pip install 'sslseg[itk]' (NIfTI files .nii/.nii.gz need nothing extra)"
        ) from None
    return sitk


def itk_affine(spacing: Sequence[float], origin: Sequence[float], direction: Sequence[float]) -> np.ndarray:
    """The 4x4 RAS index-to-scanner matrix of an ITK image, for ITK's index order ``(x, y, z)``.

    ``spacing``/``origin`` hold ITK's per-axis values (``GetSpacing()``, ``GetOrigin()``) and
    ``direction`` its row-major ``n x n`` cosine matrix (``GetDirection()``); 2D images get a unit
    third axis, the extra axes of 4D images are dropped. ITK maps index ``i`` to the LPS point
    ``origin + direction @ (spacing * i)``; the result is flipped to RAS (see ``_LPS_TO_RAS``).
    """
    n = len(spacing)
    cosines = np.asarray(direction, dtype=np.float64).reshape(n, n)
    m = min(n, 3)
    lps = np.eye(4)
    lps[:m, :m] = cosines[:m, :m] * np.asarray(spacing, dtype=np.float64)[:m]
    lps[:m, 3] = np.asarray(origin, dtype=np.float64)[:m]
    return _LPS_TO_RAS @ lps


class _Zooms:
    """``header.get_zooms()`` of an :class:`ItkImageFile` (the part of nibabel's header sslseg uses)."""

    def __init__(self, zooms: tuple[float, ...]) -> None:
        self._zooms = zooms

    def get_zooms(self) -> tuple[float, ...]:
        return self._zooms


class ItkImageFile:
    """An NRRD/MetaImage file seen through SimpleITK with nibabel's axis conventions.

    It offers what the data layer uses of a nibabel image, so both formats go through the same
    code: ``shape`` in file order ``(x, y[, z[, c]])`` (components, i.e. channels, last),
    ``affine`` (RAS, for that index order), ``header.get_zooms()`` (``(x, y[, z])`` mm) and
    ``dataobj`` (the voxels in that order, read on first use). The header is read without the
    voxels; ``spacing_xyz``, ``origin_xyz`` and ``direction`` keep ITK's own geometry, which
    ``sslseg infer`` writes its outputs with. :attr:`image` is the SimpleITK image itself.
    """

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        sitk = import_sitk(self.path)
        reader = sitk.ImageFileReader()
        reader.SetFileName(str(self.path))
        try:
            reader.ReadImageInformation()
        except RuntimeError as exc:
            raise DataError(f"{self.path}: unreadable {image_extension(self.path)} file ({_itk_message(exc)})") from None
        size = tuple(int(s) for s in reader.GetSize())
        if len(size) not in (2, 3, 4):
            raise DataError(f"{self.path}: expected a 2D, 3D or 4D image, got {len(size)}D of size {size}")
        self._reader = reader
        self._image = None
        self.ndim = len(size)
        self.components = int(reader.GetNumberOfComponents())
        # A 2D image is a volume of one slice (a unit z axis), so that channels are never mistaken
        # for a spatial axis.
        grid = size if self.ndim > 2 else (*size, 1)
        self.shape: tuple[int, ...] = grid + ((self.components,) if self.components > 1 else ())
        self.spacing_xyz = tuple(float(s) for s in reader.GetSpacing())
        self.origin_xyz = tuple(float(o) for o in reader.GetOrigin())
        self.direction = tuple(float(d) for d in reader.GetDirection())
        self.affine = itk_affine(self.spacing_xyz, self.origin_xyz, self.direction)
        self.header = _Zooms((*self.spacing_xyz, 1.0)[:3])

    @property
    def image(self):
        """The SimpleITK image (voxels read on first use)."""
        if self._image is None:
            try:
                self._image = self._reader.Execute()
            except RuntimeError as exc:
                raise DataError(f"{self.path}: unreadable {image_extension(self.path)} file ({_itk_message(exc)})") from None
        return self._image

    @property
    def dataobj(self) -> np.ndarray:
        """The voxels in file order ``(x, y[, z[, c]])``: SimpleITK's ``(z, y, x[, c])`` array with
        its spatial axes reversed (a 2D image gets a unit ``z`` axis)."""
        sitk = import_sitk(self.path)
        array = np.array(sitk.GetArrayViewFromImage(self.image))  # a copy: the view dies with the image
        order = tuple(range(self.ndim - 1, -1, -1)) + tuple(range(self.ndim, array.ndim))
        array = array.transpose(order)
        return array[:, :, None] if self.ndim == 2 else array


def _itk_message(exc: Exception) -> str:
    """The last non-empty line of a SimpleITK exception (its first lines are C++ source locations)."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return lines[-1] if lines else type(exc).__name__


def open_image(path: Path):
    """A ``.nii``/``.nii.gz`` file as a nibabel image, an NRRD/MetaImage file as an
    :class:`ItkImageFile`; in both cases voxels are not read yet.

    Raises:
        DataError: naming the file when it is missing, empty or unreadable;
            :class:`MissingReaderError` (a ``DataError``) when SimpleITK is needed but missing.
    """
    path = Path(path)
    if not is_itk_file(path):
        return open_nifti(path)
    if not path.is_file():
        raise DataError(f"{path}: file not found")
    if path.stat().st_size == 0:
        raise DataError(f"{path}: file is empty (0 bytes)")
    return ItkImageFile(path)


def open_nifti(path: Path):
    """The nibabel image of a ``.nii``/``.nii.gz`` file (voxels not read yet).

    Raises:
        DataError: naming the file when it is missing, empty or not a readable NIfTI file.
    """
    import nibabel as nib

    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: file not found")
    if path.stat().st_size == 0:
        raise DataError(f"{path}: file is empty (0 bytes)")
    try:
        return nib.load(str(path))
    except Exception as exc:  # nibabel raises several types for corrupt files
        raise DataError(f"{path}: unreadable NIfTI file ({exc})") from None


def nifti_to_zyx(data: np.ndarray) -> np.ndarray:
    """nibabel ``(x, y[, z[, c]])`` -> ``(c, z, y, x)`` (the module's array order; a view)."""
    if data.ndim == 2:
        data = data[:, :, None]
    if data.ndim == 3:
        return data.transpose(2, 1, 0)[None]
    if data.ndim == 4:
        return data.transpose(3, 2, 1, 0)
    raise DataError(f"expected a 2D, 3D or 4D NIfTI array, got {data.ndim}D {data.shape}")


def zyx_to_nifti(array: np.ndarray, spatial_shape: Sequence[int]) -> np.ndarray:
    """Inverse of :func:`nifti_to_zyx` for one map: ``(z, y, x)`` or ``(c, z, y, x)`` -> nibabel
    ``(*spatial_shape[, c])``, where ``spatial_shape`` is the source file's ``(x, y[, z])``."""
    if array.ndim == 3:
        return array.transpose(2, 1, 0).reshape(tuple(spatial_shape))
    if array.ndim == 4:
        return array.transpose(3, 2, 1, 0).reshape((*spatial_shape, array.shape[0]))
    raise DataError(f"expected a (z, y, x) or (c, z, y, x) array, got shape {array.shape}")


@dataclass
class NiftiVolume(VolumeRecord):
    """A case of an nnU-Net/MSD folder: one file per channel (nnU-Net ``_0000`` suffixes) or one
    4D file (MSD). Files are NIfTI (nibabel) or NRRD/MetaImage (SimpleITK, see :func:`open_image`).

    Attributes:
        image_paths: channel files in channel order.
        label_path: the label file (None for images without labels, e.g. ``imagesTs``).
        intensity: per-volume normalisation applied on read (``zscore``, ``minmax``, ``none``).
    """

    image_paths: Sequence[Path] = ()
    label_path: Path | None = None
    intensity: str = "zscore"

    @property
    def location(self) -> str:
        return str(self.image_paths[0])

    def _header(self, path: Path):
        return open_image(path)

    def shape(self) -> tuple[int, ...]:
        shp = self._header(self.image_paths[0]).shape
        return tuple(int(s) for s in shp[:3][::-1]) if len(shp) >= 3 else (1, *shp[::-1])

    def stored_spacing(self) -> tuple[float, ...] | None:
        zooms = self._header(self.image_paths[0]).header.get_zooms()
        zooms = tuple(float(z) for z in zooms[:3])
        return zooms[::-1] if len(zooms) == 3 else (1.0, *zooms[::-1])

    def affine(self) -> np.ndarray | None:
        return np.asarray(self._header(self.image_paths[0]).affine, dtype=np.float64) @ _REVERSE

    _to_zyx = staticmethod(nifti_to_zyx)

    def read(self, with_label: bool = True) -> tuple[np.ndarray, np.ndarray | None]:
        key = (tuple(str(p) for p in self.image_paths), self.intensity, with_label)
        cached = _NIFTI_CACHE.get(key)
        if cached is not None:
            return cached
        channels = []
        for path in self.image_paths:
            data = np.asanyarray(self._header(path).dataobj).astype(np.float32, copy=False)
            try:
                channels.append(self._to_zyx(data))
            except DataError as exc:
                raise DataError(f"{path}: {exc}") from None
        image = np.concatenate(channels, axis=0) if len(channels) > 1 else channels[0]
        image = normalize_intensity(np.ascontiguousarray(image, dtype=np.float32), self.intensity)
        label = None
        if with_label:
            if self.label_path is None:
                raise DataError(f"{self.location}: case {self.case!r} has no label file")
            lab = np.asanyarray(self._header(self.label_path).dataobj)
            label = np.ascontiguousarray(self._to_zyx(np.rint(lab))[0]).astype(np.int64)
        _NIFTI_CACHE.put(key, (image, label))
        return image, label


@dataclass
class MemoryVolume(VolumeRecord):
    """A volume held in memory (synthetic phantoms); arrays follow the module conventions."""

    image: np.ndarray = None  # type: ignore[assignment]
    label: np.ndarray | None = None
    voxel_spacing: tuple[float, ...] | None = None

    @property
    def location(self) -> str:
        return f"<memory:{self.id}>"

    def shape(self) -> tuple[int, ...]:
        return tuple(self.image.shape[1:])

    def stored_spacing(self) -> tuple[float, ...] | None:
        return self.voxel_spacing

    def read(self, with_label: bool = True) -> tuple[np.ndarray, np.ndarray | None]:
        if with_label and self.label is None:
            raise DataError(f"{self.location}: volume {self.id!r} has no label")
        # Copies: the arrays may be shared (memoised synthetic data) and are read-only.
        image = np.array(self.image, dtype=np.float32)
        return image, (np.array(self.label, dtype=np.int64) if with_label else None)

    def read_slice(self, k: int, with_label: bool = True) -> tuple[np.ndarray, np.ndarray | None]:
        if with_label and self.label is None:
            raise DataError(f"{self.location}: volume {self.id!r} has no label")
        image = np.array(self.image[:, k], dtype=np.float32)
        return image, (np.array(self.label[k], dtype=np.int64) if with_label else None)
