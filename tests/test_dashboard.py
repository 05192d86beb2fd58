"""The dashboard: a real HTTP server on loopback, reading a study database."""

from __future__ import annotations

import json
import threading
import urllib.request

import optuna

from sweep.dashboard import build_server


def test_dashboard_serves_the_studies_of_the_database(tmp_path):
    url = f"sqlite:///{tmp_path / 'studies.db'}"
    study = optuna.create_study(study_name="dash", storage=url, direction="maximize")
    study.optimize(lambda t: t.suggest_float("x", 0, 1), n_trials=3)

    server = build_server(url, "127.0.0.1", 0)
    assert server.server_address[0] == "127.0.0.1"
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        port = server.server_port
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/studies", timeout=10) as response:
            studies = json.loads(response.read())["study_summaries"]
        assert [s["study_name"] for s in studies] == ["dash"]
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/dashboard", timeout=10) as response:
            assert response.status == 200
    finally:
        server.shutdown()
        server.server_close()
