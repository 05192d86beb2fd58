"""Scoring with lm-eval on a local task written at run time; suites and their aggregate."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import yaml

from evaluator.config import EvalConfig, SuiteConfig, TaskConfig
from evaluator.harness import write_choice_task
from evaluator.score import aggregate, normalized, suite_values
from trainer.data import write_choice_docs
from trainer.examples import ChoiceDoc


def test_mean_of_raw_scores_is_the_weighted_mean():
    tasks = [TaskConfig(name="a", weight=1.0), TaskConfig(name="b", weight=3.0)]
    # (1 * 0.2 + 3 * 0.6) / 4 = 0.5
    assert aggregate({"a": 0.2, "b": 0.6}, tasks, method="mean", normalize="none") == pytest.approx(0.5)


def test_local_task_file_points_at_absolute_data(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    data = write_choice_docs([ChoiceDoc("Is 1 2 3 even or odd?", ("even", "odd"), 1)], Path("rel") / "docs.jsonl",
                             "alpaca")
    path = write_choice_task("t", data, tmp_path / "tasks")
    spec = yaml.safe_load(path.read_text())
    data_file = spec["dataset_kwargs"]["data_files"]["test"]
    assert Path(data_file).is_absolute() and Path(data_file).exists()
    assert spec["output_type"] == "multiple_choice" and spec["target_delimiter"] == ""


def test_lm_eval_scores_the_4bit_base_on_a_local_task(demo_base_dir, tmp_path):
    from evaluator.harness import evaluate
    from trainer.config import ModelConfig
    from trainer.model import load_base_model, load_tokenizer
    from trainer.synthetic import digit_task

    _, heldout = digit_task(seed=0, num_train=10, num_eval=60)
    data = write_choice_docs(heldout, tmp_path / "docs.jsonl", "alpaca")
    write_choice_task("digits_t", data, tmp_path / "tasks")
    model_config = ModelConfig(name_or_path="sweep-demo/tiny-llama")
    model, tok = load_base_model(model_config, "cpu"), load_tokenizer(model_config)
    result = evaluate(model, tok, [TaskConfig(name="digits_t", metric="acc")], tmp_path / "tasks", batch_size=16)
    assert set(result.scores) == {"digits_t"}
    # Two choices per item: an untrained base lands near chance.
    assert 0.25 <= result.scores["digits_t"] <= 0.75
    assert result.eval_seconds > 0
    with pytest.raises(KeyError, match="no metric"):
        evaluate(model, tok, [TaskConfig(name="digits_t", metric="bleu")], tmp_path / "tasks")


def test_aggregate_worked_example_from_the_readme():
    # Three tasks: a four-choice task (chance 0.25), a generation task, a two-choice task (chance 0.5).
    tasks = [
        TaskConfig(name="mc", chance=0.25, weight=2.0),
        TaskConfig(name="gen", metric="exact_match"),
        TaskConfig(name="yesno", chance=0.5),
    ]
    scores = {"mc": 0.55, "gen": 0.2, "yesno": 0.45}
    # Normalised: mc (0.55 - 0.25) / 0.75 = 0.4; gen 0.2; yesno below chance -> 0, counted as the floor 0.01.
    assert normalized(0.55, tasks[0]) == pytest.approx(0.4)
    assert normalized(0.45, tasks[2]) == 0.0
    expected = math.exp((2 * math.log(0.4) + math.log(0.2) + math.log(0.01)) / 4)
    assert aggregate(scores, tasks) == pytest.approx(expected)
    assert aggregate(scores, tasks) == pytest.approx(0.1337, abs=1e-4)
    # The arithmetic mean of the same normalised scores, and the geometric mean against a base model.
    assert aggregate(scores, tasks, method="mean") == pytest.approx((2 * 0.4 + 0.2 + 0.0) / 4)
    base = {"mc": 0.5, "gen": 0.1, "yesno": 0.5}
    ratios = [0.55 / 0.5, 0.2 / 0.1, 0.45 / 0.5]
    expected_base = math.exp((2 * math.log(ratios[0]) + math.log(ratios[1]) + math.log(ratios[2])) / 4)
    assert aggregate(scores, tasks, normalize="baseline", baseline=base) == pytest.approx(expected_base)
    with pytest.raises(KeyError):
        aggregate({"mc": 0.5}, tasks)


def test_suite_values_follow_the_config():
    suites = {
        "open": SuiteConfig(tasks=[TaskConfig(name="a", chance=0.5), TaskConfig(name="b")]),
        "heldout": SuiteConfig(tasks=[TaskConfig(name="c")]),
    }
    config = EvalConfig(suites=suites, pick_by="heldout")
    assert config.objective_suite == "open" and [t.name for t in config.all_tasks()] == ["a", "b", "c"]
    values = suite_values({"a": 0.75, "b": 0.5, "c": 0.3}, config)
    assert values == pytest.approx({"open": math.sqrt(0.5 * 0.5), "heldout": 0.3})
    # normalize: baseline with no baseline scores falls back to chance.
    fallback = suite_values({"a": 0.75, "b": 0.5, "c": 0.3}, EvalConfig(suites=suites, normalize="baseline"))
    assert fallback == values
    with pytest.raises(ValueError, match="unique"):
        EvalConfig(suites={"x": SuiteConfig(tasks=[TaskConfig(name="a")]),
                           "y": SuiteConfig(tasks=[TaskConfig(name="a")])}).validate()


def test_shipped_tasks_are_indexed_next_to_local_ones(tmp_path):
    from evaluator.harness import task_manager

    manager = task_manager([TaskConfig(name="sweep_cnn_dailymail", metric="rouge2")], tmp_path)
    assert "sweep_cnn_dailymail" in manager.all_tasks
    from evaluator.tasks.rouge_utils import process_rouge

    doc = {"highlights": "the red fox ran over the hill"}
    assert process_rouge(doc, ["the red fox ran over the hill"])["rouge2"] == pytest.approx(1.0)
    assert process_rouge(doc, ["a blue bird"])["rouge2"] == 0.0
