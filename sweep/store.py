"""Our own tables in the study database: per-trial records, per-task scores, baselines, drivers and leases.

They live in the same SQLite file as Optuna's tables, under their own
SQLAlchemy metadata (table names prefixed `sweep_`). Only the driver that
holds a study's lease (sweep.lease) writes that study's rows. The file runs in
WAL mode with a busy timeout, so the dashboard and `sweep status` can read
while the driver writes; every write transaction on SQLite starts with
`BEGIN IMMEDIATE`, so a read-then-write (a check and its update) is never
interleaved with another writer's.

Invariant: a trial's record, once in a finished state (COMPLETE, PRUNED,
FAIL), is never rewritten: `record_trial` refuses and says so.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import logging
import os
import urllib.parse
from dataclasses import dataclass
from typing import Any, Optional

from sqlalchemy import (
    JSON,
    Boolean,
    Column,
    DateTime,
    Float,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    UniqueConstraint,
    create_engine,
    event,
    func,
    inspect,
    select,
)
from sqlalchemy.engine import Connection, Engine

log = logging.getLogger("sweep")

SQLITE_BUSY_TIMEOUT_S = 30
FINISHED_STATES = ("COMPLETE", "PRUNED", "FAIL")

metadata = MetaData()

trial_records = Table(
    "sweep_trial_records",
    metadata,
    Column("id", Integer, primary_key=True),
    Column("study_name", String(512), nullable=False, index=True),
    Column("trial_number", Integer, nullable=False),
    Column("state", String(16), nullable=False),
    Column("adapter_dir", Text),
    Column("train_seconds", Float),
    Column("eval_seconds", Float),
    Column("wall_seconds", Float),
    Column("tokens_per_second", Float),
    Column("peak_memory_gib", Float),
    Column("memory_cap_gib", Float),
    Column("mfu", Float),
    Column("train_tokens", Integer),
    Column("train_steps", Integer),
    Column("final_loss", Float),
    Column("checkpointed_layers", Integer),
    Column("full_run_tokens", Integer),
    Column("projected_full_run_hours", Float),
    Column("feasible", Boolean),
    Column("values", JSON),
    Column("data", JSON),
    Column("fail_reason", Text),
    Column("base_load_seconds", Float),
    Column("timeline", JSON),
    Column("started_at", DateTime),
    Column("finished_at", DateTime),
    Column("driver_id", Integer),
    Column("value", Float),
    Column("constraints", JSON),
    Column("losses", JSON),
    Column("stderrs", JSON),
    Column("num_docs", JSON),
    Column("learning_rates", JSON),
    Column("base", JSON),
    UniqueConstraint("study_name", "trial_number"),
)

task_scores = Table(
    "sweep_task_scores",
    metadata,
    Column("id", Integer, primary_key=True),
    Column("study_name", String(512), nullable=False, index=True),
    Column("trial_number", Integer, nullable=False),
    Column("task", String(256), nullable=False),
    Column("metric", String(128), nullable=False),
    Column("value", Float, nullable=False),
    UniqueConstraint("study_name", "trial_number", "task"),
)

baselines = Table(
    "sweep_baselines",
    metadata,
    Column("study_name", String(512), primary_key=True),
    Column("model", Text, nullable=False),
    Column("value", Float, nullable=False),
    Column("scores", JSON, nullable=False),
    Column("values", JSON),
    Column("eval_seconds", Float),
    Column("created_at", DateTime, nullable=False),
    Column("stderrs", JSON),
    Column("num_docs", JSON),
)


drivers = Table(
    "sweep_drivers",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("study_name", String(512), nullable=False, index=True),
    Column("host", String(256), nullable=False),
    Column("host_key", String(512), nullable=False),
    Column("pid", Integer, nullable=False),
    Column("pid_started", Integer),
    Column("heartbeat_seconds", Integer, nullable=False),
    Column("target", Integer),
    Column("started_at", DateTime, nullable=False),
    Column("ended_at", DateTime),
    Column("end_reason", Text),
    Column("resumable", Boolean),
)
"""Every `sweep start` that held a study's lease: who it was, the finished-trial count it was to reach, how it ended."""

leases = Table(
    "sweep_leases",
    metadata,
    Column("study_name", String(512), primary_key=True),
    Column("driver_id", Integer, nullable=False),
    Column("heartbeat_at", DateTime, nullable=False),
)
"""At most one row per study (its primary key): the driver that may run it, and its last heartbeat (database time)."""


# Measurements a finished trial reports; the same names in TrialResult, TrialRecord and `sweep status`.
MEASUREMENTS = (
    "train_seconds", "eval_seconds", "wall_seconds", "tokens_per_second", "peak_memory_gib", "memory_cap_gib",
    "mfu", "train_tokens", "train_steps", "final_loss", "checkpointed_layers", "full_run_tokens",
    "projected_full_run_hours", "data", "base_load_seconds", "timeline", "losses", "stderrs", "num_docs",
    "learning_rates", "base",
)


@dataclass(frozen=True)
class TrialRecord:
    """What `sweep status` shows of a trial beyond Optuna's own fields."""

    trial_number: int
    state: str
    adapter_dir: Optional[str]
    scores: dict[str, float]
    train_seconds: Optional[float] = None
    eval_seconds: Optional[float] = None
    wall_seconds: Optional[float] = None
    tokens_per_second: Optional[float] = None
    peak_memory_gib: Optional[float] = None
    memory_cap_gib: Optional[float] = None
    mfu: Optional[float] = None
    train_tokens: Optional[int] = None
    train_steps: Optional[int] = None
    final_loss: Optional[float] = None
    checkpointed_layers: Optional[int] = None
    full_run_tokens: Optional[int] = None
    projected_full_run_hours: Optional[float] = None
    feasible: Optional[bool] = None
    """Within the profile's memory cap and the full-run time limit; None when not measured."""
    values: Optional[dict] = None
    """Each suite's aggregate (the objective is the optimised suite's)."""
    data: Optional[dict] = None
    fail_reason: Optional[str] = None
    base_load_seconds: Optional[float] = None
    """Seconds the trial spent loading the 4-bit base; None when its slot's resident base was reused."""
    timeline: Optional[dict] = None
    """Unix times in the worker (`started`, `first_step`, `finished`), where the trial ran (`slot`, `device`, `pid`,
    `cuda_visible_devices`, `device_uuid`), the card's memory at its end and its `rung_waits_s`
    (`sweep.worker.TrialResult.timeline`)."""
    started_at: Optional[dt.datetime] = None
    finished_at: Optional[dt.datetime] = None
    driver_id: Optional[int] = None
    """The `sweep start` (its row in sweep_drivers) that ran the trial."""
    value: Optional[float] = None
    """The objective value told to Optuna (COMPLETE trials)."""
    constraints: Optional[dict] = None
    """Optuna constraints told with it (> 0: violated)."""
    losses: Optional[list] = None
    """[step, training loss] pairs (at most `sweep.worker.MAX_LOSS_POINTS`)."""
    stderrs: Optional[dict] = None
    """Each task's standard error, from its per-document values."""
    num_docs: Optional[dict] = None
    """Documents each task was scored on."""
    learning_rates: Optional[list] = None
    """[step, learning rate] pairs, thinned as `losses`."""
    base: Optional[dict] = None
    """The base the trial trained on: `mode` (qlora, lora), `quantization` (nf4, fp4, int8, 16-bit),
    `double_quant`, `dtype`, and `swapped_from` / `swap_seconds` when its slot swapped the resident base."""

    @property
    def finished(self) -> bool:
        return self.state in FINISHED_STATES


def make_engine(url: str, read_only: bool = False) -> Engine:
    """An engine on `url`; SQLite files get WAL mode and a busy timeout.

    With `read_only`, a SQLite file is opened read-only (`engine_kwargs`): the engine never
    creates, converts or writes it, and works on read-only media.
    """
    is_sqlite = url.startswith("sqlite")
    engine = create_engine(url, **engine_kwargs(url, read_only))
    if is_sqlite:
        @event.listens_for(engine, "connect")
        def _on_connect(dbapi_conn, _record):  # noqa: ANN001
            dbapi_conn.isolation_level = None  # no implicit BEGIN from sqlite3: "begin" below emits ours
            cur = dbapi_conn.cursor()
            if not read_only:  # switching to WAL rewrites the file's header: a writer's business
                cur.execute("PRAGMA journal_mode=WAL")
            cur.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT_S * 1000}")
            cur.close()

        @event.listens_for(engine, "begin")
        def _on_begin(conn):  # noqa: ANN001
            # A write transaction takes SQLite's write lock at once: what it reads cannot change before it writes.
            conn.exec_driver_sql("BEGIN IMMEDIATE" if conn.get_execution_options().get("sweep_write") else "BEGIN")
    return engine


def sqlite_file(url: str) -> Optional[str]:
    """The file a SQLite URL names; None for other databases, in-memory ones and URI file names (`uri=true`).

    Raises:
        sqlalchemy.exc.ArgumentError: `url` is not a database URL.
    """
    from sqlalchemy.engine import make_url

    parsed = make_url(url)
    if parsed.get_backend_name() != "sqlite" or parsed.database in (None, "", ":memory:"):
        return None
    if parsed.query.get("uri") or parsed.database.startswith("file:"):
        return None
    return parsed.database


def engine_kwargs(url: str, read_only: bool = False) -> dict[str, Any]:
    """`create_engine` arguments for `url`: SQLite's busy timeout, and with `read_only` a read-only connection.

    A read-only SQLite connection opens the file through a URI (`read_only_sqlite_uri`), so
    nothing is created (no empty database for a mistyped path), converted or written: a write
    fails with "attempt to write a readonly database". Other databases are opened as given.
    """
    if not url.startswith("sqlite"):
        return {}
    path = sqlite_file(url) if read_only else None
    if path is None:
        return {"connect_args": {"timeout": SQLITE_BUSY_TIMEOUT_S}}

    def connect():
        import sqlite3

        return sqlite3.connect(read_only_sqlite_uri(path), uri=True, timeout=SQLITE_BUSY_TIMEOUT_S,
                               check_same_thread=False)

    return {"creator": connect}


def read_only_sqlite_uri(path: str) -> str:
    """A SQLite URI that reads `path` and never writes it or anything beside it.

    `mode=ro` where SQLite can read a WAL database's changes: its directory is writable (SQLite
    creates the `-shm` index there), or the `-wal` and `-shm` files are there already (a writer
    has it open). Otherwise (read-only media, a directory this user may not write) the file is
    read `immutable=1`: as it stands, without locks, which is what a file nobody can write is.
    """
    path = os.path.abspath(path)
    query = "mode=ro"
    if not writable(os.path.dirname(path)) and _is_wal(path):
        if not (os.path.exists(f"{path}-wal") and os.path.exists(f"{path}-shm")):
            query = "immutable=1"
    return f"file:{urllib.parse.quote(path)}?{query}"


def writable(path: str) -> bool:
    """Whether this process may write `path` (a read-only mount says no, even to root)."""
    return os.access(path, os.W_OK | (os.X_OK if os.path.isdir(path) else 0),
                     effective_ids=os.access in os.supports_effective_ids)


def nearest_existing(path: str) -> str:
    """`path` if it exists, else its nearest ancestor that does (`.` for a relative path none of whose parts do)."""
    while not os.path.exists(path):
        parent = os.path.dirname(path)
        if parent == path:
            return path
        path = parent or "."
    return path


def _is_wal(path: str) -> bool:
    """Whether the SQLite file at `path` is in WAL mode (bytes 18 and 19 of its header are 2)."""
    try:
        with open(path, "rb") as f:
            header = f.read(20)
    except OSError:
        return False
    return len(header) == 20 and header[18] == 2 and header[19] == 2


def not_writable_reason(path: str) -> str:
    try:
        return "read-only file system" if os.statvfs(path).f_flag & os.ST_RDONLY else "permission denied"
    except OSError:
        return "permission denied"


def database_problem(url: str, write: bool) -> Optional[str]:
    """Why `url` cannot serve the reading commands (`write=False`) or a `sweep start` (`write=True`), or None.

    It creates and changes nothing: a SQLite file is read through a read-only connection. Checked:
    the URL and its driver; for a SQLite file, that it exists (reading) or that its directory does
    (start), that it is a file and an SQLite database whose pages all read (`PRAGMA quick_check`),
    that it holds Optuna's tables (reading; an empty file is a new database for a start) and that
    this process may write it and its directory (start). Other databases are checked when the
    command connects.
    """
    import sqlite3

    from sqlalchemy.exc import ArgumentError, NoSuchModuleError

    try:
        path = sqlite_file(url)
        create_engine(url, **engine_kwargs(url)).dispose()  # loads the dialect and the driver; connects to nothing
    except (ArgumentError, NoSuchModuleError):
        return "not a database URL (e.g. sqlite:///studies.db, or a file path)"
    except ImportError as e:
        return f"the database driver is not installed ({e}); install it, or use a SQLite file"
    if path is None:
        return None
    directory = os.path.dirname(path) or "."
    if os.path.isdir(path):
        return f"{path} is a directory, not a database file (pass the file, e.g. {os.path.join(path, 'studies.db')})"
    if not os.path.exists(path):
        if not write:
            return f"no database at {path} (run `sweep start` first, or pass --storage)"
        ancestor = nearest_existing(directory)
        if not os.path.isdir(ancestor):
            return f"{ancestor} is a file, not a directory (pass a --storage path in a directory)"
        if not os.path.isdir(directory):
            return f"directory {directory} does not exist (create it first, or pass another --storage)"
        if not writable(directory):
            return (f"the database is not writable: cannot create {path} in {directory} "
                    f"({not_writable_reason(directory)}); pass a --storage in a writable directory")
        return None
    if not os.access(path, os.R_OK):
        return f"cannot read {path} (permission denied); pass a database this user may read"
    try:
        con = sqlite3.connect(read_only_sqlite_uri(path), uri=True, timeout=SQLITE_BUSY_TIMEOUT_S)
        try:
            tables = {row[0] for row in con.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
            check = con.execute("PRAGMA quick_check(1)").fetchone()[0] if tables else "ok"  # reads every page
        finally:
            con.close()
    except sqlite3.DatabaseError as e:
        return f"cannot use the database ({e}); pass another --storage, or restore {path} from a copy"
    if check != "ok":
        return (f"cannot use the database (database disk image is malformed); pass another --storage, "
                f"or restore {path} from a copy")
    if not write:
        if os.path.getsize(path) == 0:
            return (f"{path} is an empty file, not a study database (`sweep start --storage {path}` "
                    f"creates a study in it; or pass another --storage)")
        if not {"studies", "version_info"} <= tables:
            return (f"{path} is an SQLite database without Optuna's tables, not a study database "
                    f"(pass the file `sweep start` wrote, e.g. studies.db)")
        return None
    for target in (path, directory):
        if not writable(target):
            return (f"the database is not writable ({target}: {not_writable_reason(target)}); copy it to a "
                    f"writable place and pass that as --storage")
    return None


class Store:
    """Reads and writes the `sweep_*` tables of one database."""

    def __init__(self, url: str, create: bool = True, read_only: bool = False):
        """Opens the store; `create=False` (readers) never creates tables, and reads as empty without them.

        `read_only` (with `create=False`) opens a SQLite file read-only (`make_engine`): the reading
        commands never write the database, and read it on read-only media.
        """
        if create and read_only:
            raise ValueError("a read-only store cannot create its tables")
        self.url = url
        self.engine = make_engine(url, read_only=read_only)
        if create:
            # In one write transaction: two drivers starting on a new file do not both create the tables.
            with self.write() as conn:
                metadata.create_all(conn)
                _add_missing_columns(conn)
        self._readable = create or inspect(self.engine).has_table(trial_records.name)
        self._columns = {
            table.name: {c["name"] for c in inspect(self.engine).get_columns(table.name)} if self._readable else set()
            for table in (trial_records, baselines)
        }

    @contextlib.contextmanager
    def write(self):
        """A write transaction (SQLite: `BEGIN IMMEDIATE`), committed at the end of the block."""
        with self.engine.connect() as conn:
            conn.execution_options(sweep_write=True)
            with conn.begin():
                yield conn

    def now(self, conn: Connection) -> dt.datetime:
        """The database's clock (naive UTC on SQLite): heartbeats from several hosts compare on one clock."""
        value = conn.execute(select(func.now())).scalar()
        return value.replace(tzinfo=None) if isinstance(value, dt.datetime) else dt.datetime.fromisoformat(str(value))

    # --- writes (the driver holding the study's lease) ---

    def start_trial(self, study_name: str, trial_number: int, driver_id: Optional[int],
                    started_at: dt.datetime) -> None:
        """Records a trial as RUNNING under the driver that runs it."""
        with self.write() as conn:
            self.write_record(conn, study_name, TrialRecord(
                trial_number=trial_number, state="RUNNING", adapter_dir=None, scores={}, started_at=started_at,
                driver_id=driver_id,
            ))

    def record_trial(self, study_name: str, record: TrialRecord, metrics: dict[str, str] | None = None) -> bool:
        """Writes a trial's record and its per-task scores; False (nothing written) when it is already finished."""
        with self.write() as conn:
            return self.write_record(conn, study_name, record, metrics)

    def write_record(self, conn: Connection, study_name: str, record: TrialRecord,
                     metrics: dict[str, str] | None = None) -> bool:
        """`record_trial` inside the caller's write transaction (to pair it with another write)."""
        key = (trial_records.c.study_name == study_name) & (trial_records.c.trial_number == record.trial_number)
        present = conn.execute(select(trial_records.c.state, trial_records.c.driver_id).where(key)).first()
        if present is not None and present.state in FINISHED_STATES:
            log.warning("Trial %d of study %r is already recorded %s: not rewritten as %s", record.trial_number,
                        study_name, present.state, record.state)
            return False
        row = {k: v for k, v in record.__dict__.items() if k != "scores"}
        if present is not None:
            if row["driver_id"] is None:
                row["driver_id"] = present.driver_id
            if row["started_at"] is None:
                row.pop("started_at")
            conn.execute(trial_records.update().where(key).values(**row))
        else:
            conn.execute(trial_records.insert().values(study_name=study_name, **row))
        conn.execute(task_scores.delete().where(
            task_scores.c.study_name == study_name, task_scores.c.trial_number == record.trial_number
        ))
        for task, value in record.scores.items():
            conn.execute(task_scores.insert().values(
                study_name=study_name, trial_number=record.trial_number, task=task,
                metric=(metrics or {}).get(task, ""), value=float(value),
            ))
        return True

    def record_baseline(self, study_name: str, model: str, value: float, scores: dict[str, float],
                        eval_seconds: float | None, values: dict[str, float] | None = None,
                        stderrs: dict[str, float] | None = None, num_docs: dict[str, int] | None = None) -> None:
        with self.write() as conn:
            conn.execute(baselines.delete().where(baselines.c.study_name == study_name))
            conn.execute(baselines.insert().values(
                study_name=study_name, model=model, value=float(value), scores=scores, values=values,
                eval_seconds=eval_seconds, created_at=utc_now(), stderrs=stderrs, num_docs=num_docs,
            ))

    def delete_study(self, study_name: str) -> None:
        """Removes every row of `study_name` from our tables (its study was deleted from Optuna's)."""
        if not self._readable:  # a database of Optuna's alone: no rows of ours
            return
        with self.write() as conn:
            for table in (trial_records, task_scores, baselines, drivers, leases):
                conn.execute(table.delete().where(table.c.study_name == study_name))

    # --- reads ---

    def trials(self, study_name: str) -> dict[int, TrialRecord]:
        if not self._readable:
            return {}
        with self.engine.connect() as conn:
            scores: dict[int, dict[str, float]] = {}
            for r in conn.execute(select(task_scores).where(task_scores.c.study_name == study_name)):
                scores.setdefault(r.trial_number, {})[r.task] = r.value
            out = {}
            columns = _present(trial_records, self._columns)  # older databases lack newer columns
            for r in conn.execute(select(*columns).where(trial_records.c.study_name == study_name)).mappings():
                fields = {k: v for k, v in r.items() if k not in ("id", "study_name")}
                out[r["trial_number"]] = TrialRecord(scores=scores.get(r["trial_number"], {}), **fields)
            return out

    def baseline(self, study_name: str) -> Optional[dict[str, Any]]:
        if not self._readable:
            return None
        with self.engine.connect() as conn:
            row = conn.execute(
                select(*_present(baselines, self._columns)).where(baselines.c.study_name == study_name)
            ).mappings().first()
        if row is None:
            return None
        scores = row["scores"] if isinstance(row["scores"], dict) else json.loads(row["scores"])
        return {"model": row["model"], "value": row["value"], "scores": scores, "values": row.get("values"),
                "eval_seconds": row["eval_seconds"], "stderrs": row.get("stderrs"), "num_docs": row.get("num_docs")}


def _add_missing_columns(conn: Connection) -> None:
    """Adds columns introduced since a database was created (all nullable), so old studies keep working."""
    for table in (trial_records, baselines):
        present = {c["name"] for c in inspect(conn).get_columns(table.name)}
        for column in table.c:
            if column.name not in present:
                kind = column.type.compile(dialect=conn.dialect)
                conn.exec_driver_sql(f'ALTER TABLE {table.name} ADD COLUMN "{column.name}" {kind}')


def _present(table: Table, columns: dict[str, set[str]]) -> list:
    return [c for c in table.c if c.name in columns[table.name]]


def utc_now() -> dt.datetime:
    """Now, as the naive UTC our records (and Optuna's) store."""
    return dt.datetime.now(dt.timezone.utc).replace(tzinfo=None)
