"""The Pareto front of finished trials over the sweep's objectives, and the best trial under an
accuracy constraint. Pure functions of the trials' measured values."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from service.sweeps.plan import Objective


def metric_of(report: dict[str, Any], metric: str) -> float | None:
    """A dotted report key (`size.ratio`) as a float; None when absent or not a number."""
    node: Any = report
    for part in metric.split("."):
        if not isinstance(node, dict) or part not in node:
            return None
        node = node[part]
    if isinstance(node, bool) or not isinstance(node, int | float):
        return None
    return float(node)


def _oriented(values: dict[str, float], objectives: Sequence[Objective]) -> tuple[float, ...]:
    # Every objective as "larger is better", so dominance is one comparison.
    return tuple(values[o.metric] if o.direction == "max" else -values[o.metric] for o in objectives)


def dominates(a: dict[str, float], b: dict[str, float], objectives: Sequence[Objective]) -> bool:
    """a is at least as good as b on every objective and better on one."""
    va, vb = _oriented(a, objectives), _oriented(b, objectives)
    return all(x >= y for x, y in zip(va, vb, strict=True)) and va != vb


def complete(values: dict[str, float | None], objectives: Sequence[Objective]) -> bool:
    return all(values.get(o.metric) is not None for o in objectives)


def pareto_front(
    points: Sequence[tuple[str, dict[str, float]]], objectives: Sequence[Objective]
) -> list[str]:
    """Ids of the points no other point dominates, in the input order. Points missing a value of
    an objective (a failed trial, a report without latency) are not on the front. Two points with
    equal values are both on it."""
    ok = [(i, v) for i, v in points if complete(v, objectives)]
    return [i for i, v in ok if not any(dominates(w, v, objectives) for _, w in ok)]


def best_under_drop(
    points: Sequence[tuple[str, dict[str, float]]],
    objectives: Sequence[Objective],
    reference_accuracy: float | None,
    max_accuracy_drop: float,
) -> str | None:
    """The trial to pick when accuracy may fall at most `max_accuracy_drop` percentage points
    below `reference_accuracy` (accuracy is a fraction, so 0.5 allows 0.005). Among those, the
    front's objectives other than accuracy decide in their order (by default the largest size
    ratio, then the lowest latency), then the higher accuracy. None when no trial qualifies or
    there is no reference."""
    if reference_accuracy is None:
        return None
    floor = reference_accuracy - max_accuracy_drop / 100.0
    # A small tolerance: accuracies are ratios of counts, and 0.97 - 0.005 is not exact in floats.
    ok = [(i, v) for i, v in points if v.get("accuracy") is not None and v["accuracy"] >= floor - 1e-12]
    ok = [(i, v) for i, v in ok if complete(v, objectives)]
    if not ok:
        return None
    order = [o for o in objectives if o.metric != "accuracy"] + [
        Objective(metric="accuracy", direction="max")
    ]
    return max(ok, key=lambda p: _oriented(p[1], order))[0]
