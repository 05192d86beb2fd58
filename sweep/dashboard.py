"""The Optuna dashboard over a study database, served on loopback by default."""

from __future__ import annotations

from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8080


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format, *args):  # noqa: A002 - the stdlib's signature
        pass


def build_server(storage_url: str, host: str = DEFAULT_HOST, port: int = DEFAULT_PORT,
                 read_only: bool = False) -> WSGIServer:
    """A WSGI server for optuna-dashboard on `storage_url` (port 0 picks a free port).

    The storage opens SQLite with a busy timeout, and the study file is in WAL
    mode, so the dashboard reads while a sweep writes. With `read_only` (a
    database this process may not write, e.g. on read-only media) the file is
    opened read-only: the dashboard shows the studies, and its edits (notes,
    deleting a study) fail.
    """
    from optuna_dashboard import wsgi

    from sweep.study import make_storage

    app = wsgi(make_storage(storage_url, read_only=read_only))
    return make_server(host, port, app, handler_class=_QuietHandler)
