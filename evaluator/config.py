"""Typed settings of the evaluator library: which lm-eval tasks score a model, and how."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional


def doc(text: str, **kwargs):
    """A dataclass field with documentation (kept in metadata for the README reference)."""
    return field(metadata={"doc": text}, **kwargs)


@dataclass(frozen=True)
class TaskConfig:
    """One lm-eval task and the metric taken from it."""

    name: str = doc(
        "lm-eval task name (e.g. mmlu, gsm8k) or, for a local task, the name it is registered under."
    )
    metric: str = doc("Metric read from the task's results (acc, acc_norm, exact_match, ...).", default="acc")
    source: Optional[str] = doc(
        "Build a local multiple-choice task from the held-out split of this data source.", default=None
    )
    data_file: Optional[str] = doc(
        "Build a local multiple-choice task from this JSONL file (fields prompt, choices, answer); "
        "relative to the config file.",
        default=None,
    )
    num_fewshot: int = doc("Few-shot examples per prompt.", default=0)
    limit: Optional[int] = doc("Score only the first N documents (None: all).", default=None)
    weight: float = doc("Weight of this task in the objective (a weighted mean).", default=1.0)

    @property
    def is_local(self) -> bool:
        return self.source is not None or self.data_file is not None

    def validate(self) -> None:
        if not self.name:
            raise ValueError("name: must be a non-empty string")
        if self.source is not None and self.data_file is not None:
            raise ValueError("source: give either source or data_file, not both")
        if self.num_fewshot < 0:
            raise ValueError(f"num_fewshot: must be >= 0, got {self.num_fewshot}")
        if self.limit is not None and self.limit < 1:
            raise ValueError(f"limit: must be >= 1 or null, got {self.limit}")
        if not self.weight > 0:
            raise ValueError(f"weight: must be > 0, got {self.weight}")


@dataclass(frozen=True)
class EvalConfig:
    """How trained adapters (and the untuned base) are scored."""

    tasks: list[TaskConfig] = doc("Tasks whose weighted mean metric is the trial's objective.", default_factory=list)
    batch_size: int = doc("Requests per forward pass in lm-eval.", default=16)

    def validate(self) -> None:
        if not self.tasks:
            raise ValueError("tasks: at least one evaluation task is required")
        names = [t.name for t in self.tasks]
        if len(set(names)) != len(names):
            raise ValueError(f"tasks: names must be unique, got {names}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size: must be >= 1, got {self.batch_size}")
