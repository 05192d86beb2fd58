"""Scoring with lm-eval on a local task written at run time; the objective's arithmetic."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from evaluator.config import TaskConfig
from evaluator.harness import write_choice_task
from evaluator.score import objective
from trainer.data import ChoiceDoc, write_choice_docs


def test_objective_is_the_weighted_mean():
    tasks = [TaskConfig(name="a", weight=1.0), TaskConfig(name="b", weight=3.0)]
    # (1 * 0.2 + 3 * 0.6) / 4 = 0.5
    assert objective({"a": 0.2, "b": 0.6}, tasks) == pytest.approx(0.5)
    with pytest.raises(KeyError):
        objective({"a": 0.2}, tasks)


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
    from trainer.data import digit_task
    from trainer.model import load_base_model, load_tokenizer

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
