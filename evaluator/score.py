"""A suite's value from its per-task scores: normalise each task, then aggregate.

The challenge ranked entries by a geometric mean over scenarios, so one weak
task costs more than an arithmetic mean would let it. With `normalize:
chance` each task first maps its chance score to 0 and a perfect score to 1:

    n_i = clip((s_i - c_i) / (1 - c_i), 0, 1)

(`baseline`: n_i = s_i / b_i against the untuned base model's score b_i;
`none`: n_i = s_i). The suite's value is the weighted geometric mean with a
floor f, so that a single zero does not erase a trial:

    G = exp( sum_i w_i * ln(max(n_i, f)) / sum_i w_i )

or, with `aggregate: mean`, sum_i w_i * n_i / sum_i w_i.
"""

from __future__ import annotations

import math
from typing import Optional

from evaluator.config import EvalConfig, TaskConfig


def normalized(score: float, task: TaskConfig, mode: str = "chance", baseline: Optional[float] = None) -> float:
    """One task's score on the common scale of its suite (see the module docstring)."""
    if mode == "none":
        return score
    if mode == "baseline":
        if baseline is None:
            raise ValueError(f"task {task.name!r}: normalize=baseline needs the base model's score")
        return score / baseline if baseline > 0 else (1.0 if score > 0 else 0.0)
    return min(1.0, max(0.0, (score - task.chance) / (1.0 - task.chance)))


def aggregate(
    scores: dict[str, float],
    tasks: list[TaskConfig],
    method: str = "geometric",
    floor: float = 0.01,
    normalize: str = "chance",
    baseline: Optional[dict[str, float]] = None,
) -> float:
    """The value of a suite of `tasks` from per-task `scores`.

    Raises:
        KeyError: a task has no score (a missing score never passes for a low one).
    """
    total = sum(t.weight for t in tasks)
    values = [
        normalized(scores[t.name], t, normalize, (baseline or {}).get(t.name)) for t in tasks
    ]
    if method == "mean":
        return sum(t.weight * v for t, v in zip(tasks, values, strict=True)) / total
    return math.exp(sum(t.weight * math.log(max(v, floor)) for t, v in zip(tasks, values, strict=True)) / total)


def suite_values(
    scores: dict[str, float], config: EvalConfig, baseline: Optional[dict[str, float]] = None
) -> dict[str, float]:
    """The value of every suite of `config` from per-task scores.

    With `normalize: baseline` and no baseline scores (the base could not be
    scored), tasks are normalised by chance instead.
    """
    normalize = "chance" if config.normalize == "baseline" and baseline is None else config.normalize
    return {
        name: aggregate(scores, tasks, config.aggregate, config.floor, normalize, baseline)
        for name, tasks in config.suite_tasks().items()
    }
