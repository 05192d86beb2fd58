"""Picking the submission: the held-out winner among the top-k on the open suite, from a real study database."""

from __future__ import annotations

import pytest

from evaluator.score import suite_values
from sweep.config import load_config
from sweep.export import pick_submission, rank_correlation, study_status
from sweep.store import Store, TrialRecord
from sweep.study import make_storage

# Per-task scores of five trials on the demo's micro-suite (open: demo_digits, micro_mc, micro_gen, micro_sum;
# heldout: micro_parity, micro_math). Trial 0 is the best on open but weak on heldout: tuned to the open tasks.
TASKS = ("demo_digits", "micro_mc", "micro_gen", "micro_sum", "micro_parity", "micro_math")
SCORES = [
    dict(zip(TASKS, row, strict=True))
    for row in [
        (0.92, 0.60, 0.20, 0.30, 0.52, 0.0),
        (0.85, 0.55, 0.15, 0.25, 0.80, 0.2),
        (0.80, 0.50, 0.15, 0.20, 0.70, 0.1),
        (0.60, 0.30, 0.05, 0.10, 0.95, 0.5),
        (0.55, 0.25, 0.00, 0.05, 0.50, 0.0),
    ]
]


@pytest.fixture
def status(tmp_path):
    import optuna

    config = load_config(None)  # the demo: optimise open, pick by heldout among the top 3
    url = f"sqlite:///{tmp_path / 'studies.db'}"
    study = optuna.create_study(study_name="pick", storage=make_storage(url), direction="maximize")
    evaluator = config.evaluator
    for key, value in {"suites": list(evaluator.suite_tasks()), "optimize": evaluator.objective_suite,
                       "pick_by": evaluator.pick_by, "top_k": evaluator.top_k}.items():
        study.set_user_attr(key, value)
    store = Store(url)
    for scores in SCORES:
        trial = study.ask()
        values = suite_values(scores, evaluator)
        store.record_trial("pick", TrialRecord(trial_number=trial.number, state="COMPLETE", adapter_dir=None,
                                               scores=scores, values=values, feasible=True))
        study.tell(trial, values[evaluator.objective_suite])
    return study_status(optuna.load_study(study_name="pick", storage=make_storage(url)), Store(url, create=False))


def test_the_pick_is_the_heldout_winner_among_the_top_k_on_open(status):
    trials = status["trials"]
    best_open = max(trials, key=lambda t: t["open_value"])
    best_heldout = max(trials, key=lambda t: t["heldout_value"])
    assert best_open["number"] == 0 and best_heldout["number"] == 3  # the study's best open trial is not it
    top3 = sorted(trials, key=lambda t: -t["open_value"])[:3]
    assert [t["number"] for t in top3] == [0, 1, 2]
    # Trial 3 wins heldout overall but is not in the top 3 on open: the pick is the heldout winner among 0, 1, 2.
    assert status["pick"]["number"] == 1 and status["best"]["number"] == 0
    assert status["pick"]["values"] == pytest.approx(trials[1]["values"])
    assert -1.0 <= status["rank_correlation"] <= 1.0


def test_pick_and_rank_correlation_by_hand():
    trials = [
        {"number": i, "state": "COMPLETE", "feasible": f, "value": o, "values": {"open": o, "heldout": h}}
        for i, (o, h, f) in enumerate([(0.9, 0.1, True), (0.8, 0.3, True), (0.7, 0.9, True), (0.95, 0.99, False)])
    ]
    # The infeasible trial 3 is never a candidate; top 2 on open are 0 and 1; 1 is better on heldout.
    assert pick_submission(trials, "open", "heldout", top_k=2)["number"] == 1
    assert pick_submission(trials, "open", "heldout", top_k=3)["number"] == 2
    assert pick_submission(trials, "open", None, top_k=3)["number"] == 0
    # Feasible trials ranked 3, 2, 1 on open and 1, 2, 3 on heldout: perfectly anti-correlated.
    assert rank_correlation(trials, "open", "heldout") == pytest.approx(-1.0)
    assert rank_correlation(trials[:2], "open", "heldout") is None
