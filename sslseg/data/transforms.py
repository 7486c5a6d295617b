"""Geometric training augmentations on tensors (any device), seeded by a ``torch.Generator``.

Shapes: image ``(C, H, W)`` or ``(C, D, H, W)`` float; label ``(H, W)`` / ``(D, H, W)`` integer, or
None for unlabeled samples. Geometric operations are applied identically to image and label;
labels are always resampled nearest-neighbour, so their set of values never changes.

Random numbers come from the ``generator`` argument (a CPU ``torch.Generator``), so a sample's
augmentation depends only on its seed, never on the worker that loads it or on the device.

An *augment* is any callable ``(image, label, *, generator, spacing) -> (image, label, spacing)``;
``spacing`` (mm, one value per spatial axis) is updated where the geometry changes it (resizing,
axis swaps). :class:`Augment2D` and :class:`Augment3D` are the SSL4MIS pipelines.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F

from .errors import check_choice

IMAGE_MODES = ("bilinear", "nearest")
Spacing = tuple[float, ...]


def uniform(generator: torch.Generator, low: float, high: float) -> float:
    """One float in ``[low, high)`` from ``generator``."""
    return low + (high - low) * float(torch.rand((), generator=generator))


def randint(generator: torch.Generator, low: int, high: int) -> int:
    """One int in ``[low, high)`` from ``generator``."""
    return int(torch.randint(low, high, (1,), generator=generator))


def _check_pair(image: torch.Tensor, label: torch.Tensor | None, ndim: int) -> None:
    if not isinstance(image, torch.Tensor) or image.ndim != ndim + 1:
        shape = tuple(image.shape) if isinstance(image, torch.Tensor) else type(image).__name__
        raise ValueError(f"image must be a ({'C, ' + ', '.join('DHW'[-ndim:])}) tensor, got {shape}")
    if label is not None and tuple(label.shape) != tuple(image.shape[1:]):
        raise ValueError(f"label shape {tuple(label.shape)} must equal the image's spatial shape {tuple(image.shape[1:])}")


def _patch(patch_size: Sequence[int] | int, ndim: int, name: str = "patch_size") -> tuple[int, ...]:
    if isinstance(patch_size, int):
        patch_size = (patch_size,) * ndim
    ps = tuple(patch_size)
    if len(ps) != ndim or not all(isinstance(p, int) and not isinstance(p, bool) and p > 0 for p in ps):
        raise ValueError(f"{name} must be {ndim} positive ints, got {patch_size!r}")
    return ps


# ------------------------------------------------------------------------------------ functional
def rot90_flip(
    image: torch.Tensor, label: torch.Tensor | None, k: int, flip_dim: int | None, dims: tuple[int, int] = (-2, -1)
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Rotate by ``k`` quarter turns in the spatial ``dims`` then flip spatial dim ``flip_dim``."""
    sd = tuple(d if d < 0 else d + 1 for d in dims)  # spatial dims -> image dims (channel first)
    image = torch.rot90(image, k, sd)
    if label is not None:
        label = torch.rot90(label, k, dims)
    if flip_dim is not None:
        image = torch.flip(image, (flip_dim if flip_dim < 0 else flip_dim + 1,))
        if label is not None:
            label = torch.flip(label, (flip_dim,))
    return image, label


def _sample_grid(x: torch.Tensor, grid: torch.Tensor, mode: str) -> torch.Tensor:
    return F.grid_sample(x, grid, mode=mode, padding_mode="zeros", align_corners=False)


def affine2d(
    image: torch.Tensor,
    label: torch.Tensor | None,
    matrix: torch.Tensor,
    *,
    image_mode: str = "bilinear",
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Resample ``(C, H, W)`` / ``(H, W)`` with a 2x3 affine in *pixel* units about the centre.

    ``matrix`` maps output pixel offsets ``(x, y)`` from the centre to input offsets. Areas
    sampled from outside are zero (image) and background 0 (label).
    """
    h, w = image.shape[-2:]
    # Pixel offsets -> normalised coordinates: scale so that rotations stay rotations on non-square images.
    s = torch.tensor([w / 2, h / 2], dtype=torch.float64)
    m = matrix.to(torch.float64)
    theta = torch.zeros(2, 3, dtype=torch.float64)
    theta[:, :2] = m[:, :2] * s[None, :] / s[:, None]  # S^-1 M S with S = diag(w/2, h/2)
    theta[:, 2] = m[:, 2] / s
    theta = theta.to(image.dtype if image.is_floating_point() else torch.float32).to(image.device)
    grid = F.affine_grid(theta[None], [1, 1, h, w], align_corners=False)
    out = _sample_grid(image[None].float(), grid, image_mode)[0].to(image.dtype)
    if label is not None:
        lab = _sample_grid(label[None, None].float(), grid, "nearest")[0, 0]
        label = lab.round().to(label.dtype)
    return out, label


def rotate2d(
    image: torch.Tensor, label: torch.Tensor | None, angle_deg: float, *, image_mode: str = "bilinear"
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Rotate about the centre by ``angle_deg`` (shape kept, corners filled with 0)."""
    a = math.radians(angle_deg)
    m = torch.tensor([[math.cos(a), -math.sin(a), 0.0], [math.sin(a), math.cos(a), 0.0]])
    return affine2d(image, label, m, image_mode=image_mode)


def resize(
    image: torch.Tensor, label: torch.Tensor | None, size: Sequence[int], *, image_mode: str = "bilinear"
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Resize to ``size`` (labels nearest-neighbour; images ``bilinear``/trilinear or ``nearest``)."""
    size = tuple(int(s) for s in size)
    if tuple(image.shape[1:]) == size:
        return image, label
    nd = len(size)
    mode = image_mode if image_mode == "nearest" else ("bilinear" if nd == 2 else "trilinear")
    kw = {} if mode == "nearest" else {"align_corners": False}
    img = F.interpolate(image[None].float(), size=size, mode="nearest-exact" if mode == "nearest" else mode, **kw)[0]
    if label is not None:
        lab = F.interpolate(label[None, None].float(), size=size, mode="nearest-exact")[0, 0]
        label = lab.round().to(label.dtype)
    return img.to(image.dtype), label


def zoom_order0(
    image: torch.Tensor, label: torch.Tensor | None, size: Sequence[int]
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Resize as ``scipy.ndimage.zoom(order=0)`` does (SSL4MIS's resize of images and labels).

    Output index ``i`` along an axis of input length ``n`` and output length ``m`` reads input
    index ``round(i (n - 1) / (m - 1))`` (halves up): the corner pixels map onto each other,
    unlike :func:`resize`'s ``nearest`` (pixel-centre) grid. Values are copied, never blended.
    """
    size = tuple(int(s) for s in size)
    if len(size) != image.ndim - 1 or not all(s > 0 for s in size):
        raise ValueError(f"size must be {image.ndim - 1} positive ints, got {size}")
    idx = []
    for n, m in zip(image.shape[1:], size):
        scale = (n - 1) / (m - 1) if m > 1 else 0.0
        idx.append(torch.floor(torch.arange(m, dtype=torch.float64) * scale + 0.5).long().clamp_(0, n - 1))
    grid = torch.meshgrid(*idx, indexing="ij")
    out = image[(slice(None), *grid)]
    return out, (None if label is None else label[grid])


def pad_to(
    image: torch.Tensor, label: torch.Tensor | None, size: Sequence[int]
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Zero-pad (symmetrically) every spatial axis shorter than ``size``."""
    shape = image.shape[1:]
    pads: list[int] = []
    for s, p in zip(reversed(shape), reversed(tuple(size))):
        total = max(int(p) - int(s), 0)
        pads += [total // 2, total - total // 2]
    if not any(pads):
        return image, label
    image = F.pad(image, pads)
    if label is not None:
        label = F.pad(label, pads)
    return image, label


def random_crop(
    image: torch.Tensor,
    label: torch.Tensor | None,
    size: Sequence[int],
    generator: torch.Generator,
    *,
    foreground_prob: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Pad to at least ``size`` then crop ``size`` at a random position.

    With probability ``foreground_prob`` (and a label with foreground) the crop is centred on a
    random foreground voxel, clamped to the volume; otherwise its corner is uniform. Unlabeled
    samples (``label=None``) always get a uniform crop: their labels are never read.
    """
    image, label = pad_to(image, label, size)
    shape = image.shape[1:]
    starts = None
    if label is not None and foreground_prob > 0 and uniform(generator, 0, 1) < foreground_prob:
        fg = torch.nonzero(label > 0)
        if len(fg):
            centre = fg[randint(generator, 0, len(fg))].tolist()
            starts = [min(max(c - p // 2, 0), s - p) for c, p, s in zip(centre, size, shape)]
    if starts is None:
        starts = [randint(generator, 0, s - p + 1) for s, p in zip(shape, size)]
    sl = tuple(slice(a, a + p) for a, p in zip(starts, size))
    image = image[(slice(None), *sl)]
    if label is not None:
        label = label[sl]
    return image, label


# -------------------------------------------------------------------------------------- pipelines
class Augment2D:
    """The SSL4MIS 2D training pipeline (``RandomGenerator``), on tensors.

    With probability ``rot_flip_prob`` a random rot90 (k in 0..3) followed by a flip along one
    axis; otherwise a rotation by an angle in ``[-max_angle, max_angle]`` degrees. Then a resize to
    ``patch_size``. SSL4MIS resamples images nearest-neighbour; the default here is bilinear, which
    avoids blocky images, with real-valued angles; labels are nearest either way.
    :meth:`ssl4mis` (``exact_ssl4mis=True``, the engine's ``ssl4mis_aug``) resamples as SSL4MIS's
    ``RandomGenerator``: integer angles ``randint(-max_angle, max_angle)`` (so -20..19), rotation
    nearest-neighbour for image and label, and the resize of :func:`zoom_order0`
    (``scipy.ndimage.zoom(order=0)``) for both.

    Args:
        patch_size: output ``(H, W)``.
        rot_flip_prob: probability of rot90+flip instead of a small rotation.
        max_angle: maximum absolute rotation angle in degrees (SSL4MIS: 20).
        image_mode: ``bilinear`` or ``nearest`` resampling for the image.
        exact_ssl4mis: SSL4MIS's resampling (above); needs ``image_mode="nearest"`` and an
            integer ``max_angle``.
    """

    def __init__(
        self,
        patch_size: Sequence[int] | int,
        *,
        rot_flip_prob: float = 0.5,
        max_angle: float = 20.0,
        image_mode: str = "bilinear",
        exact_ssl4mis: bool = False,
    ) -> None:
        self.patch_size = _patch(patch_size, 2)
        if exact_ssl4mis and (image_mode != "nearest" or max_angle != int(max_angle)):
            raise ValueError("exact_ssl4mis=True resamples images nearest-neighbour with integer angles: it needs "
                             f"image_mode='nearest' and an integer max_angle, got {image_mode!r} and {max_angle}")
        self.exact_ssl4mis = bool(exact_ssl4mis)
        if not 0 <= rot_flip_prob <= 1:
            raise ValueError(f"rot_flip_prob must be in [0, 1], got {rot_flip_prob}")
        if max_angle < 0:
            raise ValueError(f"max_angle must be >= 0, got {max_angle}")
        self.rot_flip_prob = float(rot_flip_prob)
        self.max_angle = float(max_angle)
        self.image_mode = check_choice("image_mode", image_mode, IMAGE_MODES)

    @classmethod
    def ssl4mis(cls, patch_size: Sequence[int] | int) -> Augment2D:
        """SSL4MIS's ``RandomGenerator`` resampling: nearest images, integer angles, order-0 zoom."""
        return cls(patch_size, rot_flip_prob=0.5, max_angle=20, image_mode="nearest", exact_ssl4mis=True)

    def __call__(
        self,
        image: torch.Tensor,
        label: torch.Tensor | None = None,
        *,
        generator: torch.Generator,
        spacing: Spacing | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None, Spacing | None]:
        _check_pair(image, label, 2)
        if uniform(generator, 0, 1) < self.rot_flip_prob:
            k = randint(generator, 0, 4)
            flip = randint(generator, 0, 2) - 2  # -2 (rows) or -1 (columns)
            image, label = rot90_flip(image, label, k, flip)
            if spacing is not None and k % 2:
                spacing = (spacing[1], spacing[0])
        else:
            if self.exact_ssl4mis:  # np.random.randint(-20, 20): an integer in [-20, 20)
                angle = float(randint(generator, -int(self.max_angle), int(self.max_angle)))
            else:
                angle = uniform(generator, -self.max_angle, self.max_angle)
            image, label = rotate2d(image, label, angle, image_mode=self.image_mode)
        in_size = image.shape[1:]
        if self.exact_ssl4mis:
            image, label = zoom_order0(image, label, self.patch_size)
        else:
            image, label = resize(image, label, self.patch_size, image_mode=self.image_mode)
        if spacing is not None:
            spacing = tuple(float(sp) * i / o for sp, i, o in zip(spacing, in_size, self.patch_size))
        return image, label, spacing

    def __repr__(self) -> str:
        return (
            f"Augment2D(patch_size={self.patch_size}, rot_flip_prob={self.rot_flip_prob}, "
            f"max_angle={self.max_angle}, image_mode={self.image_mode!r}, exact_ssl4mis={self.exact_ssl4mis})"
        )


class Augment3D:
    """The 3D training pipeline: rot90 in-plane, random flips, random crop (foreground-aware).

    SSL4MIS (BraTS) does a rot90 in one plane, one flip, and a uniform random crop. Here every
    axis is flipped with probability ``flip_prob`` and, with probability ``foreground_prob``, the
    crop is centred on a labelled voxel (nnU-Net oversamples foreground with 1/3); set
    ``foreground_prob=0`` for SSL4MIS's uniform crop.

    Args:
        patch_size: output ``(D, H, W)``.
        foreground_prob: probability of a foreground-centred crop (labeled samples only).
        flip_prob: per-axis flip probability.
        rot90: rotate by k quarter turns in the ``rot_dims`` plane (only when the plane is square
            in the crop, so the patch shape is kept).
        rot_dims: the two spatial axes of the rotation plane (default: the last two, in-plane).
    """

    def __init__(
        self,
        patch_size: Sequence[int] | int,
        *,
        foreground_prob: float = 0.33,
        flip_prob: float = 0.5,
        rot90: bool = True,
        rot_dims: tuple[int, int] = (-2, -1),
    ) -> None:
        self.patch_size = _patch(patch_size, 3)
        for name, v in (("foreground_prob", foreground_prob), ("flip_prob", flip_prob)):
            if not 0 <= v <= 1:
                raise ValueError(f"{name} must be in [0, 1], got {v}")
        self.foreground_prob = float(foreground_prob)
        self.flip_prob = float(flip_prob)
        self.rot90 = bool(rot90)
        self.rot_dims = tuple(int(d) for d in rot_dims)

    def __call__(
        self,
        image: torch.Tensor,
        label: torch.Tensor | None = None,
        *,
        generator: torch.Generator,
        spacing: Spacing | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None, Spacing | None]:
        _check_pair(image, label, 3)
        image, label = random_crop(image, label, self.patch_size, generator, foreground_prob=self.foreground_prob)
        a, b = (d % 3 for d in self.rot_dims)
        if self.rot90 and self.patch_size[a] == self.patch_size[b]:
            k = randint(generator, 0, 4)
            image, label = rot90_flip(image, label, k, None, (a, b))
            if spacing is not None and k % 2:
                sp = list(spacing)
                sp[a], sp[b] = sp[b], sp[a]
                spacing = tuple(sp)
        for axis in range(3):
            if uniform(generator, 0, 1) < self.flip_prob:
                image, label = rot90_flip(image, label, 0, axis)
        return image.contiguous(), (None if label is None else label.contiguous()), spacing

    def __repr__(self) -> str:
        return (
            f"Augment3D(patch_size={self.patch_size}, foreground_prob={self.foreground_prob}, "
            f"flip_prob={self.flip_prob}, rot90={self.rot90})"
        )
