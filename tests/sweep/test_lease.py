"""One driver per study: the lease, its takeover rules, and two real `sweep start` racing on one study."""

from __future__ import annotations

import datetime as dt
import os
import subprocess
import sys

import pytest
from sqlalchemy import select
from sweep_processes import LIGHT, kill_session, rows, start_driver, started, wait_for

from sweep.lease import DriverLease, LeaseHeld, host_key, process_alive, process_started
from sweep.store import Store, drivers, leases


@pytest.fixture
def store(tmp_path):
    return Store(f"sqlite:///{tmp_path / 'studies.db'}")


def _age_lease(store: Store, study: str, seconds: float, **holder) -> None:
    """Makes the lease's last heartbeat `seconds` old and changes its holder's row (another host, a dead pid)."""
    with store.write() as conn:
        now = store.now(conn)
        conn.execute(leases.update().where(leases.c.study_name == study)
                     .values(heartbeat_at=now - dt.timedelta(seconds=seconds)))
        if holder:
            driver_id = conn.execute(select(leases.c.driver_id).where(leases.c.study_name == study)).scalar()
            conn.execute(drivers.update().where(drivers.c.id == driver_id).values(**holder))


def test_a_live_lease_is_refused_naming_its_driver(store):
    first = DriverLease.acquire(store, "s", heartbeat_seconds=10)
    with pytest.raises(LeaseHeld) as refused:
        DriverLease.acquire(store, "s", heartbeat_seconds=10)
    message = str(refused.value)
    assert f"pid {os.getpid()}" in message and "is being run by another `sweep start`" in message
    assert "\n" not in message
    assert DriverLease.acquire(store, "other", heartbeat_seconds=10).driver_id != first.driver_id  # per study
    first.release("finished")
    second = DriverLease.acquire(store, "s", heartbeat_seconds=10)
    assert second.previous is None  # the first ended cleanly: nothing to resume


def test_a_lease_of_another_host_is_taken_over_only_once_its_heartbeat_is_stale(store):
    holder = DriverLease.acquire(store, "s", heartbeat_seconds=10)
    _age_lease(store, "s", 20, host_key="elsewhere", host="elsewhere")  # 20 s < 3 intervals: may be alive
    with pytest.raises(LeaseHeld, match="on host elsewhere"):
        DriverLease.acquire(store, "s", heartbeat_seconds=10)
    _age_lease(store, "s", 31)
    taker = DriverLease.acquire(store, "s", heartbeat_seconds=10)
    assert taker.previous.id == holder.driver_id
    assert not holder.beat() and holder.lost.is_set()  # the old holder finds out at its next heartbeat
    ended = rows(store.url.removeprefix("sqlite:///"), f"select end_reason from sweep_drivers where id = "
                                                       f"{holder.driver_id}")
    assert ended[0][0].startswith("died (no heartbeat for")


def test_a_lease_of_a_dead_process_on_this_host_is_taken_over_at_once(store):
    DriverLease.acquire(store, "s", heartbeat_seconds=10)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    _age_lease(store, "s", 0, pid=dead.pid, pid_started=None)
    assert not process_alive(dead.pid, None)
    taker = DriverLease.acquire(store, "s", heartbeat_seconds=10)
    assert taker.previous is not None and taker.previous.pid == dead.pid


def test_a_reused_process_id_is_not_taken_for_the_driver(store):
    me = os.getpid()
    assert process_alive(me, process_started(me))
    assert not process_alive(me, process_started(me) - 1)  # same pid, another start time: another process
    assert host_key() == host_key() and os.uname().nodename in host_key()


def test_a_finished_record_is_never_rewritten(store):
    from sweep.store import TrialRecord

    store.start_trial("s", 0, driver_id=1, started_at=dt.datetime(2026, 1, 1))
    done = TrialRecord(trial_number=0, state="COMPLETE", adapter_dir="/a", scores={"t": 0.5}, train_seconds=3.0,
                       value=0.5)
    assert store.record_trial("s", done)
    assert not store.record_trial("s", TrialRecord(trial_number=0, state="FAIL", adapter_dir=None, scores={},
                                                   fail_reason="stale: driver died"))
    kept = store.trials("s")[0]
    assert kept.state == "COMPLETE" and kept.adapter_dir == "/a" and kept.train_seconds == 3.0
    assert kept.scores == {"t": 0.5} and kept.driver_id == 1 and kept.started_at == dt.datetime(2026, 1, 1)


def _study_with_a_dead_drivers_trial(tmp_path, store):
    """A study whose driver died with trial 0 RUNNING; a new start holds the lease."""
    from sweep.config import load_config
    from sweep.study import create_or_load_study, make_storage

    storage = make_storage(store.url, heartbeat_seconds=1, max_retries=2)
    study = create_or_load_study(load_config(None), storage, "s")
    dead = DriverLease.acquire(store, "s", heartbeat_seconds=1)
    trial = study.ask()
    trial.suggest_float("x", 0, 1)
    storage.record_heartbeat(trial._trial_id)
    store.start_trial("s", trial.number, dead.driver_id, dt.datetime(2026, 1, 1))
    _age_lease(store, "s", 10)
    return study, trial, DriverLease.acquire(store, "s", heartbeat_seconds=1)


def test_a_trial_that_ends_before_the_stale_check_is_not_failed(tmp_path, store):
    """The race of two drivers: the old trial completes between the new start's look and its failing."""
    from sweep.records import _fail_stale, end_trial
    from sweep.store import TrialRecord

    study, trial, lease = _study_with_a_dead_drivers_trial(tmp_path, store)
    seen_running = study.get_trials(deepcopy=False)[0]
    end_trial(study, store, trial, TrialRecord(trial_number=0, state="COMPLETE", adapter_dir="/kept", scores={},
                                               value=0.25, train_seconds=4.0))
    assert not _fail_stale(study, store, lease, seen_running, max_retries=2, grace_s=None)
    assert study.get_trials()[0].state.name == "COMPLETE" and study.get_trials()[0].value == 0.25
    rec = store.trials("s")[0]
    assert rec.state == "COMPLETE" and rec.adapter_dir == "/kept" and rec.train_seconds == 4.0
    assert len(study.get_trials()) == 1  # nothing queued to run again


def test_a_stale_trial_fails_in_one_transaction_and_runs_again(tmp_path, store):
    from sweep.records import recover_trials

    study, trial, lease = _study_with_a_dead_drivers_trial(tmp_path, store)
    recover_trials(study, store, lease, heartbeat_seconds=1, max_retries=2)
    first, retry = study.get_trials()
    assert first.state.name == "FAIL" and store.trials("s")[0].fail_reason == "stale: driver died"
    assert retry.state.name == "WAITING" and retry.params == first.params


def test_a_trial_of_no_known_driver_fails_only_once_its_heartbeat_is_stale(tmp_path, store):
    """A study from an older `sweep` (no driver rows): its RUNNING trial waits out the grace period."""
    import time

    from sweep.config import load_config
    from sweep.records import recover_trials
    from sweep.study import create_or_load_study, make_storage

    storage = make_storage(store.url, heartbeat_seconds=1, max_retries=0)
    study = create_or_load_study(load_config(None), storage, "s")
    trial = study.ask()
    storage.record_heartbeat(trial._trial_id)
    lease = DriverLease.acquire(store, "s", heartbeat_seconds=1)
    started = time.monotonic()
    recover_trials(study, store, lease, heartbeat_seconds=1, max_retries=0)
    assert time.monotonic() - started >= 3  # 3 intervals of 1 s: the heartbeat had to go stale first
    assert [t.state.name for t in study.get_trials()] == ["FAIL"]  # max_retries=0: not queued again
    assert store.trials("s")[0].fail_reason == "stale: driver died"


def test_an_end_recorded_but_not_told_is_told_on_the_next_start(tmp_path, store):
    """A driver that died between our record and Optuna's tell: the next start finishes the tell."""
    from sweep.records import recover_trials
    from sweep.store import TrialRecord

    study, trial, lease = _study_with_a_dead_drivers_trial(tmp_path, store)
    store.record_trial("s", TrialRecord(trial_number=0, state="COMPLETE", adapter_dir="/a", scores={"t": 0.5},
                                        values={"open": 0.5}, value=0.5, constraints={"memory_over_cap_gib": 1.0}))
    recover_trials(study, store, lease, heartbeat_seconds=1, max_retries=2)
    (t,) = study.get_trials()
    assert t.state.name == "COMPLETE" and t.value == 0.5 and t.user_attrs["adapter_dir"] == "/a"
    assert t.user_attrs["score.t"] == 0.5 and t.user_attrs["open_value"] == 0.5
    assert t.constraints == {"memory_over_cap_gib": 1.0}
    assert store.trials("s")[0].adapter_dir == "/a"


def _race(tmp_path, round_: int) -> None:
    """Two starts launched together, then a third while the winner runs a trial: one driver runs the study."""
    db = tmp_path / f"race{round_}.db"
    study = f"race{round_}"
    # Three trials: the winner is still running when the late start reaches the lease, on a loaded machine too.
    launched = [start_driver(tmp_path, study, *LIGHT, trials=3, log=f"{study}-{k}", db=db) for k in "ab"]
    late = None
    try:
        wait_for(lambda: any(p.poll() is not None for p in launched), seconds=120, what="one start refused")
        loser = next(p for p in launched if p.poll() is not None)
        winner = next(p for p in launched if p is not loser)
        name = "ab"[launched.index(winner)]
        wait_for(lambda: started(tmp_path, f"{study}-{name}", 0), winner, what="the winner's first trial")
        late = start_driver(tmp_path, study, *LIGHT, trials=3, log=f"{study}-late", db=db)
        assert late.wait(timeout=120) == 2
        assert winner.wait(timeout=300) == 0
        for refused, log in ((loser, f"{study}-{'ab'[launched.index(loser)]}"), (late, f"{study}-late")):
            assert refused.returncode == 2
            out = (tmp_path / f"{log}.log").read_text()
            errors = [line for line in out.splitlines() if line.startswith("sweep start: error:")]
            assert len(errors) == 1 and f"pid {winner.pid} on host" in errors[0], out
            assert "Traceback" not in out
    finally:
        for p in [*launched, *([late] if late else [])]:
            if p.poll() is None:
                p.kill()
            kill_session(p.pid)
    trials = rows(db, "select t.number, t.state, r.adapter_dir, r.train_seconds, r.driver_id from trials t "
                      "join sweep_trial_records r on r.trial_number = t.number order by t.number")
    assert [t[1] for t in trials] == ["COMPLETE"] * 3
    assert all(t[2] and t[3] for t in trials)  # adapters and timings kept
    assert len({t[4] for t in trials}) == 1  # one driver ran them
    assert rows(db, "select count(*) from sweep_drivers") == [(1,)]  # the refused starts wrote nothing
    params = rows(db, "select trial_id, param_name, param_value from trial_params")
    sets = {}
    for trial_id, name, value in params:
        sets.setdefault(trial_id, set()).add((name, value))
    assert len({frozenset(s) for s in sets.values()}) == len(sets) == 3  # no parameter set ran twice


@pytest.mark.integration
def test_two_starts_on_one_study_leave_one_driver(tmp_path):
    _race(tmp_path, 0)


@pytest.mark.integration
@pytest.mark.slow
@pytest.mark.parametrize("round_", range(10))
def test_two_starts_on_one_study_repeated(tmp_path, round_):
    _race(tmp_path, round_)
