"""A real sweep through Ray: Optuna ask/tell, QLoRA trials, lm-eval scores, SQLite, export."""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from sweep_processes import ONE_THREAD

pytestmark = pytest.mark.integration  # every test here starts Ray or runs a sweep


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    return tmp_path_factory.mktemp("sweep-e2e")


EXPORTED = ["README.md", "adapter_config.json", "adapter_model.safetensors", "config.yaml", "environment.json",
            "hyperparameters.yaml", "scores.json", "tokenizer.json", "tokenizer_config.json"]
"""What an export without --merge writes: the adapter, the tokenizer, the card, the configs and the scores."""
ALL_TASKS = {"demo_digits", "micro_mc", "micro_gen", "micro_sum", "micro_math", "micro_parity"}


def status(cli, storage, study="e2e") -> dict:
    return json.loads(cli("status", "--storage", storage, "--study", study, "--format", "json"))


def test_two_trial_sweep_then_more_trials_and_failures(workdir, monkeypatch, cli, capsys, ray_session):
    monkeypatch.chdir(workdir)
    storage = f"sqlite:///{workdir / 'studies.db'}"
    common = ["--storage", storage, "--study", "e2e", "--gpu", "cpu",
              "--set", "trainer.max_steps=60", "--set", "study.pruner=none",
              "--set", f"orchestration.artifacts_dir={workdir / 'runs'}", *ONE_THREAD]

    cli("start", "--trials", "2", *common)
    first = status(cli, storage)
    assert first["study"] == "e2e" and first["direction"] == "maximize"
    trials = first["trials"]
    assert [t["state"] for t in trials] == ["COMPLETE", "COMPLETE"]
    for t in trials:
        assert isinstance(t["value"], float) and 0.0 <= t["value"] <= 1.0
        assert set(t["scores"]) == ALL_TASKS and all(0.0 <= v <= 1.0 for v in t["scores"].values())
        assert t["value"] == t["open_value"] == t["values"]["open"] and 0.0 < t["heldout_value"] <= 1.0
        assert t["train_steps"] == 60 and t["tokens_per_second"] > 0
        assert t["peak_memory_gib"] is None
        # The demo searches the mix with the training settings: the drawn weights are the trial's data.
        mix = {k.removeprefix("data.mix."): v for k, v in t["params"].items() if k.startswith("data.mix.")}
        assert set(t["params"]) == {"trainer.learning_rate", "trainer.lora.r", "trainer.lora.alpha",
                                    "trainer.lora.dropout", "data.num_examples", *(f"data.mix.{s}" for s in mix)}
        assert set(mix) == {"digits", "letters", "sums", "news"}
        assert t["data"]["weights"] == {k: round(v / sum(mix.values()), 6) for k, v in mix.items()}
        assert t["data"]["examples"] == t["params"]["data.num_examples"]
    assert trials[0]["params"] != trials[1]["params"]
    assert first["baseline"] is not None and set(first["baseline"]["scores"]) == ALL_TASKS
    assert set(first["baseline"]["values"]) == {"open", "heldout"}
    assert first["optimize"] == "open" and first["pick_by"] == "heldout" and first["top_k"] == 3
    # Two trials, both in the top 3 on open: the pick is the one better on heldout.
    assert first["pick"]["number"] == max(trials, key=lambda t: (t["heldout_value"], t["open_value"]))["number"]
    assert first["rank_correlation"] is None  # fewer than 3 trials
    best = first["best"]
    assert best["value"] == max(t["value"] for t in trials)
    assert (workdir / "runs" / "e2e" / "trials").is_dir()
    for name in ("adapter_config.json", "adapter_model.safetensors", "hyperparameters.yaml"):
        assert (workdir / "runs" / "e2e" / "trials" / f"{best['number']:04d}" / "adapter" / name).exists()
    # Library output of each worker goes to the trial's own log, not the driver's terminal.
    assert (workdir / "runs" / "e2e" / "trials" / "0000" / "worker.log").exists()
    assert (workdir / "runs" / "e2e" / "baseline.log").exists()

    # The baseline lives in our table, not as an Optuna trial.
    con = sqlite3.connect(workdir / "studies.db")
    assert con.execute("select count(*) from trials").fetchone()[0] == 2
    assert con.execute("select count(*) from sweep_baselines").fetchone()[0] == 1
    assert con.execute("pragma journal_mode").fetchone()[0] == "wal"
    con.close()

    # Export the best trial and load it with peft from what the export records.
    out = workdir / "export"
    cli("export", "--storage", storage, "--study", "e2e", "--best", "--out", str(out))
    for name in EXPORTED:
        assert (out / name).stat().st_mode & 0o777 == 0o666 & ~_umask(), name  # one ordinary mode for all
    scores = json.loads((out / "scores.json").read_text())
    assert scores["trial"] == best["number"] and scores["value"] == best["value"]
    hyper = yaml.safe_load((out / "hyperparameters.yaml").read_text())
    assert hyper["trainer"]["learning_rate"] == best["params"]["trainer.learning_rate"]
    assert hyper["trainer"]["lora"]["r"] == best["params"]["trainer.lora.r"]
    assert hyper["trial"]["study"] == "e2e" and hyper["trial"]["number"] == best["number"]
    assert hyper["model"]["name_or_path"] == "sweep-demo/tiny-llama"
    from peft import PeftConfig, PeftModel
    from transformers import AutoModelForCausalLM

    from trainer.demo_base import resolve_model_path

    recorded = PeftConfig.from_pretrained(str(out))
    assert recorded.base_model_name_or_path == "sweep-demo/tiny-llama"
    base = AutoModelForCausalLM.from_pretrained(resolve_model_path(recorded.base_model_name_or_path))
    model = PeftModel.from_pretrained(base, str(out))
    assert any("lora_A" in n for n, _ in model.named_parameters())
    # peft's auto class resolves the recorded base by itself (the hub cache, offline).
    from peft import AutoPeftModelForCausalLM

    auto = AutoPeftModelForCausalLM.from_pretrained(str(out))
    assert type(auto.get_base_model()).__name__ == "LlamaForCausalLM"

    # The submission with a merged model: it loads and generates without peft; the card names every score and
    # the mix; the adapter beside it still loads on its base; config.yaml trains the trial again.
    submission = workdir / "submission"
    cli("export", "--storage", storage, "--study", "e2e", "--pick", "--merge", "--out", str(submission))
    pick = next(t for t in trials if t["number"] == first["pick"]["number"])
    from transformers import AutoTokenizer

    merged = AutoModelForCausalLM.from_pretrained(str(submission / "merged"))
    assert not (submission / "merged" / "adapter_config.json").exists()
    merged_config = json.loads((submission / "merged" / "config.json").read_text())
    assert "quantization_config" not in merged_config and merged_config["dtype"] == "bfloat16"
    tok = AutoTokenizer.from_pretrained(str(submission / "merged"))
    prompt = tok("### Instruction:\nIs 4 7 1 even or odd?\n\n### Response:\n", return_tensors="pt")
    generated = merged.generate(**prompt, max_new_tokens=4, do_sample=False)
    assert generated.shape[1] > prompt["input_ids"].shape[1]
    assert (submission / "tokenizer.json").exists()
    card = (submission / "README.md").read_text()
    assert card.startswith("---\nbase_model: sweep-demo/tiny-llama\nlibrary_name: peft\n")
    for task, score in pick["scores"].items():
        assert f"| {task} | {score:.4g} | {first['baseline']['scores'][task]:.4g} |" in card
    for source in ("digits", "letters", "sums", "news"):
        assert f"| {source} | synthetic: " in card
    assert "bf16 dequantization of the 4-bit weights" in card and f"trial {pick['number']}" in card
    assert type(AutoPeftModelForCausalLM.from_pretrained(str(submission)).get_base_model()).__name__ == \
        "LlamaForCausalLM"
    trained = yaml.safe_load((submission / "hyperparameters.yaml").read_text())
    again = yaml.safe_load((submission / "config.yaml").read_text())
    assert again["search_space"] == {} and again["study"]["trial_seed"] == trained["trial"]["seed"]
    assert again["trainer"]["learning_rate"] == pick["params"]["trainer.learning_rate"] and "trial" not in again
    cli("validate", str(submission / "config.yaml"), "--file-only")
    # Trained again from config.yaml: one trial with nothing searched, the exported trial's seed and settings.
    again = f"sqlite:///{workdir / 'again.db'}"  # a storage of its own: later steps read the only study of theirs
    # Another study seed: the trial's seed must come from study.trial_seed, not be derived again.
    cli("start", "--config", str(submission / "config.yaml"), "--storage", again, "--study", "again",
        "--gpu", "cpu", "--set", "study.seed=12345", *ONE_THREAD)
    rerun = status(cli, again, "again")["trials"]
    assert [t["state"] for t in rerun] == ["COMPLETE"] and rerun[0]["params"] == {}
    retrained = yaml.safe_load((Path(rerun[0]["adapter_dir"]) / "hyperparameters.yaml").read_text())
    assert retrained["trial"]["seed"] == trained["trial"]["seed"]
    assert {k: retrained[k] for k in ("model", "data", "trainer")} == {k: trained[k] for k in ("model", "data",
                                                                                               "trainer")}

    # Two more trials on the same study, each failing at run time: both end FAIL
    # with a reason (the second ran after the first failed); earlier trials stay.
    # A start whose trials all failed exits 1, its last line about this start.
    from sweep.cli import main

    capsys.readouterr()
    assert main(["start", "--trials", "2", *common, "--set", "trainer.lora.target_modules=[no_such_module]"]) == 1
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last.startswith("sweep start: error: study 'e2e': all 2 trial(s) of this start failed (the last: ")
    assert "no_such_module" in last and f"the study's best is still trial {first['best']['number']}" in last
    after = status(cli, storage)
    assert len(after["trials"]) == 4
    assert after["trials"][:2] == first["trials"]
    for t in after["trials"][2:]:
        assert t["state"] == "FAIL" and t["value"] is None
        assert "no_such_module" in t["fail_reason"]
    assert after["best"] == first["best"] and after["baseline"] == first["baseline"]
    table = cli("status", "--storage", storage)
    assert "FAIL" in table and "COMPLETE" in table
    assert "Pick (best on heldout among the top 3 on open, the untuned base included)" in table
    picked = workdir / "picked"
    cli("export", "--storage", storage, "--study", "e2e", "--pick", "--out", str(picked))
    exported = json.loads((picked / "scores.json").read_text())
    assert exported["trial"] == after["pick"]["number"] and set(exported["values"]) == {"open", "heldout"}

    # An export never lands in a non-empty directory without --force, nor mixes old files with new.
    other = next(t["number"] for t in first["trials"] if t["number"] != exported["trial"])
    (picked / "notes.txt").write_text("mine")
    before = {p.name: p.read_bytes() for p in picked.iterdir()}
    refused = subprocess.run([sys.executable, "-m", "sweep.cli", "export", "--storage", storage, "--study", "e2e",
                              "--trial", str(other), "--out", str(picked)], capture_output=True, text=True)
    assert refused.returncode == 2 and refused.stderr.count("\n") == 1 and "--force" in refused.stderr
    assert {p.name: p.read_bytes() for p in picked.iterdir()} == before
    cli("export", "--storage", storage, "--study", "e2e", "--trial", str(other), "--out", str(picked), "--force")
    assert sorted(p.name for p in picked.iterdir()) == EXPORTED
    assert json.loads((picked / "scores.json").read_text())["trial"] == other
    assert not [p for p in workdir.iterdir() if p.name.startswith(".picked")]  # no staging left behind

    # A trial whose full run would not fit the time limit is COMPLETE but infeasible: an Optuna
    # constraint the sampler learns from, and never the best.
    cli("start", "--trials", "1", *common, "--set", "study.full_run_hours_limit=1e-9")
    last = status(cli, storage)["trials"][-1]
    assert last["state"] == "COMPLETE" and last["feasible"] is False
    assert last["constraints"]["full_run_hours_over_limit"] > 0
    assert last["projected_full_run_hours"] > 1e-9
    assert status(cli, storage)["best"] == first["best"]  # whatever the infeasible trial scored
    assert "infeasible" in cli("status", "--storage", storage)
