"""The objective a trial is ranked by, from its per-task scores."""

from __future__ import annotations

from evaluator.config import TaskConfig


def objective(scores: dict[str, float], tasks: list[TaskConfig]) -> float:
    """Weighted mean of the task metrics: sum(w_i * s_i) / sum(w_i).

    Raises KeyError when a task has no score, so a missing score can never pass
    for a low one.
    """
    total = sum(t.weight for t in tasks)
    return sum(t.weight * scores[t.name] for t in tasks) / total
