"""A full disk under a running sweep, with real processes: one line, nothing finished lost, the next start recovers.

The real thing is a small tmpfs filled up mid-sweep (ENOSPC). Where mounting is
not allowed, a file-size limit set on the running driver gives EFBIG (and
SIGXFSZ, which the driver ignores) instead; the `slow` run also covers that
variant where the tmpfs works.
"""

from __future__ import annotations

import errno
import os
import resource
import sqlite3
import subprocess
import threading

import pytest
from sweep_processes import LIGHT, kill_session, rows, start_driver, states, wait_for

from sweep.faults import DiskFull, is_disk_full


def _mount_tmpfs(path, size_mb: int) -> bool:
    path.mkdir()
    try:
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_mb}m", "tmpfs", str(path)],
                              capture_output=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return False
    return done.returncode == 0


def _fill(path) -> None:
    """Writes one file until the file system has no byte left."""
    with open(path / "filler", "wb", buffering=0) as f:
        for size in (1 << 20, 1 << 12, 1):
            try:
                while True:
                    f.write(b"\0" * size)
            except OSError as e:
                assert e.errno == errno.ENOSPC
    os.sync()


def _can_mount(tmp_path) -> bool:
    probe = tmp_path / "probe"
    if not _mount_tmpfs(probe, 1):
        return False
    subprocess.run(["umount", str(probe)], check=False)
    return True


def _full_disk_sweep(tmp_path, how: str) -> None:
    disk = tmp_path / "disk"
    if how == "tmpfs":
        assert _mount_tmpfs(disk, 48)
    else:
        disk.mkdir()
    try:
        _run_out_of_space_and_recover(tmp_path, disk, how)
    finally:
        if how == "tmpfs":
            subprocess.run(["umount", "-l", str(disk)], check=False)


def _run_out_of_space_and_recover(tmp_path, disk, how: str) -> None:
    db = disk / "studies.db"
    args = [*LIGHT, "--set", f"orchestration.artifacts_dir={disk / 'runs'}"]
    output: list[bytes] = []
    driver = start_driver(tmp_path, "full", *args, trials=3, db=db, stdout=subprocess.PIPE)
    reader = threading.Thread(target=lambda: output.extend(driver.stdout), daemon=True)  # a pipe: no file limit
    reader.start()
    try:
        # Right after the first trial: the next write, whichever it is (the next trial's record, its worker's
        # log, its adapter, a heartbeat), finds no room.
        wait_for(lambda: "COMPLETE" in states(db), driver, what="trial 0 to complete")
        if how == "tmpfs":
            _fill(disk)
        else:
            size = max(os.path.getsize(db), 1)
            resource.prlimit(driver.pid, resource.RLIMIT_FSIZE, (size, size))  # the database may not grow
        code = driver.wait(timeout=180)
        reader.join(timeout=30)
    finally:
        if driver.poll() is None:
            driver.kill()
        kill_session(driver.pid)
    text = b"".join(output).decode(errors="replace")
    errors = [line for line in text.splitlines() if line.startswith("sweep start: error:")]
    assert code == 2, text
    assert len(errors) == 1 and "no space left on device while writing" in errors[0], text
    assert "Traceback" not in text, text

    # The database is readable and whole; what finished before the disk filled is there, unchanged.
    con = sqlite3.connect(db)
    assert con.execute("pragma integrity_check").fetchone()[0] == "ok"
    con.close()
    before = rows(db, "select trial_number, state, adapter_dir, train_seconds from sweep_trial_records "
                      "where state = 'COMPLETE' order by trial_number")
    assert before and all(adapter and seconds for _, _, adapter, seconds in before)
    assert all(os.path.exists(adapter) for _, _, adapter, _ in before)

    # Room again: the same command recovers (no RUNNING trial left) and reaches the count of 3.
    if how == "tmpfs":
        (disk / "filler").unlink()
    again = start_driver(tmp_path, "full", *args, trials=3, db=db, log="again")
    try:
        assert again.wait(timeout=300) == 0, (tmp_path / "again.log").read_text()
    finally:
        kill_session(again.pid)
    after = rows(db, "select trial_number, state, adapter_dir, train_seconds from sweep_trial_records "
                     "where state = 'COMPLETE' order by trial_number")
    assert set(before) <= set(after)  # nothing finished lost or rewritten
    assert "RUNNING" not in states(db)
    ended = rows(db, "select r.fail_reason from trials t join sweep_trial_records r on r.trial_number = t.number")
    stale = [r for (r,) in ended if (r or "").startswith("stale")]
    assert len(ended) - len(stale) >= 3  # the count was reached, stale trials aside
    assert "stale" in open(tmp_path / "again.log").read() or not stale


@pytest.fixture
def tmpfs_allowed(tmp_path):
    return _can_mount(tmp_path)


@pytest.mark.integration
def test_a_full_disk_stops_the_sweep_in_one_line_and_the_next_start_recovers(tmp_path, tmpfs_allowed):
    _full_disk_sweep(tmp_path, "tmpfs" if tmpfs_allowed else "file-size limit")


@pytest.mark.integration
@pytest.mark.slow
def test_a_file_size_limit_is_a_full_disk_too(tmp_path, tmpfs_allowed):
    if not tmpfs_allowed:
        pytest.skip("the default run already took this variant")
    _full_disk_sweep(tmp_path, "file-size limit")


def test_disk_full_errors_are_one_class(tmp_path):
    assert is_disk_full(OSError(errno.ENOSPC, "No space left on device"))
    assert is_disk_full(OSError(errno.EFBIG, "File too large"))
    assert not is_disk_full(OSError(errno.EACCES, "Permission denied"))
    assert not is_disk_full(ValueError("bad value"))
    wrapped = RuntimeError("saving failed")
    wrapped.__cause__ = OSError(errno.ENOSPC, "No space left on device", "/x/adapter")
    assert is_disk_full(wrapped)
    # safetensors reports the OS error from Rust, in words.
    assert is_disk_full(Exception('Error while serializing: IoError(Os { code: 28, kind: StorageFull, message: '
                                  '"No space left on device" })'))
    assert str(DiskFull("the study database")) == "no space left on device while writing the study database"
    # SQLite's own error, from a real file past a real limit.
    db = tmp_path / "x.db"
    con = sqlite3.connect(db)
    con.execute("create table t (x blob)")
    con.commit()
    previous = resource.getrlimit(resource.RLIMIT_FSIZE)
    import signal

    old = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (os.path.getsize(db), previous[1]))
    try:
        with pytest.raises(sqlite3.OperationalError) as raised:
            con.execute("insert into t values (?)", (b"\0" * 200_000,))
            con.commit()
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, previous)
        signal.signal(signal.SIGXFSZ, old)
        con.close()
    assert is_disk_full(raised.value), (raised.value, getattr(raised.value, "sqlite_errorname", None))
