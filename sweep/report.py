"""A static HTML report of a study: `index.html` and the PNG plots beside it, readable offline.

`write_report` takes the study's status (`sweep.export.study_status`) and the Optuna study, draws one
figure per `plot_*` function and writes the page. Each `plot_*` function returns a matplotlib `Figure`
drawn without pyplot's global state (the one Optuna plot is closed out of pyplot at once), or raises
`NothingToPlot` with the reason the page shows instead of the image.
"""

from __future__ import annotations

import html
import math
import os
import sys
import warnings
from collections import Counter
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Optional

from sweep.export import candidates, pick_label

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

DPI = 110
FIGSIZE = (7.0, 4.0)
FINISHED = ("COMPLETE", "PRUNED", "FAIL")
STATE_COLORS = {"COMPLETE": "#4c72b0", "PRUNED": "#dd8452", "FAIL": "#c44e52", "RUNNING": "#8c8c8c"}
STATE_COLORMAPS = {"COMPLETE": "Blues", "PRUNED": "Oranges", "FAIL": "Reds"}
PICK_COLOR = "#2a9d8f"
BEST_COLOR = "#1f3a60"
BASELINE_COLOR = "#7f7f7f"
BUDGET_COLOR = "#c44e52"
GRID_COLOR = "#e6e6e6"
SOURCE_COLORS = ("#4c72b0", "#dd8452", "#55a868", "#8172b3", "#ccb974", "#64b5cd", "#da8bc3", "#937860")
MAX_MIX_TRIALS = 8
MAX_LOSS_LEGEND = 12


class NothingToPlot(Exception):
    """A plot has no data to show; the message says why, in words for the page."""


@dataclass(frozen=True)
class Section:
    """One figure of the page: its file, heading, caption and how to draw it."""

    file: str
    title: str
    caption: str
    draw: Callable[[], "Figure"]


def write_report(status: dict[str, Any], study, out: Path) -> Path:
    """Writes `out/index.html` and its PNG plots; reads the study, never writes it.

    Args:
        status: the study's status (`sweep.export.study_status`).
        study: the Optuna study (read only: the parameter importances come from it).
        out: the report's directory, created with its parents; files of an earlier report are replaced.

    Returns:
        The path of `index.html`.
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    figures = []
    for section in sections(status, study):
        figures.append((section, _save_section(section, out)))
    index = out / "index.html"
    staging = out / ".index.html.tmp"
    staging.write_text(render_page(status, figures), encoding="utf-8")
    os.replace(staging, index)  # a reader never sees half a page
    return index


def _save_section(section: Section, out: Path) -> Optional[str]:
    """Draws and saves one section's figure; returns None when saved, else the reason it is missing."""
    path = out / section.file
    try:
        figure = section.draw()
    except NothingToPlot as e:
        path.unlink(missing_ok=True)  # an earlier report's image would not match this page
        return str(e)
    figure.savefig(path, dpi=DPI, facecolor="white")
    return None


def sections(status: dict[str, Any], study) -> list[Section]:
    """The report's figures in page order, their captions filled in from `status`."""
    optimize = status.get("optimize") or "the objective"
    pick_by = status.get("pick_by")
    unit = status.get("hours_unit") or "GPU-hours"
    top_k = status.get("top_k") or 1
    named = f" ({status['optimize']})" if status.get("optimize") else ""
    suites_title = f"{pick_by} against {optimize}" if pick_by and status.get("optimize") else "Suite against suite"
    return [
        Section("history.png", "Optimisation history",
                f"The objective{named} of every trial by number ({status.get('direction', 'maximize')}d), with the "
                "best so far. Pruned trials sit at their last reported value; failed ones are marked at the foot.",
                lambda: plot_history(status)),
        Section("importances.png", "Parameter importances",
                "How much of the objective's variation each parameter explains across COMPLETE trials "
                "(Optuna's fANOVA evaluator).", lambda: plot_importances(study)),
        Section("suites.png", suites_title,
                f"COMPLETE feasible trials on the objective suite and the suite that picks the submission: the top "
                f"{top_k} on {optimize} are ringed, the pick is the star.", lambda: plot_suites(status)),
        Section("losses.png", "Training loss",
                "Training loss by step of every trial (smoothed); pruned trials dashed, the pick drawn thick.",
                lambda: plot_losses(status)),
        Section("tasks.png", "Pick against the baseline, by task",
                "Per-task scores of the pick and of the untuned base model, with one standard error.",
                lambda: plot_task_scores(status)),
        Section("data_mix.png", "Data mix of the top trials",
                f"Share of each data source in the training examples of the best trials on {optimize} (up to "
                f"{MAX_MIX_TRIALS}), best at the top.", lambda: plot_data_mix(status)),
        Section("hours.png", f"{unit} used",
                f"Cumulative {unit} (start to finish of each trial) in the order trials finished, against the "
                "budget when there is one.", lambda: plot_hours(status)),
    ]


# Plots


def plot_history(status: dict[str, Any]) -> "Figure":
    """Objective value of each trial by number: COMPLETE points, the best-so-far line, PRUNED trials at
    their last intermediate value, FAIL ones at the foot, the baseline as a line and the pick as a star."""
    trials = status["trials"]
    if not any(t["state"] in FINISHED for t in trials):
        raise NothingToPlot("No trial has finished yet.")
    fig, ax = _figure()
    complete = [t for t in trials if t["state"] == "COMPLETE" and t.get("value") is not None]
    feasible = [t for t in complete if t.get("feasible") is not False]
    infeasible = [t for t in complete if t.get("feasible") is False]
    _scatter(ax, feasible, [t["value"] for t in feasible], color=STATE_COLORS["COMPLETE"], label="complete")
    _scatter(ax, infeasible, [t["value"] for t in infeasible], facecolors="none",
             edgecolors=STATE_COLORS["COMPLETE"], label="complete, infeasible")
    _best_so_far(ax, feasible, _maximize(status), last=max(t["number"] for t in trials))
    pruned = [t for t in trials if t["state"] == "PRUNED" and _last_reported(t) is not None]
    _scatter(ax, pruned, [_last_reported(t) for t in pruned], marker="v", color=STATE_COLORS["PRUNED"],
             label="pruned (last report)")
    failed = [t for t in trials if t["state"] == "FAIL"]
    if failed:  # no value to place them by: at the foot of the axes
        ax.scatter([t["number"] for t in failed], [0.03] * len(failed), marker="X", s=60,
                   color=STATE_COLORS["FAIL"], transform=ax.get_xaxis_transform(), label="failed", zorder=4)
    _baseline_line(ax, status)
    pick = status.get("pick")
    if pick is not None and pick.get("value") is not None:
        # The untuned base is no trial: its star sits on the baseline, left of trial 0.
        x = -0.6 if pick.get("untuned") else pick["number"]
        ax.scatter([x], [pick["value"]], marker="*", s=320, color=PICK_COLOR, edgecolors="black",
                   linewidths=0.8, label=f"pick: {pick_label(pick)}", zorder=6)
    _integer_ticks(ax)
    ax.set_xlabel("trial number")
    ax.set_ylabel(f"objective: {status.get('optimize') or 'value'}")
    ax.set_title(f"Optimisation history ({status.get('direction', 'maximize')})", loc="left")
    ax.legend(fontsize="small", framealpha=0.9)
    return fig


def plot_importances(study) -> "Figure":
    """Optuna's parameter-importance plot (fANOVA, fixed seed), restyled to the report's look.

    Raises:
        NothingToPlot: fewer than 2 COMPLETE trials, or no parameter that differs between them.
    """
    from optuna.exceptions import ExperimentalWarning
    from optuna.importance import FanovaImportanceEvaluator
    from optuna.trial import TrialState
    from optuna.visualization.matplotlib import plot_param_importances

    complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    if len(complete) < 2:
        raise NothingToPlot(f"Parameter importances need at least 2 COMPLETE trials; this study has "
                            f"{len(complete)}.")
    names = {name for t in complete for name in t.params}
    if not any(len({repr(t.params.get(name)) for t in complete}) > 1 for name in names):
        raise NothingToPlot("Parameter importances need COMPLETE trials whose parameters differ; these don't.")
    plt = _pyplot()
    import matplotlib

    with warnings.catch_warnings(), matplotlib.rc_context():  # Optuna sets the ggplot style globally: undo it
        warnings.simplefilter("ignore", ExperimentalWarning)
        try:
            ax = plot_param_importances(study, evaluator=FanovaImportanceEvaluator(seed=0))
        except (ValueError, RuntimeError) as e:
            raise NothingToPlot(f"Optuna could not compute parameter importances ({e}).") from None
        fig = ax.figure
        plt.close(fig)  # out of pyplot's registry: saved by us, then garbage
    _restyle_importances(fig, ax)
    return fig


def _restyle_importances(fig: "Figure", ax: "Axes") -> None:
    fig.set_size_inches(*FIGSIZE)
    fig.set_dpi(DPI)
    fig.set_layout_engine("constrained")
    fig.set_facecolor("white")
    _style(ax)
    ax.grid(axis="y", visible=False)
    for bar in ax.patches:
        bar.set_facecolor(STATE_COLORS["COMPLETE"])
    if ax.get_legend() is not None:  # one objective: the legend says nothing
        ax.get_legend().remove()
    ax.set_title("Parameter importances for the objective (fANOVA)", loc="left")
    ax.set_xlabel("importance (share of the objective's variance)", fontsize=10, color="#222222")
    ax.set_ylabel("")
    for text in ax.texts:
        text.set_fontsize(8)


def plot_suites(status: dict[str, Any]) -> "Figure":
    """`pick_by` suite against the objective suite over COMPLETE feasible trials: the top-k on the objective
    ringed, the pick starred and labelled, the baseline as a diamond, the rank correlation in the title."""
    x_suite, y_suite = status.get("optimize"), status.get("pick_by")
    if not x_suite or not y_suite or x_suite == y_suite:
        raise NothingToPlot("The pick is the best on one suite alone: there is no second suite to plot.")
    trials = candidates(status["trials"], x_suite, y_suite)
    if not trials:
        raise NothingToPlot(f"No COMPLETE feasible trial has values on both {x_suite} and {y_suite} yet.")
    fig, ax = _figure()
    xs, ys = [t["values"][x_suite] for t in trials], [t["values"][y_suite] for t in trials]
    ax.scatter(xs, ys, s=40, color=STATE_COLORS["COMPLETE"], label="complete, feasible", zorder=3)
    _number_labels(ax, trials, xs, ys, skip=(status.get("pick") or {}).get("number"))
    top_k = max(1, int(status.get("top_k") or 1))
    top = _top(trials, x_suite, top_k, _maximize(status))
    ax.scatter([t["values"][x_suite] for t in top], [t["values"][y_suite] for t in top], s=190, facecolors="none",
               edgecolors=BEST_COLOR, linewidths=1.4, label=f"top {top_k} on {x_suite}", zorder=4)
    _suites_pick(ax, status, x_suite, y_suite)
    _suites_baseline(ax, status, x_suite, y_suite)
    ax.set_xlabel(f"{x_suite} (objective)")
    ax.set_ylabel(f"{y_suite} (picks the submission)")
    rho = status.get("rank_correlation")
    title = f"{y_suite} against {x_suite}" + ("" if rho is None else f" — Spearman ρ = {rho:+.2f}")
    ax.set_title(title, loc="left")
    ax.legend(fontsize="small", framealpha=0.9)
    return fig


def _number_labels(ax: "Axes", trials: list[dict], xs: list[float], ys: list[float], skip: Optional[int]) -> None:
    """Each point's trial number beside it, but the skipped one's (the pick has its own label)."""
    for t, x, y in zip(trials, xs, ys, strict=True):
        if t["number"] != skip:
            ax.annotate(f"{t['number']}", (x, y), textcoords="offset points", xytext=(5, 4), fontsize=7,
                        color="#555555")


def _suites_pick(ax: "Axes", status: dict[str, Any], x_suite: str, y_suite: str) -> None:
    pick = status.get("pick")
    values = (pick or {}).get("values") or {}
    if values.get(x_suite) is None or values.get(y_suite) is None:
        return
    point = (values[x_suite], values[y_suite])
    ax.scatter(*point, marker="*", s=320, color=PICK_COLOR, edgecolors="black", linewidths=0.8,
               label=f"pick: {pick_label(pick)}", zorder=6)
    ax.annotate(f"pick: {pick_label(pick)}", point, textcoords="offset points", xytext=(9, -13),
                fontsize=9, fontweight="bold", color=PICK_COLOR)


def _suites_baseline(ax: "Axes", status: dict[str, Any], x_suite: str, y_suite: str) -> None:
    values = (status.get("baseline") or {}).get("values") or {}
    if values.get(x_suite) is None or values.get(y_suite) is None:
        return
    ax.scatter(values[x_suite], values[y_suite], marker="D", s=60, color=BASELINE_COLOR, label="baseline", zorder=5)


def plot_losses(status: dict[str, Any]) -> "Figure":
    """Training loss curves of every trial that logged losses: pruned dashed, failed dotted, the pick thick;
    one legend entry per trial (per state when there are many)."""
    trials = [t for t in status["trials"] if t.get("losses")]
    if not trials:
        raise NothingToPlot("No trial has logged training losses yet.")
    pick_number = (status.get("pick") or {}).get("number")
    fig, ax = _figure()
    shades = _shades(trials)
    per_trial = len(trials) <= MAX_LOSS_LEGEND
    for t in trials:
        steps, losses = zip(*t["losses"], strict=True)
        is_pick = t["number"] == pick_number
        label = f"trial {t['number']} ({t['state'].lower()})" + (", pick" if is_pick else "")
        ax.plot(steps, _smooth(losses), color=PICK_COLOR if is_pick else shades[t["number"]],
                linestyle={"PRUNED": "--", "FAIL": ":"}.get(t["state"], "-"), linewidth=2.6 if is_pick else 1.3,
                zorder=5 if is_pick else 3, label=label if per_trial or is_pick else None)
    if not per_trial:
        _state_legend_proxies(ax, {t["state"] for t in trials})
    all_losses = [loss for t in trials for _, loss in t["losses"]]
    if min(all_losses) > 0 and max(all_losses) / min(all_losses) > 10:
        ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("training loss (smoothed)")
    ax.set_title("Training loss by trial", loc="left")
    ax.legend(fontsize="small", ncols=2 if len(trials) > 6 else 1, framealpha=0.9)
    return fig


def _shades(trials: list[dict]) -> dict[int, Any]:
    """A shade of its state's colour for each trial, darker for later trials."""
    import matplotlib

    by_state: dict[str, list[int]] = {}
    for t in trials:
        by_state.setdefault(t["state"], []).append(t["number"])
    shades = {}
    for state, numbers in by_state.items():
        cmap = matplotlib.colormaps[STATE_COLORMAPS.get(state, "Greys")]
        for i, number in enumerate(numbers):
            shades[number] = cmap(0.45 + 0.45 * i / max(1, len(numbers) - 1))
    return shades


def _state_legend_proxies(ax: "Axes", states: set[str]) -> None:
    for state in (s for s in (*FINISHED, "RUNNING") if s in states):
        ax.plot([], [], color=STATE_COLORS[state], linestyle={"PRUNED": "--", "FAIL": ":"}.get(state, "-"),
                label=state.lower())


def _smooth(values: tuple[float, ...], weight: float = 0.9) -> list[float]:
    """TensorBoard's debiased exponential moving average; short curves are left as they are."""
    if len(values) < 20:
        return list(values)
    smoothed, average = [], 0.0
    for i, value in enumerate(values, start=1):
        average = weight * average + (1 - weight) * value
        smoothed.append(average / (1 - weight**i))
    return smoothed


def plot_task_scores(status: dict[str, Any]) -> "Figure":
    """The pick's score on each task beside the baseline's, as grouped bars with standard-error bars. Where the
    untuned base is the pick, the best trial on the objective stands beside it instead."""
    pick = status.get("pick")
    if pick is None:
        raise NothingToPlot("There is no pick (no COMPLETE feasible trial) to compare with the baseline.")
    shown = status.get("best") if pick.get("untuned") else pick
    if shown is None:
        raise NothingToPlot("The untuned base is the pick and no trial is COMPLETE to set beside it.")
    role = "best on the objective; the pick is the untuned base" if pick.get("untuned") else "pick"
    pick = shown
    trial = next((t for t in status["trials"] if t["number"] == pick["number"]), {})
    scores = trial.get("scores") or {}
    baseline = status.get("baseline") or {}
    base_scores = baseline.get("scores") or {}
    tasks = list(scores) + [task for task in base_scores if task not in scores]
    if not tasks:
        raise NothingToPlot(f"Trial {pick['number']} (the pick) has no per-task scores.")
    fig, ax = _figure()
    positions = list(range(len(tasks)))
    width = 0.4 if base_scores else 0.6
    offset = width / 2 if base_scores else 0.0
    label = f"pick: trial {pick['number']}" if role == "pick" else f"trial {pick['number']}, {role}"
    _bars(ax, [p - offset for p in positions], tasks, scores, trial.get("stderrs") or {}, width, PICK_COLOR,
          f"{label} ({_values_text(trial.get('values'))})")
    if base_scores:
        _bars(ax, [p + offset for p in positions], tasks, base_scores, baseline.get("stderrs") or {}, width,
              BASELINE_COLOR, f"baseline ({_values_text(baseline.get('values'))})")
    ax.set_xticks(positions, tasks, rotation=25 if len(tasks) > 4 else 0, ha="right" if len(tasks) > 4 else "center")
    ax.grid(axis="x", visible=False)
    ax.set_ylim(0, _bar_top(ax) * 1.25)  # room for the legend above the bars
    ax.set_ylabel("score")
    ax.set_title(f"Trial {pick['number']} ({role}) against the baseline, by task", loc="left")
    ax.legend(fontsize="small", framealpha=0.9)
    return fig


def _bars(ax: "Axes", positions: list[float], tasks: list[str], scores: dict, stderrs: dict, width: float,
          color: str, label: str) -> None:
    heights = [scores.get(task) if scores.get(task) is not None else math.nan for task in tasks]
    errors = [stderrs.get(task) or 0.0 for task in tasks]
    ax.bar(positions, heights, width, yerr=errors, capsize=3, color=color, label=label, zorder=3,
           error_kw={"elinewidth": 1, "ecolor": "#333333"})


def _bar_top(ax: "Axes") -> float:
    """The highest bar plus its error bar (1 when there is nothing above 0)."""
    tops = [line.get_ydata().max() for line in ax.lines if len(line.get_ydata())]
    tops += [bar.get_height() for bar in ax.patches if not math.isnan(bar.get_height())]
    return max([t for t in tops if not math.isnan(t)] + [0.0]) or 1.0


def plot_data_mix(status: dict[str, Any]) -> "Figure":
    """Stacked horizontal bars of the data-source weights of the best COMPLETE trials on the objective (up to
    `MAX_MIX_TRIALS`): the weights the trial trained on, or its `data.mix.*` parameters normalised."""
    complete = [t for t in status["trials"] if t["state"] == "COMPLETE" and t.get("value") is not None]
    top = [(t, w) for t in _top(complete, None, MAX_MIX_TRIALS, _maximize(status)) if (w := _mix_weights(t))]
    if not top:
        raise NothingToPlot("No COMPLETE trial has data-mix weights to show.")
    sources = list(dict.fromkeys(source for _, weights in top for source in weights))
    fig, ax = _figure(height=max(2.6, 1.4 + 0.42 * len(top)))
    labels = [_mix_label(t, status) for t, _ in top]
    left = [0.0] * len(top)
    for i, source in enumerate(sources):
        widths = [weights.get(source, 0.0) for _, weights in top]
        bars = ax.barh(labels, widths, left=left, color=SOURCE_COLORS[i % len(SOURCE_COLORS)], label=source,
                       edgecolor="white", linewidth=0.8, zorder=3)
        ax.bar_label(bars, [f"{w:.0%}" if w >= 0.07 else "" for w in widths], label_type="center", fontsize=8,
                     color="white")
        left = [a + b for a, b in zip(left, widths, strict=True)]
    ax.invert_yaxis()  # the best trial on top
    ax.set_xlim(0, max(1.0, *left))
    ax.xaxis.set_major_formatter(_percent())
    ax.grid(axis="y", visible=False)
    ax.set_xlabel("share of training examples")
    ax.set_title(f"Data mix of the top {len(top)} trials on {status.get('optimize') or 'the objective'}", loc="left")
    fig.legend(loc="outside lower center", ncols=min(len(sources), 6), fontsize="small", frameon=False)
    return fig


def _mix_weights(trial: dict) -> dict[str, float]:
    """The weights the trial's data actually had, else its `data.mix.*` parameters normalised."""
    weights = (trial.get("data") or {}).get("weights")
    if weights:
        return {str(k): float(v) for k, v in weights.items()}
    mix = {k.removeprefix("data.mix."): float(v) for k, v in trial["params"].items()
           if k.startswith("data.mix.") and isinstance(v, (int, float))}
    total = sum(mix.values())
    return {k: v / total for k, v in mix.items()} if total > 0 else {}


def _mix_label(trial: dict, status: dict[str, Any]) -> str:
    pick = " (pick)" if trial["number"] == (status.get("pick") or {}).get("number") else ""
    return f"trial {trial['number']}{pick}: {_fmt(trial['value'])}"


def plot_hours(status: dict[str, Any]) -> "Figure":
    """Cumulative hours of the finished trials (finish minus start, else `wall_seconds`) in finish order, with
    the budget as a line when there is one."""
    finished = sorted((t for t in status["trials"] if t["state"] in FINISHED and _hours(t) is not None),
                      key=lambda t: (t.get("finished_at") or "", t["number"]))
    if not finished:
        raise NothingToPlot("No finished trial has a duration yet.")
    unit = status.get("hours_unit") or "GPU-hours"
    cumulative = _cumulative([_hours(t) for t in finished])
    order = list(range(1, len(finished) + 1))
    fig, ax = _figure()
    ax.plot([0, *order], [0.0, *cumulative], color=BEST_COLOR, linewidth=1.6, zorder=3)
    for state in FINISHED:
        points = [(i, h) for i, h, t in zip(order, cumulative, finished, strict=True) if t["state"] == state]
        if points:
            ax.scatter(*zip(*points, strict=True), color=STATE_COLORS[state], label=state.lower(), zorder=4)
    _number_labels(ax, finished, order, cumulative, skip=None)
    budget = status.get("budget_hours")
    if budget is not None:
        ax.axhline(budget, color=BUDGET_COLOR, linestyle="--", linewidth=1.4, label=f"budget: {budget:g} {unit}")
    used = cumulative[-1]
    share = f" of {budget:g} ({used / budget:.1%})" if budget else ""
    ax.set_title(f"{_fmt(used)} {unit} used{share}", loc="left")
    _integer_ticks(ax)
    ax.set_xlabel("trials finished, in finish order")
    ax.set_ylabel(f"cumulative {unit}")
    ax.set_ylim(bottom=0)
    ax.legend(fontsize="small", framealpha=0.9)
    return fig


def _hours(trial: dict) -> Optional[float]:
    """The trial's duration in hours: finish minus start, else its wall-clock seconds."""
    start, finish = trial.get("started_at"), trial.get("finished_at")
    if start and finish:
        try:
            return max(0.0, (datetime.fromisoformat(finish) - datetime.fromisoformat(start)).total_seconds() / 3600)
        except ValueError:
            pass
    wall = trial.get("wall_seconds")
    return wall / 3600 if wall is not None else None


def _cumulative(values: list[float]) -> list[float]:
    total, out = 0.0, []
    for value in values:
        total += value
        out.append(total)
    return out


# Drawing helpers


def _figure(width: float = FIGSIZE[0], height: float = FIGSIZE[1]) -> tuple["Figure", "Axes"]:
    """A figure outside pyplot (so nothing global is left behind) with one styled axes."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=DPI, layout="constrained", facecolor="white")
    ax = fig.add_subplot()
    _style(ax)
    return fig, ax


def _style(ax: "Axes") -> None:
    ax.set_facecolor("white")
    ax.grid(True, color=GRID_COLOR, linewidth=0.8, zorder=0)
    ax.set_axisbelow(True)
    for side in ("top", "right"):
        ax.spines[side].set_visible(False)
    for side in ("left", "bottom"):
        ax.spines[side].set_color("#999999")
    ax.tick_params(colors="#333333", labelsize=9)
    ax.title.set_fontsize(11)


def _pyplot():
    """pyplot on the Agg backend (only Optuna's plots need it), unless the caller already chose a backend."""
    import matplotlib

    if "matplotlib.pyplot" not in sys.modules:
        matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _scatter(ax: "Axes", trials: list[dict], values: list[float], **kwargs) -> None:
    if trials:
        ax.scatter([t["number"] for t in trials], values, s=kwargs.pop("s", 42), zorder=4, **kwargs)


def _best_so_far(ax: "Axes", trials: list[dict], maximize: bool, last: int) -> None:
    """A step line of the best value so far, carried on to the last trial."""
    if not trials:
        return
    better = max if maximize else min
    numbers, best, current = [], [], None
    for t in sorted(trials, key=lambda t: t["number"]):
        current = t["value"] if current is None else better(current, t["value"])
        numbers.append(t["number"])
        best.append(current)
    numbers.append(max(last, numbers[-1]))
    best.append(best[-1])
    ax.step(numbers, best, where="post", color=BEST_COLOR, linewidth=1.6, label="best so far", zorder=3)


def _baseline_line(ax: "Axes", status: dict[str, Any]) -> None:
    value = (status.get("baseline") or {}).get("value")
    if value is not None:
        ax.axhline(value, color=BASELINE_COLOR, linestyle="--", linewidth=1.3, label=f"baseline ({_fmt(value)})")


def _integer_ticks(ax: "Axes") -> None:
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))


def _percent():
    from matplotlib.ticker import PercentFormatter

    return PercentFormatter(1.0, decimals=0)


# Selections


def _maximize(status: dict[str, Any]) -> bool:
    return status.get("direction", "maximize") != "minimize"


def _top(trials: list[dict], suite: Optional[str], k: int, maximize: bool) -> list[dict]:
    """The `k` best trials on `suite` (on the objective value when None), ties to the earlier trial."""
    sign = -1.0 if maximize else 1.0

    def key(t: dict) -> tuple[float, int]:
        return sign * (t["values"][suite] if suite else t["value"]), t["number"]

    return sorted(trials, key=key)[:k]


def _last_reported(trial: dict) -> Optional[float]:
    intermediate = trial.get("intermediate") or []
    return intermediate[-1][1] if intermediate else trial.get("value")


# The page


def render_page(status: dict[str, Any], figures: list[tuple[Section, Optional[str]]]) -> str:
    """The report's HTML: the summary, the trials table and each figure (or why it is missing).

    Args:
        status: the study's status (`sweep.export.study_status`).
        figures: each section with None when its image was written, else the reason it was not.
    """
    name = html.escape(str(status.get("study", "")))
    body = "\n".join([
        f"<h1>Study {name}</h1>",
        _summary_html(status),
        '<div class="grid">',
        *(_figure_html(section, missing) for section, missing in figures),
        "</div>",
        "<h2>Trials</h2>",
        _trials_table_html(status),
    ])
    return (f'<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
            f'<meta name="viewport" content="width=device-width, initial-scale=1">\n'
            f"<title>Sweep report: {name}</title>\n<style>{CSS}</style>\n</head>\n<body>\n{body}\n</body>\n</html>\n")


def _figure_html(section: Section, missing: Optional[str]) -> str:
    title, caption = html.escape(section.title), html.escape(section.caption)
    if missing is None:
        content = f'<img src="{html.escape(section.file)}" alt="{title}">'
    else:
        content = f'<p class="missing">{html.escape(missing)}</p>'
    return f"<figure>\n<h3>{title}</h3>\n{content}\n<figcaption>{caption}</figcaption>\n</figure>"


def _summary_html(status: dict[str, Any]) -> str:
    lines = [f'<p class="pick-line">{html.escape(pick_line(status))}</p>', _values_table_html(status),
             f"<p>{html.escape(_counts_text(status))}</p>", f"<p>{html.escape(_correlation_text(status))}</p>"]
    best = status.get("best")
    if best is not None:
        text = f"Best on the objective: trial {best['number']} ({_fmt(best['value'])})."
        lines.append(f"<p>{html.escape(text)}</p>")
    hours = _hours_text(status)
    if hours:
        lines.append(f"<p>{html.escape(hours)}</p>")
    return '<section class="summary">\n' + "\n".join(line for line in lines if line) + "\n</section>"


def pick_line(status: dict[str, Any]) -> str:
    """The submission in words, e.g. "Pick: trial 3 — best on heldout among the top 3 on open"."""
    pick, optimize, pick_by = status.get("pick"), status.get("optimize"), status.get("pick_by")
    if pick is None:
        return "No pick: the study has no COMPLETE feasible trial yet."
    top_k = int(status.get("top_k") or 1)
    if pick_by and pick_by != optimize and top_k > 1:
        rule = f"best on {pick_by} among the top {top_k} on {optimize or 'the objective'}"
    else:
        rule = f"best on {optimize or 'the objective'}"
    return f"Pick: {pick_label(pick)} — {rule}" + (", the untuned base included: no trial beat it; export it "
                                                   "for the base's id and a card, no adapter"
                                                   if pick.get("untuned") else "")


def _values_table_html(status: dict[str, Any]) -> str:
    """The pick's value on each suite beside the baseline's, and the difference."""
    pick = status.get("pick")
    if pick is None:
        return ""
    pick_values = pick.get("values") or {}
    base_values = (status.get("baseline") or {}).get("values") or {}
    suites = list(status.get("suites") or []) or list(pick_values)
    rows = []
    for suite in suites:
        mine, theirs = pick_values.get(suite), base_values.get(suite)
        delta = f"{mine - theirs:+.4g}" if mine is not None and theirs is not None else "—"
        rows.append([suite, _fmt(mine), _fmt(theirs), delta])
    model = (status.get("baseline") or {}).get("model")
    base_head = f"baseline ({model})" if model else "baseline (none)"
    return _table(["suite", f"pick: {pick_label(pick)}", base_head, "difference"], rows, css="values")


def _counts_text(status: dict[str, Any]) -> str:
    counts = Counter(t["state"] for t in status["trials"])
    shown = [s for s in (*FINISHED, "RUNNING") if counts.get(s) or s in FINISHED] + sorted(
        s for s in counts if s not in (*FINISHED, "RUNNING"))
    return f"{len(status['trials'])} trial(s): " + ", ".join(f"{counts.get(s, 0)} {s}" for s in shown) + "."


def _correlation_text(status: dict[str, Any]) -> str:
    optimize, pick_by, rho = status.get("optimize"), status.get("pick_by"), status.get("rank_correlation")
    if not optimize or not pick_by or optimize == pick_by:
        return "Rank correlation: none (the pick is chosen on one suite)."
    if rho is None:
        return f"Rank correlation of {optimize} and {pick_by}: not yet (it needs 3 COMPLETE feasible trials)."
    return f"Rank correlation (Spearman) of {optimize} and {pick_by} across COMPLETE feasible trials: {rho:+.2f}."


def _hours_text(status: dict[str, Any]) -> str:
    durations = [h for t in status["trials"] if t["state"] in FINISHED and (h := _hours(t)) is not None]
    unit, budget = status.get("hours_unit") or "GPU-hours", status.get("budget_hours")
    if not durations:
        return ""
    used = f"{_fmt(sum(durations))} {unit} used"
    return used + (f" of a {budget:g} budget." if budget is not None else " (no budget set).")


def _trials_table_html(status: dict[str, Any]) -> str:
    """One row per trial: number, state, Optuna's value, each suite's value, the main parameters, speed."""
    trials = sorted(status["trials"], key=lambda t: t["number"])
    if not trials:
        return '<p class="missing">No trials yet.</p>'
    suites = list(status.get("suites") or [])
    params = _main_params(trials)
    pick = (status.get("pick") or {}).get("number")
    head = ["trial", "state", "value", *suites, *(_short(p) for p in params), "train s", "tok/s", "note"]
    rows, classes = [], []
    for t in trials:
        values = t.get("values") or {}
        rows.append([t["number"], t["state"], _fmt(t.get("value")), *(_fmt(values.get(s)) for s in suites),
                     *(_fmt(t["params"].get(p)) for p in params), _fmt(t.get("train_seconds"), ".1f"),
                     _fmt(t.get("tokens_per_second"), ".0f"), _note(t, pick)])
        classes.append(("pick " if t["number"] == pick else "") + t["state"].lower())
    return _table(head, rows, css="trials", row_classes=classes, titles=["", "", "", *suites, *params])


def _main_params(trials: list[dict]) -> list[str]:
    """The parameters to show as columns: all but the data-mix weights (the data-mix plot shows those)."""
    names = list(dict.fromkeys(name for t in trials for name in t["params"]))
    return [name for name in names if not name.startswith("data.mix.")]


def _short(name: str) -> str:
    return name.split(".", 1)[1] if "." in name else name


def _note(trial: dict, pick: Optional[int]) -> str:
    notes = []
    if trial["number"] == pick:
        notes.append("pick")
    if trial.get("feasible") is False:
        notes.append("infeasible")
    if trial.get("fail_reason"):
        notes.append(str(trial["fail_reason"]))
    return "; ".join(notes)


def _table(head: list[str], rows: list[list[Any]], css: str, row_classes: Optional[list[str]] = None,
           titles: Optional[list[str]] = None) -> str:
    """An HTML table, every cell escaped; `titles` are tooltips for the header cells."""
    titles = titles or []
    cells = []
    for i, h in enumerate(head):
        tip = titles[i] if i < len(titles) and titles[i] else ""
        cells.append(f'<th title="{html.escape(tip)}">{html.escape(str(h))}</th>' if tip else
                     f"<th>{html.escape(str(h))}</th>")
    lines = [f'<table class="{css}">', "<thead><tr>" + "".join(cells) + "</tr></thead>", "<tbody>"]
    for i, row in enumerate(rows):
        cls = f' class="{html.escape(row_classes[i])}"' if row_classes else ""
        lines.append(f"<tr{cls}>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in row) + "</tr>")
    lines.append("</tbody></table>")
    return "\n".join(lines)


def _fmt(value: Any, spec: str = ".4g") -> str:
    if value is None:
        return "—"
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return str(value)
    if isinstance(value, int):
        return str(value)
    return "—" if math.isnan(value) else format(value, spec)


def _values_text(values: Optional[dict]) -> str:
    return ", ".join(f"{suite} {_fmt(value, '.3g')}" for suite, value in (values or {}).items()) or "no suite values"


CSS = """
body { font-family: system-ui, -apple-system, "Segoe UI", Helvetica, Arial, sans-serif; color: #222;
       margin: 24px auto; max-width: 1600px; padding: 0 20px; background: #fafafa; }
h1 { margin-bottom: 4px; }
h2 { margin-top: 32px; }
h3 { margin: 0 0 8px; font-size: 15px; }
.summary { background: white; border: 1px solid #e3e3e3; border-radius: 6px; padding: 12px 18px; }
.summary p { margin: 6px 0; }
.pick-line { font-size: 18px; font-weight: 600; color: #1d6f66; }
.grid { display: grid; grid-template-columns: repeat(auto-fill, minmax(640px, 1fr)); gap: 18px; margin-top: 18px; }
figure { margin: 0; background: white; border: 1px solid #e3e3e3; border-radius: 6px; padding: 12px; }
figure img { width: 100%; height: auto; display: block; }
figcaption { font-size: 13px; color: #555; margin-top: 6px; }
.missing { color: #8a6d3b; background: #fcf8e3; border-radius: 4px; padding: 14px; }
table { border-collapse: collapse; font-size: 13px; background: white; }
th, td { border-bottom: 1px solid #e6e6e6; padding: 4px 10px; text-align: right; white-space: nowrap; }
th { background: #f2f2f2; }
table.trials :is(th, td):is(:nth-child(2), :last-child) { text-align: left; }
table.values td:first-child, table.values th:first-child { text-align: left; }
tr.pick td { background: #e3f4f1; font-weight: 600; }
tr.pruned td:nth-child(2) { color: #b5652f; }
tr.fail td:nth-child(2) { color: #c44e52; }
.trials { display: block; overflow-x: auto; }
"""
