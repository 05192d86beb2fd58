"""A sweep over the data mix: four sources in their own row formats, searched weights and budget, through the CLI."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

pytestmark = pytest.mark.integration  # every test here starts Ray or runs a sweep

MAX_SEQ_LENGTH = 64
LONG_TEXT = "once upon a time " * 20  # about 270 demo tokens: over MAX_SEQ_LENGTH in any template
NUM_DIGITS = 300
SOURCES = ("digits", "dolly", "oasst", "mine")


def plain(rows: list[dict]) -> list[dict]:
    """Rows as lists, to compare them."""
    return [{k: v.tolist() for k, v in r.items()} for r in rows]


def write_jsonl(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


# Each builder returns the rows it writes and what reading them must give:
# (rows, examples kept, skip reasons with counts).


def dolly_rows() -> tuple[list[dict], int, dict[str, int]]:
    good = [
        {"instruction": f"Name number {i}.", "context": "Counting." if i % 3 == 0 else "",
         "response": f"It is {i}.", "category": "open_qa"}
        for i in range(10)
    ]
    empty = [{"instruction": "   ", "context": "", "response": "Nothing.", "category": "open_qa"}]
    missing = [{"instruction": "No answer here.", "context": "", "category": "open_qa"}]
    long = [{"instruction": f"Tell story {i}.", "context": "", "response": LONG_TEXT, "category": "creative_writing"}
            for i in range(2)]
    rows = good[:5] + empty + long[:1] + good[5:] + missing + long[1:]
    return rows, len(good), {"empty_text": len(empty), "missing_field": len(missing), "overlong": len(long)}


def oasst_message(message_id: str, parent_id: str | None, role: str, text: str, lang: str = "en",
                  rank: int | None = None) -> dict:
    return {
        "message_id": message_id, "parent_id": parent_id, "user_id": f"user-{message_id}", "text": text,
        "role": role, "lang": lang, "review_count": 3, "review_result": True, "deleted": False, "rank": rank,
        "synthetic": False, "model_name": None, "message_tree_id": message_id.split("-")[0],
    }


def oasst_rows() -> tuple[list[dict], int, dict[str, int]]:
    rows = []
    for i in range(4):  # single-turn trees: one example each
        rows += [oasst_message(f"t{i}", None, "prompter", f"What is {i} plus {i}?"),
                 oasst_message(f"t{i}-a", f"t{i}", "assistant", f"{2 * i}.", rank=0)]
    rows += [  # two turns: the top-ranked reply answers, the second turn has the first as history
        oasst_message("t4", None, "prompter", "Say hi."),
        oasst_message("t4-b", "t4", "assistant", "Hello there.", rank=1),
        oasst_message("t4-a", "t4", "assistant", "Hi.", rank=0),
        oasst_message("t4-es", "t4", "assistant", "Hola.", lang="es", rank=2),  # not_english
        oasst_message("t4-a-p", "t4-a", "prompter", "Again?"),
        oasst_message("t4-a-p-a", "t4-a-p", "assistant", "Hi again.", rank=0),
        oasst_message("t5", None, "prompter", "Anyone there?"),  # no_reply
        oasst_message("t6", None, "prompter", "Tell a story."),
        oasst_message("t6-a", "t6", "assistant", LONG_TEXT, rank=0),  # overlong
    ]
    return rows, 4 + 2, {"not_english": 1, "no_reply": 1, "overlong": 1}


def mine_rows() -> tuple[list[dict], int, dict[str, int]]:
    good = [{"question": f"Spell {i}.", "background": "Digits." if i % 2 else None, "answer": str(i)}
            for i in range(8)]
    long = [{"question": "Recite the story.", "background": "", "answer": LONG_TEXT}]
    return good[:4] + long + good[4:], len(good), {"overlong": len(long)}


def write_config(tmp_path: Path) -> tuple[Path, dict[str, tuple[int, dict[str, int]]]]:
    """Writes the three files and the sweep config; returns its path and each source's expected counts."""
    expected = {"digits": (NUM_DIGITS, {})}
    for name, build in (("dolly", dolly_rows), ("oasst", oasst_rows), ("mine", mine_rows)):
        rows, used, reasons = build()
        write_jsonl(tmp_path / f"{name}.jsonl", rows)
        expected[name] = (used, reasons)
    mix_space = {"type": "float", "low": 0.05, "high": 1.0}
    config = {
        "study": {"name": "mix", "n_trials": 3, "seed": 0, "sampler": "random"},
        "model": {"name_or_path": "sweep-demo/tiny-llama"},
        "data": {
            "template": "alpaca", "max_seq_length": MAX_SEQ_LENGTH, "overlong": "skip",
            "sources": [  # file paths are relative to this config file
                {"name": "digits", "kind": "synthetic", "num_train": NUM_DIGITS, "num_eval": 40},
                {"name": "dolly", "kind": "file", "path": "dolly.jsonl", "format": "dolly"},
                {"name": "oasst", "kind": "jsonl", "path": "oasst.jsonl", "format": "oasst1"},
                {"name": "mine", "kind": "jsonl", "path": "mine.jsonl", "format": "fields",
                 "fields": {"instruction": "question", "input": "background", "response": "answer"}},
            ],
        },
        "trainer": {"max_steps": 8, "epochs": 1, "packing": True, "pack_length": 320},
        "evaluator": {"batch_size": 32, "tasks": [{"name": "demo_digits", "source": "digits", "metric": "acc"}]},
        "search_space": {
            **{f"data.mix.{name}": mix_space for name in SOURCES},
            "data.num_examples": {"type": "int", "low": 200, "high": 400},
            "trainer.learning_rate": {"type": "float", "low": 1e-4, "high": 1e-2, "log": True},
        },
        "orchestration": {"artifacts_dir": str(tmp_path / "runs"), "cpus_per_trial": 1},
    }
    path = tmp_path / "mix.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path, expected


def sampled_mix(params: dict) -> dict[str, float]:
    return {name: params[f"data.mix.{name}"] for name in SOURCES}


def test_sweep_searches_the_data_mix(tmp_path, monkeypatch, cli, ray_session):
    monkeypatch.chdir(tmp_path)
    config_path, expected = write_config(tmp_path)
    storage = f"sqlite:///{tmp_path / 'studies.db'}"
    cli("start", "--config", str(config_path), "--storage", storage, "--gpu", "cpu", "--set", "study.pruner=none")
    status = json.loads(cli("status", "--storage", storage, "--study", "mix", "--format", "json"))
    trials = status["trials"]

    # 1. Every trial completed with its own mix and budget.
    assert [t["state"] for t in trials] == ["COMPLETE"] * 3, [t.get("fail_reason") for t in trials]
    for t in trials:
        assert set(t["params"]) == {*(f"data.mix.{n}" for n in SOURCES), "data.num_examples",
                                    "trainer.learning_rate"}
        assert all(0.05 <= w <= 1.0 for w in sampled_mix(t["params"]).values())
        assert 200 <= t["params"]["data.num_examples"] <= 400
    for name in SOURCES:
        assert len({t["params"][f"data.mix.{name}"] for t in trials}) == 3, name

    for t in trials:
        # 2. What the data preparation did, per source, from the rows written above.
        data = t["data"]
        budget = t["params"]["data.num_examples"]
        assert data["rows_used"] == {name: used for name, (used, _) in expected.items()}
        assert data["skip_reasons"] == {name: reasons for name, (_, reasons) in expected.items()}
        assert data["rows_skipped"] == {name: sum(reasons.values()) for name, (_, reasons) in expected.items()}
        mix = sampled_mix(t["params"])
        assert data["weights"] == pytest.approx({n: w / sum(mix.values()) for n, w in mix.items()}, abs=1e-6)
        assert set(data["selected"]) == set(SOURCES)
        assert sum(data["selected"].values()) == budget == data["examples"]
        for name in SOURCES:  # largest-remainder shares: within one example of weight x budget
            assert abs(data["selected"][name] - data["weights"][name] * budget) < 1 + 1e-6, name
        assert data["tokens"] > 0

        # 3. The measurements of a CPU trial.
        assert t["train_steps"] == 8 and t["tokens_per_second"] > 0
        assert t["peak_memory_gib"] is None and t["mfu"] is None
        hours = t["projected_full_run_hours"]
        assert isinstance(hours, float) and hours > 0
        assert t["feasible"] is True
        assert t["wall_seconds"] >= t["train_seconds"] > 0
        assert set(t["scores"]) == {"demo_digits"} and 0.0 <= t["value"] <= 1.0

        # 4. The adapter's hyperparameters.yaml records the sampled mix.
        hyper = yaml.safe_load((Path(t["adapter_dir"]) / "hyperparameters.yaml").read_text())
        assert hyper["data"]["mix"] == pytest.approx(mix, abs=1e-12)
        assert hyper["data"]["num_examples"] == budget
        assert hyper["trial"]["params"] == pytest.approx(t["params"], abs=1e-12)

    # 5. Trials share their sources: the later ones read every source from the tokenized-data cache.
    assert [t["data"]["cache_hits"] for t in trials[1:]] == [len(SOURCES)] * 2

    # Same seed, same mix: the data of a trial prepared again here gives the same rows and the same record.
    from sweep.config import load_config, with_params
    from trainer.data import prepare_data
    from trainer.model import load_tokenizer

    trial = trials[1]
    trial_config = with_params(load_config(config_path), trial["params"])
    tokenizer = load_tokenizer(trial_config.model)
    first = prepare_data(tokenizer, trial_config.data, cache_dir=tmp_path / "cache")
    again = prepare_data(tokenizer, trial_config.data, cache_dir=tmp_path / "cache")
    assert first.stats.cache_hits == 0 and again.stats.cache_hits == len(SOURCES)
    assert plain(again.rows) == plain(first.rows) and len(first.rows) == trial["params"]["data.num_examples"]
    record = json.loads(json.dumps(first.stats.as_record()))
    assert {**record, "cache_hits": None} == {**trial["data"], "cache_hits": None}
    # The workers' cache is the default one: reading it here tokenizes nothing and gives the same rows.
    shared = prepare_data(tokenizer, trial_config.data)
    assert shared.stats.cache_hits == len(SOURCES) and plain(shared.rows) == plain(first.rows)
