"""Helpers for tests that run `sweep start` as real processes: start, watch, read the database, clean up."""

from __future__ import annotations

import contextlib
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

# Short trials on one thread each (on a busy 2-core machine two threads per trial wait on each other
# most of the time), one slot (the demo runs two) unless a test asks for more, rungs at 25% and 50%, and
# (LIGHT) the digit task alone: what these tests check is how a start ends, not what it scores.
ONE_THREAD = ["--set", "orchestration.cpus_per_trial=1", "--set", "orchestration.concurrency=1"]
FAST = ["--gpu", "cpu", "--set", "trainer.max_steps=24", "--set", "study.rung_eval_docs=8",
        "--set", "study.rungs=[0.25, 0.5]", *ONE_THREAD]
LIGHT = [  # the digit task alone, trained and scored on 40 documents, with the four training settings searched
    "--set", "data.sources=[{name: digits, kind: synthetic, num_train: 2400, num_eval: 40}]",
    "--set", "evaluator.suites={open: {tasks: [{name: demo_digits, source: digits, metric: acc, chance: 0.5}]}}",
    "--set", "evaluator.pick_by=null",
    "--set", "search_space={trainer.learning_rate: {type: float, low: 1.0e-4, high: 1.0e-2, log: true}, "
             "trainer.lora.r: {type: categorical, choices: [4, 8, 16]}, "
             "trainer.lora.alpha: {type: categorical, choices: [8, 16, 32]}, "
             "trainer.lora.dropout: {type: float, low: 0.0, high: 0.2}}",
]


def common(tmp_path: Path, study: str, db: Path | None = None) -> list[str]:
    return ["--storage", f"sqlite:///{db or tmp_path / 'studies.db'}", "--study", study,
            "--set", f"orchestration.artifacts_dir={tmp_path / 'runs'}", *FAST]


def start_driver(tmp_path: Path, study: str, *extra: str, trials: int = 3, log: str | None = None,
                 db: Path | None = None, stdout=None) -> subprocess.Popen:
    """`sweep start` in a process of its own session, its output in `<log or study>.log` (or `stdout`)."""
    args = [sys.executable, "-m", "sweep.cli", "start", "--trials", str(trials), *common(tmp_path, study, db),
            "--set", "study.pruner=none", "--set", "orchestration.heartbeat_seconds=1", *extra]
    out = stdout if stdout is not None else open(tmp_path / f"{log or study}.log", "w")
    # Ctrl-C's default action in the driver, whatever the test runner's shell left it (a background job's is
    # to ignore it, and a child inherits that).
    return subprocess.Popen(args, cwd=tmp_path, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))


def logged(tmp_path: Path, log: str, text: str) -> bool:
    path = tmp_path / f"{log}.log"
    return path.exists() and text in path.read_text()


def started(tmp_path: Path, log: str, trial: int) -> bool:
    """Whether the driver has logged the trial's start: its parameters are all drawn and it runs on a slot."""
    return logged(tmp_path, log, f"Trial {trial} started on slot")


def rows(db: Path, query: str) -> list[tuple]:
    try:
        con = sqlite3.connect(db)
        try:
            return con.execute(query).fetchall()
        finally:
            con.close()
    except sqlite3.Error:
        return []


def states(db: Path) -> list[str]:
    return [s for (s,) in rows(db, "select state from trials order by number")]


def wait_for(predicate, process: subprocess.Popen | None = None, seconds: float = 180, what: str = "") -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if predicate():
            return
        if process is not None:
            assert process.poll() is None, f"the driver exited early ({process.returncode}) waiting for {what}"
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


def kill_session(sid: int) -> None:
    """Kills what a driver left behind (its local Ray's processes share its session)."""
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                if os.getsid(int(entry)) == sid:
                    os.kill(int(entry), signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass


def study_status_of(storage: str, study: str) -> dict:
    """`sweep status --format json` of a study, read read-only in this process."""
    from sweep.export import study_status
    from sweep.store import Store
    from sweep.study import load_existing_study, make_storage

    loaded = load_existing_study(make_storage(storage, read_only=True), study)
    return study_status(loaded, Store(storage, create=False, read_only=True))


@contextlib.contextmanager
def serving_process(command: list[str], env: dict | None = None, cwd: Path | None = None, seconds: float = 180):
    """Runs a server command (`sweep serve`, a submission's start.sh) until its banner names its URL; yields the
    URL (`http://127.0.0.1:PORT`) and stops it at the end. Its output goes to a file beside it on failure."""
    import re
    import tempfile

    log = tempfile.NamedTemporaryFile(prefix="sweep-serve-", suffix=".log", delete=False)
    process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, cwd=cwd,
                               env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}, start_new_session=True)
    try:
        deadline = time.monotonic() + seconds
        while True:
            text = Path(log.name).read_text(errors="replace")
            found = re.search(r" at (http://127\.0\.0\.1:\d+) ", text)
            if found:
                break
            if process.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"the server did not start (exit {process.poll()}):\n{text[-3000:]}")
            time.sleep(0.2)
        yield found.group(1)
        assert process.poll() is None, f"the server died:\n{Path(log.name).read_text()[-3000:]}"
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGTERM)
            try:
                process.wait(20)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()
        log.close()
        os.unlink(log.name)
