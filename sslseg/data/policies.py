"""Strong (photometric) augmentations for weak/strong pairs: jitter, RandAugment, CTAugment.

Photometric ops change the image only; they never move pixels, so a strong view stays aligned
with the weak view and with the label. Geometric ops (used by CTAugment's weak policy) move image
and label identically, labels nearest-neighbour.

Each op is a deterministic function of a value ``v`` in ``[0, 1]`` (CTAugment's bins); RandAugment
maps a magnitude to ``v`` (signed ops: ``0.5 +/- magnitude / 2``). Ops scale to the image's own
intensity statistics, so they suit min-max (ACDC) and z-scored (BraTS, LA) data alike. Images
are ``(C, *spatial)`` float tensors on any device; randomness comes from a CPU
``torch.Generator``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from .errors import did_you_mean
from .transforms import affine2d, randint, uniform

Tensor = torch.Tensor


# ------------------------------------------------------------------------------------ photometric
def _stats(image: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Per-channel mean, std, min, max with singleton spatial dims for broadcasting."""
    flat = image.reshape(image.shape[0], -1).float()
    view = (image.shape[0],) + (1,) * (image.ndim - 1)
    std = flat.std(dim=1, unbiased=False).clamp_min(1e-6)
    return flat.mean(1).view(view), std.view(view), flat.amin(1).view(view), flat.amax(1).view(view)


def brightness(image: Tensor, v: float, generator: torch.Generator | None = None) -> Tensor:
    """Add ``(2v - 1) * 0.3`` of the intensity range (v = 0.5: identity)."""
    _, _, lo, hi = _stats(image)
    return image + (2 * v - 1) * 0.3 * (hi - lo)


def contrast(image: Tensor, v: float, generator: torch.Generator | None = None) -> Tensor:
    """Scale deviations from the mean by ``1 + (2v - 1) * 0.7``."""
    mean = _stats(image)[0]
    return (image - mean) * (1 + (2 * v - 1) * 0.7) + mean


def gamma(image: Tensor, v: float, generator: torch.Generator | None = None) -> Tensor:
    """Gamma ``2.5 ** (2v - 1)`` on the min-max normalised image, range restored."""
    _, _, lo, hi = _stats(image)
    span = (hi - lo).clamp_min(1e-6)
    x = ((image - lo) / span).clamp(0, 1)
    return x.pow(2.5 ** (2 * v - 1)) * span + lo


def _gaussian_kernel(sigma: float, device: torch.device) -> Tensor:
    radius = max(1, int(math.ceil(3 * sigma)))
    x = torch.arange(-radius, radius + 1, device=device, dtype=torch.float32)
    k = torch.exp(-0.5 * (x / sigma) ** 2)
    return k / k.sum()


def gaussian_blur(image: Tensor, sigma: float) -> Tensor:
    """Separable Gaussian blur of every channel, ``sigma`` in pixels (2D or 3D), edges replicated.

    Written as a weighted sum of shifted views rather than a convolution: for the small kernels
    and patches of data augmentation this avoids convolution set-up and thread-pool hand-offs,
    which dominate on a busy CPU, and it runs unchanged on any device.
    """
    if sigma <= 0:
        return image
    k = _gaussian_kernel(sigma, torch.device("cpu")).tolist()
    r = len(k) // 2
    x = image.float()
    for axis in range(1, image.ndim):
        n = x.shape[axis]
        idx = torch.arange(-r, n + r, device=image.device).clamp_(0, n - 1)
        xp = x.index_select(axis, idx)
        acc = xp.narrow(axis, 0, n) * k[0]
        for i in range(1, len(k)):
            acc = acc.add_(xp.narrow(axis, i, n), alpha=k[i])
        x = acc
    return x.to(image.dtype)


def blur(image: Tensor, v: float, generator: torch.Generator | None = None) -> Tensor:
    """Gaussian blur with sigma ``1.5 v`` pixels."""
    return gaussian_blur(image, 1.5 * v)


def sharpness(image: Tensor, v: float, generator: torch.Generator | None = None) -> Tensor:
    """Unsharp mask: ``x + 2v (x - blur(x))``."""
    return image + 2 * v * (image - gaussian_blur(image, 1.0))


def noise(image: Tensor, v: float, generator: torch.Generator | None = None) -> Tensor:
    """Additive Gaussian noise of std ``0.3 v`` times the image std."""
    std = _stats(image)[1]
    n = torch.randn(image.shape, generator=generator, dtype=torch.float32).to(image.device)
    return image + n.to(image.dtype) * (0.3 * v) * std


def posterize(image: Tensor, v: float, generator: torch.Generator | None = None) -> Tensor:
    """Quantise the range to ``2 ** (1 + int(7.999 v))`` levels."""
    _, _, lo, hi = _stats(image)
    levels = 2 ** (1 + int(7.999 * v)) - 1
    span = (hi - lo).clamp_min(1e-6)
    return torch.round((image - lo) / span * levels) / levels * span + lo


def autocontrast(image: Tensor, v: float, generator: torch.Generator | None = None) -> Tensor:
    """Blend (by ``v``) with the image stretched between its 1st and 99th percentiles."""
    flat = image.reshape(image.shape[0], -1).float()
    q = torch.quantile(flat[:, :: max(1, flat.shape[1] // 20000)], torch.tensor([0.01, 0.99], device=image.device), dim=1)
    view = (image.shape[0],) + (1,) * (image.ndim - 1)
    lo, hi = q[0].view(view), q[1].view(view)
    _, _, mn, mx = _stats(image)
    stretched = ((image - lo) / (hi - lo).clamp_min(1e-6)).clamp(0, 1) * (mx - mn) + mn
    return image + v * (stretched - image)


def equalize(image: Tensor, v: float, generator: torch.Generator | None = None) -> Tensor:
    """Blend (by ``v``) with the histogram-equalised image (intensity ranks), range kept."""
    flat = image.reshape(image.shape[0], -1).float()
    ranks = torch.argsort(torch.argsort(flat, dim=1), dim=1).float() / max(flat.shape[1] - 1, 1)
    _, _, mn, mx = _stats(image)
    eq = ranks.view(image.shape) * (mx - mn) + mn
    return image + v * (eq - image)


def cutout(image: Tensor, v: float, generator: torch.Generator, fill: float = 0.0) -> Tensor:
    """Set a random box of side ``max(1, v * 0.5 * size)`` per axis to ``fill`` (image only)."""
    out = image.clone()
    sl = [slice(None)]
    for s in image.shape[1:]:
        side = max(1, int(v * 0.5 * s))
        start = randint(generator, 0, s - side + 1)
        sl.append(slice(start, start + side))
    out[tuple(sl)] = fill
    return out


# -------------------------------------------------------------------------------------- geometric
def _affine_op(kind: str):
    def op(image: Tensor, label: Tensor | None, v: float) -> tuple[Tensor, Tensor | None]:
        if image.ndim != 3:
            raise ValueError(f"geometric policy op {kind!r} supports 2D (C, H, W) images, got {tuple(image.shape)}")
        h, w = image.shape[-2:]
        t = 2 * v - 1
        m = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]])
        if kind == "rotate":
            a = math.radians(30 * t)
            m = torch.tensor([[math.cos(a), -math.sin(a), 0.0], [math.sin(a), math.cos(a), 0.0]])
        elif kind == "shear_x":
            m[0, 1] = 0.3 * t
        elif kind == "shear_y":
            m[1, 0] = 0.3 * t
        elif kind == "translate_x":
            m[0, 2] = 0.3 * t * w  # a fraction of the size (SSL4MIS's is sub-pixel)
        elif kind == "translate_y":
            m[1, 2] = 0.3 * t * h
        return affine2d(image, label, m)

    return op


@dataclass(frozen=True)
class Op:
    """A policy op: ``fn(image, v[, generator])`` photometric or ``fn(image, label, v)`` geometric."""

    fn: Callable
    signed: bool
    geometric: bool = False
    bins: int = 17


PHOTOMETRIC_OPS: dict[str, Op] = {
    "brightness": Op(brightness, signed=True),
    "contrast": Op(contrast, signed=True),
    "gamma": Op(gamma, signed=True),
    "blur": Op(blur, signed=False),
    "sharpness": Op(sharpness, signed=False),
    "noise": Op(noise, signed=False),
    "posterize": Op(posterize, signed=False, bins=8),
    "autocontrast": Op(autocontrast, signed=False),
    "equalize": Op(equalize, signed=False),
}
GEOMETRIC_OPS: dict[str, Op] = {
    name: Op(_affine_op(name), signed=True, geometric=True)
    for name in ("rotate", "shear_x", "shear_y", "translate_x", "translate_y")
}
ALL_OPS = {**PHOTOMETRIC_OPS, **GEOMETRIC_OPS}


def _ops(names: Sequence[str] | None, table: dict[str, Op]) -> list[str]:
    names = list(table) if names is None else list(names)
    for n in names:
        if n not in table:
            raise ValueError(did_you_mean(n, table, "augmentation op"))
    if not names:
        raise ValueError("ops must name at least one augmentation op")
    return names


# ---------------------------------------------------------------------------------------- policies
class StrongAugment:
    """Intensity jitter + cutout: the default strong view (UniMatch/FixMatch-style).

    Each of brightness, contrast, gamma, blur and noise is applied with probability ``p`` and a
    random strength up to ``magnitude``, in random order; then one cutout box (image only) with
    probability ``cutout_prob``, of side up to ``cutout_size`` of each axis.

    Args:
        p: probability of each jitter op.
        magnitude: maximum strength in ``[0, 1]``.
        cutout_prob: probability of a cutout box.
        cutout_size: maximum side of the box as a fraction of each axis (<= 1).
        fill: value written into the box.
    """

    OPS = ("brightness", "contrast", "gamma", "blur", "noise")

    def __init__(
        self, p: float = 0.8, magnitude: float = 1.0, cutout_prob: float = 0.5, cutout_size: float = 0.5, fill: float = 0.0
    ) -> None:
        for name, val in (("p", p), ("magnitude", magnitude), ("cutout_prob", cutout_prob), ("cutout_size", cutout_size)):
            if not 0 <= val <= 1:
                raise ValueError(f"{name} must be in [0, 1], got {val}")
        self.p, self.magnitude = float(p), float(magnitude)
        self.cutout_prob, self.cutout_size, self.fill = float(cutout_prob), float(cutout_size), float(fill)

    def __call__(self, image: Tensor, *, generator: torch.Generator) -> Tensor:
        order = torch.randperm(len(self.OPS), generator=generator).tolist()
        for i in order:
            name = self.OPS[i]
            if uniform(generator, 0, 1) >= self.p:
                continue
            op = PHOTOMETRIC_OPS[name]
            m = uniform(generator, 0, self.magnitude)
            v = 0.5 + (m / 2 if uniform(generator, 0, 1) < 0.5 else -m / 2) if op.signed else m
            image = op.fn(image, v, generator)
        if uniform(generator, 0, 1) < self.cutout_prob:
            image = cutout(image, uniform(generator, 0, 1) * 2 * self.cutout_size, generator, self.fill)
        return image

    def __repr__(self) -> str:
        return f"StrongAugment(p={self.p}, magnitude={self.magnitude}, cutout_prob={self.cutout_prob})"


class RandAugment:
    """RandAugment over photometric ops (FixMatch's variant: random magnitude per op) + cutout.

    Args:
        num_ops: ops drawn uniformly (with replacement) per image.
        magnitude: fixed magnitude in ``[0, 1]``, or None to draw one uniformly per op.
        ops: op names (default: every photometric op in :data:`PHOTOMETRIC_OPS`).
        cutout_size: maximum cutout side as a fraction of each axis (0 disables cutout).
        fill: cutout value.
    """

    def __init__(
        self,
        num_ops: int = 2,
        magnitude: float | None = None,
        ops: Sequence[str] | None = None,
        cutout_size: float = 0.5,
        fill: float = 0.0,
    ) -> None:
        if isinstance(num_ops, bool) or not isinstance(num_ops, int) or num_ops < 0:
            raise ValueError(f"num_ops must be a non-negative int, got {num_ops!r}")
        if magnitude is not None and not 0 <= magnitude <= 1:
            raise ValueError(f"magnitude must be in [0, 1] or None, got {magnitude}")
        if not 0 <= cutout_size <= 1:
            raise ValueError(f"cutout_size must be in [0, 1], got {cutout_size}")
        self.num_ops, self.magnitude = num_ops, magnitude
        self.ops = _ops(ops, PHOTOMETRIC_OPS)
        self.cutout_size, self.fill = float(cutout_size), float(fill)

    def __call__(self, image: Tensor, *, generator: torch.Generator) -> Tensor:
        for _ in range(self.num_ops):
            op = PHOTOMETRIC_OPS[self.ops[randint(generator, 0, len(self.ops))]]
            m = self.magnitude if self.magnitude is not None else uniform(generator, 0, 1)
            v = 0.5 + (m / 2 if uniform(generator, 0, 1) < 0.5 else -m / 2) if op.signed else m
            image = op.fn(image, v, generator)
        if self.cutout_size > 0:
            image = cutout(image, uniform(generator, 0, 1) * 2 * self.cutout_size, generator, self.fill)
        return image

    def __repr__(self) -> str:
        return f"RandAugment(num_ops={self.num_ops}, magnitude={self.magnitude}, ops={self.ops})"


PolicyStep = tuple[str, tuple[float, ...]]


def probe_proximity(probs: Tensor, labels: Tensor) -> Tensor:
    """CTAugment's per-sample reward ``1 - 0.5 * mean_voxels sum_c |p_c - onehot(y)_c|``.

    For probabilities this is the mean probability given to the true class.

    Args:
        probs: ``(B, C, *spatial)`` class probabilities of the probed (augmented) samples.
        labels: ``(B, *spatial)`` integer labels.

    Returns:
        ``(B,)`` float32 rewards in ``[0, 1]``.
    """
    p_true = probs.float().gather(1, labels.long().unsqueeze(1)).squeeze(1)
    return p_true.flatten(1).mean(1)


class CTAugment:
    """Control-theory augmentation (FixMatch-CTA): op magnitudes adapt to the model's accuracy.

    Each op's value range is cut into bins with a rate (all start at 1). :meth:`policy` draws
    ``depth`` ops and, per op, a bin with probability from the rates (rates below ``threshold``
    of the best are never drawn) and a value inside it; :meth:`update_rates` moves the rates of the
    bins used toward how well the model did on the augmented sample (``proximity`` in [0, 1]).

    ``weak`` policies draw from geometric ops plus identity (applied to image and label alike,
    2D only); strong policies from photometric ops (image only). Unlike SSL4MIS, cutout is
    drawn with its own generator-backed randomness and never touches the label, and translations
    are a fraction of the size rather than of a pixel.

    Rewards may be deferred, so that a training step never waits for the device: :meth:`record`
    keeps the policies of a probed batch with their rewards (a device tensor, e.g.
    :func:`probe_proximity`), and :meth:`apply_pending` applies everything recorded in one host
    copy (across processes with a ``gather``, so the rates stay identical on every rank).

    Args:
        depth: ops per policy.
        threshold: rates below ``threshold * max`` are not drawn.
        decay: rate update momentum.
    """

    def __init__(self, depth: int = 2, threshold: float = 0.85, decay: float = 0.99) -> None:
        if isinstance(depth, bool) or not isinstance(depth, int) or depth < 1:
            raise ValueError(f"depth must be a positive int, got {depth!r}")
        for name, v in (("threshold", threshold), ("decay", decay)):
            if not 0 <= v <= 1:
                raise ValueError(f"{name} must be in [0, 1], got {v}")
        self.depth, self.threshold, self.decay = depth, float(threshold), float(decay)
        self.rates: dict[str, np.ndarray] = {name: np.ones(op.bins) for name, op in ALL_OPS.items()}
        # Recorded, not yet applied rewards: (policies of one probed batch, their (B,) rewards).
        self.pending: list[tuple[list[list[PolicyStep]], Tensor]] = []

    def _probs(self, rate: np.ndarray) -> np.ndarray:
        p = rate + (1 - self.decay)
        p = p / p.max()
        p[p < self.threshold] = 0
        return p / p.sum()

    def policy(self, generator: torch.Generator, *, weak: bool = False, probe: bool = False) -> list[PolicyStep]:
        """Draw a policy: ``[(op name, (value,)), ...]`` with values in ``[0, 1]``.

        Args:
            generator: randomness.
            weak: draw geometric ops (+ identity) instead of photometric ones.
            probe: uniform values, ignoring rates (the samples used to update the rates).
        """
        names = [*GEOMETRIC_OPS, "identity"] if weak else list(PHOTOMETRIC_OPS)
        steps: list[PolicyStep] = []
        for _ in range(self.depth):
            name = names[randint(generator, 0, len(names))]
            if name == "identity":
                steps.append((name, ()))
                continue
            bins = ALL_OPS[name].bins
            if probe:
                value = uniform(generator, 0, 1)
            else:
                p = torch.from_numpy(self._probs(self.rates[name]))
                b = int(torch.multinomial(p, 1, generator=generator))
                value = (b + uniform(generator, 0, 1)) / bins
            steps.append((name, (value,)))
        return steps

    @staticmethod
    def apply(
        image: Tensor, label: Tensor | None, policy: Sequence[PolicyStep], generator: torch.Generator
    ) -> tuple[Tensor, Tensor | None]:
        """Apply ``policy``: geometric ops to image and label, photometric ops to the image only."""
        for name, values in policy:
            if name == "identity":
                continue
            if name not in ALL_OPS:
                raise ValueError(did_you_mean(name, [*ALL_OPS, "identity"], "policy op"))
            op = ALL_OPS[name]
            if op.geometric:
                image, label = op.fn(image, label, values[0])
            else:
                image = op.fn(image, values[0], generator)
        return image, label

    def update_rates(self, policy: Sequence[PolicyStep], proximity: float) -> None:
        """Move the rates of the bins ``policy`` used toward ``proximity`` (1 = perfect)."""
        for name, values in policy:
            if name == "identity":
                continue
            rate = self.rates[name]
            i = int(values[0] * len(rate) * 0.999)
            rate[i] = rate[i] * self.decay + float(proximity) * (1 - self.decay)

    def record(self, policies: Sequence[Sequence[PolicyStep]], proximity: Tensor) -> None:
        """Keep the rewards of one probed batch for a later :meth:`apply_pending` (no host sync).

        Args:
            policies: The policy of each probed sample.
            proximity: ``(B,)`` rewards in ``[0, 1]``, one per policy, on any device.
        """
        if proximity.dim() != 1 or proximity.shape[0] != len(policies):
            raise ValueError(f"CTAugment.record: proximity must be (B,) with B = {len(policies)} policies, "
                             f"got shape {tuple(proximity.shape)}")
        self.pending.append(([list(p) for p in policies], proximity.detach()))

    def apply_pending(self, gather: Callable[[Any], list[Any]] | None = None) -> None:
        """Apply the recorded rewards with :meth:`update_rates` (one host copy), then forget them.

        Args:
            gather: Under DDP, an all-gather of Python objects (``[obj of each rank]``): every
                rank's rewards are applied, in rank order, on every rank, so the rates stay
                identical across ranks. Every rank must call it at the same step.
        """
        if not self.pending and gather is None:
            return
        policies = [pol for pols, _ in self.pending for pol in pols]
        proximities = torch.cat([p for _, p in self.pending]).tolist() if self.pending else []
        shards = gather((policies, proximities)) if gather is not None else [(policies, proximities)]
        for shard_policies, shard_proximities in shards:
            for pol, prox in zip(shard_policies, shard_proximities):
                self.update_rates(pol, prox)
        self.pending = []

    def pending_state(self) -> list:
        """The recorded rewards as plain lists and CPU tensors, for checkpoints."""
        return [[[[[name, list(values)] for name, values in pol] for pol in pols], prox.detach().cpu()]
                for pols, prox in self.pending]

    def load_pending_state(self, state: list, device: torch.device | str | None = None) -> None:
        """Inverse of :meth:`pending_state`; rewards go to ``device``."""
        self.pending = [([[(name, tuple(values)) for name, values in pol] for pol in pols], prox.to(device))
                        for pols, prox in state]

    def state_dict(self) -> dict:
        """Rates and settings, for checkpoints (recorded rewards: :meth:`pending_state`)."""
        return {
            "depth": self.depth,
            "threshold": self.threshold,
            "decay": self.decay,
            "rates": {k: v.tolist() for k, v in self.rates.items()},
        }

    def load_state_dict(self, state: dict) -> None:
        """Inverse of :meth:`state_dict`."""
        self.depth, self.threshold, self.decay = int(state["depth"]), float(state["threshold"]), float(state["decay"])
        for k, v in state["rates"].items():
            if k not in self.rates:
                raise ValueError(did_you_mean(k, self.rates, "CTAugment op"))
            self.rates[k] = np.asarray(v, dtype=np.float64)
