"""Search efficiency: the best value found against the compute used, for random search, TPE and TPE with
successive halving, on the demo (CPU, the demo base, its searched mix), over several seeds.

Each method runs the demo's study from scratch through `sweep.driver.run_sweep`, with its own sampler and
pruner and the same search space, trial count and seed set. For each run it records, in the order the trials
finished, the slot-seconds they used (each trial's `wall_seconds` in its worker: loading, data, training, rung
evals, scoring) and the best objective value so far, plus the pick's value on the held-out suite.

    python bench/search_efficiency.py                       # 3 methods x 3 seeds x the demo's 10 trials
    python bench/search_efficiency.py --seeds 0,1,2,3,4 --trials 16 --startup 4

This is a working step of the search-efficiency benchmark: the Ray Tune peer (OptunaSearch with ASHA) and the
plot are still to come.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

METHODS = {
    "random": ["study.sampler=random", "study.pruner=none"],
    "tpe": ["study.sampler=tpe", "study.pruner=none"],
    "tpe_sh": ["study.sampler=tpe", "study.pruner=successive_halving"],
}


def run_method(method: str, seed: int, args, work: Path, profile) -> dict:
    """One study of `method` from scratch: its trials' compute and the best value so far after each."""
    from sweep.config import load_config
    from sweep.driver import run_sweep
    from sweep.export import study_status
    from sweep.store import Store
    from sweep.study import load_existing_study, make_storage

    overrides = [*METHODS[method], f"study.seed={seed}", f"study.sampler_startup_trials={args.startup}",
                 f"orchestration.artifacts_dir={work / 'runs'}"]
    config = load_config(None, overrides)
    work.mkdir(parents=True, exist_ok=True)
    storage = f"sqlite:///{work / 'studies.db'}"
    started = time.perf_counter()
    run_sweep(config, storage_url=storage, study_name=method, n_trials=args.trials, profile=profile)
    status = study_status(load_existing_study(make_storage(storage, read_only=True), method),
                          Store(storage, create=False, read_only=True))
    finished = sorted((t for t in status["trials"] if t["state"] in ("COMPLETE", "PRUNED", "FAIL")),
                      key=lambda t: t["finished_at"] or "")
    curve, used, best = [], 0.0, None
    for t in finished:
        used += t.get("wall_seconds") or 0.0
        if t["state"] == "COMPLETE" and t["value"] is not None:
            best = t["value"] if best is None else max(best, t["value"])
        curve.append([round(used, 2), best])
    pick = status.get("pick") or {}
    return {
        "seed": seed,
        "trials": len(finished),
        "states": {s: sum(1 for t in finished if t["state"] == s) for s in ("COMPLETE", "PRUNED", "FAIL")},
        "compute_s": round(used, 2),
        "wall_s": round(time.perf_counter() - started, 2),
        "best_value": best,
        "pick": pick.get("number"),
        "pick_values": pick.get("values"),
        "curve": curve,
    }


def compute_to_reach(curve: list, target: float) -> float | None:
    """Slot-seconds a run used until its best value reached `target`; None if it never did."""
    return next((used for used, best in curve if best is not None and best >= target), None)


def summarise(results: dict) -> dict:
    """Per method the median final best and compute; for tpe_sh, the compute to reach random's final best."""
    summary = {}
    for method, runs in results.items():
        summary[method] = {
            "median_best_value": statistics.median(r["best_value"] for r in runs if r["best_value"] is not None),
            "median_compute_s": statistics.median(r["compute_s"] for r in runs),
            "median_pick_heldout": statistics.median(
                (r["pick_values"] or {}).get("heldout", 0.0) for r in runs),
        }
    if "random" in results and "tpe_sh" in results:
        ratios = []
        by_seed = {r["seed"]: r for r in results["tpe_sh"]}
        for run in results["random"]:
            other = by_seed.get(run["seed"])
            if other is None or run["best_value"] is None:
                continue
            reached = compute_to_reach(other["curve"], run["best_value"])
            ratios.append(None if reached is None else reached / run["compute_s"])
        summary["tpe_sh_compute_to_reach_random_best"] = {
            "per_seed": ratios,
            "median": statistics.median(r for r in ratios if r is not None) if any(r is not None for r in ratios)
            else None,
            "not_reached": sum(1 for r in ratios if r is None),
        }
    return summary


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--trials", type=int, default=10)
    parser.add_argument("--startup", type=int, default=4, help="TPE's random trials before it models the space")
    parser.add_argument("--out", help="JSON file (default: bench/results/search_efficiency-cpu.json)")
    args = parser.parse_args(argv)
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from sweep.gpus import resolve_profile

    profile = resolve_profile("cpu", local_check=True)
    results: dict[str, list] = {}
    with tempfile.TemporaryDirectory(prefix="search-efficiency-") as tmp:
        for method in args.methods.split(","):
            for seed in (int(s) for s in args.seeds.split(",")):
                run = run_method(method, seed, args, Path(tmp) / f"{method}-{seed}", profile)
                results.setdefault(method, []).append(run)
                print(f"{method} seed {seed}: best {run['best_value']} in {run['compute_s']} slot-s "
                      f"({run['states']})", flush=True)
    report = {
        "benchmark": "search_efficiency",
        "command": "python bench/search_efficiency.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "device": f"cpu ({os.cpu_count()} cores)",
        "trials": args.trials, "tpe_startup_trials": args.startup,
        "summary": summarise(results),
        "runs": results,
    }
    out = Path(args.out or Path(__file__).parent / "results" / "search_efficiency-cpu.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1) + "\n")
    print(json.dumps(report["summary"], indent=1))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
