"""Live progress of a sweep: a rich table on a terminal, plain log lines otherwise."""

from __future__ import annotations

import logging
import sys
import time
from dataclasses import dataclass, field
from typing import Optional

log = logging.getLogger("sweep")

PLAIN_EVERY_S = 30.0


@dataclass
class RunningTrial:
    number: int
    slot: int
    params: dict
    started: float = field(default_factory=time.monotonic)
    step: int = 0
    total_steps: Optional[int] = None
    loss: Optional[float] = None
    first_step_at: Optional[float] = None

    def eta_seconds(self, now: float) -> Optional[float]:
        """Training time left, from the pace of the steps so far (scoring not included)."""
        if not self.total_steps or not self.step or self.first_step_at is None or self.step >= self.total_steps:
            return None
        pace = (now - self.first_step_at) / max(self.step - 1, 1)
        return pace * (self.total_steps - self.step)


@dataclass
class Progress:
    """What the driver knows of the sweep right now (driver side only)."""

    study: str
    n_trials: int
    unit: str
    """`GPU-hours` on a GPU profile, `slot-hours` on cpu."""
    budget_hours: Optional[float] = None
    running: dict[int, RunningTrial] = field(default_factory=dict)
    complete: int = 0
    pruned: int = 0
    failed: int = 0
    best: Optional[tuple[int, float]] = None
    finished_hours: float = 0.0

    def hours_used(self, now: Optional[float] = None) -> float:
        now = time.monotonic() if now is None else now
        return self.finished_hours + sum(now - r.started for r in self.running.values()) / 3600

    def on_step(self, number: int, step: int, total: Optional[int], loss: float) -> None:
        r = self.running.get(number)
        if r is None:
            return
        if r.first_step_at is None:
            r.first_step_at = time.monotonic()
        r.step, r.loss = step, loss
        r.total_steps = total or r.total_steps

    def summary(self) -> str:
        budget = f" of {self.budget_hours:.4g}" if self.budget_hours else ""
        best = f"best trial {self.best[0]} ({self.best[1]:.4f})" if self.best else "no best yet"
        return (f"{self.complete} complete, {self.pruned} pruned, {self.failed} failed, {len(self.running)} running "
                f"of {self.n_trials}; {best}; {self.hours_used():.4f}{budget} {self.unit} used")

    def table(self):
        """The rich renderable of the live display."""
        from rich.console import Group
        from rich.table import Table

        now = time.monotonic()
        table = Table(title=f"Study {self.study}", expand=False)
        for name in ("trial", "slot", "step", "loss", "ETA", "elapsed", "params"):
            table.add_column(name)
        for r in sorted(self.running.values(), key=lambda r: r.number):
            eta = r.eta_seconds(now)
            table.add_row(
                str(r.number), str(r.slot), f"{r.step}/{r.total_steps or '?'}",
                "" if r.loss is None else f"{r.loss:.4f}", "" if eta is None else f"{eta:.0f}s",
                f"{now - r.started:.0f}s", _short(r.params),
            )
        return Group(table, self.summary())


class Display:
    """Shows `Progress`: a rich live table when stdout is a terminal, else a log line now and then."""

    def __init__(self, progress: Progress, live: Optional[bool] = None):
        self.progress = progress
        self.live_mode = sys.stdout.isatty() if live is None else live
        self._live = None
        self._handlers: list = []
        self._last_line = time.monotonic()

    def __enter__(self) -> "Display":
        if self.live_mode:
            from rich.live import Live

            self._live = Live(self.progress.table(), refresh_per_second=2, transient=True)
            self._live.__enter__()
            # Log lines go above the live table instead of through it.
            for handler in logging.getLogger().handlers:
                if isinstance(handler, logging.StreamHandler) and handler.stream in (sys.__stderr__, sys.__stdout__):
                    self._handlers.append((handler, handler.setStream(sys.stderr)))
        return self

    def update(self) -> None:
        if self._live is not None:
            self._live.update(self.progress.table())
        elif time.monotonic() - self._last_line >= PLAIN_EVERY_S and self.progress.running:
            self.event()

    def event(self) -> None:
        """A trial ended: in plain mode, one line now."""
        if self._live is None:
            self._last_line = time.monotonic()
            log.info("Progress: %s", self.progress.summary())
        else:
            self.update()

    def __exit__(self, *exc) -> None:
        for handler, stream in self._handlers:
            handler.setStream(stream)
        if self._live is not None:
            self._live.__exit__(*exc)
            self._live = None
            log.info("Progress: %s", self.progress.summary())


def _short(params: dict) -> str:
    parts = []
    for k, v in params.items():
        name = k.split(".")[-1]
        parts.append(f"{name}={v:.3g}" if isinstance(v, float) else f"{name}={v}")
    return " ".join(parts)


def fmt_values(values: dict) -> str:
    """`{open=0.3362, lr=2e-05}`: values for a log line, floats to four significant digits."""
    parts = []
    for k, v in values.items():
        parts.append(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}")
    return "{" + ", ".join(parts) + "}"
