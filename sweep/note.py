"""The study's note on the dashboard: the pick and why, the top-k, the rank correlation, the baseline.

A Markdown note (optuna-dashboard's note API) that the driver writes again as trials finish, so the
study's page says which trial is the submission, not only which has the best objective value.
"""

from __future__ import annotations

import datetime as dt
from typing import Any, Optional


def dashboard_best(status: dict[str, Any]) -> Optional[dict]:
    """The trial the dashboard labels "Best Trial": the best objective value among COMPLETE trials, feasible
    or not (the storage's own best), the earlier trial on a tie."""
    complete = [t for t in status["trials"] if t["state"] == "COMPLETE" and t["value"] is not None]
    if not complete:
        return None
    sign = 1.0 if status["direction"] == "maximize" else -1.0
    return min(complete, key=lambda t: (-sign * t["value"], t["number"]))


def study_note(status: dict[str, Any], now: Optional[dt.datetime] = None) -> str:
    """The note's Markdown for a study as `sweep.export.study_status` describes it."""
    optimize, pick_by, top_k = status.get("optimize"), status.get("pick_by"), status.get("top_k") or 1
    pick, baseline = status.get("pick"), status.get("baseline")
    lines = []
    if pick is None:
        lines += ["## No pick yet", "", "No COMPLETE, feasible trial yet: the pick appears here when one ends."]
    else:
        why = (f"the best on **{pick_by}** among the top {top_k} trials on **{optimize}**, the objective: it is "
               f"chosen on tasks the search did not tune on"
               if pick_by and pick_by != optimize else f"the best on **{optimize}**")
        if pick.get("untuned"):
            lines += ["## Pick: the untuned base", "",
                      f"The untuned base {pick.get('model', '')} is the submission, {why}: no trial beat it. "
                      "It was scored once, as the baseline, outside the sampler's trials.", "",
                      _values(pick["values"]), "",
                      f"Export it with `sweep export --study {status['study']} --pick --out DIR` (the base's id "
                      "and a model card, no adapter)."]
        else:
            lines += [f"## Pick: trial {pick['number']}", "", f"Trial {pick['number']} is the submission, {why}.",
                      "", f"{_values(pick['values'])}" + (f" (baseline: {_values(baseline['values'])})"
                                                          if baseline and baseline.get("values") else ""),
                      "", f"Export it with `sweep export --study {status['study']} --pick --out DIR`."]
        best = dashboard_best(status)
        if best is not None and (pick.get("untuned") or best["number"] != pick["number"]):
            chosen = "the untuned base" if pick.get("untuned") else f"trial {pick['number']}"
            lines += ["", f"> The dashboard's **Best Trial** is trial {best['number']}: the best on {optimize} "
                          f"alone, among the trials. The pick is {chosen}."]
    lines += _top_table(status, optimize, pick_by, top_k)
    rho = status.get("rank_correlation")
    if rho is not None:
        lines += ["", f"Rank correlation {optimize}/{pick_by} over the COMPLETE trials (Spearman): **{rho:.2f}**"
                      + (" — the objective says little about the held-out tasks" if rho < 0.5 else "")]
    if baseline:
        lines += ["", "### Baseline (the untuned base)", "", f"{baseline['model']}: {_values(baseline['values'])}"
                  if baseline.get("values") else f"{baseline['model']}: {baseline['value']:.4f}"]
    counts = {}
    for t in status["trials"]:
        counts[t["state"]] = counts.get(t["state"], 0) + 1
    stamp = (now or dt.datetime.now(dt.timezone.utc)).strftime("%Y-%m-%d %H:%M UTC")
    lines += ["", "Trials: " + ", ".join(f"{n} {state}" for state, n in sorted(counts.items()))
              + f". Updated {stamp} by `sweep start`; `sweep report` draws the study."]
    return "\n".join(lines) + "\n"


def _top_table(status: dict[str, Any], optimize: Optional[str], pick_by: Optional[str], top_k: int) -> list[str]:
    from sweep.export import base_row, ranked_candidates

    top = ranked_candidates(status["trials"], optimize, pick_by, status["direction"] == "maximize",
                            base_row(status.get("baseline")))[:top_k]
    if not top:
        return []
    suites = [s for s in (optimize, pick_by) if s]
    params = sorted({p for t in top for p in t["params"]})
    header = ["trial", *suites, *[p.split(".")[-1] for p in params]]
    pick = status.get("pick")

    def name(t):  # the base's number is None, as the pick's is when the base is the pick
        label = "base (untuned)" if t.get("untuned") else str(t["number"])
        return f"**{label}** (pick)" if pick and t["number"] == pick["number"] else label

    rows = [[name(t),
             *[f"{t['values'][s]:.4f}" for s in suites], *[_cell(t["params"].get(p)) for p in params]] for t in top]
    return ["", f"### Top {len(top)} on {optimize}", "", "| " + " | ".join(header) + " |",
            "|" + "---|" * len(header), *["| " + " | ".join(r) + " |" for r in rows]]


def _values(values: dict) -> str:
    return ", ".join(f"{name} {value:.4f}" for name, value in values.items())


def _cell(value) -> str:
    if value is None:
        return ""
    return f"{value:.3g}" if isinstance(value, float) else str(value)


def update_study_note(study, store) -> None:
    """Writes the study's note again from what the storage holds now."""
    from optuna_dashboard import save_note

    from sweep.export import study_status

    save_note(study, study_note(study_status(study, store)))
