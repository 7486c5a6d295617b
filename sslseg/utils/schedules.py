"""Schedules as pure functions of the step: learning rate, consistency ramp-up."""

from __future__ import annotations

import math

__all__ = ["consistency_weight", "poly_lr", "sigmoid_rampup"]


def sigmoid_rampup(current: float, length: float) -> float:
    """Laine & Aila's ramp-up: ``exp(-5 (1 - x/L)^2)`` for ``x`` clipped to ``[0, L]``; 1 if ``L == 0``.

    Args:
        current: Position (steps), clipped to ``[0, length]``.
        length: Ramp length in the same units, ``>= 0``.
    """
    if length < 0:
        raise ValueError(f"sigmoid_rampup: length must be >= 0, got {length}")
    if length == 0:
        return 1.0
    phase = 1.0 - min(max(current, 0.0), length) / length
    return float(math.exp(-5.0 * phase * phase))


def poly_lr(base_lr: float, step: int, iterations: int, power: float = 0.9) -> float:
    """Polynomial decay ``base_lr * (1 - step / iterations) ** power`` (0 at the end)."""
    if iterations <= 0:
        raise ValueError(f"poly_lr: iterations must be > 0, got {iterations}")
    return base_lr * max(0.0, 1.0 - step / iterations) ** power


def consistency_weight(step: int, consistency: float, rampup_length: float) -> float:
    """The consistency weight ``lambda(t) = consistency * sigmoid_rampup(t, rampup_length)``.

    SSL4MIS computes ``sigmoid_rampup(t // 150, 200)``, a ramp over 30000 steps in blocks of 150;
    sslseg ramps per step over ``rampup_length`` steps (the engine's default: the whole run), which
    differs from SSL4MIS by at most one 150-step block.
    """
    return consistency * sigmoid_rampup(step, rampup_length)
