"""The contamination check: planted overlaps are found per (source, task), and dropped from training on request."""

from __future__ import annotations

import json
import logging
import os
import re

import pytest
import yaml

from evaluator.micro import generate_docs
from sweep.config import demo_config_path, load_config
from sweep.contamination import SharedDataset, overlap_report, shared_datasets
from sweep.tasks import check_contamination, prepare_tasks
from trainer.data import prepare_data
from trainer.demo_base import build_tokenizer

NUM_PLANTED = 50


def write_config(tmp_path, drop: bool):
    # 50 of the micro summarisation task's own documents planted among 30 unrelated articles, in CNN/DailyMail rows.
    planted = generate_docs("micro_sum", 60, seed=0)[:NUM_PLANTED]
    unrelated = [
        {"article": f"Report number {i}: the committee reviewed budget line {i} and approved it after a long "
                    f"debate about roads, schools and parks in district {i} during the spring session.",
         "highlights": f"Budget line {i} approved."}
        for i in range(30)
    ]
    data = tmp_path / "news.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in planted + unrelated))
    raw = yaml.safe_load(demo_config_path().read_text())
    # The demo's generated summaries give way to the file; micro_sum is scored on the generated task itself.
    raw["data"]["sources"] = [s for s in raw["data"]["sources"] if s["name"] != "news"]
    raw["data"]["sources"].append({"name": "news", "kind": "file", "path": str(data), "format": "cnn_dailymail"})
    raw["data"]["drop_contaminated"] = drop
    raw["data"]["max_seq_length"] = 256
    raw["trainer"]["pack_length"] = 512
    raw["trainer"]["max_steps"] = 5
    raw["orchestration"]["cpus_per_trial"] = 1
    raw["evaluator"]["suites"]["open"]["tasks"][3] = {  # the planted documents
        "name": "micro_sum", "generator": "micro_sum", "metric": "rouge2", "num_docs": 60}
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


def test_planted_overlap_is_reported_and_dropped(tmp_path):
    config = load_config(write_config(tmp_path, drop=True))
    rows, grams = overlap_report(config, prepare_tasks(config, tmp_path / "work"))
    found = {(r.source, r.task): r.overlapping for r in rows}
    assert found[("news", "micro_sum")] == NUM_PLANTED
    # Nothing else overlaps: a generated source's held-out split shares no 13-gram with its training split.
    assert sum(found.values()) == NUM_PLANTED
    news = next(r for r in rows if r.source == "news" and r.task == "micro_sum")
    assert news.source_examples == NUM_PLANTED + 30 and news.task_docs == 60

    prepared = prepare_data(build_tokenizer(), config.data, cache_dir=tmp_path / "cache", exclude=grams)
    assert prepared.stats.skip_reasons["news"] == {"contaminated": NUM_PLANTED}
    assert prepared.stats.rows_used["news"] == 30
    kept = prepare_data(build_tokenizer(), config.data, cache_dir=tmp_path / "cache")
    assert kept.stats.rows_used["news"] == NUM_PLANTED + 30  # without dropping, all are trained on


@pytest.mark.integration
def test_contamination_command_and_a_sweep_that_drops(tmp_path, monkeypatch, cli, ray_session):
    monkeypatch.chdir(tmp_path)
    path = write_config(tmp_path, drop=True)
    report = json.loads(cli("contamination", "--config", str(path), "--format", "json"))
    assert {"source": "news", "task": "micro_sum", "overlapping": NUM_PLANTED, "source_examples": 80,
            "task_docs": 60} in report["overlaps"]
    assert report["shared_datasets"] == [] and report["overlaps_skipped"] is None  # no hub source here
    assert re.search(r"^news +micro_sum +50 ", cli("contamination", "--config", str(path)), re.M)

    storage = f"sqlite:///{tmp_path / 'studies.db'}"
    cli("start", "--config", str(path), "--storage", storage, "--study", "drop", "--trials", "1", "--gpu", "cpu")
    trial = json.loads(cli("status", "--storage", storage, "--study", "drop", "--format", "json"))["trials"][0]
    assert trial["state"] == "COMPLETE", trial.get("fail_reason")
    assert trial["data"]["skip_reasons"]["news"] == {"contaminated": NUM_PLANTED}
    assert trial["data"]["rows_used"]["news"] == 30
    saved = json.loads((tmp_path / "sweep-runs" / "drop" / "contamination.json").read_text())
    assert {"source": "news", "task": "micro_sum", "overlapping": NUM_PLANTED, "source_examples": 80,
            "task_docs": 60} in saved
    assert json.loads((tmp_path / "sweep-runs" / "drop" / "contamination-datasets.json").read_text()) == []


def hub_config(tmp_path, sources, tasks=({"name": "bbq", "metric": "acc", "chance": 0.33, "limit": 20},)):
    """The demo with hub sources added (never read here) and lm-eval tasks added to its heldout suite."""
    raw = yaml.safe_load(demo_config_path().read_text())
    raw["data"]["sources"] += [{"kind": "hub", **s} for s in sources]
    raw["evaluator"]["suites"]["heldout"]["tasks"] += list(tasks)
    path = tmp_path / "hub.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


def test_a_source_that_is_a_tasks_dataset_is_reported_without_data(tmp_path):
    bbq = {"name": "bbq", "dataset": "oskarvanderwal/bbq", "split": "test"}
    config = load_config(hub_config(tmp_path, [bbq, {"name": "sciq", "dataset": "allenai/sciq"}]))
    # Offline, nothing downloaded: lm-eval's task YAML alone names the dataset.
    assert shared_datasets(config) == [
        SharedDataset("bbq", "bbq", "oskarvanderwal/bbq", "oskarvanderwal/bbq", "test", "test")]
    assert shared_datasets(config)[0].same_split
    # Case and a bare name match; another org's dataset of the same name, or another dataset, does not.
    aliases = [{"name": "a", "dataset": "OskarVanDerWal/BBQ"}, {"name": "b", "dataset": "bbq"},
               {"name": "c", "dataset": "someone/bbq"}, {"name": "d", "dataset": "allenai/sciq"}]
    found = shared_datasets(load_config(hub_config(tmp_path, aliases)))
    assert [(r.source, r.trained_split, r.scored_split, r.same_split) for r in found] == [
        ("a", "train", "test", False), ("b", "train", "test", False)]
    # Groups count by their subtasks (mmlu: groups of tags of 57 tasks); org/name against a bare source id.
    tasks = [{"name": "mmlu", "metric": "acc"}, {"name": "gsm8k", "metric": "exact_match,strict-match"}]
    sources = [{"name": "aux", "dataset": "cais/mmlu", "subset": "auxiliary_train"},
               {"name": "math", "dataset": "gsm8k"}]
    found = shared_datasets(load_config(hub_config(tmp_path, sources, tasks)))
    assert [(r.source, r.task, r.task_dataset, r.scored_split) for r in found] == [
        ("aux", "mmlu", "cais/mmlu", "test"), ("math", "gsm8k", "openai/gsm8k", "test")]


@pytest.mark.slow  # builds lm-eval's task index several times (about 25 s); `.ci/run` runs it
def test_contamination_command_shows_shared_datasets_when_the_ngram_check_cannot_run(tmp_path, capsys, caplog):
    from sweep.cli import main

    bbq = {"name": "bbq", "dataset": "oskarvanderwal/bbq", "split": "test"}
    path = hub_config(tmp_path, [bbq])
    assert os.environ["HF_HUB_OFFLINE"] == "1"  # the bbq rows and documents cannot be downloaded
    code = main(["contamination", "--config", str(path)])
    out, err = capsys.readouterr()
    assert code == 0, err
    assert re.search(r"^bbq +bbq +oskarvanderwal/bbq +test +test \(same\)$", out, re.M)
    assert re.search(r"^13-gram check skipped .*ConnectionError", out, re.M)
    assert "Traceback" not in out + err

    code = main(["contamination", "--config", str(path), "--format", "json"])
    out, err = capsys.readouterr()
    report = json.loads(out)
    assert code == 0 and report["overlaps"] == [] and "ConnectionError" in report["overlaps_skipped"]
    assert report["shared_datasets"] == [{"source": "bbq", "task": "bbq", "dataset": "oskarvanderwal/bbq",
                                          "task_dataset": "oskarvanderwal/bbq", "trained_split": "test",
                                          "scored_split": "test", "same_split": True}]

    # The sweep start's step: a warning per pair and a file of them, though the n-gram check is skipped.
    config = load_config(path)
    work = tmp_path / "work"
    with caplog.at_level(logging.WARNING, logger="sweep"):
        assert check_contamination(config, str(prepare_tasks(config, work)), work) is None
    assert "source bbq trains on oskarvanderwal/bbq, the dataset task bbq reads" in caplog.text
    assert "Contamination check skipped" in caplog.text
    saved = json.loads((work / "contamination-datasets.json").read_text())
    assert saved == report["shared_datasets"] and not (work / "contamination.json").exists()

    # Without a dataset-level row to show, a check that cannot run is still an error, in one line.
    other = hub_config(tmp_path, [{"name": "sciq", "dataset": "allenai/sciq"}])
    code = main(["contamination", "--config", str(other)])
    out, err = capsys.readouterr()
    assert code != 0 and "Traceback" not in err and len(err.strip().splitlines()) == 1
