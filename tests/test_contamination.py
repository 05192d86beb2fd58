"""The contamination check: planted overlaps are found per (source, task), and dropped from training on request."""

from __future__ import annotations

import json
import re

import yaml

from evaluator.micro import generate_docs
from sweep.config import demo_config_path, load_config
from sweep.contamination import overlap_report
from sweep.scheduler import prepare_tasks
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


def test_contamination_command_and_a_sweep_that_drops(tmp_path, monkeypatch, cli, ray_session):
    monkeypatch.chdir(tmp_path)
    path = write_config(tmp_path, drop=True)
    report = json.loads(cli("contamination", "--config", str(path), "--format", "json"))
    assert {"source": "news", "task": "micro_sum", "overlapping": NUM_PLANTED, "source_examples": 80,
            "task_docs": 60} in report
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
