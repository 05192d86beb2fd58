"""`sweep report`: the static HTML report, opened in a real headless Chromium, and its edge cases."""

from __future__ import annotations

import re

import optuna
import pytest
from browser import open_browser, screenshot_path
from sweep_processes import study_status_of

from sweep.export import pick_submission, rank_correlation
from sweep.report import plot_data_mix, plot_history, write_report

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.mark.integration
def test_the_report_opens_offline_in_a_browser_with_every_plot_and_names_the_pick(demo_study, tmp_path):
    from sweep.cli import main

    out = tmp_path / "nested" / "report"
    assert main(["report", "--storage", demo_study.storage, "--out", str(out)]) == 0
    index = out / "index.html"
    page = index.read_text()
    assert not re.search(r"""(src|href)=["']?(https?:)?//""", page), "the page must not fetch anything"
    assert "<script" not in page
    status = study_status_of(demo_study.storage, demo_study.study)
    pick = status["pick"]["number"]
    with open_browser() as browser:
        browser.open(index.as_uri())
        images = browser.evaluate("[...document.images].map(i => [i.getAttribute('src'), i.complete, i.naturalWidth])")
        text = browser.text()
        shot = browser.screenshot(screenshot_path(tmp_path, "report.png"))
    assert len(images) >= 6, images
    for src, complete, width in images:
        assert complete and width > 0, f"{src} did not load"
        assert "/" not in src and (out / src).read_bytes()[:8] == PNG_MAGIC, src  # beside index.html, relative
    assert f"Pick: trial {pick}" in text
    assert f"Study {status['study']}" in text
    assert shot.read_bytes()[:8] == PNG_MAGIC and shot.stat().st_size > 10_000


# Hand-made studies: no sweep run.


def _study(direction: str, trials: list[tuple[str, dict, float | None, dict]]):
    """An in-memory study holding `trials` as (state, params, value, intermediate values)."""
    study = optuna.create_study(direction=direction, study_name="hand-made")
    distributions = {"trainer.learning_rate": optuna.distributions.FloatDistribution(1e-5, 1e-2, log=True),
                     "trainer.lora.r": optuna.distributions.IntDistribution(4, 16),
                     "data.mix.a": optuna.distributions.FloatDistribution(0, 1),
                     "data.mix.b": optuna.distributions.FloatDistribution(0, 1)}
    for state, params, value, intermediate in trials:
        study.add_trial(optuna.trial.create_trial(
            state=optuna.trial.TrialState[state], params=params, distributions=distributions,
            value=value if state == "COMPLETE" else None, intermediate_values=intermediate))
    return study


def _rows(study, suites: dict[int, dict], losses: dict[int, list]) -> list[dict]:
    """Status rows as `study_status` makes them, from the study and the suite values of each trial."""
    rows = []
    for t in study.trials:
        values = suites.get(t.number, {})
        rows.append({
            "number": t.number, "state": t.state.name,
            "value": t.value if t.value is not None else (list(t.intermediate_values.values()) or [None])[-1],
            "params": dict(t.params), "values": values, **{f"{s}_value": v for s, v in values.items()},
            "scores": {"task_a": 0.5, "task_b": 0.25} if values else {}, "stderrs": {"task_a": 0.05},
            "losses": losses.get(t.number), "intermediate": sorted(map(list, t.intermediate_values.items())),
            "feasible": True if t.state.name == "COMPLETE" else None, "data": None,
            "train_seconds": 12.5, "tokens_per_second": 1000.0, "wall_seconds": 30.0,
            "started_at": None, "finished_at": None, "fail_reason": "CUDA <OOM>" if t.state.name == "FAIL" else None,
        })
    return rows


def _status(study, rows: list[dict], baseline: dict | None, name: str = "hand-made") -> dict:
    maximize = study.direction.name == "MAXIMIZE"
    pick = pick_submission(rows, "open", "heldout", 2, maximize=maximize)
    return {
        "study": name, "direction": study.direction.name.lower(), "suites": ["open", "heldout"],
        "optimize": "open", "pick_by": "heldout", "top_k": 2,
        "pick": None if pick is None else {k: pick[k] for k in ("number", "value", "values", "params")},
        "rank_correlation": rank_correlation(rows, "open", "heldout"), "trials": rows, "best": None,
        "baseline": baseline, "budget_hours": 0.05, "hours_unit": "GPU-hours",
    }


def test_a_study_without_a_complete_trial_or_a_baseline_still_gets_a_report_that_says_there_is_no_pick(tmp_path):
    params = {"trainer.learning_rate": 1e-3, "trainer.lora.r": 8, "data.mix.a": 0.2, "data.mix.b": 0.6}
    study = _study("maximize", [("PRUNED", params, None, {10: 0.4}), ("FAIL", params, None, {}),
                                ("PRUNED", params, None, {10: 0.3, 20: 0.35})])
    rows = _rows(study, {}, {0: [[1, 3.0], [2, 2.5]]})  # trials 1 and 2 logged no loss
    status = _status(study, rows, baseline=None, name="edge <b>&amp;")
    assert status["pick"] is None
    index = write_report(status, study, tmp_path / "r")
    page = index.read_text()
    assert "No pick" in page
    assert "<b>" not in page and "edge &lt;b&gt;&amp;amp;" in page  # the study's name, escaped
    assert "CUDA &lt;OOM&gt;" in page  # the fail reason, escaped
    assert "at least 2 COMPLETE trials" in page  # instead of the importance plot
    images = re.findall(r'<img src="([^"]+)"', page)
    assert "importances.png" not in images and "tasks.png" not in images and "suites.png" not in images
    assert {"history.png", "losses.png", "hours.png"} <= set(images)
    assert all((index.parent / src).read_bytes()[:8] == PNG_MAGIC for src in images)


def test_a_minimised_study_reports_the_lowest_as_best_and_leaves_pyplot_as_it_found_it(tmp_path):
    import matplotlib
    import matplotlib.pyplot as plt

    values = {0: 0.9, 1: 0.4, 2: 0.6, 3: 0.2}
    study = _study("minimize", [
        ("COMPLETE", {"trainer.learning_rate": 10 ** -(2 + n), "trainer.lora.r": 4 + 3 * n, "data.mix.a": n / 4,
                      "data.mix.b": 1 - n / 4}, value, {}) for n, value in values.items()])
    suites = {n: {"open": v, "heldout": 1 - v if n != 3 else 0.9} for n, v in values.items()}
    rows = _rows(study, suites, {n: [[s, 3.0 / s] for s in range(1, 40)] for n in values})
    baseline = {"model": "base", "scores": {"task_a": 0.3, "task_b": 0.1}, "value": 1.0,
                "values": {"open": 1.0, "heldout": 0.0}, "stderrs": {"task_a": 0.04}}
    status = _status(study, rows, baseline)
    assert status["pick"]["number"] == 1  # the lower heldout of the 2 lowest on open (3 and 1)
    facecolor = matplotlib.rcParams["axes.facecolor"]
    index = write_report(status, study, tmp_path / "min")
    page = index.read_text()
    assert "Pick: trial 1 — best on heldout among the top 2 on open" in page
    images = re.findall(r'<img src="([^"]+)"', page)
    assert len(images) == 7, images  # every plot, parameter importances included
    assert plt.get_fignums() == [] and matplotlib.rcParams["axes.facecolor"] == facecolor
    best = next(line for line in plot_history(status).axes[0].lines if line.get_label() == "best so far")
    assert list(best.get_ydata()) == [0.9, 0.4, 0.4, 0.2, 0.2]  # the running minimum, carried to the last trial
    mix = plot_data_mix(status).axes[0]
    assert [t.get_text() for t in mix.get_yticklabels()] == ["trial 3: 0.2", "trial 1 (pick): 0.4", "trial 2: 0.6",
                                                             "trial 0: 0.9"]  # the lowest on top
    assert [round(bar.get_width(), 3) for bar in mix.patches[:4]] == [0.75, 0.25, 0.5, 0.0]  # data.mix.a normalised


def test_a_study_without_trials_gets_a_page_of_reasons_and_no_images(tmp_path):
    study = _study("maximize", [])
    status = _status(study, [], baseline=None)
    index = write_report(status, study, tmp_path / "empty")
    page = index.read_text()
    assert "<img" not in page and sorted(p.name for p in index.parent.iterdir()) == ["index.html"]
    assert "No trial has finished yet." in page and "No trials yet." in page and "0 trial(s)" in page
