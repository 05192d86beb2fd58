"""The driver: Ray start-up, the baseline, and the concurrent ask -> run -> tell loop over trials.

Optuna decides, Ray runs. Trials run on slots (sweep.slots): one Ray actor per
GPU (or per share of the CPU cores), each keeping its 4-bit base loaded across
trials unless `orchestration.resident_base` is off. Up to one trial per slot is
in flight; the driver waits on them with `ray.wait`, drains the mailbox the
workers report to (steps, losses, rung values), asks the pruner and answers,
and ends each trial through sweep.records (our record and Optuna's tell). Only
the start holding the study's lease (sweep.lease) writes the study; a thread
keeps the lease and the running trials' heartbeats fresh.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import logging
import os
import signal
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from evaluator.harness import write_choice_task
from evaluator.micro import write_micro_task
from evaluator.score import suite_values
from sweep.artifacts import open_store, upload_trial_artifacts
from sweep.config import SweepConfig, study_name_problem, to_dict, with_params
from sweep.faults import (
    DiskFull,
    SweepError,
    is_disk_full,
    reclaim_stop_signals,
    stop_signal,
    written_file,
)
from sweep.gpus import GpuError, GpuProfile
from sweep.lease import DriverLease, Heartbeat, LeaseLost
from sweep.note import update_study_note
from sweep.preflight import PreflightError, check_config, check_study
from sweep.progress import Display, Progress, RunningTrial
from sweep.records import end_trial, finished_count, recover_trials
from sweep.space import suggest
from sweep.store import MEASUREMENTS, Store, TrialRecord, utc_now
from sweep.study import best_trial, create_or_load_study, derived_seed, make_storage
from sweep.tracking import Trackers, wandb_mode
from sweep.worker import BaselineSpec, TrialResult, TrialSpec, failure_reason, out_of_memory_reason
from trainer.data import Example, heldout_docs, render, resolve_template, write_choice_docs
from trainer.demo_base import DEMO_MODEL_ID

log = logging.getLogger("sweep")

# Passed to every worker through Ray's runtime_env when set in the driver's environment.
_PASSED_ENV = (
    "HF_HOME", "HF_HUB_CACHE", "HF_DATASETS_CACHE", "HF_TOKEN", "HF_HUB_OFFLINE",
    "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE", "SWEEP_CACHE_DIR",
)


POLL_S = 0.25


@dataclass(frozen=True)
class _Run:
    """What every step of one `sweep start` shares (driver side only: holds live handles)."""

    config: SweepConfig
    study: Any
    store: Store
    work_dir: Path
    task_dir: str
    storage: Any
    """Optuna's storage, with heartbeats."""
    pool: Any
    """The trial slots (sweep.slots.SlotPool)."""
    mailbox: Any
    """The Ray actor running trials report to (sweep.slots.Mailbox)."""
    cpus_per_trial: int
    device: str
    profile: GpuProfile
    lease: DriverLease
    """This start's hold on the study: only its holder writes the study's trials."""
    running_ids: set
    """Optuna ids of the trials in flight, whose heartbeats the heartbeat thread records."""
    exclude_ngrams_file: Optional[str] = None
    """Evaluation n-grams that training examples must not share (data.drop_contaminated)."""
    artifact_store: Any = None
    """The study's Optuna artifact store (sweep.artifacts), where each trial's artifacts go as it ends."""
    trackers: Any = None
    """The experiment trackers each ended trial is logged to (sweep.tracking.Trackers)."""


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
    env_vars = _worker_env(config, _cpus_per_trial(config, profile))
    if tracking_mode is not None:
        env_vars["WANDB_MODE"] = tracking_mode
    start_ray(address, profile, env_vars=env_vars)
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
    cpus_per_trial = _cpus_per_trial(config, profile)
    work_dir = Path(orchestration.artifacts_dir).expanduser().resolve() / study_name
    concurrency = _concurrency(config, profile, cpus_per_trial)

    storage = make_storage(storage_url, orchestration.heartbeat_seconds, orchestration.max_retries)
    running_ids: set = set()

    def beat_trials() -> None:
        for trial_id in list(running_ids):
            storage.record_heartbeat(trial_id)

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
    pool = SlotPool(concurrency, _remote_options(profile, cpus_per_trial), orchestration.resident_base,
                    orchestration.memory_growth_margin_gib)
    run = _Run(
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
    log.info("%d slot(s), %d CPU core(s) each, %s base", concurrency, cpus_per_trial,
             "resident" if orchestration.resident_base else "reloaded per trial")
    try:
        run = dataclasses.replace(run, exclude_ngrams_file=check_contamination(config, run.task_dir, work_dir))
        baseline = run.store.baseline(study_name)
        missing = {t.name for t in config.evaluator.all_tasks()} - set(baseline["scores"] if baseline else ())
        failure = None
        if missing:  # first start, or the config gained tasks since the baseline was scored
            try:
                _run_baseline(run)
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
                        pick_untuned=_pick_is_untuned(study, store))


def _pick_is_untuned(study, store: Store) -> bool:
    from sweep.export import study_status

    try:
        return bool((study_status(study, store).get("pick") or {}).get("untuned"))
    except Exception as e:  # noqa: BLE001 - for the last line only: `sweep status` says it again
        log.warning("The pick could not be read (%s)", failure_reason(e))
        return False


def enqueue_trials(study, config: SweepConfig) -> int:
    """Puts the config's `enqueue` parameter sets in the study's queue, in order: the next trials run them.

    A set the study already holds (run, running or waiting) is not added again, so a resumed study does not
    repeat its recipes. Returns how many were added.
    """
    from sweep.config import coerce_value

    before = len(study.get_trials(deepcopy=False))
    for params in config.enqueue:
        study.enqueue_trial({k: coerce_value(v, config.search_space[k]) for k, v in params.items()},
                            skip_if_exists=True)
    added = len(study.get_trials(deepcopy=False)) - before
    if added:
        log.info("Enqueued %d trial(s) to run first (of %d parameter set(s))", added, len(config.enqueue))
    return added


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


def start_ray(address: Optional[str], profile: GpuProfile, env_vars: dict[str, str]) -> None:
    """Joins `address`, or starts a local Ray; checks that a GPU profile has GPUs to run on."""
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    # Ray runs its workers at niceness 15, so that they yield to its own services: on a machine with
    # any other load, a trial (the sweep's whole work) then gets a sliver of the CPU and runs many
    # times slower. A local Ray of ours runs them at the driver's priority (a cluster keeps its own).
    os.environ.setdefault("RAY_worker_niceness", "0")
    import ray

    from sweep import raynet

    if not ray.is_initialized():
        kwargs = dict(
            runtime_env={"env_vars": env_vars},
            include_dashboard=False,
            logging_level=logging.WARNING,
            log_to_driver=True,
        )
        try:
            if address and address != "local":
                # Probed first, Ray's waits bounded: an address that cannot be joined is one line within ~25 s.
                raynet.join(address, **kwargs)
            else:
                # On loopback, with a token of this process (sweep.raynet). A local Ray only offers GPUs a
                # GPU profile asked for: with the cpu profile, trials must not wait for a GPU slot.
                raynet.start_local(num_cpus=os.cpu_count(), num_gpus=None if profile.uses_gpu else 0, **kwargs)
        finally:
            reclaim_stop_signals()  # ray.init took SIGTERM over
    if profile.uses_gpu and ray.cluster_resources().get("GPU", 0) < 1:
        raise GpuError(f"--gpu {profile.name}: the Ray cluster has no GPU; use --gpu cpu")


def prepare_tasks(config: SweepConfig, work_dir: Path) -> Path:
    """Writes the local lm-eval tasks (and their held-out data) into the sweep's work area."""
    task_dir = work_dir / "tasks"
    sources = {s.name: s for s in config.data.sources}
    tokenizer = _prompt_tokenizer(config)
    template = resolve_template(tokenizer, config.data.template)

    def render_prompt(text: str) -> str:  # generated tasks are prompted as the model is trained
        return render(tokenizer, template, Example(text, ""))[0]

    for task in config.evaluator.all_tasks():
        source = sources.get(task.source) if task.source is not None else None
        if source is not None and source.generator != "digits":
            write_micro_task(task.name, source.generator, task_dir, docs=heldout_docs(source), render=render_prompt)
        elif source is not None:
            data_file = write_choice_docs(
                heldout_docs(source), work_dir / "data" / f"{task.name}.jsonl", config.data.template, tokenizer
            )
            write_choice_task(task.name, data_file, task_dir)
        elif task.data_file is not None:
            write_choice_task(task.name, task.data_file, task_dir)
        elif task.generator is not None:
            write_micro_task(task.name, task.generator, task_dir, n=task.num_docs, render=render_prompt)
    task_dir.mkdir(parents=True, exist_ok=True)
    return task_dir


def check_contamination(config: SweepConfig, task_dir: str, work_dir: Path) -> Optional[str]:
    """The contamination step of a sweep start: logs the overlaps and writes them to contamination.json.

    Returns the file of evaluation n-grams the workers drop examples by
    (with `data.drop_contaminated`), else None. A check that cannot run (an
    evaluation dataset out of reach) is a warning unless dropping was asked for.
    Hub sources that are an evaluation task's dataset are warned about first,
    n-gram check or not, and written to contamination-datasets.json.
    """
    from sweep.contamination import cached_overlap_report, shared_datasets

    try:
        shared = shared_datasets(config)
    except Exception as e:  # noqa: BLE001 - a report, like the n-gram one below
        log.warning("Dataset-level contamination check skipped: %s", failure_reason(e))
    else:
        (work_dir / "contamination-datasets.json").write_text(
            json.dumps([r.as_record() for r in shared], indent=2) + "\n")
        for r in shared:
            log.warning("Contamination: %s", r.describe())
    try:
        rows, grams_file = cached_overlap_report(config, task_dir, work_dir / "contamination")
    except Exception as e:  # noqa: BLE001 - the report must not stop a sweep that does not drop examples
        if config.data.drop_contaminated:
            raise SweepError(f"contamination check failed: {failure_reason(e)}") from None
        log.warning("Contamination check skipped: %s", failure_reason(e))
        return None
    (work_dir / "contamination.json").write_text(json.dumps([r.__dict__ for r in rows], indent=2) + "\n")
    found = [r for r in rows if r.overlapping]
    for r in found:
        log.warning("Contamination: %d of %d examples of source %s share a 13-gram with task %s%s",
                    r.overlapping, r.source_examples, r.source, r.task,
                    " (dropped from training)" if config.data.drop_contaminated else "")
    if not found:
        log.info("Contamination check: no training example shares a 13-gram with an evaluation task")
    return str(grams_file) if config.data.drop_contaminated else None


def _prompt_tokenizer(config: SweepConfig):
    """The base tokenizer when prompts depend on it (template `auto`: its chat template, if any)."""
    if config.data.template != "auto":
        return None
    from trainer.model import load_tokenizer

    return load_tokenizer(config.model)


def _run_baseline(run: _Run) -> None:
    """Scores the untuned base on slot 0 (whose base then stays loaded) and records it in our table.

    Never as a trial: it must not feed the sampler.
    """
    import ray

    config = run.config
    log.info("Scoring the untuned base model %s (the baseline)", config.model.name_or_path)
    spec = BaselineSpec(
        model=config.model, eval=config.evaluator, task_dir=run.task_dir, num_threads=run.cpus_per_trial,
        log_file=str(run.work_dir / "baseline.log"), device=run.device,
        memory_cap_gib=_memory_cap(run.profile, config.orchestration.gpu_memory_cap_gib),
        host_memory_limit_gib=_host_memory_limit(run), mode=config.trainer.mode,
    )
    try:
        result = ray.get(run.pool.actors[0].baseline.remote(spec))
    except ray.exceptions.RayError as e:
        run.pool.check(0)
        why = out_of_memory_reason(spec.log_file) or failure_reason(e)
        raise SweepError(f"scoring the base model failed: {why} (log: {spec.log_file})") from None
    _log_base_load(config, result.base_load_seconds, 0)
    values = suite_values(result.scores, config.evaluator, baseline=result.scores)
    value = values[config.evaluator.objective_suite]
    run.store.record_baseline(
        run.study.study_name, config.model.name_or_path, value, result.scores, result.eval_seconds, values,
        stderrs=result.stderrs, num_docs=result.num_docs,
    )
    # How the base was scored: an export of the untuned base (when it is the pick) loads it the same way.
    run.study.set_user_attr("baseline_base", {"model": to_dict(config.model), "mode": config.trainer.mode})
    log.info("Baseline: %s scores=%s", _fmt(values), _fmt(result.scores))
    if run.trackers is not None:
        run.trackers.baseline(config.model.name_or_path, result.scores, values, result.stderrs)


def _log_base_load(config: SweepConfig, seconds: Optional[float], slot: int, base: Optional[dict] = None) -> None:
    """The slot's base load (or swap, when the trial needed another format than the resident one) in the log."""
    if seconds is None:
        return
    from trainer.model import base_label

    form = f" ({base_label(base)})" if base else ""
    if base and base.get("swapped_from"):
        log.info("Slot %d swapped its base: %s -> %s, in %.1fs", slot, base["swapped_from"], base_label(base), seconds)
    else:
        log.info("Loaded base %s%s in %.1fs (slot %d)", config.model.name_or_path, form, seconds, slot)


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


class Budget:
    """`budget_hours` (slot-hours: GPU-hours on a GPU profile) and `timeout_seconds` of one start.

    A trial starts only when the time it is expected to take (the mean of the
    finished full-length trials, else of any finished ones) fits in what is
    left, after what the running trials are still expected to use.
    """

    def __init__(self, hours: Optional[float], timeout_seconds: Optional[float], unit: str):
        self.hours = hours
        self.timeout_seconds = timeout_seconds
        self.unit = unit
        self.started = time.monotonic()
        self.complete_seconds: list[float] = []
        self.other_seconds: list[float] = []

    def finished(self, seconds: float, complete: bool) -> None:
        (self.complete_seconds if complete else self.other_seconds).append(seconds)

    def trial_seconds(self) -> Optional[float]:
        durations = self.complete_seconds or self.other_seconds
        return sum(durations) / len(durations) if durations else None

    def blocks(self, used_hours: float, running_seconds: list[float]) -> Optional[str]:
        """Why no trial may start now, or None."""
        estimate = self.trial_seconds()
        about = f"; a trial takes about {estimate:.0f}s" if estimate is not None else ""
        if self.timeout_seconds is not None:
            left = self.timeout_seconds - (time.monotonic() - self.started)
            if left <= 0 or (estimate is not None and estimate > left):
                return f"timeout of {self.timeout_seconds:g}s: {max(left, 0):.0f}s left{about}"
        if self.hours is not None:
            still = sum(max(0.0, estimate - s) for s in running_seconds) if estimate is not None else 0.0
            projected = used_hours + (still + (estimate or 0.0)) / 3600
            if used_hours >= self.hours or projected > self.hours:
                return f"budget of {self.hours:g} {self.unit}: {used_hours:.4f} used{about}"
        return None


class _Driver:
    """The loop of one start: keeps every slot busy, serves the mailbox, records each trial's end."""

    def __init__(self, run: _Run, n_trials: int, failure: Optional[str] = None):
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
        run.storage.record_heartbeat(trial._trial_id)
        run.running_ids.add(trial._trial_id)
        self.to_start -= 1
        flight = _Flight(trial=trial, slot=slot, spec=None, params={}, started_at=utc_now())
        run.store.start_trial(run.study.study_name, trial.number, run.lease.driver_id, flight.started_at)
        try:
            flight.params = suggest(trial, run.config.search_space)
            flight.spec = _trial_spec(run, trial.number, flight.params)
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
        log.info("Trial %d started on slot %d: %s", trial.number, slot, _fmt(flight.params))

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
            _log_base_load(run.config, result.base_load_seconds, flight.slot, result.base)
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
        run.running_ids.discard(flight.trial._trial_id)
        self._update_note()
        if run.trackers is not None and flight.spec is not None:
            run.trackers.trial(record, flight.params, flight.spec.hyperparameters, rungs, record.learning_rates or [],
                               run.config.evaluator.objective_suite)

    def _rungs(self, flight: _Flight) -> tuple:
        """The (step, value) the trial reported at its rungs, from Optuna's storage."""
        try:
            frozen = flight.trial.storage.get_trial(flight.trial._trial_id)
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
        self._end(flight, TrialRecord(
            trial_number=trial.number, state="FAIL", adapter_dir=None, scores={}, fail_reason=reason,
            started_at=flight.started_at, finished_at=utc_now(), feasible=feasible,
        ))
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
        self._end(flight, TrialRecord(
            trial_number=trial.number, state="PRUNED", adapter_dir=None, scores={},
            started_at=flight.started_at, finished_at=utc_now(),
            **{name: getattr(result, name) for name in MEASUREMENTS},
        ))
        self.progress.pruned += 1
        log.info("Trial %d PRUNED at step %d: intermediate %s params=%s train=%.1fs", trial.number,
                 result.train_steps, [(s, round(v, 4)) for s, v in result.intermediate], _fmt(flight.params),
                 result.train_seconds)
        self.display.event()

    def _record_complete(self, flight: _Flight, result: TrialResult) -> None:
        run, trial = self.run_, flight.trial
        config, study, store = run.config, run.study, run.store
        baseline = store.baseline(study.study_name)
        values = suite_values(result.scores, config.evaluator, baseline["scores"] if baseline else None)
        value = values[config.evaluator.objective_suite]
        constraints = feasibility(result, config.study.full_run_hours_limit)
        feasible = all(v <= 0 for v in constraints.values())
        self._end(flight, TrialRecord(
            trial_number=trial.number, state="COMPLETE", adapter_dir=result.adapter_dir, scores=result.scores,
            values=values, value=value, constraints=constraints, started_at=flight.started_at, finished_at=utc_now(),
            feasible=feasible, **{name: getattr(result, name) for name in MEASUREMENTS},
        ), metrics={t.name: t.metric for t in config.evaluator.all_tasks()})
        best = best_trial(study)
        self.progress.complete += 1
        self.progress.best = (best.number, best.value) if best else None
        hours = result.projected_full_run_hours
        log.info(
            "Trial %d COMPLETE: %s params=%s train=%.1fs (%.0f tok/s%s) eval=%.1fs full run %s%s; "
            "best is trial %s",
            trial.number, _fmt(values), _fmt(flight.params), result.train_seconds, result.tokens_per_second,
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


def feasibility(result: TrialResult, hours_limit: float) -> dict[str, float]:
    """Optuna constraints of a finished trial (<= 0 means satisfied).

    `full_run_hours_over_limit`: projected hours of the full run on the target
    GPU minus the limit. `memory_over_cap_gib`: peak GPU memory minus the
    profile's cap (only where both are known).
    """
    constraints = {}
    if result.projected_full_run_hours is not None:
        constraints["full_run_hours_over_limit"] = min(result.projected_full_run_hours, 1e9) - hours_limit
    if result.peak_memory_gib is not None and result.memory_cap_gib is not None:
        constraints["memory_over_cap_gib"] = result.peak_memory_gib - result.memory_cap_gib
    return constraints


def _trial_spec(run: _Run, number: int, params: dict) -> TrialSpec:
    """The plain-data description of a trial that travels to its worker."""
    config, study_name = run.config, run.study.study_name
    trial_dir = run.work_dir / "trials" / f"{number:04d}"
    trial_config = with_params(config, params)
    seed = config.study.trial_seed
    if seed is None:
        seed = derived_seed(config.study.seed, number)
    return TrialSpec(
        study_name=study_name,
        trial_number=number,
        seed=seed,
        params=params,
        model=trial_config.model,
        data=trial_config.data,
        train=trial_config.trainer,
        eval=config.evaluator,
        task_dir=run.task_dir,
        adapter_dir=str(trial_dir / "adapter"),
        log_file=str(trial_dir / "worker.log"),
        # The resolved config of this trial (searched values in place) and where it came from.
        hyperparameters={
            **to_dict(trial_config),
            "trial": {"study": study_name, "number": number, "seed": seed, "params": params},
        },
        num_threads=run.cpus_per_trial,
        device=run.device,
        memory_cap_gib=_memory_cap(run.profile, config.orchestration.gpu_memory_cap_gib),
        host_memory_limit_gib=_host_memory_limit(run),
        exclude_ngrams_file=run.exclude_ngrams_file,
        target_tflops=run.profile.bf16_tflops,
        rungs=tuple(config.study.rungs) if config.study.pruner != "none" else (),
        rung_eval_docs=config.study.rung_eval_docs,
        baseline_scores=baseline["scores"] if (baseline := run.store.baseline(study_name)) else None,
    )


def _host_memory_limit(run: _Run) -> Optional[float]:
    """The host memory a trial or the baseline may use (on every profile): the config's limit, else the slot's
    share of the memory available when the start began (sweep.slots); None: no limit."""
    limit = run.config.orchestration.cpu_memory_limit_gib
    return limit if limit is not None else run.pool.share_gib


def _memory_cap(profile: GpuProfile, override: Optional[float]) -> Optional[float]:
    """The GPU memory a trial may use: the profile's cap, lowered by the config's."""
    if override is None:
        return profile.memory_cap_gib
    return override if profile.memory_cap_gib is None else min(override, profile.memory_cap_gib)


def _remote_options(profile: GpuProfile, cpus_per_trial: int) -> dict:
    return {"num_cpus": cpus_per_trial, "num_gpus": 1 if profile.uses_gpu else 0}


def _concurrency(config: SweepConfig, profile: GpuProfile, cpus_per_trial: int) -> int:
    """Slots: `orchestration.concurrency`, else every GPU of the Ray cluster (1 on the cpu profile).

    Never more than the cluster holds: a slot Ray cannot place would take trials and never run them.
    """
    import ray

    resources = ray.cluster_resources()
    if profile.uses_gpu:
        room = int(resources.get("GPU", 0))
    else:
        room = int(resources.get("CPU", 1) // cpus_per_trial)
    wanted = config.orchestration.concurrency or (room if profile.uses_gpu else 1)
    if wanted > room:
        log.warning("Concurrency %d: the Ray cluster holds %d slot(s) of %s; running %d", wanted, room,
                    "1 GPU" if profile.uses_gpu else f"{cpus_per_trial} CPU(s)", max(room, 1))
    return max(1, min(wanted, room))


def _cpus_per_trial(config: SweepConfig, profile: GpuProfile) -> int:
    """Cores per trial: the configured number, else 4 on a GPU; on cpu the cores split between the slots."""
    if config.orchestration.cpus_per_trial:
        return config.orchestration.cpus_per_trial
    cores = os.cpu_count() or 1
    return max(1, cores // (config.orchestration.concurrency or 1)) if not profile.uses_gpu else min(4, cores)


def _worker_env(config: SweepConfig, cpus_per_trial: int) -> dict[str, str]:
    env = {k: os.environ[k] for k in _PASSED_ENV if k in os.environ}
    env.update({
        "OMP_NUM_THREADS": str(cpus_per_trial),
        "MKL_NUM_THREADS": str(cpus_per_trial),
        "TOKENIZERS_PARALLELISM": "false",
        "TRANSFORMERS_VERBOSITY": "error",
        "HF_HUB_DISABLE_PROGRESS_BARS": "1",
        "TQDM_DISABLE": "1",
        "PYTHONWARNINGS": "ignore::FutureWarning,ignore::DeprecationWarning",
    })
    if _is_offline(config):
        env.update({"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"})
    return env


def _is_offline(config: SweepConfig) -> bool:
    """A sweep that needs nothing from the hub runs with the offline flags on."""
    return (
        config.model.name_or_path == DEMO_MODEL_ID
        and all(t.is_local for t in config.evaluator.all_tasks())
        and all(s.kind != "hub" for s in config.data.sources)
    )


def _fmt(values: dict) -> str:
    parts = []
    for k, v in values.items():
        parts.append(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}")
    return "{" + ", ".join(parts) + "}"


