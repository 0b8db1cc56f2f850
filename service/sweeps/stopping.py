"""Early stopping of sweep trials: the median stopping rule, a pure function of validation
curves (lists of (step, val_accuracy))."""

from __future__ import annotations

import statistics
from collections.abc import Sequence

Curve = Sequence[tuple[int, float]]


def best_so_far(curve: Curve, step: int) -> float | None:
    """The best value the curve reached at or before `step` (None before its first point)."""
    values = [v for s, v in curve if s <= step]
    return max(values) if values else None


def trained(curve: Curve) -> list[tuple[int, float]]:
    """The points after training began. Step 0 scores the initial weights (the driver's step-0
    evaluation): it says nothing about a trial's settings, and a trial's seed or width alone
    would put it below the others' there."""
    return [(s, v) for s, v in curve if s > 0]


def median_stop(curve: Curve, finished: Sequence[Curve], min_trials: int, grace_steps: int) -> bool:
    """Stop the trial with `curve` when, at its latest step, its best so far is below the median
    of the finished trials' best so far at that step. Never before `grace_steps`, nor while
    fewer than `min_trials` finished trials reached that step. Step 0 does not count (`trained`)."""
    curve, finished = trained(curve), [trained(c) for c in finished]
    if not curve:
        return False
    step = max(s for s, _ in curve)
    if step < grace_steps:
        return False
    others = [b for c in finished if (b := best_so_far(c, step)) is not None]
    if len(others) < min_trials:
        return False
    return best_so_far(curve, step) < statistics.median(others)
