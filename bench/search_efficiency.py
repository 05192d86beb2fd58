"""Search efficiency: the best value found against the compute used, for random search, TPE, TPE with
successive halving (ours) and Ray Tune's OptunaSearch with ASHA, on the demo (CPU, the demo base, its searched
mix), over several seeds.

(a) `random`, (b) `tpe` and (c) `tpe_sh` (our default) each run the demo's study from scratch through
`sweep.driver.run_sweep`, with their own sampler and pruner. (d) `ray_tune_asha` is the peer as its users run
it: `tune.Tuner` over a trainable function, `OptunaSearch` (the sampler `sweep.study.make_sampler` builds for
(c): TPE, the same seed and startup trials; the same search space as Optuna distributions, `sweep.space`) and
`ASHAScheduler` (`time_attr` training_iteration, one report per rung and one at the end; grace period 1, max_t
the number of reports, reduction factor `study.reduction_factor`, one bracket: our successive halving's
settings), `metric` the optimised suite's value, mode max. Its trainable runs our trial: the spec
`sweep.context.spec_for_trial` builds, run by `sweep.worker.TrialSlot.run` (the same training, the same quick
rung evals at `study.rungs` on `study.rung_eval_docs` documents, the same scoring of every suite at the end),
with a reporter whose rung calls `ray.tune.report`: ASHA stops a trial there, and Tune ends the function inside
that report. Every method gets the same trials, seeds, concurrency and threads per trial (the config's,
`--concurrency`), on a local Ray on loopback started as `sweep start` starts it, shut down after each run.

Per trial it records the slot-seconds (`wall_seconds` of the trial in its worker: loading, data, training, rung
evals, scoring; for a trial ASHA stopped, up to its rung's report), its value, and its setup time (start to
its first optimizer step); per run, in the order the trials finished, the best value so far (values of trials
that ran to the end only: a rung's value is not a final score), the pick and its value on the held-out suite.
For (d) also what Tune itself calls best (`ResultGrid.get_best_result`, which may be a stopped trial), and,
read from the Optuna study behind OptunaSearch (the storage it was given), how many trials ASHA stopped that
Optuna stored COMPLETE with their rung's value (OptunaSearch tells COMPLETE whenever a stopped trial has a
last result, and its TPE then learns from partial-training values).

The summary: per method the median final best, compute and the pick's held-out value; the compute (c) needs to
reach (a)'s final best (the goal: at most a third, median over seeds); and per seed (c)'s best at (d)'s total
compute against (d)'s best. The plot: best so far against slot-seconds, each seed thin, the median thick.

    python bench/search_efficiency.py                       # 4 methods x 3 seeds x the demo's 10 trials
    python bench/search_efficiency.py --seeds 0,1,2,3,4 --trials 16 --startup 4
    python bench/search_efficiency.py --methods tpe_sh,ray_tune_asha --seeds 0 --trials 3 --out /tmp/se.json
    python bench/search_efficiency.py --from-json bench/results/search_efficiency-cpu.json   # summary, plot again
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import math
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

OURS = {
    "random": ["study.sampler=random", "study.pruner=none"],
    "tpe": ["study.sampler=tpe", "study.pruner=none"],
    "tpe_sh": ["study.sampler=tpe", "study.pruner=successive_halving"],
}
PEER = "ray_tune_asha"
"""(d): Ray Tune, OptunaSearch with ASHA, over our trial, seeded and configured like `tpe_sh`."""
METHODS = [*OURS, PEER]
LABELS = {
    "random": "(a) random",
    "tpe": "(b) TPE",
    "tpe_sh": "(c) TPE + successive halving (ours)",
    PEER: "(d) Ray Tune: OptunaSearch + ASHA",
}
COLOURS = {"random": "tab:gray", "tpe": "tab:blue", "tpe_sh": "tab:green", PEER: "tab:red"}


def bench_config(method: str, seed: int, args, work: Path):
    """The demo config of one run: the method's sampler and pruner (the peer's: `tpe_sh`'s), seed, startup
    trials, concurrency and artifacts directory."""
    from sweep.config import load_config

    overrides = [*OURS["tpe_sh" if method == PEER else method], f"study.seed={seed}",
                 f"study.sampler_startup_trials={args.startup}", f"orchestration.artifacts_dir={work / 'runs'}"]
    if args.concurrency:
        overrides.append(f"orchestration.concurrency={args.concurrency}")
    return load_config(None, overrides)


def run_ours(method: str, seed: int, args, work: Path, profile) -> dict:
    """One study of `method` from scratch through `run_sweep`: its trials' compute and the best value so far."""
    import ray

    from sweep.driver import run_sweep
    from sweep.export import study_status
    from sweep.store import Store
    from sweep.study import load_existing_study, make_storage

    config = bench_config(method, seed, args, work)
    work.mkdir(parents=True, exist_ok=True)
    storage = f"sqlite:///{work / 'studies.db'}"
    started = time.perf_counter()
    try:
        run_sweep(config, storage_url=storage, study_name=method, n_trials=args.trials, profile=profile)
    finally:
        ray.shutdown()
    wall = time.perf_counter() - started
    status = study_status(load_existing_study(make_storage(storage, read_only=True), method),
                          Store(storage, create=False, read_only=True))
    pick_by = config.evaluator.pick_by or config.evaluator.objective_suite
    trials = [_our_trial(t, pick_by) for t in status["trials"] if t["state"] in ("COMPLETE", "PRUNED", "FAIL")]
    trials.sort(key=lambda t: t["finished"])
    pick = status.get("pick") or {}
    return {
        "seed": seed,
        **run_summary(trials),
        "wall_s": round(wall, 2),
        "pick": pick.get("number"),
        "pick_untuned": bool(pick.get("untuned")),
        "pick_values": pick.get("values"),
        "pick_heldout": (pick.get("values") or {}).get(pick_by),
        "trials": trials,
    }


def _our_trial(t: dict, pick_by: str) -> dict:
    """A trial of `sweep status --format json`, as this benchmark records it."""
    timeline = t.get("timeline") or {}
    setup = timeline["first_step"] - timeline["started"] if "first_step" in timeline and "started" in timeline \
        else None
    full = t["state"] == "COMPLETE" and t["value"] is not None
    return {
        "number": t["number"],
        "state": t["state"],
        "value": t["value"] if full else None,
        "last_value": t["value"],
        "heldout": t.get(f"{pick_by}_value") if full else None,
        "rungs": t.get("intermediate") or [],
        "wall_s": _round(t.get("wall_seconds")),
        "setup_s": _round(setup),
        "base_load_s": _round(t.get("base_load_seconds")),
        "finished": _unix(t.get("finished_at")),
        "params": t["params"],
    }


# --- (d): Ray Tune ----------------------------------------------------------------------------------------------


def run_tune(seed: int, args, work: Path, profile) -> dict:
    """One Ray Tune run from scratch: OptunaSearch + ASHA over our trial, configured like `tpe_sh`."""
    import optuna
    import ray
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler
    from ray.tune.search.optuna import OptunaSearch

    from sweep import cluster
    from sweep.preflight import check_config
    from sweep.slots import slot_share_gib
    from sweep.study import make_sampler
    from sweep.tasks import check_contamination, prepare_tasks

    started = time.perf_counter()
    config = bench_config(PEER, seed, args, work)
    study_name = PEER
    work_dir = (work / "runs" / study_name).resolve()
    work_dir.mkdir(parents=True, exist_ok=True)
    check_config(config, profile)  # what `sweep start` checks first: the base built, the data tokenized and cached
    cpus = cluster.cpus_per_trial(config, profile)
    concurrency = config.orchestration.concurrency or 1
    objective = config.evaluator.objective_suite
    reports = len(config.study.rungs) + 1
    cluster.start_ray(None, profile, env_vars=cluster.worker_env(config, cpus))  # as `sweep start` starts it
    try:
        task_dir = str(prepare_tasks(config, work_dir))
        setup = {
            "config": config, "study_name": study_name, "work_dir": str(work_dir), "task_dir": task_dir,
            "cpus": cpus, "profile": profile, "objective": objective,
            "exclude_ngrams_file": check_contamination(config, task_dir, work_dir),
            "host_memory_limit_gib": config.orchestration.cpu_memory_limit_gib or slot_share_gib(concurrency),
        }
        storage_url = f"sqlite:///{work / 'tune-optuna.db'}"
        searcher = OptunaSearch(
            tune_space(config), metric=objective, mode="max", sampler=make_sampler(config, 0),
            storage=optuna.storages.RDBStorage(storage_url), study_name=study_name,
        )
        scheduler = ASHAScheduler(
            time_attr="training_iteration", metric=objective, mode="max", max_t=reports, grace_period=1,
            reduction_factor=config.study.reduction_factor, brackets=1,
        )
        tuner = tune.Tuner(
            tune.with_resources(tune.with_parameters(tune_trial, setup=setup), {"cpu": cpus}),
            tune_config=tune.TuneConfig(
                search_alg=searcher, scheduler=scheduler, num_samples=args.trials,
                max_concurrent_trials=concurrency, reuse_actors=not args.tune_fresh_actors,
                trial_name_creator=tune_trial_name, trial_dirname_creator=tune_trial_name,
            ),
            run_config=tune.RunConfig(name=study_name, storage_path=str(work / "tune"), verbose=1),
        )
        results = tuner.fit()
    finally:
        ray.shutdown()
    wall = time.perf_counter() - started
    trials = sorted((tune_record(r, objective, config.evaluator.pick_by or objective) for r in results),
                    key=lambda t: t["finished"] or float("inf"))
    ot_study = optuna.load_study(study_name=study_name, storage=storage_url)
    tune_best = _tune_best(results, objective, trials)
    full = [t for t in trials if t["value"] is not None]
    pick = max(full, key=lambda t: t["value"], default=None)
    return {
        "seed": seed,
        **run_summary(trials),
        "wall_s": round(wall, 2),
        "pick": pick["number"] if pick else None,
        "pick_heldout": pick["heldout"] if pick else None,
        "pick_rule_heldout": our_pick_rule(full, config.evaluator.top_k),
        "tune_best": tune_best,
        "optuna": optuna_view(ot_study, trials),
        "reuse_actors": not args.tune_fresh_actors,
        "trials": trials,
    }


def tune_space(config) -> dict:
    """The search space as OptunaSearch takes it: the very Optuna distributions our study samples from."""
    from sweep.space import distribution

    return {name: distribution(space) for name, space in config.search_space.items()}


def tune_trial_name(trial) -> str:
    """`trial_0003` for the 4th trial Tune created: the order OptunaSearch asked Optuna for them, which is the
    number of our trial it runs (its seed and directory), as our driver numbers them."""
    return f"trial_{int(trial.experiment_tag.split('_', 1)[0]) - 1:04d}"


_SLOTS: dict = {}
"""The trial slot of this Tune actor: with `reuse_actors`, a later trial on the actor finds the base loaded, as a
slot of ours does."""


def tune_trial(params: dict, setup: dict) -> None:
    """Ray Tune's trainable: our trial (`TrialSlot.run` of the spec `spec_for_trial` builds) with a reporter that
    sends each rung's value to `tune.report`, then the final report with every suite's value."""
    from ray import tune

    from evaluator.score import suite_values
    from sweep.context import spec_for_trial
    from sweep.worker import TrialSlot

    started = time.perf_counter()
    config = setup["config"]
    number = int(tune.get_context().get_trial_name().rsplit("_", 1)[-1])
    spec = spec_for_trial(
        config, setup["study_name"], number, dict(params), work_dir=Path(setup["work_dir"]),
        task_dir=setup["task_dir"], cpus_per_trial=setup["cpus"], device="cpu", profile=setup["profile"],
        host_memory_limit_gib=setup["host_memory_limit_gib"], exclude_ngrams_file=setup["exclude_ngrams_file"],
    )
    reporter = TuneReporter(setup["objective"], started)
    slot = _SLOTS.setdefault("slot", TrialSlot(resident=config.orchestration.resident_base))
    result = slot.run(spec, reporter)
    values = suite_values(result.scores, config.evaluator, None)
    tune.report({**values, **reporter.facts(number, result.wall_seconds), "final": True,
                 "base_load_seconds": result.base_load_seconds, "train_steps": result.train_steps})


class TuneReporter:
    """`sweep.worker.Reporter` for a trial run by Ray Tune: a rung's value goes to `tune.report` (the trial's
    `training_iteration` 1, 2, ...), where ASHA's stop ends the function; progress is only timed."""

    def __init__(self, objective: str, started: float):
        self.objective = objective
        self.started = started
        self.setup_seconds = None

    def progress(self, trial_number: int, step: int, total_steps: int, loss: float) -> None:
        if self.setup_seconds is None:  # the first call comes after the first optimizer step
            self.setup_seconds = time.perf_counter() - self.started

    def rung(self, trial_number: int, step: int, value: float) -> bool:
        from ray import tune

        tune.report({self.objective: value, "step": step, "final": False,
                     **self.facts(trial_number, time.perf_counter() - self.started)})
        return False  # Tune decides: a stopped trial never returns from `report`

    def facts(self, trial_number: int, wall_seconds: float) -> dict:
        return {"trial_number": trial_number, "wall_seconds": wall_seconds, "setup_seconds": self.setup_seconds,
                "finished_unix": time.time()}


def tune_record(result, objective: str, pick_by: str) -> dict:
    """A Tune trial as this benchmark records it: COMPLETE (it reported its final scores), STOPPED (ASHA stopped
    it at a rung) or ERROR."""
    metrics = result.metrics or {}
    final = bool(metrics.get("final"))
    frame = result.metrics_dataframe
    rungs = []
    if frame is not None and "step" in frame:
        rungs = [[int(row["step"]), float(row[objective])] for _, row in frame.iterrows() if not row["final"]]
    state = "ERROR" if result.error is not None else "COMPLETE" if final else "STOPPED"
    return {
        "number": metrics.get("trial_number"),
        "trial_id": metrics.get("trial_id"),
        "state": state,
        "value": metrics.get(objective) if final else None,
        "last_value": metrics.get(objective),
        "heldout": metrics.get(pick_by) if final else None,
        "rungs": rungs,
        "training_iteration": metrics.get("training_iteration"),
        "wall_s": _round(metrics.get("wall_seconds")),
        "setup_s": _round(metrics.get("setup_seconds")),
        "base_load_s": _round(metrics.get("base_load_seconds")),
        "finished": metrics.get("finished_unix"),
        "params": dict(result.config or {}),
        "error": str(result.error)[:300] if result.error is not None else None,
    }


def _tune_best(results, objective: str, trials: list) -> dict | None:
    """What Tune calls the best trial (`get_best_result`, scope last): its number, value, and whether ASHA had
    stopped it (then its value is a rung's, and there is no trained adapter to submit)."""
    try:
        best = results.get_best_result(metric=objective, mode="max")
    except RuntimeError:  # no trial reported anything
        return None
    number = (best.metrics or {}).get("trial_number")
    trial = next((t for t in trials if t["number"] == number), {})
    return {"number": number, "value": (best.metrics or {}).get(objective), "state": trial.get("state"),
            "stopped": trial.get("state") == "STOPPED", "heldout": trial.get("heldout")}


def optuna_view(study, trials: list) -> dict:
    """How the Optuna study behind OptunaSearch stored Tune's trials: its states, and which trials ASHA stopped
    it holds COMPLETE, with their value there (a rung's: partial training) beside their rung's report."""
    stored = {t.number: t for t in study.get_trials(deepcopy=False)}
    stopped = [t for t in trials if t["state"] == "STOPPED"]
    stopped_complete = [
        {"number": t["number"], "stored_value": stored[t["number"]].value, "rung_value": t["last_value"]}
        for t in stopped if t["number"] in stored and stored[t["number"]].state.name == "COMPLETE"
    ]
    by_number = {t["number"]: t for t in trials}
    states = [t.state.name for t in stored.values()]
    return {
        "states": {s: states.count(s) for s in sorted(set(states))},
        "stopped_by_asha": len(stopped),
        "stopped_stored_complete": len(stopped_complete),
        "stopped_stored_complete_trials": stopped_complete,
        # Tune's trial numbers (their creation order) are Optuna's: the same parameters under the same number.
        "numbering_matches": all(n in by_number and _same_params(t.params, by_number[n]["params"])
                                 for n, t in stored.items()),
    }


def _same_params(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(a[k] == b[k] for k in a)


def our_pick_rule(full: list, top_k: int) -> float | None:
    """The held-out value of the pick our rule makes (`sweep.export.pick_submission`: the best on held-out among the
    top `top_k` on the objective) among complete trials: the peer's search judged with our pick."""
    from sweep.export import pick_submission

    rows = [{"number": t["number"], "state": "COMPLETE", "values": {"optimize": t["value"], "pick_by": t["heldout"]}}
            for t in full]
    picked = pick_submission(rows, "optimize", "pick_by", top_k)
    return picked["values"]["pick_by"] if picked else None


# --- curves and the summary -------------------------------------------------------------------------------------


def run_summary(trials: list) -> dict:
    """A run's counts, compute, final best and best-so-far curve, from its trials in the order they finished."""
    curve, used, best = [], 0.0, None
    for t in trials:
        used += t["wall_s"] or 0.0
        if t["value"] is not None:
            best = t["value"] if best is None else max(best, t["value"])
        curve.append([round(used, 2), best])
    states = {}
    for t in trials:
        states[t["state"]] = states.get(t["state"], 0) + 1
    return {"trials_run": len(trials), "states": states, "compute_s": round(used, 2), "best_value": best,
            "curve": curve}


def compute_to_reach(curve: list, target: float) -> float | None:
    """Slot-seconds a run used until its best value reached `target`; None if it never did."""
    return next((used for used, best in curve if best is not None and best >= target), None)


def best_at(curve: list, compute_s: float) -> float | None:
    """A run's best value once it had used `compute_s` slot-seconds (its final best past its end)."""
    best = None
    for used, value in curve:
        if used > compute_s + 1e-9:
            break
        best = value
    return best


def _median(values) -> float | None:
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def summarise(results: dict) -> dict:
    """Per method the medians; (c)'s compute to reach (a)'s final best; (c) against (d) at (d)'s compute."""
    summary: dict = {}
    for method, runs in results.items():
        summary[method] = {
            "median_best_value": _median(r["best_value"] for r in runs),
            "median_compute_s": _median(r["compute_s"] for r in runs),
            "median_pick_heldout": _median(r.get("pick_heldout") for r in runs),
            "median_setup_s": _median(t.get("setup_s") for r in runs for t in r.get("trials", [])),
            # Start to first optimizer step. A trial that loaded the base is the first on its process (our slot 0
            # is warmed by the baseline; with --tune-fresh-actors every Tune trial is): it pays the imports too.
            "cold_trials": sum(1 for r in runs for t in r.get("trials", []) if t.get("base_load_s") is not None),
            "cold_setup_s": round(sum(t.get("setup_s") or 0.0 for r in runs for t in r.get("trials", [])
                                      if t.get("base_load_s") is not None), 2),
            "states": {s: sum(r["states"].get(s, 0) for r in runs) for s in sorted({s for r in runs
                                                                                      for s in r["states"]})},
        }
    if PEER in results:
        peer = results[PEER]
        summary[PEER].update(
            median_pick_rule_heldout=_median(r.get("pick_rule_heldout") for r in peer),
            tune_best_is_stopped=sum(1 for r in peer if (r.get("tune_best") or {}).get("stopped")),
            stopped_stored_complete=sum(r["optuna"]["stopped_stored_complete"] for r in peer),
            stopped_by_asha=sum(r["optuna"]["stopped_by_asha"] for r in peer),
        )
    if "random" in results and "tpe_sh" in results:
        summary["tpe_sh_compute_to_reach_random_best"] = reach_ratios(results["random"], results["tpe_sh"])
    if "tpe_sh" in results and PEER in results:
        summary["tpe_sh_vs_ray_tune_at_equal_compute"] = at_equal_compute(results["tpe_sh"], results[PEER])
        summary["tpe_sh_vs_ray_tune_first_trials_same_params"] = same_first_params(results["tpe_sh"], results[PEER])
    summary["goal"] = goal_line(summary)
    return summary


def reach_ratios(baseline_runs: list, runs: list) -> dict:
    """Per seed, the share of the baseline run's compute that `runs` needed to reach its final best."""
    by_seed = {r["seed"]: r for r in runs}
    ratios = []
    for run in baseline_runs:
        other = by_seed.get(run["seed"])
        if other is None or run["best_value"] is None:
            continue
        reached = compute_to_reach(other["curve"], run["best_value"])
        ratios.append(None if reached is None else round(reached / run["compute_s"], 4))
    # A seed that never reached the baseline's best counts as worse than every seed that did (an infinite
    # ratio), not as absent: the median is over all seeds.
    ordered = sorted(ratios, key=lambda r: math.inf if r is None else r)
    median = statistics.median([math.inf if r is None else r for r in ordered]) if ordered else None
    return {"per_seed": ratios, "median": None if median is None or math.isinf(median) else median,
            "median_reached": median is not None and not math.isinf(median),
            "median_of_reached_seeds": _median(ratios), "not_reached": sum(1 for r in ratios if r is None)}


def at_equal_compute(ours: list, peer: list) -> dict:
    """Per seed: the peer's total compute, our best at that compute, the peer's best (its final one)."""
    by_seed = {r["seed"]: r for r in ours}
    rows = []
    for run in peer:
        mine = by_seed.get(run["seed"])
        if mine is None:
            continue
        at = run["compute_s"]
        best = best_at(mine["curve"], at)
        rows.append({
            "seed": run["seed"], "ray_tune_compute_s": at, "tpe_sh_compute_s": mine["compute_s"],
            "tpe_sh_best_at_that_compute": best, "ray_tune_best": run["best_value"],
            "tpe_sh_ahead": best is not None and (run["best_value"] is None or best > run["best_value"]),
            "tie": best is not None and best == run["best_value"],
        })
    return {
        "per_seed": rows,
        "median_ray_tune_compute_s": _median(r["ray_tune_compute_s"] for r in rows),
        "median_tpe_sh_best_at_that_compute": _median(r["tpe_sh_best_at_that_compute"] for r in rows),
        "median_ray_tune_best": _median(r["ray_tune_best"] for r in rows),
        "tpe_sh_ahead_seeds": sum(1 for r in rows if r["tpe_sh_ahead"]),
        "tie_seeds": sum(1 for r in rows if r["tie"]),
        "seeds": len(rows),
    }


def same_first_params(ours: list, peer: list) -> list:
    """Per seed, the trial numbers below which both runs sampled the same parameters (the same seeded sampler:
    the startup draws agree until the first pruning decision that differs reaches TPE)."""
    by_seed = {r["seed"]: r for r in ours}
    agree = []
    for run in peer:
        mine = {t["number"]: t["params"] for t in by_seed.get(run["seed"], {}).get("trials", [])}
        theirs = {t["number"]: t["params"] for t in run["trials"]}
        n = 0
        while n in mine and n in theirs and _same_params(mine[n], theirs[n]):
            n += 1
        agree.append({"seed": run["seed"], "same_params_through_trial": n - 1})
    return agree


def goal_line(summary: dict) -> str:
    """The issue's goal, in one line: (c) reaches (a)'s final best with at most a third of (a)'s compute (median
    over seeds), and (c) is ahead of (d) at equal compute."""
    parts = []
    reach = summary.get("tpe_sh_compute_to_reach_random_best")
    if reach:
        ratio = reach["median"]
        parts.append("(c) reaches (a)'s final best with " + (f"{ratio:.2f}" if ratio is not None else "never")
                     + " of (a)'s compute (median over all seeds, a seed that never reaches counting as worst; "
                       "goal <= 0.33: "
                     + ("met" if ratio is not None and ratio <= 1 / 3 else "not met")
                     + f"; not reached in {reach['not_reached']} seed(s))")
    equal = summary.get("tpe_sh_vs_ray_tune_at_equal_compute")
    if equal:
        mine, theirs = equal["median_tpe_sh_best_at_that_compute"], equal["median_ray_tune_best"]
        parts.append(f"at (d)'s compute (median {equal['median_ray_tune_compute_s']} slot-s) (c) is ahead of (d) "
                     f"in {equal['tpe_sh_ahead_seeds']} of {equal['seeds']} seed(s), tied in {equal['tie_seeds']} "
                     f"(median best {_fmt(mine)} against {_fmt(theirs)})")
    return "; ".join(parts) or "needs random and tpe_sh, or tpe_sh and ray_tune_asha"


def plot(results: dict, path: Path) -> None:
    """Best value so far against slot-seconds: each seed's run thin (a dot where a full trial raised its best, a
    cross where the run ended), the median over seeds thick (up to the compute of the shortest run, where every
    seed has a value); (a)'s median final best and (d)'s median compute dotted."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    fig, ax = plt.subplots(figsize=(9, 5.5), dpi=120)
    for method in [m for m in METHODS if m in results]:
        runs, colour = results[method], COLOURS[method]
        for run in runs:
            points = [(used, best) for used, best in run["curve"] if best is not None]
            if not points:
                continue
            xs, ys = zip(*points, strict=True)
            ax.plot([*xs, run["compute_s"]], [*ys, ys[-1]], drawstyle="steps-post", color=colour, lw=0.8, alpha=0.4)
            raised = [(x, y) for i, (x, y) in enumerate(points) if i == 0 or y > points[i - 1][1]]
            ax.plot(*zip(*raised, strict=True), "o", color=colour, ms=3, alpha=0.5)
            ax.plot(run["compute_s"], ys[-1], "x", color=colour, ms=6, alpha=0.7)
        grid = np.linspace(0.0, min(r["compute_s"] for r in runs), 400)
        per_seed = np.array([[np.nan if (b := best_at(r["curve"], x)) is None else b for x in grid] for r in runs])
        defined = ~np.isnan(per_seed).any(axis=0)
        median = np.full(grid.shape, np.nan)
        median[defined] = np.median(per_seed[:, defined], axis=0)
        ax.plot(grid, median, drawstyle="steps-post", color=colour, lw=2.6,
                label=f"{LABELS[method]}: median of {len(runs)} seed(s)")
    if "random" in results:
        target = _median(r["best_value"] for r in results["random"])
        if target is not None:
            ax.axhline(target, color=COLOURS["random"], ls=":", lw=1.2, label=f"(a)'s median final best {target:.3f}")
    if PEER in results:
        spent = _median(r["compute_s"] for r in results[PEER])
        ax.axvline(spent, color=COLOURS[PEER], ls=":", lw=1.2, label=f"(d)'s median compute {spent:.0f} slot-s")
    ax.set_xlabel("slot-seconds used (sum of the trials' wall seconds, in the order they finished)")
    ax.set_ylabel("best objective value so far (full trials only)")
    ax.set_title("Search efficiency on the demo (CPU): best value found against compute")
    ax.grid(alpha=0.3)
    ax.set_xlim(0, 1.04 * max(r["compute_s"] for runs in results.values() for r in runs))  # the last crosses
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)


# --- helpers and the command ------------------------------------------------------------------------------------


def _round(value, digits: int = 2):
    return round(float(value), digits) if value is not None else None


def _unix(iso: str | None) -> float:
    return dt.datetime.fromisoformat(iso).timestamp() if iso else float("inf")


def _fmt(value) -> str:
    return f"{value:.4f}" if isinstance(value, float) else str(value)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--methods", default=",".join(METHODS), help=f"of {', '.join(METHODS)}")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--trials", type=int, default=10)
    parser.add_argument("--startup", type=int, default=4, help="TPE's random trials before it models the space")
    parser.add_argument("--concurrency", type=int, help="trials at once, for every method (default: the demo "
                        "config's orchestration.concurrency, 2; the cores split between them)")
    parser.add_argument("--tune-fresh-actors", action="store_true",
                        help="(d): a new Tune actor per trial (Tune's default reuse_actors=False): every trial "
                        "imports torch and loads the base again. Default: actors reused, the base kept loaded "
                        "in each, as our slots keep it")
    parser.add_argument("--out", help="JSON file (default: bench/results/search_efficiency-cpu.json)")
    parser.add_argument("--plot", help="PNG of the curves (default: the JSON's path with .png)")
    parser.add_argument("--from-json", help="summarise and plot an earlier run's JSON again, running nothing")
    args = parser.parse_args(argv)
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    if args.from_json:
        report = json.loads(Path(args.from_json).read_text())
        report["summary"] = summarise(report["runs"])
        out = Path(args.out or args.from_json)
    else:
        methods = args.methods.split(",")
        unknown = [m for m in methods if m not in METHODS]
        if unknown:
            parser.error(f"--methods: unknown {', '.join(unknown)} (choose from {', '.join(METHODS)})")
        report = run_all(methods, [int(s) for s in args.seeds.split(",")], args, argv)
        out = Path(args.out or Path(__file__).parent / "results" / "search_efficiency-cpu.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1) + "\n")
    picture = Path(args.plot) if args.plot else out.with_suffix(".png")
    plot(report["runs"], picture)
    print(json.dumps(report["summary"], indent=1))
    print(report["summary"]["goal"])
    print(f"wrote {out} and {picture}")
    return 0


def run_all(methods: list, seeds: list, args, argv) -> dict:
    from sweep.gpus import resolve_profile

    profile = resolve_profile("cpu", local_check=True)
    results: dict[str, list] = {}
    ray_tmp = os.environ.get("RAY_TMPDIR")
    own_ray_tmp = None
    if not ray_tmp:  # Ray's sessions in a directory of this run's own (short: socket paths fit in 107 bytes)
        own_ray_tmp = os.environ["RAY_TMPDIR"] = tempfile.mkdtemp(prefix="se-ray-", dir="/tmp")
    try:
        with tempfile.TemporaryDirectory(prefix="search-efficiency-") as tmp:
            for method in methods:
                for seed in seeds:
                    work = Path(tmp) / f"{method}-{seed}"
                    run = (run_tune(seed, args, work, profile) if method == PEER
                           else run_ours(method, seed, args, work, profile))
                    results.setdefault(method, []).append(run)
                    extra = ""
                    if method == PEER:
                        extra = (f"; Tune's best: trial {run['tune_best'] and run['tune_best']['number']} "
                                 f"(stopped: {run['tune_best'] and run['tune_best']['stopped']}); stopped trials "
                                 f"Optuna stored COMPLETE: {run['optuna']['stopped_stored_complete']}")
                    print(f"{method} seed {seed}: best {run['best_value']} in {run['compute_s']} slot-s "
                          f"({run['states']}){extra}", flush=True)
    finally:
        if own_ray_tmp:
            shutil.rmtree(own_ray_tmp, ignore_errors=True)
            os.environ.pop("RAY_TMPDIR", None)
    from trainer_throughput import versions

    config = bench_config("tpe_sh", seeds[0], args, Path("."))
    return {
        "benchmark": "search_efficiency",
        "command": "python bench/search_efficiency.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "device": f"cpu ({os.cpu_count()} cores)",
        "trials": args.trials, "tpe_startup_trials": args.startup,
        "concurrency": config.orchestration.concurrency or 1,
        "rungs": config.study.rungs, "rung_eval_docs": config.study.rung_eval_docs,
        "reduction_factor": config.study.reduction_factor,
        "tune_reuse_actors": not args.tune_fresh_actors,
        "versions": versions("ray", "optuna", "torch", "transformers", "lm-eval"),
        "summary": summarise(results),
        "runs": results,
    }


if __name__ == "__main__":
    sys.exit(main())
