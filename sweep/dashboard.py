"""The Optuna dashboard over a study database: read-only by default, threaded, on loopback by default.

optuna-dashboard's app can change the database (notes, a study's deletion, telling a trial) and has
no read-only mode of its own: `read_only_app` answers 403 to every request but GET and HEAD unless
writes are allowed; then a study deleted through it takes its rows in our tables with it
(`with_our_rows_deleted`). Each connection has a thread of its own, so an idle or slow client blocks
nobody else (wsgiref's stock server serves one connection at a time).
"""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path
from socketserver import ThreadingMixIn
from typing import Any, Callable, Iterable, Optional
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from sweep.artifacts import STORE_ATTR

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8080
READ_METHODS = ("GET", "HEAD")

log = logging.getLogger("sweep")


class ThreadingWSGIServer(ThreadingMixIn, WSGIServer):
    """wsgiref's server with a thread per connection (daemon threads: Ctrl-C does not wait for them)."""

    daemon_threads = True


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format, *args):  # noqa: A002 - the stdlib's signature
        pass


def build_server(storage_url: str, host: str = DEFAULT_HOST, port: int = DEFAULT_PORT, read_only: bool = False,
                 allow_writes: bool = False, artifacts: Optional[str] = None) -> WSGIServer:
    """A WSGI server for optuna-dashboard on `storage_url` (port 0 picks a free port).

    Args:
        storage_url: the study database. SQLite opens with a busy timeout and the study file is in
            WAL mode, so the dashboard reads while a sweep writes.
        host, port: where to listen.
        read_only: open the database read-only (a database this process may not write, e.g. on
            read-only media); no write can happen, whatever `allow_writes` says.
        allow_writes: let the dashboard's edits through (notes, deleting a study); else they get 403.
        artifacts: the artifact store's directory; None: the stores the studies recorded
            (`sweep.artifacts`), read through one `StudyArtifactStores`.
    """
    from optuna_dashboard import wsgi

    from sweep.study import make_storage

    storage = make_storage(storage_url, read_only=read_only)
    app = wsgi(storage, artifact_store=artifact_store(storage, artifacts))
    if allow_writes and not read_only:
        app = with_our_rows_deleted(app, storage, storage_url)
    else:
        app = read_only_app(app)
    return make_server(host, port, app, server_class=ThreadingWSGIServer, handler_class=_QuietHandler)


def artifact_store(storage, directory: Optional[str]):
    """The store the dashboard reads artifacts from: `directory`, else the studies' own stores."""
    from optuna.artifacts import FileSystemArtifactStore

    if directory is not None:
        return FileSystemArtifactStore(str(Path(directory).expanduser().resolve()))
    return StudyArtifactStores(storage)


class StudyArtifactStores:
    """The artifact stores the studies of a storage recorded (their `artifact_store` user attribute), as one.

    Artifact ids are UUIDs: an id is looked up in each recorded directory in turn. The list is read
    again when an id is not found, so a study started after the dashboard shows its artifacts too.
    """

    def __init__(self, storage):
        self._storage = storage
        self._stores: dict[str, Any] = {}

    def _refresh(self) -> None:
        from optuna.artifacts import FileSystemArtifactStore

        for study in self._storage.get_all_studies():
            path = study.user_attrs.get(STORE_ATTR)
            if path and path not in self._stores and Path(path).is_dir():
                self._stores[path] = FileSystemArtifactStore(path)

    def _find(self, artifact_id: str):
        for refresh in (False, True):
            if refresh:
                self._refresh()
            for store in self._stores.values():
                try:
                    return store, store.open_reader(artifact_id)
                except Exception:  # noqa: BLE001 - not in this store (optuna raises ArtifactNotFound)
                    continue
        from optuna.artifacts.exceptions import ArtifactNotFound

        raise ArtifactNotFound(f"artifact {artifact_id} is in none of the studies' artifact stores")

    def open_reader(self, artifact_id: str):
        return self._find(artifact_id)[1]

    def write(self, artifact_id: str, content_body) -> None:
        raise PermissionError("the dashboard does not write artifacts (`sweep start` does)")

    def remove(self, artifact_id: str) -> None:
        store, reader = self._find(artifact_id)
        reader.close()
        store.remove(artifact_id)


def read_only_app(app: Callable) -> Callable:
    """`app`, answering 403 with a JSON reason to every request but GET and HEAD."""

    def read_only(environ: dict, start_response: Callable) -> Iterable[bytes]:
        if environ.get("REQUEST_METHOD", "GET").upper() in READ_METHODS:
            return app(environ, start_response)
        body = json.dumps({"reason": "the dashboard is read-only: start it with `sweep dashboard "
                                     "--allow-writes` to edit notes or delete studies"}).encode()
        start_response("403 Forbidden", [("Content-Type", "application/json"), ("Content-Length", str(len(body)))])
        return [body]

    return read_only


_DELETE_STUDY = re.compile(r"^/api/studies/(\d+)/?$")


def with_our_rows_deleted(app: Callable, storage, storage_url: str) -> Callable:
    """`app`, where a study that the dashboard deletes takes its rows in our tables (sweep.store) with it."""

    def deleting(environ: dict, start_response: Callable) -> Iterable[bytes]:
        match = _DELETE_STUDY.match(environ.get("PATH_INFO", ""))
        if environ.get("REQUEST_METHOD", "").upper() != "DELETE" or match is None:
            return app(environ, start_response)
        try:
            name = storage.get_study_name_from_id(int(match.group(1)))
        except KeyError:
            return app(environ, start_response)
        running = _running_why(storage_url, name)
        if running is not None:
            body = json.dumps({"reason": f"{running}: stop it before deleting the study"}).encode()
            start_response("409 Conflict", [("Content-Type", "application/json"), ("Content-Length", str(len(body)))])
            return [body]
        status: list[str] = []

        def recording(code: str, headers, exc_info=None):
            status.append(code)
            return start_response(code, headers, exc_info) if exc_info else start_response(code, headers)

        body = list(app(environ, recording))
        if status and status[0].startswith("2"):
            from sweep.store import Store

            Store(storage_url, create=False).delete_study(name)
            log.info("Study %r deleted from the dashboard, with its rows in sweep's tables", name)
        return body

    return deleting


def _running_why(storage_url: str, study_name: str) -> Optional[str]:
    """Why the study may not be deleted now (a live `sweep start` holds its lease), or None."""
    from sweep.lease import DriverLease, LeaseHeld
    from sweep.store import Store

    try:
        DriverLease.check_free(Store(storage_url, create=False), study_name)
    except LeaseHeld as e:
        return str(e)
    return None
