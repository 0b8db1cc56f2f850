"""Pruning schedules: pure functions of the optimizer step (the step of the global batch).

`target_sparsity` gives the fraction of prunable weights that should be zero after the mask
update at `step`; `threshold_at` gives theta for the `threshold` schedule; `is_update_step` says
whether masks are recomputed at `step`; `target_curve` is the whole staircase, for charts.
Before `start_step` nothing is pruned (target 0)."""

from __future__ import annotations

from service.spec import JobSpec, PruningSpec
from workers.compression.nm import keep_at


def _progress(step: int, start: int, end: int) -> float:
    return min(1.0, max(0.0, (step - start) / (end - start)))


def cubic(step: int, s_i: float, s_f: float, start: int, end: int) -> float:
    """Zhu & Gupta (2017): s_t = s_f + (s_i - s_f) * (1 - (t - t0) / (n * dt))^3,
    with n * dt = end - start."""
    if step < start:
        return 0.0
    return s_f + (s_i - s_f) * (1.0 - _progress(step, start, end)) ** 3


def linear(step: int, s_i: float, s_f: float, start: int, end: int) -> float:
    if step < start:
        return 0.0
    return s_i + (s_f - s_i) * _progress(step, start, end)


def oneshot(step: int, s_f: float, start: int) -> float:
    return s_f if step >= start else 0.0


def target_sparsity(cfg: PruningSpec, step: int) -> float:
    """The target of the update at `step`. Under an N:M structure the curve is quantized to the
    N':M patterns it passes (M:M, (M-1):M, ... N:M; see workers.compression.nm.keep_at): every
    mask of the ramp is itself N':M, and the last one is N:M exactly."""
    s = _curve(cfg, step)
    nm = cfg.nm()
    if nm is None:
        return s
    n, m = nm
    return 1.0 - keep_at(m, n, s) / m


def _curve(cfg: PruningSpec, step: int) -> float:
    if cfg.schedule == "cubic":
        return cubic(step, cfg.initial_sparsity, cfg.final_sparsity, cfg.start_step, cfg.end_step)
    if cfg.schedule == "linear":
        return linear(step, cfg.initial_sparsity, cfg.final_sparsity, cfg.start_step, cfg.end_step)
    if cfg.schedule == "oneshot":
        return oneshot(step, cfg.final_sparsity, cfg.start_step)
    raise ValueError("the threshold schedule has no sparsity target; use threshold_at")


def threshold_at(cfg: PruningSpec, step: int) -> float:
    """Theta (in units of a layer's weight std) ramped up with the cubic shape, so the classic
    prune-|w|-below-theta*std method also prunes gradually instead of all at once."""
    assert cfg.threshold is not None
    return cubic(step, 0.0, cfg.threshold, cfg.start_step, cfg.end_step)


def is_update_step(cfg: PruningSpec, step: int) -> bool:
    if cfg.schedule == "oneshot":
        return step == cfg.start_step
    if step < cfg.start_step or step > cfg.end_step:
        return False
    return (step - cfg.start_step) % cfg.frequency == 0 or step == cfg.end_step


def last_update_step(cfg: PruningSpec, step: int) -> int | None:
    """The most recent update step <= step (None before the first): the target in force."""
    if step < cfg.start_step:
        return None
    if cfg.schedule == "oneshot":
        return cfg.start_step
    if step >= cfg.end_step:
        return cfg.end_step
    return cfg.start_step + (step - cfg.start_step) // cfg.frequency * cfg.frequency


def scheduled_sparsity(cfg: PruningSpec, step: int) -> float | None:
    """The sparsity target in force at `step` (None for the threshold schedule)."""
    if cfg.schedule == "threshold":
        return None
    last = last_update_step(cfg, step)
    return 0.0 if last is None else target_sparsity(cfg, last)


def update_steps(cfg: PruningSpec, total_steps: int) -> list[int]:
    """Every step at which masks are recomputed in a run of `total_steps` optimizer steps. An
    update at `total_steps` is made after the last step trains: it shapes the exported model."""
    if cfg.schedule == "oneshot":
        return [cfg.start_step] if cfg.start_step <= total_steps else []
    last = min(cfg.end_step, total_steps)
    steps = list(range(cfg.start_step, last + 1, cfg.frequency))
    if cfg.end_step <= total_steps and steps[-1:] != [cfg.end_step]:
        steps.append(cfg.end_step)
    return steps


def target_curve(cfg: PruningSpec, total_steps: int, max_points: int = 256) -> list[tuple[int, float]] | None:
    """The scheduled target over the whole run as (steps done, target) corners of a staircase,
    on the axis of the train records (`step` = optimizer steps done): the masks of the update at
    step u first train in step u, so they are what a record at u + 1 or later measures; an
    update at the last step, made after it, is drawn at the last step (the exported model has
    it). The target holds from each corner to the next. None for the threshold schedule (no
    target). More update steps than `max_points` are thinned evenly (first and last kept): the
    points lie on the curve, and at that density a chart cannot tell."""
    if cfg.schedule == "threshold":
        return None
    steps = update_steps(cfg, total_steps)
    if len(steps) > max_points:
        stride = -(-len(steps) // max_points)  # ceil
        steps = steps[::stride] + ([steps[-1]] if (len(steps) - 1) % stride else [])
    corners = {0: 0.0}
    for u in steps:  # in order, so an update at the last step replaces the one before it there
        corners[min(u + 1, total_steps)] = target_sparsity(cfg, u)
    out = sorted(corners.items())
    if out[-1][0] < total_steps:
        out.append((total_steps, out[-1][1]))
    return out


def pruning_end(spec: JobSpec) -> int | None:
    """The step of the last mask update (None without pruning)."""
    pr = spec.compression.pruning
    if pr is None:
        return None
    return pr.start_step if pr.schedule == "oneshot" else pr.end_step
