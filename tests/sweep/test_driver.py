"""Orchestration through a real local Ray: pruning, concurrent slots, a resident base, budgets, crash and resume."""

from __future__ import annotations

import json
import logging
import os
import signal
import sqlite3
from datetime import datetime

import pytest
from sweep_processes import LIGHT, kill_session, rows, start_driver, started, states, wait_for
from sweep_processes import common as _common


def _status(cli, tmp_path, study: str) -> dict:
    return json.loads(cli("status", "--storage", f"sqlite:///{tmp_path / 'studies.db'}", "--study", study,
                          "--format", "json"))


def _sweep_logs(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "sweep"]


@pytest.mark.integration
@pytest.mark.parametrize("n_trials", [4, pytest.param(12, marks=pytest.mark.slow)])
def test_successive_halving_prunes_trials_early_on_one_resident_base(tmp_path, cli, ray_session, caplog, n_trials):
    caplog.set_level(logging.INFO, logger="sweep")
    cli("start", "--trials", str(n_trials), *_common(tmp_path, "sh"), *LIGHT)
    trials = _status(cli, tmp_path, "sh")["trials"]
    assert len(trials) == n_trials
    pruned = [t for t in trials if t["state"] == "PRUNED"]
    complete = [t for t in trials if t["state"] == "COMPLETE"]
    assert pruned and complete and len(pruned) + len(complete) == n_trials
    for t in pruned:
        steps = [step for step, _ in t["intermediate"]]
        assert steps and steps == sorted(steps) and set(steps) <= {6, 12}
        assert t["train_steps"] == steps[-1] < 24  # the worker stopped at the rung it was pruned at
        assert t["value"] == t["intermediate"][-1][1]  # Optuna keeps the last intermediate value
        assert t["scores"] == {} and t["adapter_dir"] is None
    for t in complete:
        assert t["train_steps"] == 24 and [s for s, _ in t["intermediate"]] == [6, 12]
        assert set(t["scores"]) and t["adapter_dir"]
    table = cli("status", "--storage", f"sqlite:///{tmp_path / 'studies.db'}", "--study", "sh")
    assert f"pruned at step {pruned[0]['train_steps']}" in table
    # One slot with a resident base: the base is loaded once for the baseline and all the trials.
    loads = [m for m in _sweep_logs(caplog) if m.startswith("Loaded base")]
    assert loads == [loads[0]] and loads[0].endswith("(slot 0)")
    assert all(t["base_load_seconds"] is None for t in trials)
    assert len({t["timeline"]["slot"] for t in trials}) == 1
    assert len({t["timeline"]["pid"] for t in trials}) == 1  # one slot actor's process ran them all
    for t in trials:  # each rung's wait for the driver's decision, pruned trials' included
        waits = t["timeline"]["rung_waits_s"]
        assert len(waits) == len(t["intermediate"]) and all(0 <= w < 30 for w in waits)


@pytest.mark.integration
def test_two_slots_on_cpu_run_two_trials_at_once(tmp_path, cli, ray_session, caplog):
    caplog.set_level(logging.INFO, logger="sweep")
    # Trials of 60 steps: long enough that the second slot's start (its own base load) falls within the first.
    cli("start", "--trials", "2", "--concurrency", "2", *_common(tmp_path, "two"), *LIGHT, "--set",
        "study.pruner=none", "--set", "trainer.max_steps=60")
    trials = _status(cli, tmp_path, "two")["trials"]
    assert [t["state"] for t in trials] == ["COMPLETE", "COMPLETE"]
    (a_start, a_end), (b_start, b_end) = [
        (datetime.fromisoformat(t["started_at"]), datetime.fromisoformat(t["finished_at"])) for t in trials
    ]
    assert a_start < b_end and b_start < a_end, "the two trials did not overlap"
    assert {t["timeline"]["slot"] for t in trials} == {0, 1}
    assert len({t["timeline"]["pid"] for t in trials}) == 2  # an actor process per slot
    assert "2 slot(s), 1 CPU core(s) each, resident base" in _sweep_logs(caplog)


@pytest.mark.integration
def test_budget_stops_starting_trials_and_progress_shows_hours(tmp_path, cli, ray_session, caplog):
    caplog.set_level(logging.INFO, logger="sweep")
    # 5.4 slot-seconds: after the first trial, a second one would not fit.
    cli("start", "--trials", "8", "--budget-hours", "0.0015", *_common(tmp_path, "budget"), *LIGHT,
        "--set", "study.pruner=none")
    trials = _status(cli, tmp_path, "budget")["trials"]
    assert 1 <= len(trials) < 8 and all(t["state"] == "COMPLETE" for t in trials)
    logs = _sweep_logs(caplog)
    assert f"Starting no more trials ({8 - len(trials)} not started): budget of 0.0015 slot-hours" in "\n".join(logs)
    assert any(m.startswith("Progress:") and "of 0.0015 slot-hours used" in m for m in logs)


def test_live_display_shows_running_trials_and_gpu_hours():
    from rich.console import Console

    from sweep.progress import Progress, RunningTrial

    progress = Progress("live", n_trials=8, unit="GPU-hours", budget_hours=2.0, complete=3, pruned=2, failed=1,
                        best=(4, 0.5123), finished_hours=0.75)
    trial = RunningTrial(7, slot=1, params={"trainer.lora.r": 16}, total_steps=200)
    trial.started -= 120
    progress.running[7] = trial
    progress.on_step(7, 1, 200, 2.5)
    trial.first_step_at -= 10
    progress.on_step(7, 11, 200, 1.25)
    console = Console(record=True, width=160)
    console.print(progress.table())
    text = console.export_text()
    assert "11/200" in text and "1.2500" in text and "r=16" in text
    assert "189s" in text  # ETA: 1 s per step, 189 steps to go
    assert "3 complete, 2 pruned, 1 failed, 1 running of 8; best trial 4 (0.5123)" in text
    assert "0.7833 of 2 GPU-hours used" in text  # 0.75 finished + 2 minutes running


@pytest.mark.integration
def test_a_killed_driver_is_resumed_by_the_next_start(tmp_path, cli, ray_session):
    db = tmp_path / "studies.db"
    driver = start_driver(tmp_path, "crash", *LIGHT)
    try:
        # Not at the first sight of RUNNING: Optuna stores a trial as RUNNING before its parameters are drawn.
        wait_for(lambda: states(db).count("COMPLETE") == 1 and "RUNNING" in states(db)
                 and started(tmp_path, "crash", 1), driver, what="trial 1 running")
        os.kill(driver.pid, signal.SIGKILL)
        driver.wait()
    finally:
        kill_session(driver.pid)
    before = _status(cli, tmp_path, "crash")["trials"]
    assert [t["state"] for t in before] == ["COMPLETE", "RUNNING"]

    # The same command again: the dead driver's lease is taken over at once (its process is gone), the stale
    # trial fails, its parameters run again, the count of 3 is reached.
    cli("start", "--trials", "3", *_common(tmp_path, "crash"), *LIGHT, "--set", "study.pruner=none",
        "--set", "orchestration.heartbeat_seconds=1")
    after = _status(cli, tmp_path, "crash")["trials"]
    assert after[0] == {**before[0], "finished_at": after[0]["finished_at"]} and after[0]["state"] == "COMPLETE"
    assert after[1]["state"] == "FAIL" and after[1]["fail_reason"] == "stale: driver died"
    assert [t["state"] for t in after[2:]] == ["COMPLETE", "COMPLETE"]
    assert after[2]["params"] == after[1]["params"]  # the stale trial's parameters, run again
    assert "RUNNING" not in states(db)
    ended = rows(db, "select end_reason from sweep_drivers order by id")
    assert ended[0][0].startswith("died (process") and ended[1][0] == "finished"


@pytest.mark.integration
@pytest.mark.parametrize("sig, code, reason", [
    (signal.SIGTERM, 143, "terminated"),
    pytest.param(signal.SIGINT, 130, "interrupted", marks=pytest.mark.slow),
])
def test_a_stop_signal_stores_running_trials_as_stopped(tmp_path, sig, code, reason):
    """SIGTERM (`timeout`, `docker stop`, a preempted machine) acts as Ctrl-C does."""
    db = tmp_path / "studies.db"
    driver = start_driver(tmp_path, "stop", *LIGHT, "--set", "trainer.max_steps=400")
    try:
        wait_for(lambda: "RUNNING" in states(db) and started(tmp_path, "stop", 0), driver, what="trial 0 running")
        os.kill(driver.pid, sig)
        assert driver.wait(timeout=60) == code
    finally:
        kill_session(driver.pid)
    con = sqlite3.connect(db)
    ended = con.execute("select t.number, t.state, r.fail_reason from trials t join sweep_trial_records r "
                        "on r.trial_number = t.number").fetchall()
    running = con.execute("select count(*) from trials where state = 'RUNNING'").fetchone()[0]
    lease = con.execute("select count(*) from sweep_leases").fetchone()[0]
    driver_end = con.execute("select end_reason, resumable from sweep_drivers").fetchall()
    con.close()
    assert running == 0 and lease == 0  # every trial ended, the study free for the next start
    assert ended and ended[-1][1:] == ("FAIL", reason)
    assert driver_end == [(reason, 0)]  # stopped on purpose: the next start adds its own trials
    out = (tmp_path / "stop.log").read_text()
    assert f"sweep start: {reason}" in out and "Traceback" not in out


def test_budget_and_timeout_admit_a_trial_only_when_it_fits():
    from sweep.budget import Budget

    budget = Budget(hours=0.01, timeout_seconds=None, unit="GPU-hours")  # 36 s
    assert budget.blocks(used_hours=0.0, running_seconds=[]) is None  # nothing known yet: start
    budget.finished(20.0, complete=True)
    budget.finished(2.0, complete=False)  # a pruned trial does not lower the estimate
    assert budget.trial_seconds() == 20.0
    assert budget.blocks(used_hours=12 / 3600, running_seconds=[]) is None  # 12 + 20 <= 36
    assert budget.blocks(used_hours=12 / 3600, running_seconds=[18.0]) is None  # 12 + 2 to go + 20 <= 36
    # 12 used + a running trial 15 s in (5 s to go) + 20 for a new one > 36
    assert budget.blocks(used_hours=12 / 3600, running_seconds=[15.0]).startswith("budget of 0.01 GPU-hours")
    timeout = Budget(hours=None, timeout_seconds=30, unit="slot-hours")
    timeout.finished(20.0, complete=True)
    assert timeout.blocks(0.0, []) is None
    timeout.started -= 15  # 15 s left, a trial takes 20
    assert timeout.blocks(0.0, []).startswith("timeout of 30s")


def test_the_pruner_is_rebuilt_from_the_config_when_the_study_is_loaded(tmp_path):
    import optuna

    from sweep.config import load_config
    from sweep.study import create_or_load_study, make_storage

    storage = make_storage(f"sqlite:///{tmp_path / 'p.db'}")
    config = load_config(None, ["trainer.max_steps=40"])
    study = create_or_load_study(config, storage, "p")
    assert isinstance(study.pruner, optuna.pruners.SuccessiveHalvingPruner)
    assert study.pruner._min_resource == 12 and study.pruner._reduction_factor == 2  # the first rung: 30% of 40
    for name, kind in (("hyperband", optuna.pruners.HyperbandPruner), ("median", optuna.pruners.MedianPruner),
                       ("none", optuna.pruners.NopPruner)):
        again = create_or_load_study(load_config(None, [f"study.pruner={name}"]), storage, "p")
        assert isinstance(again.pruner, kind)


def test_a_slot_measures_its_memory_growth_since_its_first_trial():
    from sweep.worker import TrialSlot

    slot = TrialSlot()
    assert slot.memory_growth_gib() is None  # no trial yet
    slot._note_memory()  # what the end of its first trial does
    held = bytearray(300 * 2**20)
    held[:: 4096] = b"x" * len(held[:: 4096])  # touch every page: resident
    assert slot.memory_growth_gib() > 0.25
    del held


@pytest.mark.integration
def test_a_slot_whose_actor_died_is_replaced(ray_session, caplog):
    import ray

    from sweep.cluster import start_ray
    from sweep.gpus import detect_profile
    from sweep.slots import SlotPool

    caplog.set_level(logging.INFO, logger="sweep")
    start_ray(None, detect_profile([]), env_vars={"HF_HUB_OFFLINE": "1"})
    pool = SlotPool(1, {"num_cpus": 1, "num_gpus": 0}, resident=True, memory_growth_margin_gib=1.0)
    try:
        dead = pool.actors[0]
        ray.kill(dead, no_restart=True)
        pool.check(0)
        assert pool.actors[0] is not dead
        assert ray.get(pool.actors[0].memory_growth_gib.remote(), timeout=60) is None  # a fresh slot, alive
        assert any(m.startswith("Replacing slot 0: its actor is gone") for m in _sweep_logs(caplog))
    finally:
        pool.kill_all()


@pytest.mark.parametrize("seed", [0, 4294, 12345, 2**40, -1])
def test_any_study_seed_seeds_the_sampler_and_the_trials(seed):
    """Seeds derived from study.seed stay in the range NumPy's generators take (a seed of 12345 used to stop a
    start with "Seed must be between 0 and 2**32 - 1")."""
    from sweep.config import load_config
    from sweep.study import derived_seed, make_sampler

    make_sampler(load_config(None, [f"study.seed={seed}"]), 3)  # TPE seeds its NumPy generator here
    assert all(0 <= derived_seed(seed, i) < 2**32 for i in range(5))
    if 0 <= seed <= 4294:
        assert derived_seed(seed, 2) == seed * 1_000_003 + 2  # the seeds earlier studies were trained with


def test_tpe_models_the_space_after_its_configured_startup_trials():
    """study.sampler_startup_trials: the same seed draws the same random start; TPE takes over after it."""
    import optuna

    from sweep.config import load_config
    from sweep.study import make_sampler

    def proposals(startup: int) -> list[float]:
        config = load_config(None, [f"study.sampler_startup_trials={startup}"])
        study = optuna.create_study(direction="maximize", sampler=make_sampler(config, 0))
        study.optimize(lambda t: -(t.suggest_float("x", 0, 1) - 0.3) ** 2, n_trials=4)
        return [t.params["x"] for t in study.trials]

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    early, default = proposals(2), proposals(10)
    assert early[:2] == default[:2]  # the random start, from the same seed
    assert early[2:] != default[2:]  # then TPE's proposals, where the default still draws at random
