"""The search space: config entries -> `trial.suggest_*` calls -> per-trial settings."""

from __future__ import annotations

from typing import Any

from sweep.config import ParamSpace


def suggest(trial, search_space: dict[str, ParamSpace]) -> dict[str, Any]:
    """Samples every searched parameter of `trial` (an Optuna trial); keys are dotted paths."""
    import optuna

    params = {}
    for name, space in search_space.items():
        dist = distribution(space)
        if isinstance(dist, optuna.distributions.CategoricalDistribution):
            params[name] = trial.suggest_categorical(name, dist.choices)
        elif isinstance(dist, optuna.distributions.IntDistribution):
            params[name] = trial.suggest_int(name, dist.low, dist.high, step=dist.step, log=dist.log)
        else:
            params[name] = trial.suggest_float(name, dist.low, dist.high, step=dist.step, log=dist.log)
    return params


def distribution(space: ParamSpace):
    """The Optuna distribution `suggest` samples `space` from (what the study stores with each trial)."""
    import optuna

    if space.type == "categorical":
        return optuna.distributions.CategoricalDistribution(space.choices)
    if space.type == "int":
        step = int(space.step) if space.step else 1
        return optuna.distributions.IntDistribution(int(space.low), int(space.high), log=space.log, step=step)
    return optuna.distributions.FloatDistribution(space.low, space.high, log=space.log, step=space.step)
