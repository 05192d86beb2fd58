"""Status of a study as plain data, and export of a trial's adapter."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any, Optional

from sweep.store import MEASUREMENTS, Store
from sweep.study import best_trial

ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors", "hyperparameters.yaml")


def study_status(study, store: Store) -> dict[str, Any]:
    """The study as `sweep status --format json` prints it."""
    records = store.trials(study.study_name)
    trials = []
    for t in study.get_trials(deepcopy=False):
        rec = records.get(t.number)
        row: dict[str, Any] = {
            "number": t.number,
            "state": t.state.name,
            "value": t.value,
            "params": dict(t.params),
            "scores": dict(rec.scores) if rec else {},
            "adapter_dir": rec.adapter_dir if rec else None,
        }
        if rec is not None:
            row.update({name: getattr(rec, name) for name in MEASUREMENTS})
            row["feasible"] = rec.feasible
            row["constraints"] = dict(t.constraints) or None  # Optuna's; > 0: violated
        if t.state.name == "FAIL":
            row["fail_reason"] = t.user_attrs.get("fail_reason") or (rec.fail_reason if rec else None)
        row["started_at"] = _iso(t.datetime_start)
        row["finished_at"] = _iso(t.datetime_complete)
        trials.append(row)
    best = best_trial(study)
    baseline = store.baseline(study.study_name)
    return {
        "study": study.study_name,
        "direction": study.direction.name.lower(),
        "trials": trials,
        "best": None if best is None else {
            "number": best.number,
            "value": best.value,
            "params": dict(best.params),
            "adapter_dir": records[best.number].adapter_dir if best.number in records else None,
        },
        "baseline": None if baseline is None else {
            "model": baseline["model"], "scores": baseline["scores"], "value": baseline["value"],
        },
    }


def export_trial(status: dict[str, Any], trial_number: Optional[int], out_dir: str | Path) -> Path:
    """Copies a trial's adapter, hyperparameters.yaml and scores.json to `out_dir`.

    Args:
        status: the study's status (`study_status`).
        trial_number: the trial to export; None for the best.
        out_dir: destination (created; existing adapter files are replaced).
    """
    if trial_number is None:
        if status["best"] is None:
            raise ValueError(f"study {status['study']!r} has no COMPLETE trial to export")
        trial_number = status["best"]["number"]
    trial = next((t for t in status["trials"] if t["number"] == trial_number), None)
    if trial is None:
        raise ValueError(f"study {status['study']!r} has no trial {trial_number}")
    if trial["state"] != "COMPLETE" or not trial["adapter_dir"]:
        raise ValueError(f"trial {trial_number} is {trial['state']}: it has no adapter to export")
    src = Path(trial["adapter_dir"])
    missing = [f for f in ADAPTER_FILES if not (src / f).exists()]
    if missing:
        raise ValueError(f"trial {trial_number}: {', '.join(missing)} missing from {src}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for name in ADAPTER_FILES:
        shutil.copy2(src / name, out / name)
    scores = {
        "study": status["study"],
        "trial": trial_number,
        "value": trial["value"],
        "scores": trial["scores"],
        "params": trial["params"],
        "baseline": status["baseline"],
    }
    (out / "scores.json").write_text(json.dumps(scores, indent=2) + "\n")
    return out


def _iso(value) -> Optional[str]:
    return value.isoformat() if value is not None else None
