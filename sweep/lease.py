"""One driver per study: the lease a `sweep start` holds on its study, and the heartbeat that keeps it.

Two `sweep start` on one study (two terminals, or two hosts on a shared
database) would both write its trials. The first to start takes the study's
lease (a row of `sweep_leases`, keyed by the study's name, taken in one write
transaction); the second is refused at once, in one line naming the live
driver. Scaling out is Ray's job, not a second driver's: one driver runs as
many trials at once as its Ray cluster has GPUs (`--address`).

A lease ends when its driver ends, however it ends:
- cleanly (the trials done, Ctrl-C, SIGTERM, an error): the driver releases it;
- the driver died (`kill -9`, power loss, an out-of-memory kill): on the same
  host (host name, boot and process namespace all equal) the next start sees
  the process is gone and takes the lease over at once; from another host,
  once the lease's heartbeat is older than 3 of its driver's heartbeat
  intervals (on the database's clock). A driver whose lease was taken over
  finds out at its next heartbeat and stops.
"""

from __future__ import annotations

import datetime as dt
import logging
import os
import socket
import threading
from dataclasses import dataclass
from typing import Callable, Optional

from sqlalchemy import inspect, select
from sqlalchemy.exc import IntegrityError

from sweep.faults import SweepError
from sweep.store import Store, drivers, leases

log = logging.getLogger("sweep")

GRACE_INTERVALS = 3
"""A lease whose heartbeat is older than this many of its driver's heartbeat intervals is stale."""


class LeaseHeld(SweepError):
    """Another live driver runs the study."""


class LeaseLost(SweepError):
    """This driver's lease was taken over (its heartbeat went stale): it must stop writing."""


@dataclass(frozen=True)
class DriverRecord:
    """A row of `sweep_drivers`."""

    id: int
    study_name: str
    host: str
    host_key: str
    pid: int
    pid_started: Optional[int]
    heartbeat_seconds: int
    target: Optional[int]
    started_at: dt.datetime
    ended_at: Optional[dt.datetime]
    end_reason: Optional[str]
    resumable: Optional[bool]


def host_key() -> str:
    """What makes a process id meaningful: the host's name, its boot, and the process id namespace."""
    parts = [socket.gethostname()]
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            parts.append(f.read().strip())
    except OSError:
        parts.append("")
    try:
        parts.append(os.readlink("/proc/self/ns/pid"))
    except OSError:
        parts.append("")
    return "|".join(parts)


def process_started(pid: int) -> Optional[int]:
    """The process's start time in clock ticks since boot (Linux), to tell a reused process id apart."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            stat = f.read()
    except OSError:
        return None
    fields = stat[stat.rindex(")") + 2:].split()  # after "pid (comm) "
    return int(fields[19]) if fields[0] != "Z" else None  # field 22 of stat: starttime; a zombie has ended


def process_alive(pid: int, started: Optional[int]) -> bool:
    """Whether process `pid` on this host is still the one that started at `started`."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    now_started = process_started(pid)
    if os.path.isdir("/proc") and now_started is None:
        return False  # gone, or a zombie
    return started is None or now_started is None or now_started == started


def _driver(row) -> DriverRecord:
    return DriverRecord(**{k: row[k] for k in DriverRecord.__dataclass_fields__})


class DriverLease:
    """A study's lease, held by this process (see the module's docstring)."""

    def __init__(self, store: Store, study_name: str, driver_id: int, previous: Optional[DriverRecord]):
        self.store = store
        self.study_name = study_name
        self.driver_id = driver_id
        self.previous = previous
        """The driver that held the study before and died without ending (its start may be resumed), or None."""
        self.lost = threading.Event()

    @classmethod
    def acquire(cls, store: Store, study_name: str, heartbeat_seconds: int) -> "DriverLease":
        """Takes the study's lease, or raises `LeaseHeld` naming the live driver that has it."""
        for _ in range(3):
            try:
                return cls._acquire(store, study_name, heartbeat_seconds)
            except IntegrityError:  # another driver inserted the lease first (databases without BEGIN IMMEDIATE)
                continue
        raise LeaseHeld(f"study {study_name!r}: another `sweep start` took the study's lease at the same time")

    @staticmethod
    def check_free(store: Store, study_name: str) -> None:
        """Raises `LeaseHeld` when a live driver holds the study's lease, writing nothing (a read-only `store`).

        `acquire` decides; this lets a start be refused at once, before its checks at start.
        """
        with store.engine.connect() as conn:
            if not all(inspect(conn).has_table(t.name) for t in (leases, drivers)):
                return
            held = _lease_holder(conn, study_name, store.now(conn))
        if held is not None and _dead_why(held[1], held[2], host_key()) is None:
            raise LeaseHeld(_held_message(study_name, held[1], held[2]))

    @classmethod
    def _acquire(cls, store: Store, study_name: str, heartbeat_seconds: int) -> "DriverLease":
        me = host_key()
        with store.write() as conn:
            now = store.now(conn)
            held = _lease_holder(conn, study_name, now, for_update=True)
            previous = None
            if held is not None:
                lease, holder, age = held
                dead_why = _dead_why(holder, age, me)
                if dead_why is None:
                    raise LeaseHeld(_held_message(study_name, holder, age))
                conn.execute(leases.delete().where(leases.c.study_name == study_name,
                                                   leases.c.driver_id == lease.driver_id))
                if holder is not None and holder.ended_at is None:
                    conn.execute(drivers.update().where(drivers.c.id == holder.id).values(
                        ended_at=now, end_reason=f"died ({dead_why})", resumable=True,
                    ))
                    previous = holder
            driver_id = conn.execute(drivers.insert().values(
                study_name=study_name, host=socket.gethostname(), host_key=me, pid=os.getpid(),
                pid_started=process_started(os.getpid()), heartbeat_seconds=heartbeat_seconds, started_at=now,
            )).inserted_primary_key[0]
            conn.execute(leases.insert().values(study_name=study_name, driver_id=driver_id, heartbeat_at=now))
        if previous is not None:
            log.warning("The last driver of study %r (pid %d on %s) died; its lease is taken over", study_name,
                        previous.pid, previous.host)
        return cls(store, study_name, driver_id, previous)

    def holds(self, conn) -> bool:
        """Whether the lease is still this driver's, inside the caller's transaction."""
        row = conn.execute(select(leases.c.driver_id).where(leases.c.study_name == self.study_name)).first()
        return row is not None and row.driver_id == self.driver_id

    def still_held(self) -> bool:
        """Whether the lease is still this driver's (read now, not from the last heartbeat)."""
        with self.store.engine.connect() as conn:
            held = self.holds(conn)
        if not held:
            self.lost.set()
        return held

    def beat(self) -> bool:
        """Records a heartbeat; False (and `lost` set) when the lease is no longer this driver's."""
        with self.store.write() as conn:
            done = conn.execute(leases.update().where(
                leases.c.study_name == self.study_name, leases.c.driver_id == self.driver_id,
            ).values(heartbeat_at=self.store.now(conn))).rowcount
        if not done:
            self.lost.set()
        return bool(done)

    def set_target(self, finished_trials: int) -> None:
        """The count of finished trials this start is to reach (what a start resuming it goes on to)."""
        with self.store.write() as conn:
            conn.execute(drivers.update().where(drivers.c.id == self.driver_id).values(target=finished_trials))

    def release(self, reason: str, resumable: bool = False) -> None:
        """Ends the lease; `resumable`: the next start goes on to reach this one's target (a full disk)."""
        with self.store.write() as conn:
            conn.execute(leases.delete().where(leases.c.study_name == self.study_name,
                                               leases.c.driver_id == self.driver_id))
            conn.execute(drivers.update().where(drivers.c.id == self.driver_id, drivers.c.ended_at.is_(None)).values(
                ended_at=self.store.now(conn), end_reason=reason, resumable=resumable,
            ))


def _lease_holder(conn, study_name: str, now: dt.datetime, for_update: bool = False):
    """(lease row, its driver or None, heartbeat age in seconds) of the study's lease, or None when there is none."""
    query = select(leases).where(leases.c.study_name == study_name)
    lease = conn.execute(query.with_for_update() if for_update else query).first()
    if lease is None:
        return None
    row = conn.execute(select(drivers).where(drivers.c.id == lease.driver_id)).mappings().first()
    return lease, _driver(row) if row is not None else None, max(0.0, (now - lease.heartbeat_at).total_seconds())


def _dead_why(holder: Optional[DriverRecord], heartbeat_age_s: float, me: str) -> Optional[str]:
    """Why the lease's holder counts as dead, or None while it may be alive."""
    if holder is None or holder.ended_at is not None:
        return "it ended"
    if heartbeat_age_s > GRACE_INTERVALS * holder.heartbeat_seconds:
        return f"no heartbeat for {heartbeat_age_s:.0f}s"
    if holder.host_key == me and not process_alive(holder.pid, holder.pid_started):
        return f"process {holder.pid} is gone"
    return None


def _held_message(study_name: str, holder: Optional[DriverRecord], age_s: float) -> str:
    grace = GRACE_INTERVALS * holder.heartbeat_seconds
    started = holder.started_at.strftime("%Y-%m-%d %H:%M:%S UTC")
    return (f"study {study_name!r} is being run by another `sweep start` (pid {holder.pid} on host {holder.host}, "
            f"started {started}, last heartbeat {age_s:.0f}s ago): wait for it to end or stop it, or use another "
            f"--study (if that driver died, its lease lapses {grace}s after its last heartbeat)")


class Heartbeat:
    """A thread that keeps the lease and the running trials' Optuna heartbeats fresh every `seconds`.

    A thread, not the driver's loop: the loop blocks for minutes at a time (scoring the baseline,
    waiting on a slot), and a lease must not lapse while its driver lives.
    """

    def __init__(self, lease: DriverLease, seconds: float):
        self.lease = lease
        self.seconds = seconds
        self.beat_trials: Callable[[], object] = lambda: None
        """Records the running trials' Optuna heartbeats (set once the driver has its storage)."""
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="sweep-heartbeat", daemon=True)
        self._warned = False

    def __enter__(self) -> "Heartbeat":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(timeout=self.seconds + 30)

    def _run(self) -> None:
        while not self._stop.wait(self.seconds):
            try:
                if not self.lease.beat():
                    log.error("Study %r: this driver's lease was taken over by another start", self.lease.study_name)
                    return
                self.beat_trials()
            except Exception as e:  # noqa: BLE001 - a missed beat is retried; the driver's own writes report errors
                if not self._warned:
                    log.warning("Heartbeat not recorded (retrying every %gs): %s", self.seconds,
                                " ".join(str(e).split())[:200])
                    self._warned = True
