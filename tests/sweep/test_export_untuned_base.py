"""The untuned base as a candidate for the pick: a demo study whose trials train on wrong answers, so that the
base they start from scores best; `sweep status`, the dashboard's note, `sweep report`, `sweep export --pick`
and `sweep serve` treat it as the submission."""

from __future__ import annotations

import contextlib
import io
import json
import types

import pytest

CONFIG = """
study: {name: base-wins, n_trials: 2, seed: 0, pruner: none}
model: {name_or_path: sweep-demo/tiny-llama}
data:
  template: alpaca
  max_seq_length: 96
  num_examples: 1200
  sources:
    - {name: digits, kind: synthetic, generator: digits, num_train: 1000, num_eval: 120}
    - {name: flipped, kind: file, path: flipped.jsonl}
  mix: {digits: 0.0, flipped: 1.0}
trainer:
  learning_rate: 3.0e-3
  max_steps: 100
  packing: true
  pack_length: 320
  lora: {r: 16, alpha: 32, dropout: 0.0}
evaluator:
  batch_size: 32
  optimize: open
  top_k: 3
  normalize: none
  aggregate: mean
  suites:
    open:
      tasks: [{name: demo_digits, source: digits, metric: acc, chance: 0.5}]
search_space:
  trainer.learning_rate: {type: float, low: 2.0e-3, high: 5.0e-3, log: true}
orchestration: {concurrency: 1, artifacts_dir: sweep-runs}
"""


@pytest.fixture(scope="module")
def base_wins(tmp_path_factory, ray_session):
    """The study: its trials learn the digit questions' wrong answers (every training response is the other
    choice), so they score below the untuned base on the held-out questions."""
    import os

    from sweep.cli import main
    from trainer.synthetic import digit_task

    directory = tmp_path_factory.mktemp("base-wins")
    train, _ = digit_task(seed=0, num_train=1000, num_eval=120)  # the synthetic source's own split: no overlap
    with open(directory / "flipped.jsonl", "w") as f:
        for doc in train:
            f.write(json.dumps({"instruction": doc.instruction, "response": doc.choices[1 - doc.answer]}) + "\n")
    (directory / "config.yaml").write_text(CONFIG)
    cwd = os.getcwd()
    os.chdir(directory)
    try:
        printed = io.StringIO()
        with contextlib.redirect_stdout(printed):
            assert main(["start", "--config", "config.yaml"]) == 0
        assert "the pick is the untuned base: no trial beat it" in printed.getvalue()
    finally:
        os.chdir(cwd)
    return types.SimpleNamespace(dir=directory, storage=f"sqlite:///{directory / 'studies.db'}")


def _status(storage: str) -> dict:
    import optuna

    from sweep.export import study_status
    from sweep.store import Store

    study = optuna.load_study(study_name="base-wins", storage=storage)
    return study_status(study, Store(storage, create=False, read_only=True))


@pytest.mark.integration
def test_the_untuned_base_is_the_pick_when_no_trial_beats_it(base_wins, cli):
    status = _status(base_wins.storage)
    trials = [t for t in status["trials"] if t["state"] == "COMPLETE"]
    assert len(trials) == 2
    base = status["baseline"]
    assert all(t["value"] < base["value"] for t in trials), (base["value"], [t["value"] for t in trials])
    assert status["pick"]["untuned"] is True and status["pick"]["number"] is None
    assert status["pick"]["model"] == "sweep-demo/tiny-llama"
    assert status["best"]["number"] in (0, 1)  # the best trial is still a trial: the base never feeds the sampler
    table = cli("status", "--storage", base_wins.storage)
    assert "base  UNTUNED" in table and "<- pick (no adapter)" in table
    assert "the untuned base included): the untuned base open=" in table and "no trial beat it" in table


@pytest.mark.integration
def test_the_note_and_the_report_name_the_base_as_the_pick(base_wins, cli, tmp_path):
    from sweep.note import study_note

    note = study_note(_status(base_wins.storage))
    assert "## Pick: the untuned base" in note and "no trial beat it" in note
    assert "**base (untuned)** (pick)" in note  # in the top table, ranked with the trials
    out = tmp_path / "report"
    cli("report", "--storage", base_wins.storage, "--out", str(out))
    page = (out / "index.html").read_text()
    assert "Pick: the untuned base" in page


@pytest.mark.integration
def test_exporting_the_base_writes_its_id_and_a_card_without_an_adapter(base_wins, cli, tmp_path, capsys):
    from sweep.cli import main

    out = tmp_path / "export"
    printed = cli("export", "--storage", base_wins.storage, "--pick", "--out", str(out))
    assert "Exported the untuned base sweep-demo/tiny-llama" in printed
    record = json.loads((out / "base_model.json").read_text())
    assert record["base_model"] == "sweep-demo/tiny-llama" and record["mode"] == "qlora"
    assert record["model"]["quant_type"] == "nf4"
    assert not (out / "adapter_config.json").exists() and not (out / "adapter_model.safetensors").exists()
    card = (out / "README.md").read_text()
    assert "**No adapter.**" in card and "base_model: sweep-demo/tiny-llama" in card
    scores = json.loads((out / "scores.json").read_text())
    assert scores["untuned"] is True and scores["trial"] is None
    assert (out / "tokenizer.json").exists() or (out / "tokenizer_config.json").exists()
    # Served as it was scored: the 4-bit base, no adapter.
    from sweep.serve import load_export

    served = load_export(out, device="cpu")
    assert "untuned base" in served.description and "nf4 4-bit" in served.description
    assert not hasattr(served.model, "peft_config")
    # A merge has nothing to merge: one line, nothing written.
    merged = tmp_path / "merged"
    assert main(["export", "--storage", base_wins.storage, "--pick", "--out", str(merged), "--merge"]) == 2
    assert "no adapter to merge" in capsys.readouterr().err and not merged.exists()


def test_a_tie_goes_to_the_trial():
    from sweep.export import base_row, pick_submission

    trial = {"number": 0, "state": "COMPLETE", "value": 0.5, "values": {"open": 0.5, "heldout": 0.3},
             "feasible": True, "params": {}, "adapter_dir": "x"}
    base = base_row({"model": "m", "value": 0.5, "values": {"open": 0.5, "heldout": 0.3}, "scores": {}})
    assert pick_submission([trial], "open", "heldout", 3, base=base)["number"] == 0
    better = base_row({"model": "m", "value": 0.5, "values": {"open": 0.5, "heldout": 0.31}, "scores": {}})
    assert pick_submission([trial], "open", "heldout", 3, base=better)["untuned"] is True
    # The base takes a place in the top k by its objective value: below the top 1 here, it cannot be picked.
    assert pick_submission([trial], "open", "heldout", 1, base={**better, "values": {"open": 0.4, "heldout": 0.9},
                                                                "value": 0.4})["number"] == 0
