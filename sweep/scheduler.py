"""The driver: Ray start-up, the baseline, and the ask -> run -> tell loop over trials.

Optuna decides, Ray runs: each trial is one Ray task. On a GPU each trial gets
a fresh worker process (`max_calls=1`), so no CUDA memory held by one trial's
4-bit model leaks into the next; on the CPU, workers are reused and a trial
skips the seconds of importing torch, transformers and lm-eval. Only this
process writes the database.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from evaluator.harness import write_choice_task
from evaluator.micro import write_micro_task
from evaluator.score import suite_values
from sweep.config import SweepConfig, to_dict, with_params
from sweep.gpus import GpuError, GpuProfile
from sweep.space import suggest
from sweep.store import MEASUREMENTS, Store, TrialRecord
from sweep.study import best_trial, create_or_load_study, derived_seed, make_storage
from sweep.worker import BaselineSpec, TrialResult, TrialSpec, failure_reason, run_baseline, run_trial
from trainer.data import heldout_docs, write_choice_docs
from trainer.demo_base import DEMO_MODEL_ID

log = logging.getLogger("sweep")

# Passed to every worker through Ray's runtime_env when set in the driver's environment.
_PASSED_ENV = (
    "HF_HOME", "HF_HUB_CACHE", "HF_DATASETS_CACHE", "HF_TOKEN", "HF_HUB_OFFLINE",
    "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE", "SWEEP_CACHE_DIR",
)


class SweepError(RuntimeError):
    """A step of the sweep failed (e.g. the base model could not be scored)."""


@dataclass(frozen=True)
class _Run:
    """What every step of one `sweep start` shares (driver side only: holds live handles)."""

    config: SweepConfig
    study: Any
    store: Store
    work_dir: Path
    task_dir: str
    trial_task: Any
    """`run_trial` as a Ray remote function with the trial's resources."""
    baseline_task: Any
    cpus_per_trial: int
    device: str
    profile: GpuProfile
    exclude_ngrams_file: Optional[str] = None
    """Evaluation n-grams that training examples must not share (data.drop_contaminated)."""


@dataclass(frozen=True)
class SweepOutcome:
    study_name: str
    trial_numbers: list[int]
    best_number: Optional[int]
    best_value: Optional[float]


def run_sweep(
    config: SweepConfig,
    *,
    storage_url: str,
    study_name: str,
    n_trials: int,
    profile: GpuProfile,
    address: Optional[str] = None,
) -> SweepOutcome:
    """Runs `n_trials` more trials of the study, recording each in the storage."""
    cpus_per_trial = _cpus_per_trial(config, profile)
    work_dir = Path(config.orchestration.artifacts_dir).expanduser().resolve() / study_name
    start_ray(address, profile, env_vars=_worker_env(config, cpus_per_trial))

    study = create_or_load_study(config, make_storage(storage_url), study_name)
    # How `sweep status` picks the submission; the latest start's settings apply.
    evaluator = config.evaluator
    study.set_user_attr("suites", list(evaluator.suite_tasks()))
    study.set_user_attr("optimize", evaluator.objective_suite)
    study.set_user_attr("pick_by", evaluator.pick_by)
    study.set_user_attr("top_k", evaluator.top_k)
    run = _Run(
        config=config,
        study=study,
        store=Store(storage_url),
        work_dir=work_dir,
        task_dir=str(prepare_tasks(config, work_dir)),
        **_ray_tasks(profile, cpus_per_trial),
        cpus_per_trial=cpus_per_trial,
        device="cuda" if profile.uses_gpu else "cpu",
        profile=profile,
    )
    run = dataclasses.replace(run, exclude_ngrams_file=check_contamination(config, run.task_dir, work_dir))
    baseline = run.store.baseline(study_name)
    missing = {t.name for t in config.evaluator.all_tasks()} - set(baseline["scores"] if baseline else ())
    if missing:  # first start, or the config gained tasks since the baseline was scored
        try:
            _run_baseline(run)
        except SweepError as e:
            # The trials will fail too and store why; the next start retries the baseline.
            log.warning("%s; going on without a baseline", e)

    numbers = [_run_one_trial(run) for _ in range(n_trials)]
    best = best_trial(study)
    return SweepOutcome(study_name, numbers, best.number if best else None, best.value if best else None)


def start_ray(address: Optional[str], profile: GpuProfile, env_vars: dict[str, str]) -> None:
    """Joins `address`, or starts a local Ray; checks that a GPU profile has GPUs to run on."""
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    import ray

    if not ray.is_initialized():
        kwargs = dict(
            runtime_env={"env_vars": env_vars},
            include_dashboard=False,
            logging_level=logging.WARNING,
            log_to_driver=True,
        )
        if address:
            ray.init(address=address, **kwargs)
        else:
            # A local Ray only offers GPUs a GPU profile asked for: with the cpu
            # profile, trials must not wait for a GPU slot.
            ray.init(num_cpus=os.cpu_count(), num_gpus=None if profile.uses_gpu else 0, **kwargs)
    if profile.uses_gpu and ray.cluster_resources().get("GPU", 0) < 1:
        raise GpuError(f"--gpu {profile.name}: the Ray cluster has no GPU; use --gpu cpu")


def prepare_tasks(config: SweepConfig, work_dir: Path) -> Path:
    """Writes the local lm-eval tasks (and their held-out data) into the sweep's work area."""
    task_dir = work_dir / "tasks"
    sources = {s.name: s for s in config.data.sources}
    for task in config.evaluator.all_tasks():
        if task.source is not None:
            data_file = write_choice_docs(
                heldout_docs(sources[task.source]), work_dir / "data" / f"{task.name}.jsonl",
                config.data.template, tokenizer=_prompt_tokenizer(config),
            )
            write_choice_task(task.name, data_file, task_dir)
        elif task.data_file is not None:
            write_choice_task(task.name, task.data_file, task_dir)
        elif task.generator is not None:
            write_micro_task(task.name, task.generator, task_dir, n=task.num_docs)
    task_dir.mkdir(parents=True, exist_ok=True)
    return task_dir


def check_contamination(config: SweepConfig, task_dir: str, work_dir: Path) -> Optional[str]:
    """The contamination step of a sweep start: logs the overlaps and writes them to contamination.json.

    Returns the file of evaluation n-grams the workers drop examples by
    (with `data.drop_contaminated`), else None. A check that cannot run (an
    evaluation dataset out of reach) is a warning unless dropping was asked for.
    """
    from sweep.contamination import cached_overlap_report

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
    """Scores the untuned base and records it in our table (never as a trial: it must not feed the sampler)."""
    import ray

    config = run.config
    log.info("Scoring the untuned base model %s (the baseline)", config.model.name_or_path)
    spec = BaselineSpec(
        model=config.model, eval=config.evaluator, task_dir=run.task_dir, num_threads=run.cpus_per_trial,
        log_file=str(run.work_dir / "baseline.log"), device=run.device,
        memory_cap_gib=_memory_cap(run.profile, config.orchestration.gpu_memory_cap_gib),
    )
    try:
        result = ray.get(run.baseline_task.remote(spec))
    except ray.exceptions.RayError as e:
        raise SweepError(f"scoring the base model failed: {failure_reason(e)} (log: {spec.log_file})") from None
    values = suite_values(result.scores, config.evaluator, baseline=result.scores)
    value = values[config.evaluator.objective_suite]
    run.store.record_baseline(
        run.study.study_name, config.model.name_or_path, value, result.scores, result.eval_seconds, values
    )
    log.info("Baseline: %s scores=%s", _fmt(values), _fmt(result.scores))


def _run_one_trial(run: _Run) -> int:
    """Asks for a trial, runs it as a Ray task, records it and tells Optuna how it ended."""
    import optuna
    import ray

    config, study, store = run.config, run.study, run.store
    trial = study.ask()
    started = _now()
    ref = None
    try:
        params = suggest(trial, config.search_space)
        spec = _trial_spec(run, trial.number, params)
        log.info("Trial %d started: %s", trial.number, _fmt(params))
        ref = run.trial_task.remote(spec)
        timeout = config.orchestration.trial_timeout_minutes
        try:
            result = ray.get(ref, timeout=timeout * 60 if timeout else None)
        except ray.exceptions.GetTimeoutError:
            raise TimeoutError(f"timed out after {timeout:g} minutes") from None
    except BaseException as e:  # every trial ends COMPLETE or FAIL, also on Ctrl-C
        reason = "interrupted" if isinstance(e, KeyboardInterrupt) else failure_reason(e)
        if ref is not None and not isinstance(e, ray.exceptions.RayTaskError):
            ray.cancel(ref, force=True)
        trial.set_user_attr("fail_reason", reason)
        store.record_trial(study.study_name, TrialRecord(
            trial_number=trial.number, state="FAIL", adapter_dir=None, scores={}, fail_reason=reason,
            started_at=started, finished_at=_now(),
        ))
        study.tell(trial, state=optuna.trial.TrialState.FAIL)
        log.warning("Trial %d FAIL: %s%s", trial.number, reason,
                    f" (worker log: {spec.log_file})" if ref is not None else "")
        if isinstance(e, (KeyboardInterrupt, SystemExit)):
            raise
        return trial.number

    baseline = store.baseline(study.study_name)
    values = suite_values(result.scores, config.evaluator, baseline["scores"] if baseline else None)
    value = values[config.evaluator.objective_suite]
    constraints = feasibility(result, config.study.full_run_hours_limit)
    store.record_trial(study.study_name, TrialRecord(
        trial_number=trial.number, state="COMPLETE", adapter_dir=result.adapter_dir, scores=result.scores,
        values=values, started_at=started, finished_at=_now(), feasible=all(v <= 0 for v in constraints.values()),
        **{name: getattr(result, name) for name in MEASUREMENTS},
    ), metrics={t.name: t.metric for t in config.evaluator.all_tasks()})
    # Attributes and constraints must be set before tell: a finished trial can't be updated.
    trial.set_user_attr("adapter_dir", result.adapter_dir)
    trial.set_user_attr("scores", result.scores)
    trial.set_user_attr("values", values)
    for name, amount in constraints.items():
        trial.set_constraint(name, amount)  # > 0: infeasible; the sampler learns to avoid the region
    study.tell(trial, value)
    best = best_trial(study)
    hours = result.projected_full_run_hours
    log.info(
        "Trial %d COMPLETE: %s params=%s train=%.1fs (%.0f tok/s%s) eval=%.1fs full run %s%s; "
        "best is trial %s",
        trial.number, _fmt(values), _fmt(params), result.train_seconds, result.tokens_per_second,
        f", {result.peak_memory_gib:.2f} GiB" if result.peak_memory_gib is not None else "",
        result.eval_seconds, _duration(hours),
        "" if all(v <= 0 for v in constraints.values()) else " (INFEASIBLE)",
        f"{best.number} ({best.value:.4f})" if best else "none feasible yet",
    )
    return trial.number


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
    seed = derived_seed(config.study.seed, number)
    return TrialSpec(
        study_name=study_name,
        trial_number=number,
        seed=seed,
        params=params,
        model=config.model,
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
        exclude_ngrams_file=run.exclude_ngrams_file,
        target_tflops=run.profile.bf16_tflops,
    )


def _memory_cap(profile: GpuProfile, override: Optional[float]) -> Optional[float]:
    """The GPU memory a trial may use: the profile's cap, lowered by the config's."""
    if override is None:
        return profile.memory_cap_gib
    return override if profile.memory_cap_gib is None else min(override, profile.memory_cap_gib)


def _ray_tasks(profile: GpuProfile, cpus_per_trial: int) -> dict:
    """The worker functions as Ray remote functions, built once per sweep.

    A GPU trial gets a fresh worker process (`max_calls=1`); on the CPU,
    workers are reused (`max_calls=0`).
    """
    import ray

    options = _remote_options(profile, cpus_per_trial)
    max_calls = 1 if profile.uses_gpu else 0
    return {
        "trial_task": ray.remote(max_calls=max_calls)(run_trial).options(**options),
        "baseline_task": ray.remote(max_calls=max_calls)(run_baseline).options(**options),
    }


def _remote_options(profile: GpuProfile, cpus_per_trial: int) -> dict:
    return {
        "num_cpus": cpus_per_trial,
        "num_gpus": 1 if profile.uses_gpu else 0,
        "max_retries": 0,
    }


def _cpus_per_trial(config: SweepConfig, profile: GpuProfile) -> int:
    if config.orchestration.cpus_per_trial:
        return config.orchestration.cpus_per_trial
    cores = os.cpu_count() or 1
    return cores if not profile.uses_gpu else min(4, cores)


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


def _now() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc).replace(tzinfo=None)

