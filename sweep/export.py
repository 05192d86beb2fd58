"""Status of a study as plain data, and export of a trial's submission."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable, Optional

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
        values = (rec.values if rec is not None else None) or t.user_attrs.get("values") or {}
        row["values"] = dict(values)
        for suite, value in values.items():
            row[f"{suite}_value"] = value
        if rec is not None:
            row.update({name: getattr(rec, name) for name in MEASUREMENTS})
            row["feasible"] = rec.feasible
            row["constraints"] = dict(t.constraints) or None  # Optuna's; > 0: violated
        row["intermediate"] = [[step, value] for step, value in sorted(t.intermediate_values.items())]
        if t.state.name == "FAIL":
            row["fail_reason"] = t.user_attrs.get("fail_reason") or (rec.fail_reason if rec else None)
        row["started_at"] = _iso(t.datetime_start)
        row["finished_at"] = _iso(t.datetime_complete)
        trials.append(row)
    best = best_trial(study)
    baseline = store.baseline(study.study_name)
    attrs = study.user_attrs
    optimize, pick_by, top_k = attrs.get("optimize"), attrs.get("pick_by"), attrs.get("top_k", 1)
    pick = pick_submission(trials, optimize, pick_by, top_k, maximize=study.direction.name == "MAXIMIZE",
                           base=base_row(baseline))
    return {
        "study": study.study_name,
        "direction": study.direction.name.lower(),
        "suites": attrs.get("suites", []),
        "optimize": optimize,
        "pick_by": pick_by,
        "top_k": top_k,
        "pick": None if pick is None else {
            "number": pick["number"], "value": pick["value"], "values": pick["values"],
            "params": pick["params"], "adapter_dir": pick["adapter_dir"], "untuned": bool(pick.get("untuned")),
            **({"model": pick["model"]} if pick.get("untuned") else {}),
        },
        "rank_correlation": rank_correlation(trials, optimize, pick_by),
        "trials": trials,
        "best": None if best is None else {
            "number": best.number,
            "value": best.value,
            "params": dict(best.params),
            "adapter_dir": records[best.number].adapter_dir if best.number in records else None,
        },
        "baseline": None if baseline is None else {
            "model": baseline["model"], "scores": baseline["scores"], "value": baseline["value"],
            "values": baseline.get("values"), "stderrs": baseline.get("stderrs"),
            "num_docs": baseline.get("num_docs"), "eval_seconds": baseline.get("eval_seconds"),
        },
        "baseline_base": attrs.get("baseline_base"),
        "budget_hours": attrs.get("budget_hours"),
        "hours_unit": attrs.get("hours_unit", "GPU-hours"),
    }


def base_row(baseline: Optional[dict]) -> Optional[dict]:
    """The untuned base as a row the pick can choose: its suite values beside the trials' (it is no trial:
    `number` None, `untuned` True, no adapter), or None when it was not scored."""
    if not baseline or not baseline.get("values"):
        return None
    return {
        "number": None, "untuned": True, "state": "COMPLETE", "feasible": True, "model": baseline["model"],
        "value": baseline["value"], "values": dict(baseline["values"]), "scores": dict(baseline["scores"]),
        "params": {}, "adapter_dir": None,
    }


def pick_label(pick: Optional[dict]) -> str:
    """`trial 5`, or `the untuned base` when the base is the pick."""
    if pick is None:
        return "none"
    return "the untuned base" if pick.get("untuned") else f"trial {pick['number']}"


def candidates(trials: list[dict], *suites: Optional[str]) -> list[dict]:
    """COMPLETE, feasible trials that have a value for every named suite."""
    return [
        t for t in trials
        if t["state"] == "COMPLETE" and t.get("feasible") is not False
        and all(s is None or t["values"].get(s) is not None for s in suites)
    ]


def pick_submission(
    trials: list[dict], optimize: Optional[str], pick_by: Optional[str], top_k: int, maximize: bool = True,
    base: Optional[dict] = None,
) -> Optional[dict]:
    """The submission: the best on `pick_by` among the `top_k` best on `optimize` (feasible, COMPLETE).

    Without `pick_by` it is the best on `optimize`. Ties go to the better
    `optimize` value, then the earlier trial. `base` (`base_row`), the untuned
    base, is a candidate like a trial (it takes a place in the top k by its
    `optimize` value) but wins only where it is strictly better: a tie goes to
    the trial. With no trial COMPLETE the pick is None, whatever the base.
    """
    sign = 1.0 if maximize else -1.0
    top = ranked_candidates(trials, optimize, pick_by, maximize, base)[: max(1, top_k)]
    if not top:
        return None
    if pick_by is None:
        return top[0]
    return min(top, key=lambda t: (-sign * t["values"][pick_by], -sign * _on(t, optimize), _order(t)))


def ranked_candidates(trials: list[dict], optimize: Optional[str], pick_by: Optional[str], maximize: bool = True,
                      base: Optional[dict] = None) -> list[dict]:
    """The pick's candidates (`candidates`, and `base` when it was scored on both suites and a trial is one),
    best first on `optimize`; a tie goes to the earlier trial, and the base comes after the trials it ties."""
    sign = 1.0 if maximize else -1.0
    rows = candidates(trials, optimize, pick_by)
    if rows and base is not None and candidates([base], optimize, pick_by):
        rows.append(base)
    return sorted(rows, key=lambda t: (-sign * _on(t, optimize), _order(t)))


def _on(row: dict, suite: Optional[str]) -> float:
    return row["values"][suite] if suite else row["value"]


def _order(row: dict) -> float:
    return float("inf") if row.get("untuned") else row["number"]


def rank_correlation(trials: list[dict], first: Optional[str], second: Optional[str]) -> Optional[float]:
    """Spearman's rank correlation between two suites' values across COMPLETE trials (None under 3 trials)."""
    if not first or not second or first == second:
        return None
    pairs = [(t["values"][first], t["values"][second]) for t in candidates(trials, first, second)]
    if len(pairs) < 3:
        return None
    a, b = _ranks([p[0] for p in pairs]), _ranks([p[1] for p in pairs])
    mean_a, mean_b = sum(a) / len(a), sum(b) / len(b)
    cov = sum((x - mean_a) * (y - mean_b) for x, y in zip(a, b, strict=True))
    var_a = sum((x - mean_a) ** 2 for x in a)
    var_b = sum((y - mean_b) ** 2 for y in b)
    return cov / (var_a * var_b) ** 0.5 if var_a > 0 and var_b > 0 else None


def _ranks(values: list[float]) -> list[float]:
    """Ranks from 1, ties sharing their average rank."""
    order = sorted(range(len(values)), key=lambda i: values[i])
    ranks = [0.0] * len(values)
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and values[order[j + 1]] == values[order[i]]:
            j += 1
        for k in range(i, j + 1):
            ranks[order[k]] = (i + j) / 2 + 1
        i = j + 1
    return ranks


def export_trial(status: dict[str, Any], which: int | str, out_dir: str | Path, force: bool = False,
                 merge: Optional[str] = None, device: Optional[str] = None, quiet: bool = False,
                 announce: Optional[Callable[[str], None]] = None) -> Path:
    """Writes a trial's submission to `out_dir`, all or nothing: the adapter, the base's tokenizer,
    hyperparameters.yaml, config.yaml (the trial's config to train it again), scores.json, a README.md model
    card and, with `merge`, `merged/`: the adapter merged into a 16-bit copy of the base (`sweep.submission`).

    The files are written to a new directory beside `out_dir` and moved into place once all are
    there, so `out_dir` never holds a mix of two exports, nor a part of one. Every file gets the
    ordinary permissions of a new file (the umask's), whatever the trial's files had.

    Args:
        status: the study's status (`study_status`).
        which: a trial number, `best` (the best on the objective) or `pick` (the submission).
        out_dir: destination: a new or empty directory, or with `force` one whose contents are replaced.
        force: replace the contents of a non-empty `out_dir`.
        merge: None, `dequantized` (into the bf16 dequantization of the 4-bit weights the adapter was scored
            on) or `original` (into the base's own 16-bit weights).
        device: where the merge runs; default: a GPU when there is one.
        quiet: send the libraries' output (loading bars, notices) to /dev/null while the files are made.
        announce: told, once everything is checked, what takes time (the merge).

    Raises:
        ValueError: the trial has nothing to export (or no readable hyperparameters.yaml), or `out_dir` is not
            empty (without `force`), not a directory, under a file, or in a place this process may not write.
    """
    import yaml

    from sweep.submission import MERGE_BASES, model_config_of
    from sweep.worker import output_to

    out = Path(out_dir)
    check_out(out, force)
    if which == "pick" and (status.get("pick") or {}).get("untuned"):
        if merge is not None:
            raise ValueError("--merge: the pick is the untuned base, which has no adapter to merge (its export "
                             "names the base; `sweep serve` loads it)")
        return export_base(status, out, quiet=quiet)
    trial_number = _trial_to_export(status, which)
    trial = next((t for t in status["trials"] if t["number"] == trial_number), None)
    if trial is None:
        raise ValueError(f"study {status['study']!r} has no trial {trial_number}")
    if trial["state"] != "COMPLETE" or not trial["adapter_dir"]:
        raise ValueError(f"trial {trial_number} is {trial['state']}: it has no adapter to export")
    src = Path(trial["adapter_dir"])
    missing = [f for f in ADAPTER_FILES if not (src / f).exists()]
    if missing:
        raise ValueError(f"trial {trial_number}: {', '.join(missing)} missing from {src}")
    scores = {
        "study": status["study"],
        "trial": trial_number,
        "value": trial["value"],
        "values": trial["values"],
        "scores": trial["scores"],
        "params": trial["params"],
        "baseline": status["baseline"],
    }
    if merge is not None and merge not in MERGE_BASES:
        raise ValueError(f"--merge: expected one of {', '.join(MERGE_BASES)}, got {merge!r}")
    try:
        hyperparameters = yaml.safe_load((src / "hyperparameters.yaml").read_text())
    except yaml.YAMLError as e:
        raise ValueError(f"trial {trial_number}: {src / 'hyperparameters.yaml'} is not YAML ({e})") from None
    if not isinstance(hyperparameters, dict) or not isinstance(hyperparameters.get("model"), dict):
        raise ValueError(f"trial {trial_number}: {src / 'hyperparameters.yaml'} does not name the trial's model")
    model_config = model_config_of(hyperparameters)
    if merge is not None and announce is not None:
        announce(f"Merging trial {trial_number}'s adapter into the {merge} base (it loads the base twice: "
                 "minutes for a 7B model)")
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.export-", dir=out.parent))
    try:
        with output_to(os.devnull if quiet else None):
            _write_submission(staging, src, status, trial, scores, hyperparameters, model_config, merge, device)
        ordinary_modes(staging)
        move_into_place(staging, out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return out


def export_base(status: dict[str, Any], out: Path, quiet: bool = False) -> Path:
    """Writes the untuned base's submission to `out`, all or nothing: `base_model.json` (the base's id and
    revision, and the quantization and mode it was scored in), its tokenizer, scores.json, environment.json
    and a README.md model card that says there is no adapter. `sweep serve` serves it."""
    from sweep.submission import BASE_EXPORT_FILE, base_model_card, model_config_of, package_versions
    from sweep.worker import output_to
    from trainer.model import load_tokenizer

    baseline = status.get("baseline") or {}
    scored = status.get("baseline_base") or {}
    model = dict(scored.get("model") or {"name_or_path": baseline.get("model")})
    if not model.get("name_or_path"):
        raise ValueError(f"study {status['study']!r}: the baseline does not name its base model")
    model_config = model_config_of({"model": model})
    record = {"base_model": model_config.name_or_path, "revision": model_config.revision,
              "model": model, "mode": scored.get("mode", "qlora"), "study": status["study"]}
    scores = {"study": status["study"], "trial": None, "untuned": True, "value": baseline.get("value"),
              "values": baseline.get("values"), "scores": baseline.get("scores"), "baseline": baseline}
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.export-", dir=out.parent))
    try:
        with output_to(os.devnull if quiet else None):
            (staging / BASE_EXPORT_FILE).write_text(json.dumps(record, indent=2) + "\n")
            (staging / "scores.json").write_text(json.dumps(scores, indent=2) + "\n")
            (staging / "environment.json").write_text(json.dumps(package_versions(), indent=2) + "\n")
            load_tokenizer(model_config).save_pretrained(staging)
            (staging / "README.md").write_text(base_model_card(status, record))
        ordinary_modes(staging)
        move_into_place(staging, out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return out


def _write_submission(staging: Path, src: Path, status: dict, trial: dict, scores: dict, hyperparameters: dict,
                      model_config, merge: Optional[str], device: Optional[str]) -> None:
    import yaml

    from sweep.submission import merged_model, model_card, package_versions, reproduce_config
    from trainer.model import load_tokenizer, trained_mode

    for name in ADAPTER_FILES:
        shutil.copyfile(src / name, staging / name)  # contents only: modes come from the umask
    (staging / "scores.json").write_text(json.dumps(scores, indent=2) + "\n")
    # The versions the export was made with: `sweep submission` pins them.
    (staging / "environment.json").write_text(json.dumps(package_versions(), indent=2) + "\n")
    tokenizer = load_tokenizer(model_config)
    tokenizer.save_pretrained(staging)
    (staging / "config.yaml").write_text(yaml.safe_dump(reproduce_config(hyperparameters), sort_keys=False))
    (staging / "README.md").write_text(model_card(status, trial, hyperparameters, merge))
    if merge is not None:
        merged = merged_model(src, model_config, merge, device, mode=trained_mode(hyperparameters))
        merged.save_pretrained(staging / "merged")
        tokenizer.save_pretrained(staging / "merged")


def check_out(out: Path, force: bool) -> None:
    """Refuses an `out` that is a file, lies under a file, is a non-empty directory (without `force`), or is
    not writable (a read-only mount, a directory this user may not write); nothing is created here."""
    from sweep.store import nearest_existing, not_writable_reason, writable

    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out}: a file is there, not a directory (pass a new or empty directory)")
    if out.is_dir() and any(out.iterdir()) and not force:
        raise ValueError(f"--out {out}: the directory is not empty (pass --force to replace its contents)")
    ancestor = nearest_existing(str(out.parent))
    if not os.path.isdir(ancestor):
        raise ValueError(f"--out {out}: {ancestor} is a file, not a directory (pass a path in a directory)")
    if not writable(ancestor):
        raise ValueError(f"--out {out}: cannot write in {ancestor} ({not_writable_reason(ancestor)}); pass an "
                         f"--out in a writable place")


def _trial_to_export(status: dict[str, Any], which: int | str) -> int:
    if which in ("best", "pick"):
        chosen = status.get(which)
        if chosen is None:
            raise ValueError(f"study {status['study']!r} has no feasible COMPLETE trial to export")
        return chosen["number"]
    return int(which)


def ordinary_modes(directory: Path) -> None:
    """Files 0666 and directories 0777, less the umask: what any new file of the user's gets."""
    umask = os.umask(0)
    os.umask(umask)
    directory.chmod(0o777 & ~umask)
    for path in directory.rglob("*"):
        path.chmod((0o777 if path.is_dir() else 0o666) & ~umask)


def move_into_place(staging: Path, out: Path) -> None:
    """Makes `staging`'s files the contents of `out`, swapping whole directories where it can."""
    if not out.exists():
        staging.rename(out)
        return
    old = out.with_name(f".{out.name}.old-{os.getpid()}")
    try:
        if os.path.ismount(out) or out.resolve() == Path.cwd().resolve():
            raise OSError("not to be renamed")
        out.rename(old)  # the old export out of the way in one step...
    except OSError:  # a mount point or the working directory: replace its entries one by one
        for entry in list(out.iterdir()):
            shutil.rmtree(entry) if entry.is_dir() and not entry.is_symlink() else entry.unlink()
        for entry in list(staging.iterdir()):
            entry.rename(out / entry.name)
        return
    staging.rename(out)  # ...and the new one in, in another
    shutil.rmtree(old, ignore_errors=True)


def _iso(value) -> Optional[str]:
    return value.isoformat() if value is not None else None
