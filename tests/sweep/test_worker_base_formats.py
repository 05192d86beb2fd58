"""Searchable training mode and quantization (one resident base per format, swapped and timed), enqueued
parameter sets, and a warm start from another study's best trials."""

from __future__ import annotations

import logging
import types

import pytest

MODE_SPACE = [
    "search_space.trainer.mode={type: categorical, choices: [qlora, lora]}",
    "search_space.model.quant_type={type: categorical, choices: [nf4, int8]}",
]
# Three formats in a row on one slot: 4-bit NF4, the 16-bit base, 8-bit; the fourth set repeats the first and
# is not enqueued again.
ENQUEUE = ("enqueue=[{trainer.mode: qlora, model.quant_type: nf4}, {trainer.mode: lora, model.quant_type: nf4}, "
           "{trainer.mode: qlora, model.quant_type: int8}, {trainer.mode: qlora, model.quant_type: nf4}]")
LIGHT = ["trainer.max_steps=24", "study.pruner=none", "orchestration.concurrency=1", "study.rung_eval_docs=8"]


def _start(*args) -> int:
    from sweep.cli import main

    return main(["start", *args])


@pytest.fixture(scope="module")
def mode_study(tmp_path_factory, ray_session):
    """A demo study searching trainer.mode and model.quant_type, its first three trials enqueued: its storage,
    and the driver's log lines."""
    directory = tmp_path_factory.mktemp("modes")
    storage = f"sqlite:///{directory / 'studies.db'}"
    records = []

    class Keep(logging.Handler):
        def emit(self, record):
            records.append(record.getMessage())

    handler = Keep(level=logging.INFO)
    logger = logging.getLogger("sweep")
    level = logger.level
    logger.setLevel(logging.INFO)  # pytest leaves the root logger at WARNING
    logger.addHandler(handler)
    try:
        args = ["--trials", "3", "--storage", storage, "--study", "modes"]
        for item in [*MODE_SPACE, ENQUEUE, *LIGHT, f"orchestration.artifacts_dir={directory / 'runs'}"]:
            args += ["--set", item]
        assert _start(*args) == 0
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
    return types.SimpleNamespace(dir=directory, storage=storage, log=records)


def _records(storage: str, study: str):
    from sweep.store import Store

    return Store(storage, create=False, read_only=True).trials(study)


@pytest.mark.integration
def test_trials_of_two_modes_and_two_quantizations_complete_and_say_so(mode_study):
    import optuna

    study = optuna.load_study(study_name="modes", storage=mode_study.storage)
    trials = study.trials
    assert [t.state.name for t in trials] == ["COMPLETE"] * 3
    assert [(t.params["trainer.mode"], t.params["model.quant_type"]) for t in trials] == [
        ("qlora", "nf4"), ("lora", "nf4"), ("qlora", "int8")]
    records = _records(mode_study.storage, "modes")
    bases = [records[t.number].base for t in trials]
    assert [(b["mode"], b["quantization"]) for b in bases] == [("qlora", "nf4"), ("lora", "16-bit"),
                                                               ("qlora", "int8")]
    assert len({b["mode"] for b in bases}) == 2 and len({b["quantization"] for b in bases}) >= 2
    assert [t.user_attrs["quantization"] for t in trials] == ["nf4", "16-bit", "int8"]  # on the dashboard too
    # Each trial trained on the base it asked for: what its saved config records.
    from pathlib import Path

    import yaml

    for t in trials:
        saved = yaml.safe_load((Path(t.user_attrs["adapter_dir"]) / "hyperparameters.yaml").read_text())
        assert (saved["trainer"]["mode"], saved["model"]["quant_type"]) == (t.params["trainer.mode"],
                                                                            t.params["model.quant_type"])


@pytest.mark.integration
def test_the_slot_swaps_its_resident_base_and_times_it(mode_study):
    records = _records(mode_study.storage, "modes")
    assert "swapped_from" not in records[0].base  # the baseline's NF4 base was still resident
    assert records[1].base["swapped_from"].endswith("nf4 4-bit, double quant")
    assert records[2].base["swapped_from"].endswith("16-bit (float32)")
    for number in (1, 2):
        assert records[number].base["swap_seconds"] >= 0 and records[number].base_load_seconds is not None
    swaps = [line for line in mode_study.log if line.startswith("Slot 0 swapped its base")]
    assert len(swaps) == 2, mode_study.log
    assert "-> 16-bit (float32)" in swaps[0] and "-> int8 8-bit" in swaps[1]
    worker_log = (mode_study.dir / "runs" / "modes" / "trials" / "0002" / "worker.log").read_text()
    assert "swapped base sweep-demo/tiny-llama 16-bit (float32) -> sweep-demo/tiny-llama int8 8-bit" in worker_log


@pytest.mark.integration
def test_a_repeated_enqueued_set_is_not_run_twice(mode_study):
    assert any("Enqueued 3 trial(s)" in line for line in mode_study.log)


@pytest.mark.integration
def test_warm_start_runs_the_best_trials_of_another_study_first(mode_study):
    import optuna

    source = optuna.load_study(study_name="modes", storage=mode_study.storage)
    best = sorted((t for t in source.trials if t.state.name == "COMPLETE"), key=lambda t: (-t.value, t.number))[:2]
    args = ["--trials", "2", "--storage", mode_study.storage, "--study", "warm", "--enqueue-best-from", "modes",
            "--top", "2"]
    for item in [*MODE_SPACE, *LIGHT, f"orchestration.artifacts_dir={mode_study.dir / 'runs'}"]:
        args += ["--set", item]
    assert _start(*args) == 0
    warm = optuna.load_study(study_name="warm", storage=mode_study.storage)
    assert [t.params for t in warm.trials[:2]] == [t.params for t in best]
    assert all(t.state.name == "COMPLETE" for t in warm.trials)


@pytest.mark.integration
def test_warm_start_from_an_incompatible_space_is_one_line_before_anything_runs(mode_study, capsys):
    # The demo's space has no trainer.mode: the source's trials cannot be enqueued in it.
    assert _start("--trials", "1", "--storage", mode_study.storage, "--study", "other",
                  "--enqueue-best-from", "modes") == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert "trainer.mode: not a key of search_space" in err and err.startswith("sweep start: error: ")
    assert _start("--trials", "1", "--storage", mode_study.storage, "--study", "other",
                  "--enqueue-best-from", "nosuch") == 2
    assert "no study named 'nosuch'" in capsys.readouterr().err
    assert _start("--trials", "1", "--storage", mode_study.storage, "--study", "other", "--top", "2") == 2
    assert "--top: only with --enqueue-best-from" in capsys.readouterr().err
    import optuna

    assert "other" not in optuna.get_all_study_names(mode_study.storage)  # nothing was written


@pytest.mark.parametrize("item, message", [
    ("enqueue=[{trainer.lora.r: 64}]", "enqueue.0.trainer.lora.r: 64 is not one of the choices [4, 8, 16]"),
    ("enqueue=[{trainer.epochs: 2}]", "enqueue.0.trainer.epochs: not a key of search_space"),
    ("enqueue=[{trainer.learning_rate: 1.0}]", "enqueue.0.trainer.learning_rate: 1.0 is outside"),
    ("search_space.model.name_or_path={type: categorical, choices: [a, b]}",
     "of the model section only quant_type, double_quant can be searched"),
    ("search_space.trainer.mode={type: categorical, choices: [qlora, full]}",
     "value 'full' is invalid for trainer.mode"),
    ("search_space.model.quant_type={type: categorical, choices: [nf4, int4]}",
     "value 'int4' is invalid for model.quant_type"),
])
def test_bad_enqueue_and_search_choices_are_config_errors(item, message, capsys):
    from sweep.cli import main
    from sweep.config import demo_config_path

    assert main(["validate", str(demo_config_path()), "--set", item, "--file-only"]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1


def test_enqueued_numbers_written_as_strings_are_numbers():
    from sweep.config import load_config

    config = load_config(None, ["enqueue=[{trainer.learning_rate: 5e-3}]"])  # YAML 1.1 reads 5e-3 as a string
    from sweep.config import coerce_value

    assert coerce_value(config.enqueue[0]["trainer.learning_rate"],
                        config.search_space["trainer.learning_rate"]) == 5e-3


@pytest.mark.integration
def test_an_int8_adapter_merges_into_its_scaled_back_weights(mode_study, tmp_path):
    """`sweep export --merge` of the int8 trial: the merged model's logits match the adapter on its int8 base
    (the int8 matmul quantizes activations too, so close, not exact)."""
    import torch

    from sweep.cli import main
    from trainer.model import load_adapter

    out = tmp_path / "int8"
    assert main(["export", "--storage", mode_study.storage, "--study", "modes", "--trial", "2", "--out", str(out),
                 "--merge"]) == 0
    readme = (out / "README.md").read_text()
    assert "loaded in 8 bits (int8" in readme
    from transformers import AutoModelForCausalLM

    merged = AutoModelForCausalLM.from_pretrained(str(out / "merged"), dtype=torch.float32).eval()
    adapter, tokenizer = load_adapter(out, device="cpu")
    ids = tokenizer("Is 1 2 3 even or odd?", return_tensors="pt").input_ids
    with torch.no_grad():
        expected = adapter.eval()(input_ids=ids).logits
        got = merged(input_ids=ids).logits
    assert (got - expected).abs().max() < 0.05 * expected.abs().max()
    lora_out = tmp_path / "lora"
    assert main(["export", "--storage", mode_study.storage, "--study", "modes", "--trial", "1", "--out",
                 str(lora_out)]) == 0
    assert "loaded in 16 bits (mode lora" in (lora_out / "README.md").read_text()
    from sweep.serve import load_export

    for export, form in ((lora_out, "16-bit (float32)"), (out, "int8 8-bit")):  # served on the base it trained on
        assert form in load_export(export, device="cpu").description
