"""What every step of one start shares (`Run`, driver side only), and the plain-data specs built from it that
travel to the workers: a trial's (`trial_spec`; `spec_for_trial` builds it from plain values) and the
baseline's (`baseline_spec`)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from sweep.cluster import memory_cap
from sweep.config import SweepConfig, to_dict, with_params
from sweep.gpus import GpuProfile
from sweep.lease import DriverLease
from sweep.store import Store
from sweep.study import derived_seed
from sweep.worker import BaselineSpec, TrialSpec


@dataclass(frozen=True)
class Run:
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


def trial_spec(run: Run, number: int, params: dict) -> TrialSpec:
    """The plain-data description of a trial that travels to its worker."""
    baseline = run.store.baseline(run.study.study_name)
    return spec_for_trial(
        run.config, run.study.study_name, number, params, work_dir=run.work_dir, task_dir=run.task_dir,
        cpus_per_trial=run.cpus_per_trial, device=run.device, profile=run.profile,
        host_memory_limit_gib=host_memory_limit(run), exclude_ngrams_file=run.exclude_ngrams_file,
        baseline_scores=baseline["scores"] if baseline else None,
    )


def spec_for_trial(config: SweepConfig, study_name: str, number: int, params: dict, *, work_dir: Path,
                   task_dir: str, cpus_per_trial: int, device: str, profile: GpuProfile,
                   host_memory_limit_gib: Optional[float] = None, exclude_ngrams_file: Optional[str] = None,
                   baseline_scores: Optional[dict] = None) -> TrialSpec:
    """`trial_spec` from plain values, without a start's live handles: what runs trial `number` of the study
    with `params` (its seed, its directory under `work_dir`, its rungs), for the driver and for code that runs
    one of our trials under another orchestrator (bench/search_efficiency.py's Ray Tune trainable)."""
    trial_dir = Path(work_dir) / "trials" / f"{number:04d}"
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
        task_dir=task_dir,
        adapter_dir=str(trial_dir / "adapter"),
        log_file=str(trial_dir / "worker.log"),
        # The resolved config of this trial (searched values in place) and where it came from.
        hyperparameters={
            **to_dict(trial_config),
            "trial": {"study": study_name, "number": number, "seed": seed, "params": params},
        },
        num_threads=cpus_per_trial,
        device=device,
        memory_cap_gib=memory_cap(profile, config.orchestration.gpu_memory_cap_gib),
        host_memory_limit_gib=host_memory_limit_gib,
        exclude_ngrams_file=exclude_ngrams_file,
        target_tflops=profile.bf16_tflops,
        rungs=tuple(config.study.rungs) if config.study.pruner != "none" else (),
        rung_eval_docs=config.study.rung_eval_docs,
        baseline_scores=baseline_scores,
    )


def host_memory_limit(run: Run) -> Optional[float]:
    """The host memory a trial or the baseline may use (on every profile): the config's limit, else the slot's
    share of the memory available when the start began (sweep.slots); None: no limit."""
    limit = run.config.orchestration.cpu_memory_limit_gib
    return limit if limit is not None else run.pool.share_gib


def baseline_spec(run: Run) -> BaselineSpec:
    """The untuned base's scoring, on slot 0: the trials' model, suites, cores and memory limits."""
    config = run.config
    return BaselineSpec(
        model=config.model, eval=config.evaluator, task_dir=run.task_dir, num_threads=run.cpus_per_trial,
        log_file=str(run.work_dir / "baseline.log"), device=run.device,
        memory_cap_gib=memory_cap(run.profile, config.orchestration.gpu_memory_cap_gib),
        host_memory_limit_gib=host_memory_limit(run), mode=config.trainer.mode,
    )
