"""How a sweep stops when the world intervenes: errors it reports in one line, a full disk, and stop signals.

A full disk shows up as ENOSPC (no space left), EFBIG (a file-size limit,
`ulimit -f`), EDQUOT (a quota), SQLite's "database or disk is full" or
"disk I/O error", PostgreSQL's SQLSTATE 53100, or a library's own wording of
those (safetensors writes from Rust): `is_disk_full` treats them all as one
class. SIGTERM and SIGHUP (`timeout`, `docker stop`, a closed terminal, a
preempted cloud machine) stop a start as Ctrl-C does: `Terminated` is a
`KeyboardInterrupt`, so every path that handles Ctrl-C handles them too.
"""

from __future__ import annotations

import contextlib
import errno
import re
import signal
from typing import Optional

DISK_FULL_ERRNOS = frozenset({errno.ENOSPC, errno.EFBIG, errno.EDQUOT})
_DISK_FULL_TEXT = re.compile(
    r"no space left on device|storagefull|file too large|filetoolarge|disk quota exceeded|"
    r"database or disk is full|errno 28\b|errno 27\b|os error 28\b|os error 27\b",
    re.IGNORECASE,
)
# SQLite's result codes for a write the file system refused (SQLITE_FULL; SQLITE_IOERR_WRITE is what
# SQLite returns when write() fails with EFBIG), and PostgreSQL's disk_full.
_SQLITE_FULL_CODES = frozenset({"SQLITE_FULL", "SQLITE_IOERR_WRITE", "SQLITE_IOERR_SHMSIZE", "SQLITE_IOERR_FSYNC"})
_PG_DISK_FULL = "53100"

STOP_SIGNALS = (signal.SIGTERM, signal.SIGHUP)


class SweepError(RuntimeError):
    """A step of the sweep failed in a way the user can act on: reported in one line."""


class DiskFull(SweepError):
    """A write failed for lack of space (or of a file-size allowance)."""

    def __init__(self, what: str):
        super().__init__(f"no space left on device while writing {what}")
        self.what = what


class Terminated(KeyboardInterrupt):
    """SIGTERM or SIGHUP arrived: stop as Ctrl-C does, exiting with 128 + the signal's number."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def _chain(error: BaseException):
    """The error, its causes and contexts, and the original exception a Ray error carries."""
    seen = set()
    stack = [error]
    while stack:
        e = stack.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        yield e
        stack.extend([getattr(e, "cause", None), getattr(e, "orig", None), e.__cause__, e.__context__])


def is_disk_full(error: BaseException) -> bool:
    """Whether `error` (or anything it wraps) says a write found no room."""
    for e in _chain(error):
        if isinstance(e, OSError) and e.errno in DISK_FULL_ERRNOS:
            return True
        if getattr(e, "sqlite_errorname", None) in _SQLITE_FULL_CODES:
            return True
        if getattr(e, "pgcode", None) == _PG_DISK_FULL or getattr(e, "sqlstate", None) == _PG_DISK_FULL:
            return True
        if not isinstance(e, OSError) and _DISK_FULL_TEXT.search(str(e)):
            return True
    return False


def written_file(error: BaseException) -> Optional[str]:
    """The file a disk-full error names, if any."""
    for e in _chain(error):
        if isinstance(e, OSError) and e.filename:
            return str(e.filename)
    return None


def ignore_file_size_signal() -> None:
    """Past a file-size limit the kernel sends SIGXFSZ, whose default action kills the process: ignore it,
    so the write fails with EFBIG instead and is handled as a full disk."""
    if hasattr(signal, "SIGXFSZ"):
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)


_deferral = {"depth": 0, "pending": None, "active": False, "received": None}


def _stop_exception(signum: int) -> KeyboardInterrupt:
    return KeyboardInterrupt() if signum == signal.SIGINT else Terminated(signum)


def _on_stop_signal(signum, frame):  # noqa: ARG001
    _deferral["received"] = signum
    if _deferral["depth"]:
        _deferral["pending"] = _deferral["pending"] or signum
        return
    raise _stop_exception(signum)


def stop_signal(interrupt: KeyboardInterrupt) -> int:
    """The signal behind a KeyboardInterrupt: SIGINT, or the stop signal that raised it.

    Ray's blocking calls (`ray.get`, `ray.wait`) turn any KeyboardInterrupt raised by a handler
    into a plain one, so the signal last received is remembered here.
    """
    if isinstance(interrupt, Terminated):
        return interrupt.signum
    received = _deferral.get("received")
    return received if received is not None else signal.SIGINT


@contextlib.contextmanager
def stop_signals_raise():
    """While inside: Ctrl-C raises KeyboardInterrupt, SIGTERM and SIGHUP raise `Terminated` (main thread only).

    The handlers in place before are restored on the way out.
    """
    held = (signal.SIGINT, *STOP_SIGNALS)
    previous = {sig: signal.getsignal(sig) for sig in held}
    for sig in held:
        signal.signal(sig, _on_stop_signal)
    _deferral["active"], _deferral["received"] = True, None
    try:
        yield
    finally:
        _deferral["active"] = False
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def reclaim_stop_signals() -> None:
    """Installs this module's handlers again (under `stop_signals_raise`).

    Ray's core worker, started in the driver by `ray.init`, installs a handler of its own for
    SIGTERM that logs a stack and exits with status 1, skipping every clean-up.
    """
    if _deferral.get("active"):
        for sig in (signal.SIGINT, *STOP_SIGNALS):
            signal.signal(sig, _on_stop_signal)


@contextlib.contextmanager
def signals_deferred():
    """Holds back Ctrl-C and the stop signals while writes that belong together run (under `stop_signals_raise`).

    A signal that arrives meanwhile raises its exception right after the block. (Blocking the
    signal with pthread_sigmask would not do: the kernel hands it to another thread, and Python
    runs the handler in the main thread anyway.)
    """
    _deferral["depth"] += 1
    try:
        yield
    finally:
        _deferral["depth"] -= 1
        pending = _deferral["pending"]
        if not _deferral["depth"] and pending is not None:
            _deferral["pending"] = None
            raise _stop_exception(pending)
