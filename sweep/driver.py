"""The driver: one `sweep start`, from its checks to its last trial, and the concurrent ask -> run -> tell loop.

Optuna decides, Ray runs. Trials run on slots (sweep.slots): one Ray actor per
GPU (or per share of the CPU cores), each keeping its 4-bit base loaded across
trials unless `orchestration.resident_base` is off. Up to one trial per slot is
in flight; the driver waits on them with `ray.wait`, drains the mailbox the
workers report to (steps, losses, rung values), asks the pruner and answers,
and ends each trial through sweep.records (our record and Optuna's tell). Only
the start holding the study's lease (sweep.lease) writes the study; a thread
keeps the lease and the running trials' heartbeats fresh.

The rest of a start has a module each: sweep.cluster (Ray, and what each slot
gets), sweep.tasks (the evaluation tasks and the contamination step),
sweep.baseline (the untuned base's scores), sweep.context (what a start shares
and the specs sent to workers), sweep.budget (its limits).
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import logging
import os
import signal
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from sweep import cluster
from sweep.artifacts import open_store, upload_trial_artifacts
from sweep.baseline import log_base_load, run_baseline
from sweep.budget import Budget
from sweep.compat import stored_trial, trial_id
from sweep.config import SweepConfig, study_name_problem
from sweep.context import Run, trial_spec
from sweep.faults import DiskFull, SweepError, is_disk_full, stop_signal, written_file
from sweep.gpus import GpuError, GpuProfile
from sweep.lease import DriverLease, Heartbeat, LeaseLost
from sweep.note import update_study_note
from sweep.preflight import PreflightError, check_config, check_study
from sweep.progress import Display, Progress, RunningTrial, fmt_values
from sweep.records import complete_record, end_trial, failed_record, finished_count, pruned_record, recover_trials
from sweep.space import suggest
from sweep.store import Store, TrialRecord, utc_now
from sweep.study import best_trial, create_or_load_study, enqueue_trials, make_storage
from sweep.tasks import check_contamination, prepare_tasks
from sweep.tracking import Trackers, wandb_mode
from sweep.worker import TrialResult, TrialSpec, failure_reason, out_of_memory_reason

log = logging.getLogger("sweep")

POLL_S = 0.25


@dataclass(frozen=True)
class SweepOutcome:
    """How a start ended: its own trials, the study's best, and why it stopped early (if it did)."""

    study_name: str
    trial_numbers: list[int]
    """The trials this start ran."""
    best_number: Optional[int]
    best_value: Optional[float]
    failed: int = 0
    """Trials of this start that ended FAIL."""
    failure: Optional[str] = None
    """Why this start failed: the baseline could not be scored, or the same failure ended trial after trial;
    None when it did not."""
    last_failure: Optional[str] = None
    """The reason of this start's last FAIL."""
    pick_untuned: bool = False
    """The study's pick is the untuned base (`sweep.export.pick_submission`): no trial beat it."""
    hours_used: Optional[float] = None
    """Slot-hours (GPU-hours on a GPU profile) this start's trials took, as its budget counted them (the
    baseline not included)."""

    @property
    def all_failed(self) -> bool:
        return bool(self.trial_numbers) and self.failed == len(self.trial_numbers)


def run_sweep(
    config: SweepConfig,
    *,
    storage_url: str,
    study_name: str,
    n_trials: int,
    profile: GpuProfile,
    address: Optional[str] = None,
) -> SweepOutcome:
    """Runs `n_trials` more trials of the study, recording each in the storage.

    The start first takes the study's lease (sweep.lease): while another live
    start holds it, this one stops at once (`LeaseHeld`). Trials left RUNNING
    by a start that died are reconciled (sweep.records): ended ones are told,
    the others failed as stale and their parameters run again; when that start
    had not reached its count, this one goes on to reach it instead of adding
    `n_trials`. A full disk stops the start with `DiskFull`.
    """
    try:
        return _run_sweep(config, storage_url, study_name, n_trials, profile, address)
    except (SweepError, GpuError, KeyboardInterrupt):
        raise
    except Exception as e:
        if is_disk_full(e):
            raise DiskFull(_disk_full_target(e, storage_url)) from e
        raise


def _run_sweep(config: SweepConfig, storage_url: str, study_name: str, n_trials: int, profile: GpuProfile,
               address: Optional[str]) -> SweepOutcome:
    orchestration = config.orchestration
    problem = study_name_problem(study_name)
    if problem:
        raise PreflightError(f"--study {study_name!r}: {problem}")
    # What can be known before any trial runs, checked before anything is written.
    check_study(config, storage_url, study_name)
    check_config(config, profile)
    # The driver decides W&B's mode (offline without credentials or network); the workers get it too.
    tracking_mode = wandb_mode() if "wandb" in orchestration.tracking else None
    # Ray next: an address that cannot be joined (or a cluster without a GPU) stops the start unwritten too.
    env_vars = cluster.worker_env(config, cluster.cpus_per_trial(config, profile))
    if tracking_mode is not None:
        env_vars["WANDB_MODE"] = tracking_mode
    cluster.start_ray(address, profile, env_vars=env_vars)
    log.info("Study %r: %d trial(s) on profile %s, storage %s, %s", study_name, n_trials, profile.name,
             storage_url, f"Ray cluster {address}" if address else "local Ray")
    store = Store(storage_url)
    lease = DriverLease.acquire(store, study_name, orchestration.heartbeat_seconds)
    ending, resumable = "failed", True
    try:
        with Heartbeat(lease, orchestration.heartbeat_seconds) as heartbeat:
            outcome = _run_holding_lease(config, store, lease, heartbeat, storage_url, study_name, n_trials, profile,
                                         address, tracking_mode)
        ending, resumable = "finished", False
        return outcome
    except KeyboardInterrupt as e:  # stopped on purpose: the next start adds its own trials
        ending, resumable = _stop_reason(e), False
        raise
    except BaseException as e:
        ending = "no space left on device" if is_disk_full(e) else f"failed: {failure_reason(e)}"
        raise
    finally:
        try:
            lease.release(ending, resumable=resumable)
        except Exception as e:  # noqa: BLE001 - a full disk, say: the next start takes the lease over
            log.warning("The study's lease could not be released (%s); the next start takes it over",
                        failure_reason(e))


def _run_holding_lease(config: SweepConfig, store: Store, lease: DriverLease, heartbeat: Heartbeat,
                       storage_url: str, study_name: str, n_trials: int, profile: GpuProfile,
                       address: Optional[str], tracking_mode: Optional[str] = None) -> SweepOutcome:
    import optuna
    import ray

    from sweep.slots import Mailbox, SlotPool

    orchestration = config.orchestration
    cpus_per_trial = cluster.cpus_per_trial(config, profile)
    work_dir = Path(orchestration.artifacts_dir).expanduser().resolve() / study_name
    slots = cluster.concurrency(config, profile, cpus_per_trial)

    storage = make_storage(storage_url, orchestration.heartbeat_seconds, orchestration.max_retries)
    running_ids: set = set()

    def beat_trials() -> None:
        for running_id in list(running_ids):
            storage.record_heartbeat(running_id)

    heartbeat.beat_trials = beat_trials
    study = create_or_load_study(config, storage, study_name)
    # How `sweep status` picks the submission; the latest start's settings apply.
    evaluator = config.evaluator
    study.set_user_attr("suites", list(evaluator.suite_tasks()))
    study.set_user_attr("optimize", evaluator.objective_suite)
    study.set_user_attr("pick_by", evaluator.pick_by)
    study.set_user_attr("top_k", evaluator.top_k)
    study.set_user_attr("budget_hours", orchestration.budget_hours)  # this start's; `sweep report` plots it
    study.set_user_attr("hours_unit", "GPU-hours" if profile.uses_gpu else "slot-hours")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        study.set_metric_names([evaluator.objective_suite])  # the dashboard names the objective after its suite
    recover_trials(study, store, lease, orchestration.heartbeat_seconds, orchestration.max_retries)
    enqueue_trials(study, config)
    n_trials = _trials_to_run(study, store, lease, n_trials)
    task_dir = str(prepare_tasks(config, work_dir))
    pool = SlotPool(slots, cluster.remote_options(profile, cpus_per_trial), orchestration.resident_base,
                    orchestration.memory_growth_margin_gib)
    run = Run(
        config=config,
        study=study,
        store=store,
        work_dir=work_dir,
        task_dir=task_dir,
        storage=storage,
        pool=pool,
        mailbox=ray.remote(Mailbox).options(num_cpus=0).remote(),
        cpus_per_trial=cpus_per_trial,
        device="cuda" if profile.uses_gpu else "cpu",
        profile=profile,
        lease=lease,
        running_ids=running_ids,
        artifact_store=open_store(work_dir, study),
        trackers=Trackers(orchestration.tracking, work_dir, study_name, wandb_mode=tracking_mode),
    )
    log.info("%d slot(s), %d CPU core(s) each, %s base", slots, cpus_per_trial,
             "resident" if orchestration.resident_base else "reloaded per trial")
    try:
        run = dataclasses.replace(run, exclude_ngrams_file=check_contamination(config, run.task_dir, work_dir))
        baseline = run.store.baseline(study_name)
        missing = {t.name for t in config.evaluator.all_tasks()} - set(baseline["scores"] if baseline else ())
        failure = None
        if missing:  # first start, or the config gained tasks since the baseline was scored
            try:
                run_baseline(run)
            except SweepError as e:
                # Every trial loads and scores the same base: none would succeed. The next start retries.
                log.error("%s; starting no trial", e)
                failure = str(e)
        driver = _Driver(run, n_trials, failure=failure)
        numbers = driver.run()
    finally:
        pool.kill_all()
        ray.kill(run.mailbox)
    best = best_trial(study)
    return SweepOutcome(study_name, numbers, best.number if best else None, best.value if best else None,
                        failed=driver.progress.failed, failure=driver.failure, last_failure=driver.last_failure,
                        pick_untuned=_pick_is_untuned(study, store), hours_used=driver.progress.hours_used())


def _pick_is_untuned(study, store: Store) -> bool:
    from sweep.export import study_status

    try:
        return bool((study_status(study, store).get("pick") or {}).get("untuned"))
    except Exception as e:  # noqa: BLE001 - for the last line only: `sweep status` says it again
        log.warning("The pick could not be read (%s)", failure_reason(e))
        return False


def _trials_to_run(study, store: Store, lease: DriverLease, n_trials: int) -> int:
    """`n_trials`, or what the start this one takes over from (it died, or stopped on a full disk) had left."""
    done = finished_count(study, store)
    previous = lease.previous
    if previous is not None and previous.target is not None and previous.target > done:
        n_trials = previous.target - done
        log.info("Resuming the interrupted start: %d more trial(s) to reach %d", n_trials, previous.target)
    lease.set_target(done + n_trials)
    return n_trials


def _disk_full_target(error: BaseException, storage_url: str) -> str:
    """What a write that found no room was writing: the file it names, else the study database."""
    from sqlalchemy.exc import SQLAlchemyError

    named = written_file(error)
    if named:
        return named
    if any(isinstance(e, SQLAlchemyError) for e in (error, error.__cause__, error.__context__)):
        return f"the study database ({storage_url})"
    return "the sweep's files"


@dataclass
class _Flight:
    """A trial in flight (driver side)."""

    trial: Any
    """Optuna's live `Trial`: only the driver holds it."""
    slot: int
    spec: TrialSpec
    params: dict
    started_at: dt.datetime
    started: float = field(default_factory=time.monotonic)


class _Driver:
    """The loop of one start: keeps every slot busy, serves the mailbox, records each trial's end."""

    def __init__(self, run: Run, n_trials: int, failure: Optional[str] = None):
        """`failure`: why this start already failed (the baseline): it starts no trial."""
        orchestration = run.config.orchestration
        self.run_ = run
        self.to_start = 0 if failure else n_trials
        self.flights: dict[Any, _Flight] = {}
        self.free = list(range(len(run.pool.actors)))
        self.numbers: list[int] = []
        unit = "GPU-hours" if run.profile.uses_gpu else "slot-hours"
        self.progress = Progress(run.study.study_name, self.to_start, unit, orchestration.budget_hours)
        self.budget = Budget(orchestration.budget_hours, orchestration.timeout_seconds, unit)
        self.display: Optional[Display] = None
        best = best_trial(run.study)  # a resumed study shows its best from the start
        self.progress.best = (best.number, best.value) if best else None
        self.max_failures = orchestration.max_consecutive_failures
        self.failure_streak: list[str] = []
        """The reasons of the trials that failed since the last one that did not, in the order they ended."""
        self.failure = failure
        self.last_failure: Optional[str] = None
        from sweep.preflight import base_formats

        self.formats = len(base_formats(run.config))
        """Base formats (mode and quantization) the search space allows: with several, a trial whose format runs
        out of GPU memory is infeasible, not a failure of the start."""

    def run(self) -> list[int]:
        import ray

        with Display(self.progress) as self.display, warnings.catch_warnings():
            # Optuna warns that heartbeats are meant for Study.optimize; this driver records them itself.
            warnings.filterwarnings("ignore", message="Heartbeat of storage")
            self._update_note()
            try:
                while True:
                    self._start_what_fits()
                    if not self.flights:
                        break
                    ready, _ = ray.wait(list(self.flights), num_returns=len(self.flights), timeout=POLL_S)
                    self._serve_mailbox()
                    self._check_lease()
                    self._enforce_timeouts()
                    for ref in ready:
                        if ref in self.flights:
                            self._finish(ref, self.flights.pop(ref))
                    self.display.update()
            except KeyboardInterrupt as e:
                for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
                    signal.signal(sig, _exit_now)  # a second Ctrl-C (or signal) exits at once
                self._stop_running(_stop_reason(e))
                raise
            except BaseException as e:
                if is_disk_full(e):
                    self._stop_running("stopped: no space left on device")
                raise
        return self.numbers

    # --- starting ---

    def _start_what_fits(self) -> None:
        now = time.monotonic()
        while self.free and self.to_start > 0:
            why = self.budget.blocks(self.progress.hours_used(), [now - f.started for f in self.flights.values()])
            if why is not None:
                log.info("Starting no more trials (%d not started): %s", self.to_start, why)
                self.to_start = 0
                return
            self._start(self.free.pop(0))

    def _start(self, slot: int) -> None:
        from sweep.slots import MailboxReporter

        run = self.run_
        self._check_lease(fresh=True)  # a start that lost the study must not add trials to it
        trial = run.study.ask()
        run.storage.record_heartbeat(trial_id(trial))
        run.running_ids.add(trial_id(trial))
        self.to_start -= 1
        flight = _Flight(trial=trial, slot=slot, spec=None, params={}, started_at=utc_now())
        run.store.start_trial(run.study.study_name, trial.number, run.lease.driver_id, flight.started_at)
        try:
            flight.params = suggest(trial, run.config.search_space)
            flight.spec = trial_spec(run, trial.number, flight.params)
            ref = run.pool.actors[slot].run.remote(flight.spec, MailboxReporter(run.mailbox))
        except Exception as e:  # noqa: BLE001 - a trial that cannot even start still ends FAIL
            self._fail(flight, failure_reason(e))
            self.free.append(slot)
            self.numbers.append(trial.number)
            return
        self.flights[ref] = flight
        self.progress.running[trial.number] = RunningTrial(
            trial.number, slot, flight.params, total_steps=run.config.trainer.max_steps
        )
        log.info("Trial %d started on slot %d: %s", trial.number, slot, fmt_values(flight.params))

    # --- while trials run ---

    def _serve_mailbox(self) -> None:
        import ray

        by_number = {f.trial.number: f for f in self.flights.values()}
        for report in ray.get(self.run_.mailbox.drain.remote()):
            kind, number, step = report[:3]
            if kind == "step":
                self.progress.on_step(number, step, report[3], report[4])
                continue
            value = report[3]
            flight = by_number.get(number)
            prune = False
            if flight is not None:
                flight.trial.report(value, step)
                prune = flight.trial.should_prune()
            self.run_.mailbox.decide.remote(number, step, prune)
            log.info("Trial %d at step %d: %.4g%s", number, step, value, " -> pruned" if prune else "")

    def _check_lease(self, fresh: bool = False) -> None:
        """Stops this driver, writing nothing more, once another start has taken the study's lease over.

        `fresh`: read the lease now, rather than trust the heartbeat thread's last look.
        """
        if (fresh and not self.run_.lease.still_held()) or self.run_.lease.lost.is_set():
            self.run_.pool.kill_all()
            raise LeaseLost(f"study {self.run_.study.study_name!r}: this start's lease lapsed (no heartbeat for "
                            "longer than its grace) and another start took the study over; this one stopped")

    def _enforce_timeouts(self) -> None:
        minutes = self.run_.config.orchestration.trial_timeout_minutes
        if not minutes:
            return
        for ref, f in list(self.flights.items()):
            if time.monotonic() - f.started > minutes * 60:
                del self.flights[ref]
                self.run_.pool.replace(f.slot, f"trial {f.trial.number} timed out")
                self._ended(f, complete=False)
                self._fail(f, f"timed out after {minutes:g} minutes")

    # --- ending ---

    def _finish(self, ref, flight: _Flight) -> None:
        import ray

        run = self.run_
        try:
            result = ray.get(ref)
        except ray.exceptions.RayError as e:
            self._ended(flight, complete=False)
            if is_disk_full(e):  # every later trial would fail the same way: stop the start
                what = written_file(e) or f"the files of trial {flight.trial.number} under {run.work_dir}"
                self._fail(flight, f"no space left on device while writing {what}")
                raise DiskFull(what) from None
            # A slot that passed its host-memory limit killed itself: its watchdog left the reason by its log.
            from trainer.train import TrainingOutOfMemory

            reason = out_of_memory_reason(flight.spec.log_file) or failure_reason(e)
            if isinstance(getattr(e, "cause", None), TrainingOutOfMemory) and self.formats > 1:
                # The setting does not fit the profile's memory cap (a 16-bit base with long rows, say): the trial
                # is infeasible, and where the space holds other base formats that is no reason to stop the start.
                self._fail(flight, f"infeasible: {reason}", streak=False, feasible=False)
            else:
                self._fail(flight, reason)
        else:
            self._ended(flight, complete=not result.pruned)
            self.failure_streak.clear()
            log_base_load(run.config, result.base_load_seconds, flight.slot, result.base)
            if result.pruned:
                self._record_pruned(flight, result)
            else:
                self._record_complete(flight, result)
        run.pool.check(flight.slot)

    def _ended(self, flight: _Flight, complete: bool) -> None:
        seconds = time.monotonic() - flight.started
        self.progress.running.pop(flight.trial.number, None)
        self.progress.finished_hours += seconds / 3600
        self.budget.finished(seconds, complete)
        self.free.append(flight.slot)
        self.numbers.append(flight.trial.number)

    def _end(self, flight: _Flight, record: TrialRecord, metrics: Optional[dict[str, str]] = None) -> None:
        """The one place a trial of this driver ends: our record and Optuna's tell (sweep.records)."""
        run = self.run_
        if run.lease.lost.is_set():
            raise LeaseLost(f"study {run.study.study_name!r}: this start's lease was taken over; trial "
                            f"{flight.trial.number} not recorded")
        rungs = self._rungs(flight)
        self._save_artifacts(flight, record, rungs)
        end_trial(run.study, run.store, flight.trial, record, metrics)
        run.running_ids.discard(trial_id(flight.trial))
        self._update_note()
        if run.trackers is not None and flight.spec is not None:
            run.trackers.trial(record, flight.params, flight.spec.hyperparameters, rungs, record.learning_rates or [],
                               run.config.evaluator.objective_suite)

    def _rungs(self, flight: _Flight) -> tuple:
        """The (step, value) the trial reported at its rungs, from Optuna's storage."""
        try:
            frozen = stored_trial(self.run_.study, flight.trial)
        except Exception:  # noqa: BLE001 - for the artifacts and trackers only
            return ()
        return tuple(sorted(frozen.intermediate_values.items()))

    def _save_artifacts(self, flight: _Flight, record: TrialRecord, rungs: tuple) -> None:
        """The trial's loss curve, eval report, config and log into the artifact store (before Optuna's tell: a
        finished trial takes no artifacts). One that cannot be saved is a warning: the trial's end is recorded."""
        run = self.run_
        if run.artifact_store is None or flight.spec is None:
            return
        suites = {name: [t.name for t in tasks] for name, tasks in run.config.evaluator.suite_tasks().items()}
        try:
            upload_trial_artifacts(
                run.artifact_store, flight.trial, record, Path(flight.spec.log_file).parent,
                flight.spec.hyperparameters, flight.spec.log_file, suites, run.store.baseline(run.study.study_name),
                rungs=rungs,
            )
        except Exception as e:  # noqa: BLE001 - artifacts are for reading; the record is what must land
            log.warning("Trial %d: its artifacts were not saved (%s)", record.trial_number, failure_reason(e))

    def _update_note(self) -> None:
        """The study's note on the dashboard (sweep.note), kept current as trials end."""
        try:
            update_study_note(self.run_.study, self.run_.store)
        except Exception as e:  # noqa: BLE001 - the note is for reading
            log.warning("The study's dashboard note was not updated (%s)", failure_reason(e))

    def _fail(self, flight: _Flight, reason: str, streak: bool = True, feasible: Optional[bool] = None) -> None:
        """Stores the trial FAIL; `streak`: a failure of the trial itself (not of the start stopping it);
        `feasible` False: it failed because its setting does not fit the profile."""
        trial = flight.trial
        self._end(flight, failed_record(trial.number, reason, flight.started_at, feasible=feasible))
        self.progress.failed += 1
        self.last_failure = reason
        log.warning("Trial %d FAIL: %s%s", trial.number, reason,
                    f" (worker log: {flight.spec.log_file})" if flight.spec is not None else "")
        if streak:
            self._count_failure(reason)
        self.display.event()

    def _count_failure(self, reason: str) -> None:
        """After `max_consecutive_failures` trials in a row failed for the same reason, no more trials start."""
        self.failure_streak.append(reason)
        if not self.max_failures or len(self.failure_streak) < self.max_failures or self.failure is not None:
            return
        recent = {_failure_kind(r) for r in self.failure_streak[-self.max_failures:]}
        if len(recent) == 1:
            self.failure = (f"{self.max_failures} trials in a row failed with: {reason} "
                            f"(orchestration.max_consecutive_failures)")
            if self.to_start:
                log.error("Starting no more trials (%d not started): %s", self.to_start, self.failure)
            self.to_start = 0

    def _record_pruned(self, flight: _Flight, result: TrialResult) -> None:
        trial = flight.trial
        self._end(flight, pruned_record(trial.number, result, flight.started_at))
        self.progress.pruned += 1
        log.info("Trial %d PRUNED at step %d: intermediate %s params=%s train=%.1fs", trial.number,
                 result.train_steps, [(s, round(v, 4)) for s, v in result.intermediate], fmt_values(flight.params),
                 result.train_seconds)
        self.display.event()

    def _record_complete(self, flight: _Flight, result: TrialResult) -> None:
        run, trial = self.run_, flight.trial
        config, study = run.config, run.study
        baseline = run.store.baseline(study.study_name)
        record = complete_record(trial.number, result, config.evaluator, baseline["scores"] if baseline else None,
                                 config.study.full_run_hours_limit, flight.started_at)
        self._end(flight, record, metrics={t.name: t.metric for t in config.evaluator.all_tasks()})
        values, feasible = record.values, record.feasible
        best = best_trial(study)
        self.progress.complete += 1
        self.progress.best = (best.number, best.value) if best else None
        hours = result.projected_full_run_hours
        log.info(
            "Trial %d COMPLETE: %s params=%s train=%.1fs (%.0f tok/s%s) eval=%.1fs full run %s%s; "
            "best is trial %s",
            trial.number, fmt_values(values), fmt_values(flight.params), result.train_seconds, result.tokens_per_second,
            f", {result.peak_memory_gib:.2f} GiB" if result.peak_memory_gib is not None else "",
            result.eval_seconds, _duration(hours),
            "" if feasible else " (INFEASIBLE)",
            f"{best.number} ({best.value:.4f})" if best else "none feasible yet",
        )
        self.display.event()

    def _stop_running(self, reason: str) -> None:
        """Ctrl-C, SIGTERM or a full disk: every running trial is stopped (its slot's actor killed) and stored FAIL.

        A trial whose FAIL cannot be written (the database's disk is full) stays RUNNING: the next start
        fails it as stale and runs its parameters again.
        """
        if self.flights:
            log.warning("Stopping %d running trial(s): %s%s", len(self.flights), reason,
                        " (Ctrl-C again exits at once)" if reason == "interrupted" else "")
        self.run_.pool.kill_all()
        flights, self.flights = list(self.flights.values()), {}
        for f in flights:
            self._ended(f, complete=False)
            try:
                self._fail(f, reason, streak=False)
            except Exception as e:  # noqa: BLE001
                if not is_disk_full(e):
                    raise
                log.warning("Trial %d left RUNNING (no room to record it): the next start recovers it",
                            f.trial.number)


def _failure_kind(reason: str) -> str:
    """A failure reason with its numbers blanked: `out of memory: tried to allocate 2.1 GiB` is one kind."""
    import re

    return re.sub(r"\d+(\.\d+)?", "#", reason)


def _stop_reason(interrupt: KeyboardInterrupt) -> str:
    return "interrupted" if stop_signal(interrupt) == signal.SIGINT else "terminated"


def _exit_now(signum, frame) -> None:  # noqa: ARG001
    os._exit(128 + signum)


def _duration(hours: Optional[float]) -> str:
    if hours is None:
        return "n/a"
    return f"{hours * 60:.1f} min" if hours < 1 else f"{hours:.1f} h"

