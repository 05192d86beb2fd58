"""Generated training sources in the micro tasks' shapes: disjoint splits, scored in their shape and prompt format."""

from __future__ import annotations

import json

import pytest
import yaml

from evaluator.micro import _NAMES, _PLACES, METRICS, MICRO_TASKS, _part, example, split_docs
from sweep.config import ConfigError, load_config
from sweep.contamination import overlap_report
from sweep.tasks import prepare_tasks
from trainer.data import render
from trainer.examples import Example
from trainer.sources import read_source


def _config(tmp_path, **task_overrides):
    sources = [{"name": f"src_{g}", "kind": "synthetic", "generator": g, "num_train": 600, "num_eval": 40}
               for g in MICRO_TASKS]
    tasks = [{"name": f"task_{g}", "source": f"src_{g}", "metric": METRICS[g], **task_overrides.get(g, {})}
             for g in MICRO_TASKS]
    raw = {
        "study": {"name": "shapes"}, "model": {"name_or_path": "sweep-demo/tiny-llama"},
        "data": {"template": "alpaca", "max_seq_length": 96, "sources": sources},
        "evaluator": {"suites": {"open": {"tasks": tasks}}},
    }
    path = tmp_path / "shapes.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return load_config(path)


def test_same_seed_same_documents_and_the_splits_draw_from_disjoint_names_and_places():
    for generator in MICRO_TASKS:
        assert split_docs(generator, 3, 50, 10) == split_docs(generator, 3, 50, 10)
        assert split_docs(generator, 3, 50, 10) != split_docs(generator, 4, 50, 10)
    for values in (_NAMES, _PLACES):
        train, heldout = _part(values, "train"), _part(values, "heldout")
        assert train and heldout and not set(train) & set(heldout) and set(train) | set(heldout) == set(values)
    heldout_names = set(_part(_NAMES, "heldout"))
    train, heldout = split_docs("micro_gen", 0, 300, 40)
    assert all(not any(n in d["prompt"] for n in heldout_names) for d in train)
    assert all(any(n in d["prompt"] for n in heldout_names) for d in heldout)


def test_no_held_out_document_shares_a_13_gram_with_any_training_example(tmp_path):
    config = _config(tmp_path)
    rows, _ = overlap_report(config, prepare_tasks(config, tmp_path / "work"))
    assert len(rows) == len(MICRO_TASKS) ** 2
    assert {(r.source, r.task): r.overlapping for r in rows if r.overlapping} == {}
    assert all(r.source_examples == 600 and r.task_docs == 40 for r in rows)


def test_a_source_task_is_scored_in_the_source_shape_on_the_prompts_it_trained_on(tmp_path):
    config = _config(tmp_path)
    task_dir = prepare_tasks(config, tmp_path / "work")
    for generator in MICRO_TASKS:
        spec = (task_dir / f"task_{generator}.yaml").read_text()
        kind = "multiple_choice" if generator in ("micro_mc", "micro_ethics", "micro_parity") else "generate_until"
        assert f"output_type: {kind}" in spec
        source = next(s for s in config.data.sources if s.generator == generator)
        docs = [json.loads(line) for line in (task_dir / "data" / f"task_{generator}.jsonl").open()]
        held_out = split_docs(generator, source.seed, 0, source.num_eval)[1]
        assert len(docs) == 40
        for doc, raw in zip(docs, held_out, strict=True):
            # The training template around the document's own prompt, as every training example of the source.
            assert doc["prompt"] == render(None, "alpaca", Example(raw["prompt"], ""))[0]
            assert doc["prompt"].startswith("### Instruction:\n") and doc["prompt"].endswith("### Response:\n")
        rows = read_source(source)
        examples, skipped = rows.examples, rows.skipped
        assert len(examples) == 600 and skipped == {}
        train = split_docs(generator, source.seed, 600, 0)[0]
        assert [(e.instruction, e.response) for e in examples] == [example(generator, d) for d in train]
        assert not {e.instruction for e in examples} & {d["prompt"] for d in held_out}


@pytest.mark.parametrize("generator", ["micro_gen", "micro_sum"])
def test_a_metric_the_shape_does_not_report_is_a_config_error(tmp_path, generator):
    with pytest.raises(ConfigError) as error:
        _config(tmp_path, **{generator: {"metric": "acc"}})
    assert f"metric: a {generator} task reports {METRICS[generator]!r}, got 'acc'" in str(error.value)


def test_an_unknown_generator_is_a_config_error(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({
        "study": {"name": "x"}, "model": {"name_or_path": "sweep-demo/tiny-llama"},
        "data": {"sources": [{"name": "s", "kind": "synthetic", "generator": "micro_quiz"}]},
        "evaluator": {"tasks": [{"name": "t", "generator": "micro_mc"}]},
    }))
    with pytest.raises(ConfigError) as error:
        load_config(path)
    assert "data.sources.0.generator: expected one of digits, micro_mc" in str(error.value)


@pytest.mark.parametrize("override,message", [
    ("data.sources.0.num_eval=0", "evaluator.suites.open.tasks.0.source: source 'digits' has num_eval 0"),
    ("data.sources.3={name: news, kind: jsonl, path: x.jsonl, generator: micro_sum}",
     "data.sources.3.generator: only a synthetic source is generated (this one is jsonl)"),
])
def test_a_source_task_needs_held_out_documents_and_only_synthetic_sources_have_a_generator(override, message):
    with pytest.raises(ConfigError) as error:
        load_config(None, [override])
    assert message in str(error.value)
