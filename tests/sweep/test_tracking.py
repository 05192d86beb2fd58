"""Experiment tracking: a sweep with `orchestration.tracking: [wandb, tensorboard]`, read back with each tool's own
reader (TensorBoard's event accumulator; W&B's offline run file through W&B's own protobuf records), and a
tracker made to fail."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest
from sweep_processes import FAST, LIGHT


def _start(cli, tmp_path: Path, study: str, trials: int, *extra: str) -> dict:
    cli("start", "--trials", str(trials), "--storage", f"sqlite:///{tmp_path / 'studies.db'}", "--study", study,
        "--set", f"orchestration.artifacts_dir={tmp_path / 'runs'}", *FAST, *LIGHT, *extra)
    return json.loads(cli("status", "--storage", f"sqlite:///{tmp_path / 'studies.db'}", "--study", study,
                          "--format", "json"))


def wandb_records(path: Path) -> list:
    """The records of a W&B run file (`run-<id>.wandb`), parsed with W&B's own protobuf `Record`.

    The file is W&B's append-only log: a 7-byte header, then LevelDB-style chunks in 32 KiB blocks (a 4-byte
    checksum, a 2-byte length, a 1-byte type: 1 full, 2 first, 3 middle, 4 last).
    """
    from wandb.proto import wandb_internal_pb2

    data, block, pos = path.read_bytes(), 32768, 7
    assert data[:4] == b":W&B", data[:8]
    chunks, pending = [], b""
    while pos + 7 <= len(data):
        left = block - pos % block
        if left < 7:
            pos += left
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if length == 0 and kind == 0:
            pos += left
            continue
        chunk, pos = data[pos + 7:pos + 7 + length], pos + 7 + length
        if kind == 1:
            chunks.append(chunk)
        elif kind == 2:
            pending = chunk
        elif kind == 3:
            pending += chunk
        elif kind == 4:
            chunks.append(pending + chunk)
            pending = b""
    records = []
    for chunk in chunks:
        record = wandb_internal_pb2.Record()
        record.ParseFromString(chunk)
        records.append(record)
    return records


def _items(items) -> dict:
    return {(i.key or ".".join(i.nested_key)): json.loads(i.value_json) for i in items}


def read_wandb_run(path: Path) -> dict:
    run, history, summary, exit_code = None, [], {}, None
    for record in wandb_records(path):
        kind = record.WhichOneof("record_type")
        if kind == "run":
            run = record.run
        elif kind == "history":
            history.append(_items(record.history.item))
        elif kind == "summary":
            summary.update(_items(record.summary.update))
        elif kind == "exit":
            exit_code = record.exit.exit_code
    return {"name": run.display_name, "group": run.run_group, "job_type": run.job_type,
            "config": _items(run.config.update), "history": history, "summary": summary, "exit_code": exit_code}


def read_tensorboard(directory: Path) -> dict:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(directory))
    events.Reload()
    scalars = {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}
    texts = {tag.removesuffix("/text_summary"): [e.tensor_proto.string_val[0].decode() for e in events.Tensors(tag)]
             for tag in events.Tags().get("tensors", [])}
    return {"scalars": scalars, "texts": texts}


@pytest.mark.integration
def test_every_trial_and_the_baseline_are_runs_in_wandb_and_tensorboard_grouped_by_study(
        cli, tmp_path, monkeypatch, ray_session):
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "no-netrc"))  # no credentials: the driver picks offline
    # The median pruner after one full trial: with this seed, trial 0 completes and trials 1 and 2 are pruned.
    status = _start(cli, tmp_path, "tracked", 3, "--set", "orchestration.tracking=[wandb, tensorboard]",
                    "--set", "study.pruner=median", "--set", "study.pruner_startup_trials=1", "--set", "study.seed=0")
    trials = {t["number"]: t for t in status["trials"]}
    assert {t["state"] for t in trials.values()} == {"COMPLETE", "PRUNED"}
    work = tmp_path / "runs" / "tracked"
    # TensorBoard: one directory per study, one subdirectory per trial (and the baseline).
    board = work / "tensorboard"
    assert sorted(p.name for p in board.iterdir()) == ["baseline", "trial-0000", "trial-0001", "trial-0002"]
    for number, trial in trials.items():
        logged = read_tensorboard(board / f"trial-{number:04d}")
        losses = [(s, pytest.approx(v, rel=1e-6)) for s, v in trial["losses"]]
        assert logged["scalars"]["train/loss"] == losses
        assert [s for s, _ in logged["scalars"]["train/learning_rate"]] == [s for s, _ in trial["losses"]]
        assert [s for s, _ in logged["scalars"]["rung/objective"]] == [s for s, _ in trial["intermediate"]]
        assert logged["texts"]["state"][0].startswith(trial["state"])
        if trial["state"] == "COMPLETE":
            for task, score in trial["scores"].items():
                assert logged["scalars"][f"score/{task}"][-1][1] == pytest.approx(score, rel=1e-6)
            assert logged["scalars"]["measure/tokens_per_second"][-1][1] == pytest.approx(
                trial["tokens_per_second"], rel=1e-5)
    baseline = read_tensorboard(board / "baseline")
    assert baseline["scalars"]["score/demo_digits"][0][1] == pytest.approx(status["baseline"]["scores"]["demo_digits"])
    # W&B: offline run files under the artifacts directory, one run per trial and the baseline, in the study's group.
    runs = [read_wandb_run(p) for p in sorted((work / "wandb").glob("offline-run-*/run-*.wandb"))]
    by_name = {r["name"]: r for r in runs}
    assert set(by_name) == {"baseline", "trial-0000", "trial-0001", "trial-0002"}
    assert {r["group"] for r in runs} == {"tracked"}
    for number, trial in trials.items():
        run = by_name[f"trial-{number:04d}"]
        assert run["job_type"] == "trial" and run["config"]["params"] == trial["params"]
        assert run["config"]["config"]["trial"]["number"] == number
        steps = [(row["_step"], row["train/loss"]) for row in run["history"] if "train/loss" in row]
        assert steps == [(s, pytest.approx(v, rel=1e-6)) for s, v in trial["losses"]]
        assert run["summary"]["state"] == trial["state"] and run["exit_code"] == 0
        if trial["state"] == "COMPLETE":
            assert run["summary"]["suite/open"] == pytest.approx(trial["values"]["open"])
            assert run["summary"]["score/demo_digits"] == pytest.approx(trial["scores"]["demo_digits"])
            assert run["summary"]["measure/feasible"] is True
    assert by_name["baseline"]["summary"]["score/demo_digits"] == pytest.approx(
        status["baseline"]["scores"]["demo_digits"])


@pytest.mark.integration
def test_a_tracker_that_fails_leaves_the_trial_complete_with_one_warning(cli, tmp_path, caplog, ray_session):
    work = tmp_path / "runs" / "broken"
    work.mkdir(parents=True)
    (work / "tensorboard").write_text("a file where the tracker's directory should be\n")
    with caplog.at_level("WARNING", logger="sweep"):
        status = _start(cli, tmp_path, "broken", 1, "--set", "orchestration.tracking=[tensorboard]",
                        "--set", "study.pruner=none")
    assert [t["state"] for t in status["trials"]] == ["COMPLETE"]
    warnings = [r.getMessage() for r in caplog.records if "tensorboard" in r.getMessage().lower()]
    assert len(warnings) == 1 and "Tracking with tensorboard is off for this start" in warnings[0], warnings


def test_the_driver_runs_wandb_offline_without_credentials_or_a_route(tmp_path):
    import socket

    from sweep.tracking import wandb_mode

    (tmp_path / "netrc").write_text("machine api.wandb.ai login user password k\n")
    assert wandb_mode({"WANDB_MODE": "disabled"}) == "disabled"
    no_netrc = {"NETRC": str(tmp_path / "none")}
    assert wandb_mode(no_netrc) == "offline"  # no key, no netrc entry: not even a connection is tried
    with socket.socket() as server:  # a reachable "server" on loopback, then a closed port
        server.bind(("127.0.0.1", 0))
        server.listen(1)
        assert wandb_mode({**no_netrc, "WANDB_API_KEY": "k"}, server.getsockname()) == "online"
        assert wandb_mode({"NETRC": str(tmp_path / "netrc")}, server.getsockname()) == "online"  # `wandb login`
        closed = server.getsockname()
    assert wandb_mode({**no_netrc, "WANDB_API_KEY": "k"}, closed) == "offline"
