"""The dashboard: a real HTTP server on loopback over a study database, read-only and threaded, and what a
user sees in it, checked in headless Chromium on a finished demo study."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import optuna
import pytest
from browser import open_browser, screenshot_path
from sweep_processes import study_status_of

from sweep.dashboard import build_server


@contextlib.contextmanager
def serving(url: str, **kwargs):
    """`build_server` on a free loopback port, serving in a thread; yields the base URL."""
    server = build_server(url, "127.0.0.1", 0, **kwargs)
    assert server.server_address[0] == "127.0.0.1"
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_port}"
    finally:
        server.shutdown()
        server.server_close()


def request(url: str, method: str = "GET", body: bytes | None = None) -> tuple[int, bytes]:
    req = urllib.request.Request(url, data=body, method=method, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=10) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def _optuna_study(tmp_path: Path, name: str = "dash") -> str:
    url = f"sqlite:///{tmp_path / 'studies.db'}"
    study = optuna.create_study(study_name=name, storage=url, direction="maximize")
    study.optimize(lambda t: t.suggest_float("x", 0, 1), n_trials=3)
    return url


def test_dashboard_serves_the_studies_of_the_database(tmp_path):
    url = _optuna_study(tmp_path)
    with serving(url) as base:
        status, body = request(f"{base}/api/studies")
        assert status == 200 and [s["study_name"] for s in json.loads(body)["study_summaries"]] == ["dash"]
        assert request(f"{base}/dashboard")[0] == 200


def test_the_dashboard_is_read_only_unless_writes_are_allowed(tmp_path):
    url = _optuna_study(tmp_path)
    before = (tmp_path / "studies.db").read_bytes()
    with serving(url) as base:
        for method, path, body in [
            ("DELETE", "/api/studies/1", None),
            ("PUT", "/api/studies/1/note", b'{"version": 1, "body": "mine"}'),
            ("POST", "/api/studies", b'{"study_name": "new", "directions": ["minimize"]}'),
            ("POST", "/api/trials/1/user-attrs", b'{"user_attrs": {"a": 1}}'),
        ]:
            status, answer = request(base + path, method, body)
            assert status == 403, (method, path, status)
            assert "read-only" in json.loads(answer)["reason"] and "--allow-writes" in json.loads(answer)["reason"]
        assert request(f"{base}/api/studies/1")[0] == 200  # reading still works
    assert (tmp_path / "studies.db").read_bytes() == before
    assert optuna.get_all_study_names(url) == ["dash"]


def test_a_study_deleted_with_writes_allowed_takes_its_rows_in_our_tables_with_it(tmp_path):
    from sweep.lease import DriverLease
    from sweep.store import Store, TrialRecord

    url = _optuna_study(tmp_path)
    optuna.create_study(study_name="kept", storage=url, direction="maximize")
    store = Store(url)
    for name in ("dash", "kept"):
        store.record_trial(name, TrialRecord(trial_number=0, state="COMPLETE", adapter_dir="/a", scores={"t": 0.5}))
        store.record_baseline(name, "base", 0.1, {"t": 0.1}, 1.0)
    dash_id = optuna.load_study(study_name="dash", storage=url)._study_id
    lease = DriverLease.acquire(store, "dash", heartbeat_seconds=60)  # a live `sweep start` runs it
    with serving(url, allow_writes=True) as base:
        status, body = request(f"{base}/api/studies/{dash_id}", "DELETE")
        assert status == 409 and "is being run by another `sweep start`" in json.loads(body)["reason"]
        assert optuna.get_all_study_names(url) == ["dash", "kept"]
        lease.release("finished")
        status, _ = request(f"{base}/api/studies/{dash_id}", "DELETE")
        assert status == 204
    assert optuna.get_all_study_names(url) == ["kept"]
    assert store.trials("dash") == {} and store.baseline("dash") is None
    assert set(store.trials("kept")) == {0} and store.baseline("kept") is not None


def test_an_idle_connection_blocks_no_other_request(tmp_path):
    url = _optuna_study(tmp_path)
    with serving(url) as base:
        port = int(base.rsplit(":", 1)[1])
        idle = [socket.create_connection(("127.0.0.1", port), timeout=5) for _ in range(3)]  # connected, silent
        idle[0].sendall(b"GET /api/studies HTTP/1.1\r\nHost: x\r\n")  # and one half-sent request
        try:
            started = time.monotonic()
            status, body = request(f"{base}/api/studies")
            assert status == 200 and json.loads(body)["study_summaries"]
            assert time.monotonic() - started < 5
        finally:
            for s in idle:
                s.close()


def test_cli_dashboard_refuses_a_missing_artifacts_directory(tmp_path, capsys):
    from sweep.cli import main

    url = _optuna_study(tmp_path)
    assert main(["dashboard", "--storage", url, "--port", "0", "--artifacts", str(tmp_path / "none")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"--artifacts {tmp_path / 'none'}: no such directory" in err[0]


# --- on a finished demo study ---


@pytest.mark.integration
def test_trials_end_with_scalar_attributes_artifacts_and_the_pick_in_the_study_note(demo_study):
    from optuna.artifacts import FileSystemArtifactStore, get_all_artifact_meta
    from optuna_dashboard import get_note

    from sweep.cli import main

    study = optuna.load_study(study_name=demo_study.study, storage=demo_study.storage)
    assert study.metric_names == ["open"]
    status = study_status_of(demo_study.storage, demo_study.study)
    store = FileSystemArtifactStore(study.user_attrs["artifact_store"])
    assert Path(study.user_attrs["artifact_store"]).is_absolute()
    states = {t.state.name for t in study.trials}
    assert {"COMPLETE", "PRUNED"} <= states
    for t in study.trials:
        attrs = t.user_attrs
        assert all(not isinstance(v, (dict, list)) for v in attrs.values()), attrs  # scalars: columns, axes
        assert attrs["tokens_per_second"] > 0 and attrs["train_seconds"] > 0
        names = {m.filename: m for m in get_all_artifact_meta(t, storage=study._storage)}
        assert {"loss_curve.png", "eval_report.json", "config.yaml", "worker.log"} <= set(names), (t.number, names)
        with store.open_reader(names["loss_curve.png"].artifact_id) as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n"
        with store.open_reader(names["eval_report.json"].artifact_id) as f:
            report = json.loads(f.read())
        if t.state.name == "COMPLETE":
            assert attrs["open_value"] == t.value and isinstance(attrs["heldout_value"], float)
            assert attrs["feasible"] is True and attrs["eval_seconds"] > 0
            row = next(r for r in status["trials"] if r["number"] == t.number)
            assert {f"score.{task}": v for task, v in row["scores"].items()} == {
                k: v for k, v in attrs.items() if k.startswith("score.")}
            task = report["tasks"]["demo_digits"]
            assert task["score"] == row["scores"]["demo_digits"] and task["num_docs"] == 200
            p = task["score"]
            assert task["stderr"] == pytest.approx((p * (1 - p) / 200) ** 0.5)  # binomial, from the documents
            assert task["baseline"] == status["baseline"]["scores"]["demo_digits"] and task["baseline_stderr"] > 0
            assert report["suites"] == row["values"] and report["baseline"]["values"] == status["baseline"]["values"]
        else:
            assert report["tasks"] == {} and report["rungs"] and "open_value" not in attrs
    note = get_note(study)
    pick = status["pick"]["number"]
    assert f"## Pick: trial {pick}" in note and "top 3 trials on **open**" in note
    assert f"{status['baseline']['values']['open']:.4f}" in note
    best = max((t for t in study.trials if t.state.name == "COMPLETE"), key=lambda t: (t.value, -t.number))
    assert (f"The dashboard's **Best Trial** is trial {best.number}" in note) == (best.number != pick)
    assert main(["status", "--storage", demo_study.storage]) == 0


@contextlib.contextmanager
def dashboard_process(demo_study):
    """`sweep dashboard --port 0` as a user starts it, in the study's directory; yields its base URL."""
    server = subprocess.Popen([sys.executable, "-m", "sweep.cli", "dashboard", "--port", "0"], cwd=demo_study.dir,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              env={**os.environ, "PYTHONUNBUFFERED": "1"})
    try:
        banner = server.stdout.readline()
        assert "(read-only; --allow-writes lets it edit notes and delete studies) at http://127.0.0.1:" in banner, \
            banner + server.stderr.read()
        yield banner.split(" at ")[1].split()[0].rstrip("/")
    finally:
        server.terminate()
        server.communicate(timeout=10)


@pytest.mark.integration
def test_the_dashboard_in_a_browser_names_the_objective_shows_the_pick_and_each_trials_artifacts(
        demo_study, tmp_path):
    status = study_status_of(demo_study.storage, demo_study.study)
    pick = status["pick"]["number"]
    pruned = next(t["number"] for t in status["trials"] if t["state"] == "PRUNED")
    with dashboard_process(demo_study) as base, open_browser() as browser:
        browser.open(f"{base}/dashboard/studies/1")
        browser.wait_for("document.body.innerText.includes('demo (id=1)') && "
                         "document.body.innerText.includes('Best Trial (number=')")
        # The objective is named after its suite (History's y axis), not "Objective 0".
        axes = browser.wait_for("(t => t.includes('open') && t)([...document.querySelectorAll('.js-plotly-plot "
                                ".ytitle')].map(e => e.textContent).join(' '))")
        assert "Objective 0" not in axes and "Objective 0" not in browser.text()
        # The scalar user attributes are axes of the History plot (its y-axis menu).
        browser.evaluate("document.querySelector('[role=combobox]').dispatchEvent(new MouseEvent('mousedown', "
                         "{bubbles: true}))")
        options = browser.wait_for("(o => o.length && o)([...document.querySelectorAll('[role=option]')]"
                                   ".map(o => o.textContent))")
        for attribute in ("heldout_value", "tokens_per_second", "score.demo_digits"):
            assert f"User Attribute {attribute}" in options, options
        browser.evaluate("document.dispatchEvent(new KeyboardEvent('keydown', {key: 'Escape', bubbles: true}))")
        shot = browser.screenshot(screenshot_path(tmp_path, "dashboard-study.png"))
        browser.open(f"{base}/dashboard/studies/1/note")
        note = browser.wait_for(f"(t => t.includes('Pick: trial {pick}') && t)(document.body.innerText)")
        assert "Top " in note and "Baseline (the untuned base)" in note
        browser.screenshot(screenshot_path(tmp_path, "dashboard-note.png"))
        browser.open(f"{base}/dashboard/studies/1/trials?numbers={pruned}")
        trial = browser.wait_for("(t => t.includes('Artifacts') && t.includes('worker.log') && t)"
                                 "(document.body.innerText)")
        for name in ("loss_curve.png", "eval_report.json", "config.yaml", "tokens_per_second", "train_seconds"):
            assert name in trial, name
        # The loss curve's preview is an image the browser loaded from the artifact store.
        assert browser.wait_for("[...document.images].some(i => i.complete && i.naturalWidth > 0 && "
                                "i.src.includes('/artifacts/'))")
        trial_shot = browser.screenshot(screenshot_path(tmp_path, "dashboard-trial.png"))
    for path in (shot, trial_shot):
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 10_000


@pytest.mark.integration
def test_a_copy_of_the_artifact_store_opens_with_artifacts(demo_study, tmp_path):
    from optuna.artifacts import get_all_artifact_meta

    study = optuna.load_study(study_name=demo_study.study, storage=demo_study.storage)
    copy = tmp_path / "store"
    shutil.copytree(study.user_attrs["artifact_store"], copy)
    trial = study.trials[0]
    meta = next(m for m in get_all_artifact_meta(trial, storage=study._storage) if m.filename == "config.yaml")
    with serving(demo_study.storage, artifacts=str(copy)) as base:
        status, body = request(f"{base}/artifacts/{study._study_id}/{trial._trial_id}/{meta.artifact_id}")
    assert status == 200 and b"trainer:" in body
