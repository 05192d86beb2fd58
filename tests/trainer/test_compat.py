"""trainer/compat.py: the trainer's reaches into transformers, bitsandbytes and datasets, each checked against the
releases it was written for, and what runs instead outside them."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import pytest

from trainer import compat
from trainer.compat import UNCHECKED_ENV, CompatError

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(autouse=True)
def fresh_warnings():
    """A hook warns once a process: each test sees its own first warning."""
    compat._warn_once.cache_clear()
    yield
    compat._warn_once.cache_clear()


def test_the_checked_ranges_are_pyprojects_bounds():
    tomllib = pytest.importorskip("tomllib")  # Python 3.11 on
    from packaging.requirements import Requirement
    from packaging.specifiers import SpecifierSet

    bounds = {}
    for line in tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]:
        requirement = Requirement(line)
        bounds[requirement.name.lower()] = requirement.specifier
    assert SpecifierSet(compat.TRANSFORMERS) == bounds["transformers"]
    assert SpecifierSet(compat.BITSANDBYTES) == bounds["bitsandbytes"]
    assert SpecifierSet(compat.DATASETS) == bounds["datasets"]
    for hook in compat.HOOKS:
        assert SpecifierSet(hook.checked) == bounds[hook.library], hook.name


def test_problems_reports_each_hook_out_of_range(monkeypatch):
    monkeypatch.delenv(UNCHECKED_ENV, raising=False)
    assert compat.problems(compat.HOOKS) == ([], [])  # the installed releases are the checked ones
    monkeypatch.setenv(UNCHECKED_ENV, "transformers, bitsandbytes")
    warnings, errors = compat.problems(compat.HOOKS)
    assert errors == [compat.BNB_CPU_LAYOUT.problem()]
    transformers_hooks = [h for h in compat.HOOKS if h.library == "transformers"]
    assert len(transformers_hooks) == 3 and warnings == [h.problem() for h in transformers_hooks]
    assert all("\n" not in line and "transformers" in line and "instead" in line for line in warnings)


def test_the_bitsandbytes_hook_has_no_stock_path(monkeypatch):
    monkeypatch.setenv(UNCHECKED_ENV, "bitsandbytes")
    with pytest.raises(CompatError) as error:
        compat.unpack_cpu_4bit(None, None)  # refused before bitsandbytes is reached
    message = str(error.value)
    assert "\n" not in message and "bitsandbytes" in message and "no stock path" in message


# --- transformers: per-layer checkpointing ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def rows(demo_base_dir):
    from trainer.config import DataConfig, SourceConfig
    from trainer.data import prepare_data
    from trainer.model import load_tokenizer

    data = DataConfig(sources=[SourceConfig(name="digits", kind="synthetic", num_train=32, num_eval=8)],
                      max_seq_length=64)
    return prepare_data(load_tokenizer(_model()), data).rows


def _model():
    from trainer.config import ModelConfig
    from trainer.demo_base import DEMO_MODEL_ID

    return ModelConfig(name_or_path=DEMO_MODEL_ID)


def _train_with_one_layer_planned(rows, monkeypatch):
    """A short run whose planner picks one layer to checkpoint (what a memory cap on a GPU leads to)."""
    from trainer import train as train_module
    from trainer.config import TrainConfig
    from trainer.model import attach_lora, load_base_model, load_tokenizer

    monkeypatch.setattr(train_module, "plan_checkpointing", lambda *args: 1)
    config = TrainConfig(learning_rate=3e-3, max_steps=2, pack_length=128, gradient_checkpointing="auto")
    model = attach_lora(load_base_model(_model(), "cpu"), config.lora)
    result = train_module.train(model, load_tokenizer(_model()), rows, config, seed=0)
    return model, result


def test_the_planners_partial_checkpointing_sets_only_the_planned_layers(rows, monkeypatch, caplog):
    monkeypatch.delenv(UNCHECKED_ENV, raising=False)
    with caplog.at_level(logging.WARNING, logger="trainer.compat"):
        _, result = _train_with_one_layer_planned(rows, monkeypatch)
    assert result.num_layers > 1 and result.checkpointed_layers == 1
    assert not caplog.records


def test_outside_the_checked_transformers_every_layer_is_checkpointed(rows, monkeypatch, caplog):
    from trainer.train import decoder_layers

    monkeypatch.setenv(UNCHECKED_ENV, "transformers")
    with caplog.at_level(logging.WARNING, logger="trainer.compat"):
        model, result = _train_with_one_layer_planned(rows, monkeypatch)
    assert result.steps == 2 and result.final_loss is not None
    assert result.checkpointed_layers == result.num_layers > 1  # more than planned: less memory, still fits
    warned = [r.getMessage() for r in caplog.records]
    assert any("partial checkpointing is off" in m and "transformers" in m for m in warned), warned
    assert not any(layer.gradient_checkpointing for layer in decoder_layers(model))  # switched off after the run


def test_the_attention_kernel_is_unknown_outside_the_checked_transformers(demo_base_dir, monkeypatch):
    from trainer.model import load_base_model, use_attention

    model = load_base_model(_model(), "cpu", attn_implementation="sdpa")
    monkeypatch.delenv(UNCHECKED_ENV, raising=False)
    assert compat.attention_of(model) == "sdpa"
    monkeypatch.setenv(UNCHECKED_ENV, "transformers")
    assert compat.attention_of(model) is None
    use_attention(model, "eager")  # unknown: set anyway, through transformers' public setter
    monkeypatch.delenv(UNCHECKED_ENV)
    assert compat.attention_of(model) == "eager"


# --- datasets: the content hash ----------------------------------------------------------------------------------


def test_the_stock_dataset_fingerprint_is_stable_and_follows_the_content(tmp_path):
    datasets = pytest.importorskip("datasets")
    rows = {"instruction": ["a", "b"], "response": ["1", "2"]}
    in_memory = compat.stock_dataset_fingerprint(datasets.Dataset.from_dict(rows))
    assert in_memory == compat.stock_dataset_fingerprint(datasets.Dataset.from_dict(rows))
    assert in_memory != compat.stock_dataset_fingerprint(datasets.Dataset.from_dict({**rows, "response": ["1", "3"]}))

    datasets.Dataset.from_dict(rows).save_to_disk(tmp_path / "saved")
    on_disk = datasets.load_from_disk(str(tmp_path / "saved"))
    assert on_disk.cache_files  # the files' path, not the rows
    first = compat.stock_dataset_fingerprint(on_disk)
    assert first == compat.stock_dataset_fingerprint(datasets.load_from_disk(str(tmp_path / "saved")))
    assert first != compat.stock_dataset_fingerprint(on_disk.select([0]))  # another row count
    datasets.Dataset.from_dict({**rows, "response": ["1", "3"]}).save_to_disk(tmp_path / "saved2")
    assert first != compat.stock_dataset_fingerprint(datasets.load_from_disk(str(tmp_path / "saved2")))


def test_a_hub_source_keeps_a_stable_fingerprint_outside_the_checked_datasets(tmp_path, monkeypatch):
    datasets = pytest.importorskip("datasets")
    from trainer.config import SourceConfig
    from trainer.sources import read_source, source_fingerprint

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf-datasets-cache")
    data_dir = tmp_path / "local"
    data_dir.mkdir()
    data_file = data_dir / "train.jsonl"
    data_file.write_text('{"instruction": "Capital of France?", "response": "Paris."}\n')
    source = SourceConfig(name="local", kind="hub", dataset=str(data_dir), format="fields")
    checked = read_source(source).fingerprint

    monkeypatch.setenv(UNCHECKED_ENV, "datasets")
    got = read_source(source)
    assert got.fingerprint == read_source(source).fingerprint == source_fingerprint(source) != checked
    data_file.write_text('{"instruction": "Capital of France?", "response": "Paris, on the Seine."}\n')
    stat = os.stat(data_file)  # datasets notices a changed local file by its mtime: move it on a coarse clock too
    os.utime(data_file, ns=(stat.st_atime_ns, stat.st_mtime_ns + 2_000_000_000))
    assert source_fingerprint(source) != got.fingerprint
