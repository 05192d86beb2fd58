"""Every error a user can cause is one line on stderr and a non-zero exit, and leaves the database as it was.

The commands run in this process (`sweep.cli.main`) where they can, and as `python -m sweep.cli` where the
working directory or the process matters. Tests run as root, which ignores file modes: unwritable places
are read-only mounts (a bind mount remounted read-only, or a read-only tmpfs), skipped where mounting is
not permitted.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import socket
import sqlite3
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest

from sweep.cli import main
from sweep.config import study_name_problem

READING = {
    "status": ["status"],
    "export": ["export", "--best", "--out", "exported"],
    "dashboard": ["dashboard", "--port", "0"],
}
COMMANDS = {**READING, "start": ["start", "--trials", "1"]}


# --- helpers -----------------------------------------------------------------------------------------------


def make_study_db(directory: Path, adapter_dir: Path | None = None) -> Path:
    """A real study database (our Store and Optuna's tables, WAL mode) with one COMPLETE trial and its adapter.

    `adapter_dir` is the path the trial records (its files are written under `directory/adapter`).
    """
    import optuna

    from sweep.export import ADAPTER_FILES
    from sweep.store import Store, TrialRecord
    from sweep.study import make_storage

    directory.mkdir(parents=True, exist_ok=True)
    (directory / "adapter").mkdir()
    for name in ADAPTER_FILES:
        (directory / "adapter" / name).write_text(f"{name}\n")
    # What the export reads of the trial: its base (for the tokenizer and the card).
    (directory / "adapter" / "hyperparameters.yaml").write_text("model: {name_or_path: sweep-demo/tiny-llama}\n")
    path = directory / "studies.db"
    url = f"sqlite:///{path}"
    store, storage = Store(url), make_storage(url)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(study_name="demo", storage=storage, direction="maximize")
    trial = study.ask({"lr": optuna.distributions.FloatDistribution(1e-5, 1e-3, log=True)})
    store.record_trial("demo", TrialRecord(
        trial_number=trial.number, state="COMPLETE", adapter_dir=str(adapter_dir or directory / "adapter"),
        scores={"task": 0.5}, values={"open": 0.5}, feasible=True,
    ))
    study.tell(trial, 0.5)
    storage.remove_session()
    storage.engine.dispose()
    store.engine.dispose()  # the last connection closes: the WAL is checkpointed into the file and removed
    assert not Path(f"{path}-wal").exists()
    return path


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def snapshot(root: Path) -> dict[str, str]:
    """Every file and directory under `root` with its contents' hash.

    SQLite's `-wal` and `-shm` companions are left out: a read-only reader of a WAL database in a writable
    directory leaves the empty ones SQLite keeps beside it (the next writer removes them).
    """
    return {
        str(p.relative_to(root)): "dir" if p.is_dir() else digest(p)
        for p in sorted(root.rglob("*")) if not p.name.endswith(("-wal", "-shm"))
    }


def run_main(capsys, *argv: str) -> tuple[int, str, str]:
    rc = main(list(argv))
    out, err = capsys.readouterr()
    return rc, out, err


def assert_one_error_line(command: str, err: str, needle: str) -> str:
    lines = err.splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith(f"sweep {command}: error: "), err
    assert needle in lines[0], err
    assert "Traceback" not in err
    return lines[0]


def run_cli(*args: str, cwd: Path, env: dict | None = None, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "sweep.cli", *args], capture_output=True, text=True, cwd=cwd,
                          env={**os.environ, **(env or {})}, timeout=timeout)


def _mount(*args: str) -> None:
    subprocess.run(["mount", *args], check=True, capture_output=True, text=True)


def _unmount(target: Path) -> None:
    """Unmounts `target`, leaving it first if this process is in it (a busy mount does not unmount)."""
    with contextlib.suppress(OSError):
        if Path.cwd().is_relative_to(target):
            os.chdir(target.parent)
    if subprocess.run(["umount", str(target)], capture_output=True).returncode != 0:
        subprocess.run(["umount", "-l", str(target)], capture_output=True)  # still busy: detach it now


def _skip_unless_mounted(error: Exception) -> None:
    detail = getattr(error, "stderr", None) or error
    pytest.skip(f"mounting is not permitted here (needs root with mount rights): {str(detail).strip()}")


@contextlib.contextmanager
def read_only_bind(source: Path, target: Path):
    """`source` seen read-only at `target` (a bind mount remounted read-only), unmounted at the end."""
    target.mkdir()
    try:
        _mount("--bind", str(source), str(target))
    except (OSError, subprocess.CalledProcessError) as e:
        _skip_unless_mounted(e)
    try:
        try:
            _mount("-o", "remount,ro,bind", str(target))
        except (OSError, subprocess.CalledProcessError) as e:
            _skip_unless_mounted(e)
        assert not os.access(target, os.W_OK)
        yield target
    finally:
        _unmount(target)


@contextlib.contextmanager
def read_only_tmpfs(target: Path):
    """An empty read-only file system at `target`, unmounted at the end."""
    target.mkdir()
    try:
        _mount("-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(target))
    except (OSError, subprocess.CalledProcessError) as e:
        _skip_unless_mounted(e)
    try:
        yield target
    finally:
        _unmount(target)


@pytest.fixture(scope="module")
def template(tmp_path_factory) -> bytes:
    """The bytes of a good study database (its trial's adapter path does not matter to the error cases)."""
    return make_study_db(tmp_path_factory.mktemp("template")).read_bytes()


# --- --storage ---------------------------------------------------------------------------------------------


@pytest.fixture
def bad_storages(tmp_path, template, monkeypatch):
    """In the working directory: a file, a directory, non-SQLite bytes, a corrupt database, an empty file and an
    SQLite database of another program."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "afile").write_text("not a directory\n")
    (tmp_path / "adir").mkdir()
    (tmp_path / "junk.db").write_bytes(bytes(range(256)) * 16)
    corrupt = bytearray(template)
    assert len(corrupt) > 4 * 4096
    corrupt[2 * 4096:] = b"\xff" * (len(corrupt) - 2 * 4096)  # the header and the schema page intact
    (tmp_path / "corrupt.db").write_bytes(bytes(corrupt))
    (tmp_path / "empty.db").write_bytes(b"")
    con = sqlite3.connect(tmp_path / "other.db")
    con.execute("CREATE TABLE notes (text TEXT)")
    con.commit()
    con.close()
    return tmp_path


# (storage, the reading commands' error, start's error; None: start accepts it as a new database)
STORAGE_CASES = {
    "unknown-scheme": ("nosuch://x", "--storage nosuch://x: not a database URL", None),
    "unparsable-url": ("sqlite:no-slashes.db", "not a database URL", None),
    "missing-dir": ("missing/studies.db", "--storage sqlite:///missing/studies.db: no database at missing/studies.db",
                    "--storage sqlite:///missing/studies.db: directory missing does not exist (create it first"),
    "under-a-file": ("afile/studies.db", "no database at afile/studies.db", "afile is a file, not a directory"),
    "a-directory": ("adir", "adir is a directory, not a database file", None),
    "not-sqlite": ("junk.db", "cannot use the database (file is not a database)", None),
    "not-sqlite-url": ("sqlite:///junk.db", "--storage sqlite:///junk.db: cannot use the database (file is not a "
                       "database)", None),
    "corrupt": ("corrupt.db", "cannot use the database (database disk image is malformed); pass another --storage, "
                "or restore corrupt.db from a copy", None),
    "empty-file": ("empty.db", "empty.db is an empty file, not a study database", "new database"),
    "other-sqlite": ("other.db", "other.db is an SQLite database without Optuna's tables", "new database"),
}


@pytest.mark.parametrize("case, command", [
    (case, command) for case, (_, _, start_error) in STORAGE_CASES.items() for command in COMMANDS
    if command in READING or start_error != "new database"  # see test_start_takes_an_empty_file_as_a_new_database
])
def test_a_bad_storage_is_one_line_and_leaves_every_file_alone(bad_storages, capsys, case, command):
    storage, reading_error, start_error = STORAGE_CASES[case]
    needle = reading_error if command in READING or start_error is None else start_error
    before = snapshot(bad_storages)
    rc, out, err = run_main(capsys, *COMMANDS[command], "--storage", storage)
    assert rc == 2
    assert_one_error_line(command, err, needle)
    assert out == ""
    assert snapshot(bad_storages) == before  # nothing created (no database, no directory, no --out), nothing changed


def test_start_takes_an_empty_file_as_a_new_database(bad_storages):
    from sweep.store import database_problem

    # SQLite reads an empty file as an empty database: a start creates the study in it, a reader finds none.
    assert database_problem("sqlite:///empty.db", write=True) is None
    assert database_problem("sqlite:///other.db", write=True) is None  # Optuna's tables go beside the others
    assert "empty file" in database_problem("sqlite:///empty.db", write=False)


def test_a_missing_database_driver_is_one_line(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for command in ("status", "start"):
        rc, _, err = run_main(capsys, *COMMANDS[command], "--storage", "mysql+nosuchdriver://u@127.0.0.1/x")
        assert rc == 2
        assert_one_error_line(command, err, "--storage mysql+nosuchdriver://u@127.0.0.1/x: not a database URL")
    assert list(tmp_path.iterdir()) == []


def test_a_plain_path_as_storage_is_that_sqlite_file(tmp_path, template, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "my.db").write_bytes(template)
    rc, out, _ = run_main(capsys, "status", "--storage", "sub/my.db", "--format", "json")
    assert rc == 0 and json.loads(out)["study"] == "demo"
    rc, out, _ = run_main(capsys, "status", "--storage", str(tmp_path / "sub" / "my.db"), "--format", "json")
    assert rc == 0 and json.loads(out)["trials"][0]["state"] == "COMPLETE"
    assert (tmp_path / "sub" / "my.db").read_bytes() == template


def test_reading_does_not_write_a_database_it_opens(tmp_path, capsys, monkeypatch):
    """A database Optuna made alone (rollback journal, no sweep tables) reads as it is: not switched to WAL."""
    import optuna

    monkeypatch.chdir(tmp_path)
    storage = optuna.storages.RDBStorage(f"sqlite:///{tmp_path / 'plain.db'}")
    optuna.create_study(study_name="plain", storage=storage).optimize(lambda t: t.suggest_float("x", 0, 1),
                                                                       n_trials=2)
    storage.engine.dispose()
    before = digest(tmp_path / "plain.db")
    rc, out, err = run_main(capsys, "status", "--storage", "plain.db", "--format", "json")
    assert rc == 0, err
    assert [t["state"] for t in json.loads(out)["trials"]] == ["COMPLETE", "COMPLETE"]
    assert digest(tmp_path / "plain.db") == before
    assert (tmp_path / "plain.db").read_bytes()[18:20] == b"\x01\x01"  # still a rollback-journal database


# --- --study -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["", " demo", "a/b", "..", ".hidden", "x\x01", "n" * 129])
def test_start_refuses_a_study_name_before_touching_the_storage(tmp_path, capsys, monkeypatch, name):
    monkeypatch.chdir(tmp_path)
    rc, _, err = run_main(capsys, "start", "--trials", "1", "--study", name, "--storage", "new.db")
    assert rc == 2
    assert_one_error_line("start", err, f"--study {name!r}: {study_name_problem(name)}")
    assert list(tmp_path.iterdir()) == []  # no database created


@pytest.mark.parametrize("command", ["status", "export"])
def test_reading_commands_refuse_an_empty_study_name(tmp_path, template, capsys, monkeypatch, command):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "studies.db").write_bytes(template)
    rc, _, err = run_main(capsys, *COMMANDS[command], "--study", "")
    assert rc == 2
    assert_one_error_line(command, err, "--study '': must be a non-empty name")
    rc, _, err = run_main(capsys, *COMMANDS[command], "--study", "nope")
    assert rc == 2
    assert_one_error_line(command, err, "no study named 'nope' in the storage (studies in it: demo)")
    assert (tmp_path / "studies.db").read_bytes() == template
    assert not (tmp_path / "exported").exists()


# --- read-only media and directories -----------------------------------------------------------------------


def test_a_database_on_read_only_media_reads_and_exports_and_refuses_a_start(tmp_path, capsys, monkeypatch):
    media, mount = tmp_path / "media", tmp_path / "mnt"
    make_study_db(media, adapter_dir=mount / "adapter")
    before = snapshot(media)
    with read_only_bind(media, mount):
        db = mount / "studies.db"
        # The working directory is the read-only one, and the default --storage (studies.db) is there.
        result = run_cli("status", "--format", "json", cwd=mount)
        assert result.returncode == 0, result.stderr
        status = json.loads(result.stdout)
        assert status["study"] == "demo" and status["best"]["number"] == 0
        result = run_cli("export", "--best", "--out", str(tmp_path / "exported"), cwd=mount)
        assert result.returncode == 0, result.stderr
        assert json.loads((tmp_path / "exported" / "scores.json").read_text())["trial"] == 0
        assert (tmp_path / "exported" / "adapter_model.safetensors").read_text() == "adapter_model.safetensors\n"

        monkeypatch.chdir(mount)
        rc, _, err = run_main(capsys, "start", "--trials", "1")
        assert rc == 2
        assert_one_error_line("start", err, "--storage sqlite:///studies.db: the database is not writable "
                                            "(studies.db: read-only file system)")
        rc, _, err = run_main(capsys, "start", "--trials", "1", "--storage", str(mount / "new.db"))
        assert rc == 2
        assert_one_error_line("start", err, f"the database is not writable: cannot create {mount / 'new.db'}")
        rc, _, err = run_main(capsys, "export", "--best", "--out", "here")
        assert rc == 2
        assert_one_error_line("export", err, "--out here: cannot write in . (read-only file system); pass an --out "
                                             "in a writable place")

        # The dashboard opens it read-only too, and says so.
        server = subprocess.Popen([sys.executable, "-m", "sweep.cli", "dashboard", "--port", "0"], cwd=mount,
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                  env={**os.environ, "PYTHONUNBUFFERED": "1"})
        try:
            banner = server.stdout.readline()
            assert "(read-only: this process may not write the database) at http://127.0.0.1:" in banner, \
                banner + server.stderr.read()
            port = int(banner.split("http://127.0.0.1:")[1].split("/")[0])
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/studies", timeout=10) as response:
                assert [s["study_name"] for s in json.loads(response.read())["study_summaries"]] == ["demo"]
        finally:
            server.terminate()
            server.communicate(timeout=10)
        assert not os.access(db, os.W_OK)
    assert snapshot(media) == before  # not a byte of the database changed, and nothing was added beside it


def test_a_read_only_working_directory_without_a_database(tmp_path):
    with read_only_tmpfs(tmp_path / "ro") as cwd:
        result = run_cli("start", "--trials", "1", cwd=cwd)
        assert result.returncode == 2
        assert_one_error_line("start", result.stderr, "--storage sqlite:///studies.db: the database is not writable: "
                                                      "cannot create studies.db in . (read-only file system); pass "
                                                      "a --storage in a writable directory")
        result = run_cli("status", cwd=cwd)
        assert result.returncode == 2
        assert_one_error_line("status", result.stderr, "no database at studies.db")
        assert list(cwd.iterdir()) == []


# --- export --out ------------------------------------------------------------------------------------------


def test_export_refuses_an_out_it_cannot_use(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    make_study_db(tmp_path / "study")
    (tmp_path / "afile").write_text("keep me\n")
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "old.txt").write_text("old\n")
    storage = str(tmp_path / "study" / "studies.db")
    cases = {
        "afile": "--out afile: a file is there, not a directory (pass a new or empty directory)",
        "afile/sub": "--out afile/sub: afile is a file, not a directory",
        "full": "--out full: the directory is not empty (pass --force to replace its contents)",
    }
    with read_only_tmpfs(tmp_path / "ro"):
        cases["ro/out"] = "--out ro/out: cannot write in ro (read-only file system); pass an --out in a writable place"
        cases["ro/deeper/out"] = "--out ro/deeper/out: cannot write in ro (read-only file system)"
        before = snapshot(tmp_path)
        for out, needle in cases.items():
            rc, _, err = run_main(capsys, "export", "--storage", storage, "--best", "--out", out)
            assert rc == 2, out
            assert_one_error_line("export", err, needle)
        assert snapshot(tmp_path) == before
    rc, out, err = run_main(capsys, "export", "--storage", storage, "--best", "--out", "new/deeper/out")
    assert rc == 0, err
    assert sorted(p.name for p in (tmp_path / "new" / "deeper" / "out").iterdir()) == [
        "README.md", "adapter_config.json", "adapter_model.safetensors", "config.yaml", "environment.json",
        "hyperparameters.yaml", "scores.json", "tokenizer.json", "tokenizer_config.json"]


# --- dashboard --port and --host ---------------------------------------------------------------------------


def test_dashboard_refuses_a_bad_port_or_host(tmp_path, template, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "studies.db").write_bytes(template)
    taken = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    port = taken.getsockname()[1]
    cases = {
        ("--port", "70000"): "--port 70000: must be between 0 and 65535 (0 picks a free port)",
        ("--port", "-1"): "--port -1: must be between 0 and 65535",
        ("--port", str(port)): f"--port {port}: 127.0.0.1:{port} is in use (Address already in use); pass another "
                               f"--port, or --port 0 for a free one",
        ("--host", "nosuch.invalid"): "--host nosuch.invalid: cannot resolve it to an IPv4 address",
    }
    try:
        for flags, needle in cases.items():
            rc, out, err = run_main(capsys, "dashboard", *flags)
            assert rc == 2, flags
            assert_one_error_line("dashboard", err, needle)
            assert out == ""
    finally:
        taken.close()
    assert (tmp_path / "studies.db").read_bytes() == template


# --- --debug and the catch-all -----------------------------------------------------------------------------


def test_debug_shows_the_traceback_of_the_original_error(tmp_path, template, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "studies.db").write_bytes(template)
    rc, _, err = run_main(capsys, "--debug", "status", "--study", "nope")
    assert rc == 2
    assert err.startswith("Traceback (most recent call last):")
    assert "StudyError: no study named 'nope'" in err and "CliError: no study named 'nope'" in err
    monkeypatch.setenv("SWEEP_DEBUG", "1")
    rc, _, err = run_main(capsys, "export", "--best", "--out", "studies.db")
    assert rc == 2
    assert "Traceback (most recent call last):" in err and "ValueError: --out studies.db: a file is there" in err
    monkeypatch.setenv("SWEEP_DEBUG", "0")
    rc, _, err = run_main(capsys, "status", "--study", "nope")
    assert_one_error_line("status", err, "no study named 'nope'")
    assert (tmp_path / "studies.db").read_bytes() == template


def test_help_documents_debug():
    result = subprocess.run([sys.executable, "-m", "sweep.cli", "--help"], capture_output=True, text=True)
    assert result.returncode == 0
    assert "--debug" in result.stdout and "SWEEP_DEBUG=1" in result.stdout


def test_an_unexpected_error_is_one_line_with_its_type_and_exit_1(tmp_path, template, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "studies.db").write_bytes(template)
    con = sqlite3.connect(tmp_path / "studies.db")  # a record edited by hand into something no JSON reader takes
    con.execute("""UPDATE sweep_trial_records SET "values" = '{not json'""")
    con.commit()
    con.close()
    before = digest(tmp_path / "studies.db")
    rc, out, err = run_main(capsys, "status")
    assert rc == 1 and out == ""
    line = assert_one_error_line("status", err, "sweep status: error: JSONDecodeError: Expecting property name")
    assert line.endswith("(run with --debug for the traceback)")
    rc, _, err = run_main(capsys, "--debug", "status")
    assert rc == 1
    assert "Traceback (most recent call last):" in err and "json.decoder.JSONDecodeError" in err
    assert digest(tmp_path / "studies.db") == before
