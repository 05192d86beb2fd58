"""Experiment tracking: every trial a run in Weights & Biases and/or TensorBoard, grouped by study.

`orchestration.tracking: [wandb, tensorboard]`. The driver logs each trial once it has
ended and is recorded (the workers never touch a tracker): its resolved config and
sampled parameters, the per-step training loss and learning rate, the rung values, the
final per-task scores and suite values, the measurements (tokens/s, peak memory, the
projected full-run hours, feasibility) and its state, pruned and failed trials
included; the baseline is a run of its own. A tracker that fails (its directory, its
import, the network) is one warning line; the trial's record is already written and
the sweep goes on.

- W&B: a run per trial in the group named after the study (project `sweep-<study>`
  unless WANDB_PROJECT is set), written under `<artifacts_dir>/<study>/wandb`. The
  driver picks the mode: WANDB_MODE when set; else `offline` without credentials
  (WANDB_API_KEY, or api.wandb.ai in ~/.netrc) or without a route to the W&B server,
  else `online`. Offline runs are synced later with `wandb sync`.
- TensorBoard: `<artifacts_dir>/<study>/tensorboard/trial-NNNN/` (and `baseline/`), one
  event file each: `tensorboard --logdir <artifacts_dir>/<study>/tensorboard`.
"""

from __future__ import annotations

import logging
import os
import socket
from pathlib import Path
from typing import Any, Optional

from sweep.store import TrialRecord

log = logging.getLogger("sweep")

TRACKERS = ("wandb", "tensorboard")
WANDB_HOST = ("api.wandb.ai", 443)
# The measurements each run ends with (its summary; TensorBoard: scalars at the last step).
MEASURED = ("train_seconds", "eval_seconds", "wall_seconds", "tokens_per_second", "peak_memory_gib", "mfu",
            "train_tokens", "train_steps", "final_loss", "projected_full_run_hours")


def wandb_mode(environ: Optional[dict] = None, server: tuple[str, int] = WANDB_HOST) -> str:
    """`online` or `offline`, decided by the driver: WANDB_MODE when set; offline without credentials or a
    route to the W&B `server` (a TCP connection within 2 s)."""
    environ = os.environ if environ is None else environ
    if environ.get("WANDB_MODE"):
        return environ["WANDB_MODE"]
    if not environ.get("WANDB_API_KEY") and not _netrc_has_wandb(environ.get("NETRC")):
        return "offline"
    try:
        with socket.create_connection(server, timeout=2):
            return "online"
    except OSError:
        return "offline"


def _netrc_has_wandb(path: Optional[str]) -> bool:
    """Whether the netrc file (NETRC, else ~/.netrc) holds W&B's credentials (`wandb login` writes them there)."""
    import netrc

    try:
        return netrc.netrc(path).authenticators(WANDB_HOST[0]) is not None
    except (OSError, netrc.NetrcParseError):
        return False


class Trackers:
    """The trackers of one start; each failure is one warning and never stops the sweep."""

    def __init__(self, names: list[str], work_dir: Path, study_name: str, wandb_mode: Optional[str] = None):
        """`wandb_mode`: the mode the driver decided (and gave the workers); None: decided here."""
        self.study_name = study_name
        self.trackers: list[Any] = []
        for name in names:
            try:
                tracker = (WandbTracker(work_dir, study_name, wandb_mode) if name == "wandb"
                           else TensorBoardTracker(work_dir))
            except Exception as e:  # noqa: BLE001 - a tracker that cannot start is a warning
                log.warning("Tracking with %s is off for this start: %s", name, _reason(e))
                continue
            self.trackers.append(tracker)

    @property
    def wandb_mode(self) -> Optional[str]:
        return next((t.mode for t in self.trackers if isinstance(t, WandbTracker)), None)

    def trial(self, record: TrialRecord, params: dict, config: dict, rungs: list, learning_rates: list,
              objective: Optional[str]) -> None:
        for tracker in self.trackers:
            try:
                tracker.trial(record, params, config, rungs, learning_rates, objective)
            except Exception as e:  # noqa: BLE001 - the trial's record is written: tracking must not undo it
                log.warning("Trial %d: not logged to %s (%s); the sweep goes on", record.trial_number,
                            tracker.name, _reason(e))

    def baseline(self, model: str, scores: dict, values: dict, stderrs: Optional[dict]) -> None:
        for tracker in self.trackers:
            try:
                tracker.baseline(model, scores, values, stderrs)
            except Exception as e:  # noqa: BLE001
                log.warning("The baseline: not logged to %s (%s); the sweep goes on", tracker.name, _reason(e))


def _reason(error: BaseException) -> str:
    text = " ".join(str(error).split())
    return f"{type(error).__name__}: {text}"[:300] if text else type(error).__name__


def _steps(record: TrialRecord, rungs: list, learning_rates: list) -> dict[int, dict[str, float]]:
    """What each training step logs: its loss and learning rate, and at a rung, the rung's value."""
    rows: dict[int, dict[str, float]] = {}
    for step, loss in record.losses or []:
        rows.setdefault(int(step), {})["train/loss"] = float(loss)
    for step, rate in learning_rates or []:
        rows.setdefault(int(step), {})["train/learning_rate"] = float(rate)
    for step, value in rungs or []:
        rows.setdefault(int(step), {})["rung/objective"] = float(value)
    return dict(sorted(rows.items()))


def _summary(record: TrialRecord, objective: Optional[str]) -> dict[str, Any]:
    summary: dict[str, Any] = {"state": record.state, "trial": record.trial_number}
    if record.value is not None:
        summary["value"] = record.value
    for suite, value in (record.values or {}).items():
        summary[f"suite/{suite}"] = value
    for task, value in (record.scores or {}).items():
        summary[f"score/{task}"] = value
    for name in MEASURED:
        value = getattr(record, name)
        if value is not None:
            summary[f"measure/{name}"] = value
    if record.feasible is not None:
        summary["measure/feasible"] = bool(record.feasible)
    if record.fail_reason:
        summary["fail_reason"] = record.fail_reason
    if objective:
        summary["objective"] = objective
    return summary


class WandbTracker:
    name = "wandb"

    def __init__(self, work_dir: Path, study_name: str, mode: Optional[str] = None):
        import wandb

        self.wandb = wandb
        self.work_dir = work_dir
        self.dir = work_dir / "wandb"  # where wandb.init(dir=work_dir) writes its runs
        self.dir.mkdir(parents=True, exist_ok=True)
        self.study_name = study_name
        self.project = os.environ.get("WANDB_PROJECT") or f"sweep-{study_name}"
        self.mode = mode or wandb_mode()
        log.info("Tracking with W&B (%s) under %s%s", self.mode, self.dir,
                 "; sync later with `wandb sync " + str(self.dir) + "/offline-run-*`" if self.mode == "offline"
                 else "")

    def _run(self, name: str, job_type: str, config: dict):
        return self.wandb.init(
            project=self.project, group=self.study_name, name=name, job_type=job_type, dir=str(self.work_dir),
            mode=self.mode, config=config, reinit="create_new",
            settings=self.wandb.Settings(silent=True, console="off", x_disable_stats=True),
        )

    def trial(self, record: TrialRecord, params: dict, config: dict, rungs: list, learning_rates: list,
              objective: Optional[str]) -> None:
        run = self._run(f"trial-{record.trial_number:04d}", "trial",
                        {"params": params, "config": config, "state": record.state})
        try:
            for step, row in _steps(record, rungs, learning_rates).items():
                run.log(row, step=step)
            run.summary.update(_summary(record, objective))
        finally:
            run.finish(exit_code=1 if record.state == "FAIL" else 0)

    def baseline(self, model: str, scores: dict, values: dict, stderrs: Optional[dict]) -> None:
        run = self._run("baseline", "baseline", {"model": model})
        try:
            run.summary.update({"state": "BASELINE", **{f"suite/{k}": v for k, v in (values or {}).items()},
                                **{f"score/{k}": v for k, v in scores.items()}})
        finally:
            run.finish()


class TensorBoardTracker:
    name = "tensorboard"

    def __init__(self, work_dir: Path):
        from torch.utils.tensorboard import SummaryWriter

        self.writer_class = SummaryWriter
        self.dir = work_dir / "tensorboard"
        self.dir.mkdir(parents=True, exist_ok=True)
        log.info("Tracking with TensorBoard: tensorboard --logdir %s", self.dir)

    def trial(self, record: TrialRecord, params: dict, config: dict, rungs: list, learning_rates: list,
              objective: Optional[str]) -> None:
        import yaml

        writer = self.writer_class(log_dir=str(self.dir / f"trial-{record.trial_number:04d}"))
        try:
            steps = _steps(record, rungs, learning_rates)
            for step, row in steps.items():
                for tag, value in row.items():
                    writer.add_scalar(tag, value, step)
            last = max(steps, default=0)
            summary = _summary(record, objective)
            for tag, value in summary.items():
                if isinstance(value, (int, float)) and not isinstance(value, bool) and tag != "trial":
                    writer.add_scalar(tag, value, last)
            writer.add_text("state", record.state + (f": {record.fail_reason}" if record.fail_reason else ""), last)
            writer.add_text("params", "\n".join(f"    {k}: {v}" for k, v in params.items()), last)
            writer.add_text("config", "\n".join("    " + line for line in
                                                yaml.safe_dump(config, sort_keys=False).splitlines()), last)
        finally:
            writer.close()

    def baseline(self, model: str, scores: dict, values: dict, stderrs: Optional[dict]) -> None:
        writer = self.writer_class(log_dir=str(self.dir / "baseline"))
        try:
            for suite, value in (values or {}).items():
                writer.add_scalar(f"suite/{suite}", value, 0)
            for task, value in scores.items():
                writer.add_scalar(f"score/{task}", value, 0)
            writer.add_text("state", f"BASELINE: the untuned base {model}", 0)
        finally:
            writer.close()
