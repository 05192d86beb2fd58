"""Each trial's artifacts in Optuna's artifact store: its loss curve, its eval report, its config and its log.

The driver writes them as a trial ends, pruned and failed trials included, before Optuna's tell
(a finished trial takes no more artifacts). The store is an `optuna.artifacts.FileSystemArtifactStore`
under the study's artifacts directory; its absolute path is the study's user attribute
`artifact_store`, which `sweep dashboard` opens.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path
from typing import Any, Optional

import yaml

from sweep.store import TrialRecord

log = logging.getLogger("sweep")

STORE_DIR = "artifact-store"
STORE_ATTR = "artifact_store"
# The names each trial's artifacts have in the dashboard (the file names uploaded).
LOSS_CURVE = "loss_curve.png"
EVAL_REPORT = "eval_report.json"
CONFIG = "config.yaml"
WORKER_LOG = "worker.log"


def open_store(work_dir: Path, study) -> Any:
    """The study's artifact store under `work_dir`, its absolute path recorded in the study."""
    from optuna.artifacts import FileSystemArtifactStore

    path = (work_dir / STORE_DIR).resolve()
    path.mkdir(parents=True, exist_ok=True)
    if study.user_attrs.get(STORE_ATTR) != str(path):
        study.set_user_attr(STORE_ATTR, str(path))
    return FileSystemArtifactStore(str(path))


def upload_trial_artifacts(store, trial, record: TrialRecord, trial_dir: Path, hyperparameters: Optional[dict],
                           log_file: Optional[str], suites: dict[str, list[str]], baseline: Optional[dict],
                           rungs: tuple = ()) -> list[str]:
    """Writes a trial's artifacts into `trial_dir` and uploads each to `store`; returns their names.

    The loss curve (when the trial trained a step), the eval report, the resolved config (when the
    trial got as far as one) and the worker log (when there is one).
    """
    from optuna.artifacts import upload_artifact

    trial_dir.mkdir(parents=True, exist_ok=True)
    files: list[tuple[Path, str]] = []
    if record.losses:
        files.append((plot_loss_curve(record, trial_dir / LOSS_CURVE, rungs), "image/png"))
    report = trial_dir / EVAL_REPORT
    report.write_text(json.dumps(eval_report(record, suites, baseline, rungs), indent=2) + "\n")
    files.append((report, "application/json"))
    if hyperparameters:
        config = trial_dir / CONFIG
        config.write_text(yaml.safe_dump(hyperparameters, sort_keys=False))
        files.append((config, "text/yaml"))
    if log_file and Path(log_file).is_file():
        copy = trial_dir / "artifacts" / WORKER_LOG  # a copy: the slot may still append to its log
        copy.parent.mkdir(exist_ok=True)
        shutil.copyfile(log_file, copy)
        files.append((copy, "text/plain"))
    for path, mimetype in files:
        upload_artifact(artifact_store=store, file_path=str(path), study_or_trial=trial, mimetype=mimetype)
    return [path.name for path, _ in files]


def eval_report(record: TrialRecord, suites: dict[str, list[str]], baseline: Optional[dict],
                rungs: tuple = ()) -> dict[str, Any]:
    """A trial's scores as a JSON document: each task's score with its standard error, the suites' values,
    the baseline's, and the rung values of a trial that was pruned."""
    base_scores = (baseline or {}).get("scores") or {}
    base_errors = (baseline or {}).get("stderrs") or {}
    tasks = {}
    for task, score in sorted(record.scores.items()):
        tasks[task] = {
            "suites": [name for name, members in suites.items() if task in members],
            "score": score,
            "stderr": (record.stderrs or {}).get(task),
            "num_docs": (record.num_docs or {}).get(task),
            "baseline": base_scores.get(task),
            "baseline_stderr": base_errors.get(task),
        }
    return {
        "trial": record.trial_number,
        "state": record.state,
        "value": record.value,
        "suites": record.values or {},
        "tasks": tasks,
        "baseline": None if baseline is None else {"values": baseline.get("values"), "scores": base_scores},
        "rungs": [[step, value] for step, value in rungs],
        "fail_reason": record.fail_reason,
        "stderr_method": "from the per-document values: binomial for 0/1 metrics, else sample sd / sqrt(n)",
    }


def plot_loss_curve(record: TrialRecord, path: Path, rungs: tuple = ()) -> Path:
    """A PNG of the trial's training loss by step (its rungs marked)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    steps, losses = zip(*record.losses, strict=True)
    figure = Figure(figsize=(6.4, 3.6), dpi=110)
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    axes.plot(steps, losses, color="#1f77b4", linewidth=1.2, label="training loss")
    for step, _ in rungs:
        axes.axvline(step, color="#999999", linestyle=":", linewidth=1)
    axes.set_xlabel("optimizer step")
    axes.set_ylabel("loss")
    axes.set_title(f"Trial {record.trial_number} ({record.state.lower()})", fontsize=11)
    axes.grid(alpha=0.3)
    figure.tight_layout()
    figure.savefig(path)
    return path
