"""The limits of one start: its budget in slot-hours and its timeout, and a finished trial's feasibility."""

from __future__ import annotations

import time
from typing import Optional

from sweep.worker import TrialResult


class Budget:
    """`budget_hours` (slot-hours: GPU-hours on a GPU profile) and `timeout_seconds` of one start.

    A trial starts only when the time it is expected to take (the mean of the
    finished full-length trials, else of any finished ones) fits in what is
    left, after what the running trials are still expected to use.
    """

    def __init__(self, hours: Optional[float], timeout_seconds: Optional[float], unit: str):
        self.hours = hours
        self.timeout_seconds = timeout_seconds
        self.unit = unit
        self.started = time.monotonic()
        self.complete_seconds: list[float] = []
        self.other_seconds: list[float] = []

    def finished(self, seconds: float, complete: bool) -> None:
        (self.complete_seconds if complete else self.other_seconds).append(seconds)

    def trial_seconds(self) -> Optional[float]:
        durations = self.complete_seconds or self.other_seconds
        return sum(durations) / len(durations) if durations else None

    def blocks(self, used_hours: float, running_seconds: list[float]) -> Optional[str]:
        """Why no trial may start now, or None."""
        estimate = self.trial_seconds()
        about = f"; a trial takes about {estimate:.0f}s" if estimate is not None else ""
        if self.timeout_seconds is not None:
            left = self.timeout_seconds - (time.monotonic() - self.started)
            if left <= 0 or (estimate is not None and estimate > left):
                return f"timeout of {self.timeout_seconds:g}s: {max(left, 0):.0f}s left{about}"
        if self.hours is not None:
            still = sum(max(0.0, estimate - s) for s in running_seconds) if estimate is not None else 0.0
            projected = used_hours + (still + (estimate or 0.0)) / 3600
            if used_hours >= self.hours or projected > self.hours:
                return f"budget of {self.hours:g} {self.unit}: {used_hours:.4f} used{about}"
        return None


def feasibility(result: TrialResult, hours_limit: float) -> dict[str, float]:
    """Optuna constraints of a finished trial (<= 0 means satisfied).

    `full_run_hours_over_limit`: projected hours of the full run on the target
    GPU minus the limit. `memory_over_cap_gib`: peak GPU memory minus the
    profile's cap (only where both are known).
    """
    constraints = {}
    if result.projected_full_run_hours is not None:
        constraints["full_run_hours_over_limit"] = min(result.projected_full_run_hours, 1e9) - hours_limit
    if result.peak_memory_gib is not None and result.memory_cap_gib is not None:
        constraints["memory_over_cap_gib"] = result.peak_memory_gib - result.memory_cap_gib
    return constraints

