"""Method `tpe`: parameters of the next trial from Optuna's TPE sampler through its ask/tell
interface. No study is kept between calls: each call rebuilds one from the trials the database
holds (finished ones told with their values, failed ones as failed, running ones as running so
the constant liar spreads concurrent asks), so a restarted API asks from the same history."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import optuna
from optuna.distributions import BaseDistribution, CategoricalDistribution, FloatDistribution, IntDistribution
from optuna.trial import TrialState, create_trial

from service.errors import SpecError
from service.sweeps.plan import SweepRequest, is_int_path

# Optuna logs every trial at INFO; the service's log is about jobs.
optuna.logging.set_verbosity(optuna.logging.WARNING)
log = logging.getLogger(__name__)

_SCALARS = (type(None), bool, int, float, str)


@dataclass(frozen=True)
class Told:
    """One trial as the sampler learns it: its params, and its objective values (in the
    request's objective order) when it succeeded, None when it failed or is still running."""

    params: dict[str, Any]
    values: list[float] | None
    running: bool = False


def distributions(req: SweepRequest) -> dict[str, BaseDistribution]:
    out: dict[str, BaseDistribution] = {}
    for path, values in req.grid.items():
        out[path] = CategoricalDistribution(values)
    for path, r in req.random.items():
        if is_int_path(path):
            out[path] = IntDistribution(int(round(r.low)), int(round(r.high)), log=r.log)
        else:
            out[path] = FloatDistribution(r.low, r.high, log=r.log)
    return out


def check_tpe(req: SweepRequest) -> None:
    """Choices Optuna can hold: scalars (a list value such as model.args.hidden cannot be one)."""
    for path, values in req.grid.items():
        for i, v in enumerate(values):
            if not isinstance(v, _SCALARS):
                field = f"grid.{path}[{i}]"
                msg = "method tpe takes numbers, strings, booleans or null as choices; use method grid"
                raise SpecError(f"{field}: {msg}", [{"field": field, "message": msg}])


def ask(req: SweepRequest, history: Sequence[Told], index: int) -> dict[str, Any]:
    """Parameters of trial `index` given what the earlier trials gave."""
    dists = distributions(req)
    directions = ["maximize" if o.direction == "max" else "minimize" for o in req.objective]
    sampler = optuna.samplers.TPESampler(
        # Seeded by the trial index too: asking again for the same index after a crash, from the
        # same history, gives the same parameters.
        seed=(req.seed * 100_003 + index) % 2**32,  # numpy's seeds are 32-bit
        n_startup_trials=max(1, min(10, (req.max_trials or 1) // 2)),
        constant_liar=True,
    )
    study = optuna.create_study(directions=directions, sampler=sampler)
    for t in history:
        params = {p: v for p, v in t.params.items() if p in dists}
        if len(params) != len(dists):
            continue  # a trial of another parameter set; cannot be told
        if t.values is not None:
            study.add_trial(create_trial(params=params, distributions=dists, values=t.values))
        else:
            state = TrialState.RUNNING if t.running else TrialState.FAIL
            study.add_trial(create_trial(params=params, distributions=dists, state=state))
    trial = study.ask(dists)
    return dict(trial.params)
