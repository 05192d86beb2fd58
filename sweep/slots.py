"""The Ray side of the driver: trial slots (one actor per GPU, or per share of the CPU) and the mailbox.

A slot is a `TrialSlot` (sweep.worker) running as a Ray actor; with a resident
base it keeps the 4-bit model loaded across trials. Running trials send their
progress and their rungs' values to the `Mailbox`, a small actor the driver
creates; the driver drains it, asks the pruner, and posts each decision back.
Workers never touch the database.
"""

from __future__ import annotations

import logging
import time
from typing import Any, Optional

log = logging.getLogger("sweep")

RUNG_DECISION_TIMEOUT_S = 600.0
SHARE_OF_AVAILABLE_MEMORY = 0.9
"""The slots' default host-memory limit together: this share of what the host had available at the start."""


class Mailbox:
    """Reports from running trials to the driver, and the driver's pruning decisions back (a Ray actor)."""

    def __init__(self):
        self._reports: list[tuple] = []
        self._decisions: dict[tuple[int, int], bool] = {}

    def post(self, report: tuple) -> None:
        """`("step", trial, step, total, loss)` or `("rung", trial, step, value)`."""
        self._reports.append(report)

    def drain(self) -> list[tuple]:
        reports, self._reports = self._reports, []
        return reports

    def decide(self, trial_number: int, step: int, prune: bool) -> None:
        self._decisions[(trial_number, step)] = prune

    def decision(self, trial_number: int, step: int) -> Optional[bool]:
        return self._decisions.pop((trial_number, step), None)


class MailboxReporter:
    """What a worker holds (picklable): reports through the mailbox actor; a rung waits for the decision."""

    def __init__(self, mailbox):
        self.mailbox = mailbox

    def progress(self, trial_number: int, step: int, total_steps: int, loss: float) -> None:
        self.mailbox.post.remote(("step", trial_number, step, total_steps, loss))

    def rung(self, trial_number: int, step: int, value: float) -> bool:
        import ray

        self.mailbox.post.remote(("rung", trial_number, step, value))
        deadline = time.monotonic() + RUNG_DECISION_TIMEOUT_S
        while time.monotonic() < deadline:  # the driver answers within its poll interval
            decision = ray.get(self.mailbox.decision.remote(trial_number, step))
            if decision is not None:
                return decision
            time.sleep(0.05)
        return False  # no driver to answer: train on


class SlotPool:
    """The driver's trial slots: Ray actors it creates, and replaces when one dies or its memory grew."""

    def __init__(self, size: int, options: dict, resident: bool, memory_growth_margin_gib: float):
        import ray

        from sweep.worker import TrialSlot

        self._actor_class = ray.remote(TrialSlot).options(max_restarts=0, max_task_retries=0, **options)
        self.resident = resident
        self.margin_gib = memory_growth_margin_gib
        self.share_gib = slot_share_gib(size)  # before any slot takes memory
        """Host memory each slot may use by default (orchestration.cpu_memory_limit_gib null); None: no limit."""
        self.actors: list[Any] = [self._new(k) for k in range(size)]

    def _new(self, slot: int):
        return self._actor_class.remote(resident=self.resident, slot=slot)

    def replace(self, slot: int, why: str) -> None:
        import ray

        log.info("Replacing slot %d: %s", slot, why)
        ray.kill(self.actors[slot], no_restart=True)
        self.actors[slot] = self._new(slot)

    def check(self, slot: int) -> None:
        """After a trial: replaces the slot when its actor died or its memory grew beyond the margin."""
        import ray

        try:
            growth = ray.get(self.actors[slot].memory_growth_gib.remote(), timeout=60)
        except (ray.exceptions.RayError, TimeoutError) as e:
            self.replace(slot, f"its actor is gone ({type(e).__name__})")
            return
        if growth is not None and growth > self.margin_gib:
            self.replace(slot, f"memory grew {growth:.2f} GiB since its first trial (margin {self.margin_gib:g})")

    def kill_all(self) -> None:
        import ray

        for actor in self.actors:
            ray.kill(actor, no_restart=True)


def available_memory_gib() -> Optional[float]:
    """MemAvailable of /proc/meminfo (what this host can give without swapping), None where there is none."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) / 2**20  # kB
    except (OSError, ValueError, IndexError):
        pass
    return None


def slot_share_gib(slots: int) -> Optional[float]:
    """A slot's share of this host's memory: 90% of what is available now, split between `slots`.

    None (no limit) when the slots may run on other hosts (a Ray cluster of several nodes, or one joined with
    ray://), whose memory this host cannot measure, or where /proc/meminfo is missing.
    """
    available = available_memory_gib()
    if available is None or not _cluster_is_this_host():
        return None
    return SHARE_OF_AVAILABLE_MEMORY * available / max(1, slots)


def _cluster_is_this_host() -> bool:
    import ray
    from ray.util.client import ray as client

    if client.is_connected():  # ray://: this process is not one of the cluster's nodes
        return False
    here = ray.get_runtime_context().get_node_id()
    return all(node["NodeID"] == here for node in ray.nodes() if node.get("Alive"))
