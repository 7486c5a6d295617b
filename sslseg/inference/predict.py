"""Whole-volume prediction: the one path that validation, evaluation and inference share.

:func:`predict_volume` turns one ``(C, D, H, W)`` volume into a label map or class probabilities:
2D networks run slice by slice (:func:`~sslseg.inference.predict_slicewise`), 3D networks through
:func:`~sslseg.inference.sliding_window` (Gaussian blending of the windows' softmax
probabilities). Flip test-time augmentation is optional.
"""

from __future__ import annotations

import itertools
import numbers
from collections.abc import Callable, Sequence

import torch
from torch import Tensor, nn

from sslseg.inference.preprocessing import Preprocessing

__all__ = ["check_image", "flip_tta", "predict_volume"]

_OUTPUTS = ("labels", "probs")


def _forward(model: Callable[[Tensor], Tensor], autocast_dtype: torch.dtype | None) -> Callable[[Tensor], Tensor]:
    """The network as a float32-logits callable, under autocast when ``autocast_dtype`` is set."""
    if autocast_dtype is None:
        return lambda x: model(x).float()

    def run(x: Tensor) -> Tensor:
        with torch.autocast(device_type=x.device.type, dtype=autocast_dtype):
            return model(x).float()

    return run


def flip_tta(model: Callable[[Tensor], Tensor], spatial_dims: int) -> Callable[[Tensor], Tensor]:
    """Wrap a network so that it returns the log of its flip-averaged softmax probabilities.

    For a batch ``(N, C, *spatial)``, every combination of flips of the ``spatial_dims`` trailing
    axes is run (identity included: 4 in 2D, 8 in 3D), each softmax is flipped back, and the mean
    probability ``p`` is returned as ``log(p)``. A softmax of that output gives ``p`` back exactly
    and its argmax is the argmax of ``p``, so the wrapper is a drop-in network for any caller that
    applies a softmax or an argmax to logits.

    Args:
        model: ``(N, C, *spatial) -> (N, K, *spatial)`` float logits.
        spatial_dims: 2 or 3.
    """
    axes = list(range(2, 2 + spatial_dims))
    flips = [list(c) for r in range(len(axes) + 1) for c in itertools.combinations(axes, r)]
    floor = torch.finfo(torch.float32).tiny  # keeps log finite where every flip gives a class 0

    def averaged(x: Tensor) -> Tensor:
        total = None
        for dims in flips:
            probs = torch.softmax(model(x.flip(dims) if dims else x).float(), dim=1)
            probs = probs.flip(dims) if dims else probs
            total = probs if total is None else total.add_(probs)
        return total.div_(len(flips)).clamp_min_(floor).log_()

    return averaged


def check_image(image: Tensor, in_channels: int | None, name: str | None) -> None:
    """Raise a clear error unless ``image`` is a finite float ``(C, D, H, W)`` tensor with
    ``in_channels`` channels (when known); ``name`` (a volume or file) is named in the message."""
    what = f"image of {name}" if name else "image"
    if not isinstance(image, Tensor):
        raise TypeError(f"predict_volume: image must be a torch.Tensor, got {type(image).__name__}")
    if image.dim() != 4:
        raise ValueError(f"predict_volume: {what} must be (C, D, H, W) with 4 dims, got shape {list(image.shape)}")
    if not image.is_floating_point():
        raise TypeError(f"predict_volume: {what} must be a floating tensor (normalised intensities), got {image.dtype}")
    if in_channels is not None and image.shape[0] != in_channels:
        raise ValueError(f"predict_volume: {what} has {image.shape[0]} channel(s) (shape {list(image.shape)}), "
                         f"the model takes {in_channels}")
    if image.numel() == 0:
        raise ValueError(f"predict_volume: {what} is empty (shape {list(image.shape)})")
    finite = torch.isfinite(image)
    if not bool(finite.all()):
        kind = "NaN" if bool(torch.isnan(image).any()) else "Inf"
        bad = int((~finite).sum())
        raise ValueError(f"predict_volume: {what} contains {kind} ({bad} non-finite voxel(s) of {image.numel()})")


def predict_volume(
    model: nn.Module | Callable[[Tensor], Tensor],
    image: Tensor,
    *,
    dim: int,
    patch_size: Sequence[int],
    output: str = "labels",
    tta: bool = False,
    overlap: float = 0.5,
    sw_batch_size: int | None = None,
    autocast_dtype: torch.dtype | None = None,
    in_channels: int | None = None,
    name: str | None = None,
    preprocessing: Preprocessing | None = None,
    spacing: Sequence[float] | None = None,
) -> Tensor:
    """Segment one volume with a 2D (slice-wise) or 3D (sliding-window) network.

    * ``dim=2``: each slice of the first spatial axis is resized (bilinear) to ``patch_size``, the
      network runs on batches of ``sw_batch_size`` slices, and labels come back to the slice size
      by nearest neighbour (probabilities bilinearly).
    * ``dim=3``: Gaussian-weighted sliding window over windows of ``patch_size`` with ``overlap``;
      the windows' softmax probabilities are blended (as SSL4MIS's ``test_single_case`` averages
      probabilities), so ``labels`` is the argmax of ``probs``.

    Test-time augmentation (``tta=True``) averages softmax probabilities over every flip of the
    spatial axes the network sees (2D: the two in-plane axes, 4 passes; 3D: all three axes, 8
    passes). It is applied to each network input, i.e. per batch of resized slices (2D) or per
    window before blending (3D); flips commute with the slice resize, so in 2D this equals
    flipping the whole volume.

    With ``preprocessing`` (a model's :class:`~sslseg.inference.Preprocessing`, e.g.
    ``Preprocessing.from_record(record)``), ``image`` is the raw scan: it is normalised (and, for
    a planned model, cropped and resampled to the plan's spacing), predicted, and for a planned
    model its probabilities are resampled back onto the scan's grid and uncropped before the
    argmax, so the output always has the scan's shape.

    The model runs in its current mode: call ``model.eval()`` first.

    Args:
        model: A network (or callable) ``(N, C, *patch) -> (N, K, *patch)`` logits, on the
            image's device.
        image: ``(C, D, H, W)`` float volume, normalised as in training.
        dim: 2 or 3, the network's spatial dims.
        patch_size: The training patch, ``(H, W)`` for 2D or ``(D, H, W)`` for 3D.
        output: ``"labels"`` -> ``(D, H, W)`` int64; ``"probs"`` -> ``(K, D, H, W)`` float32.
        tta: Average over flips (see above).
        overlap: Window overlap in ``[0, 1)`` (3D only).
        sw_batch_size: Windows (3D; default 4) or slices (2D; default 16) per forward pass.
        autocast_dtype: Run the network under autocast with this dtype (e.g. ``torch.bfloat16``).
        in_channels: Channels the model takes; default ``model.in_channels`` when it has one.
        name: The volume's name for error messages (e.g. its id or file).
        preprocessing: Apply the model's input preprocessing to a raw ``image`` (see above);
            None: ``image`` is already what the network takes.
        spacing: The scan's voxel spacing ``(D, H, W)`` in mm (needed with a planned
            ``preprocessing``).

    Returns:
        The label map or the probabilities, on the image's device.

    Raises:
        ValueError: wrong dims or channel count, NaN/Inf voxels, bad ``dim``/``patch_size``/
            ``output``/``overlap``.
        TypeError: ``image`` is not a floating tensor.
    """
    if isinstance(dim, bool) or dim not in (2, 3):
        raise ValueError(f"predict_volume: dim must be 2 or 3, got {dim!r}")
    sizes = list(patch_size) if isinstance(patch_size, Sequence) and not isinstance(patch_size, (str, bytes)) else []
    if len(sizes) != dim or not all(isinstance(p, numbers.Integral) and not isinstance(p, bool) and p > 0
                                    for p in sizes):
        raise ValueError(f"predict_volume: patch_size must be {dim} positive ints for a {dim}D network, "
                         f"got {patch_size!r}")
    patch = [int(p) for p in sizes]
    if output not in _OUTPUTS:
        raise ValueError(f"predict_volume: output must be one of {list(_OUTPUTS)}, got {output!r}")
    if not isinstance(overlap, numbers.Real) or isinstance(overlap, bool) or not 0.0 <= overlap < 1.0:
        raise ValueError(f"predict_volume: overlap must be a number in [0, 1), got {overlap!r}")
    if sw_batch_size is not None and (isinstance(sw_batch_size, bool) or not isinstance(sw_batch_size, int)
                                      or sw_batch_size < 1):
        raise ValueError(f"predict_volume: sw_batch_size must be a positive int, got {sw_batch_size!r}")
    if in_channels is None:
        known = getattr(model, "in_channels", None)
        in_channels = known if isinstance(known, int) and not isinstance(known, bool) else None
    check_image(image, in_channels, name)
    if preprocessing is not None:
        prepared = preprocessing.prepare(image, spacing, name=name)
        kwargs = dict(dim=dim, patch_size=patch, tta=tta, overlap=overlap, sw_batch_size=sw_batch_size,
                      autocast_dtype=autocast_dtype, in_channels=in_channels, name=name)
        if not prepared.changes_grid:
            return predict_volume(model, prepared.image, output=output, **kwargs)
        probs = preprocessing.restore(predict_volume(model, prepared.image, output="probs", **kwargs), prepared)
        return probs.argmax(0) if output == "labels" else probs

    network = _forward(model, autocast_dtype)
    if tta:
        network = flip_tta(network, dim)
    with torch.no_grad():
        if dim == 2:
            from sslseg.inference.slicewise import predict_slicewise

            return predict_slicewise(network, image, patch, batch_size=sw_batch_size or 16, output=output)
        from sslseg.inference.sliding import sliding_window

        result = sliding_window(network, image[None].float(), patch, overlap=float(overlap), mode="gaussian",
                                sw_batch_size=sw_batch_size or 4, activation="softmax",
                                output="labels" if output == "labels" else "blend")
    return result[0]
