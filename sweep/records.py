"""Every trial's end state, written once: our record and Optuna's `tell` together, and recovery after a crash.

A trial ends here and nowhere else (as Optuna's `_run_trial` is its one place):
its record is built here for each end state (`complete_record`, `pruned_record`,
`failed_record`), and `end_trial` writes it first, then tells Optuna, with Ctrl-C
and the stop signals held back between the two. A record already finished is never
rewritten (sweep.store), so a trial told twice keeps its first end.

If the process dies between the two writes, `recover_trials` reconciles the
study when the next start loads it: a trial Optuna still has RUNNING whose
record says it ended is told that end (rolled forward, nothing lost); a
trial whose driver died mid-run is failed as stale in one transaction that
checks, at that moment, that this start holds the study's lease and the trial
is still RUNNING (and, for a trial of no known driver, that its heartbeat is
older than the grace period), then its parameters are queued to run again.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import logging
import time
import warnings
from typing import Any, Optional

from sqlalchemy import select

from evaluator.config import EvalConfig
from evaluator.score import suite_values
from sweep.budget import feasibility
from sweep.compat import fail_in_storage, live_trial, optuna_tables, stored_trial, trial_id, trial_state
from sweep.faults import SweepError, signals_deferred
from sweep.lease import GRACE_INTERVALS, DriverLease, LeaseLost
from sweep.store import MEASUREMENTS, Store, TrialRecord, utc_now
from sweep.worker import TrialResult

log = logging.getLogger("sweep")

STALE_REASON = "stale: driver died"


def end_trial(study, store: Store, trial, record: TrialRecord, metrics: Optional[dict[str, str]] = None) -> bool:
    """Records how a trial ended and tells Optuna; False when it had already ended (nothing changed).

    Args:
        study: the Optuna study.
        store: our tables.
        trial: Optuna's live `Trial` (or one rebuilt from the trial's id).
        record: the end: state COMPLETE (with `value`, `values`, `scores`, `constraints`), PRUNED or FAIL
            (with `fail_reason`).
        metrics: each task's metric name, stored beside its score.
    """
    with signals_deferred():
        if not store.record_trial(study.study_name, record, metrics):
            return False
        _tell(study, trial, record)
    return True


def complete_record(trial_number: int, result: TrialResult, evaluator: EvalConfig, baseline_scores: Optional[dict],
                    hours_limit: float, started_at: dt.datetime) -> TrialRecord:
    """A COMPLETE trial's record: its suites' values (normalised by the baseline's scores), the objective's value,
    its feasibility constraints and its measurements."""
    values = suite_values(result.scores, evaluator, baseline_scores)
    constraints = feasibility(result, hours_limit)
    return TrialRecord(
        trial_number=trial_number, state="COMPLETE", adapter_dir=result.adapter_dir, scores=result.scores,
        values=values, value=values[evaluator.objective_suite], constraints=constraints, started_at=started_at,
        finished_at=utc_now(), feasible=all(v <= 0 for v in constraints.values()),
        **{name: getattr(result, name) for name in MEASUREMENTS},
    )


def pruned_record(trial_number: int, result: TrialResult, started_at: dt.datetime) -> TrialRecord:
    """A PRUNED trial's record: no scores, its measurements up to the rung that stopped it."""
    return TrialRecord(
        trial_number=trial_number, state="PRUNED", adapter_dir=None, scores={}, started_at=started_at,
        finished_at=utc_now(), **{name: getattr(result, name) for name in MEASUREMENTS},
    )


def failed_record(trial_number: int, reason: str, started_at: Optional[dt.datetime],
                  feasible: Optional[bool] = None) -> TrialRecord:
    """A FAIL trial's record; `feasible` False: its setting does not fit the profile."""
    return TrialRecord(trial_number=trial_number, state="FAIL", adapter_dir=None, scores={}, fail_reason=reason,
                       started_at=started_at, finished_at=utc_now(), feasible=feasible)


def _tell(study, trial, record: TrialRecord) -> None:
    import optuna

    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*constraint.* is already set")
            # Attributes and constraints go before tell: a finished trial can't be updated.
            for name, value in trial_attributes(record).items():
                trial.set_user_attr(name, value)
            if record.state == "COMPLETE":
                for name, amount in (record.constraints or {}).items():
                    trial.set_constraint(name, amount)  # > 0: infeasible; the sampler learns to avoid the region
                study.tell(trial, record.value)
            elif record.state == "PRUNED":
                study.tell(trial, state=optuna.trial.TrialState.PRUNED)  # its value: the last intermediate one
            else:
                study.tell(trial, state=optuna.trial.TrialState.FAIL)
    except optuna.exceptions.UpdateFinishedTrialError:
        log.warning("Trial %d had already ended in Optuna's tables: left as it is", trial.number)


# A trial's measurements as the dashboard shows them (columns, plot axes), rounded for reading; our records keep
# the exact values.
_FACT_DIGITS = {
    "tokens_per_second": 1, "peak_memory_gib": 3, "projected_full_run_hours": 4, "train_seconds": 1,
    "eval_seconds": 1,
}


def trial_attributes(record: TrialRecord) -> dict[str, Any]:
    """The user attributes a trial ends with: one scalar each, so the dashboard can tabulate and plot them.

    `<suite>_value` for each suite (`open_value`, `heldout_value`), `score.<task>` for each task, the
    measurements (`tokens_per_second`, `peak_memory_gib`, `projected_full_run_hours`, `feasible`,
    `train_seconds`, `eval_seconds`), the base's `mode` and `quantization` (and `base_swapped_from` when
    its slot swapped bases for it), and `adapter_dir` (COMPLETE) or `fail_reason` (FAIL).
    """
    attrs: dict[str, Any] = {}
    for suite, value in (record.values or {}).items():
        attrs[f"{suite}_value"] = value
    for name, digits in _FACT_DIGITS.items():
        value = getattr(record, name)
        if value is not None and (name != "eval_seconds" or record.state == "COMPLETE"):  # a pruned one scored none
            attrs[name] = round(float(value), digits)
    if record.feasible is not None:
        attrs["feasible"] = bool(record.feasible)
    if record.base:
        attrs["mode"] = record.base.get("mode")
        attrs["quantization"] = record.base.get("quantization")
        if record.base.get("swapped_from"):
            attrs["base_swapped_from"] = record.base["swapped_from"]
    for task, value in sorted(record.scores.items()):
        attrs[f"score.{task}"] = value
    if record.state == "COMPLETE":
        attrs["adapter_dir"] = record.adapter_dir
    if record.state == "FAIL":
        attrs["fail_reason"] = record.fail_reason
    return attrs


def recover_trials(study, store: Store, lease: DriverLease, heartbeat_seconds: int, max_retries: int) -> None:
    """Reconciles the RUNNING trials of drivers that are gone (see the module's docstring)."""
    import optuna

    records = store.trials(study.study_name)
    running = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,))
    unknown = []
    for t in running:
        rec = records.get(t.number)
        if rec is not None and rec.finished:
            _roll_forward(study, t, rec)
        elif rec is not None and rec.driver_id is not None and rec.driver_id != lease.driver_id:
            _fail_stale(study, store, lease, t, max_retries, grace_s=None)  # its driver is gone: we hold the lease
        else:
            unknown.append(t)
    if unknown:
        _fail_when_stale(study, store, lease, unknown, heartbeat_seconds, max_retries)


def _roll_forward(study, frozen, rec: TrialRecord) -> None:
    if rec.state == "COMPLETE" and rec.value is None:  # recorded before records kept the value told
        rec = _with_value(rec, study.user_attrs.get("optimize"))
    log.warning("Trial %d ended %s, but its driver stopped before telling Optuna: told now", frozen.number, rec.state)
    _tell(study, live_trial(study, frozen), rec)


def _with_value(rec: TrialRecord, suite: Optional[str]) -> TrialRecord:
    values = rec.values or {}
    return dataclasses.replace(rec, value=values.get(suite) if suite in values else next(iter(values.values())))


def _fail_when_stale(study, store: Store, lease: DriverLease, trials: list, heartbeat_seconds: int,
                     max_retries: int) -> None:
    """Trials of no known driver (an older `sweep`, or a driver stopped right after asking): failed once their
    heartbeats are older than the grace period; an error if they stay fresh (something else runs them)."""
    grace = GRACE_INTERVALS * heartbeat_seconds
    numbers = sorted(t.number for t in trials)
    log.info("Trial(s) %s RUNNING from an earlier start: waiting up to %ds for their heartbeats to go stale",
             numbers, grace)
    deadline = time.monotonic() + grace + heartbeat_seconds + 5
    pending = list(trials)
    while pending:
        pending = [t for t in pending if not _fail_stale(study, store, lease, t, max_retries, grace_s=grace)
                   and _still_running(study, t)]
        if not pending:
            return
        if time.monotonic() > deadline:
            raise SweepError(f"trials {sorted(t.number for t in pending)} of study {study.study_name!r} keep live "
                             "heartbeats: another process is running them")
        time.sleep(1)


def _still_running(study, frozen) -> bool:
    return trial_state(study, frozen) == "RUNNING"


def _fail_stale(study, store: Store, lease: DriverLease, frozen, max_retries: int, grace_s: Optional[float]) -> bool:
    """Fails a RUNNING trial of a dead driver and queues its parameters again; False if it was not failed."""
    import optuna

    failed = _fail_stale_in_one_transaction(study, store, lease, frozen, grace_s)
    if failed is None:  # Optuna's schema is not the one checked: its own call, which never rewrites a finished trial
        failed = _fail_stale_through_optuna(study, store, frozen)
    if not failed:
        return False
    log.warning("Trial %d FAIL: %s; its parameters run again (at most %d retries)", frozen.number, STALE_REASON,
                max_retries)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry=max_retries)(
            study, stored_trial(study, frozen)
        )
    return True


def _fail_stale_in_one_transaction(study, store: Store, lease: DriverLease, frozen,
                                   grace_s: Optional[float]) -> Optional[bool]:
    from optuna.trial import TrialState

    tables = optuna_tables()
    if tables is None:
        return None
    trials, beats = tables
    tid = trial_id(frozen)
    now_utc = utc_now()
    with store.write() as conn:
        if not lease.holds(conn):
            raise LeaseLost(f"study {study.study_name!r}: another start took the study's lease over")
        row = conn.execute(select(trials.c.state, trials.c.datetime_start).where(trials.c.trial_id == tid)).first()
        if row is None or row.state != TrialState.RUNNING:
            return False
        if grace_s is not None:
            beat = conn.execute(select(beats.c.heartbeat).where(beats.c.trial_id == tid)).scalar()
            age = (store.now(conn) - beat) if beat is not None else (now_utc - (row.datetime_start or now_utc))
            if age.total_seconds() <= grace_s:
                return False
        conn.execute(trials.update().where(trials.c.trial_id == tid, trials.c.state == TrialState.RUNNING)
                     .values(state=TrialState.FAIL, datetime_complete=now_utc))
        store.write_record(conn, study.study_name, _stale_record(frozen, now_utc))
    return True


def _fail_stale_through_optuna(study, store: Store, frozen) -> bool:
    if not fail_in_storage(study, frozen):
        return False
    store.record_trial(study.study_name, _stale_record(frozen, utc_now()))
    return True


def _stale_record(frozen, finished_at: dt.datetime) -> TrialRecord:
    started = frozen.datetime_start  # Optuna gives naive local time; our records keep naive UTC
    started_utc = started.astimezone(dt.timezone.utc).replace(tzinfo=None) if started is not None else None
    return dataclasses.replace(failed_record(frozen.number, STALE_REASON, started_utc), finished_at=finished_at)


def finished_count(study, store: Store) -> int:
    """Trials that ended COMPLETE, PRUNED or FAIL, leaving out those failed as stale (their re-runs count)."""
    records = store.trials(study.study_name)
    return sum(
        1 for t in study.get_trials(deepcopy=False)
        if t.state.is_finished()
        and not (t.number in records and (records[t.number].fail_reason or "").startswith("stale"))
    )
