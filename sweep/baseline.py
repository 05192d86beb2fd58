"""The untuned base's scores (the baseline), taken once per study on slot 0, and the log line of a slot's
base load."""

from __future__ import annotations

import logging
from typing import Optional

from evaluator.score import suite_values
from sweep.config import SweepConfig, to_dict
from sweep.context import Run, baseline_spec
from sweep.faults import SweepError
from sweep.progress import fmt_values
from sweep.worker import failure_reason, out_of_memory_reason

log = logging.getLogger("sweep")


def run_baseline(run: Run) -> None:
    """Scores the untuned base on slot 0 (whose base then stays loaded) and records it in our table.

    Never as a trial: it must not feed the sampler.
    """
    import ray

    config = run.config
    log.info("Scoring the untuned base model %s (the baseline)", config.model.name_or_path)
    spec = baseline_spec(run)
    try:
        result = ray.get(run.pool.actors[0].baseline.remote(spec))
    except ray.exceptions.RayError as e:
        run.pool.check(0)
        why = out_of_memory_reason(spec.log_file) or failure_reason(e)
        raise SweepError(f"scoring the base model failed: {why} (log: {spec.log_file})") from None
    log_base_load(config, result.base_load_seconds, 0)
    values = suite_values(result.scores, config.evaluator, baseline=result.scores)
    value = values[config.evaluator.objective_suite]
    run.store.record_baseline(
        run.study.study_name, config.model.name_or_path, value, result.scores, result.eval_seconds, values,
        stderrs=result.stderrs, num_docs=result.num_docs,
    )
    # How the base was scored: an export of the untuned base (when it is the pick) loads it the same way.
    run.study.set_user_attr("baseline_base", {"model": to_dict(config.model), "mode": config.trainer.mode})
    log.info("Baseline: %s scores=%s", fmt_values(values), fmt_values(result.scores))
    if run.trackers is not None:
        run.trackers.baseline(config.model.name_or_path, result.scores, values, result.stderrs)


def log_base_load(config: SweepConfig, seconds: Optional[float], slot: int, base: Optional[dict] = None) -> None:
    """The slot's base load (or swap, when the trial needed another format than the resident one) in the log."""
    if seconds is None:
        return
    from trainer.model import base_label

    form = f" ({base_label(base)})" if base else ""
    if base and base.get("swapped_from"):
        log.info("Slot %d swapped its base: %s -> %s, in %.1fs", slot, base["swapped_from"], base_label(base), seconds)
    else:
        log.info("Loaded base %s%s in %.1fs (slot %d)", config.model.name_or_path, form, seconds, slot)

