"""A sweep on a GPU through Ray: a trial that runs out of memory ends FAIL with the reason, and the sweep goes on."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration  # every test here starts Ray or runs a sweep

DEMO = Path(__file__).resolve().parents[2] / "configs" / "demo.yaml"


@pytest.mark.gpu
def test_out_of_memory_trial_fails_and_the_next_trial_completes(tmp_path, monkeypatch, cli, ray_session):
    monkeypatch.chdir(tmp_path)
    storage = f"sqlite:///{tmp_path / 'studies.db'}"
    # The random sampler with seed 0 proposes the 65536-token row first, then the 320-token one.
    cli("start", "--config", str(DEMO), "--storage", storage, "--study", "oom", "--trials", "2",
        "--set", "study.sampler=random", "--set", "study.seed=0", "--set", "study.pruner=none",
        "--set", "data.sources.0.num_train=4000", "--set", "trainer.max_steps=20",
        "--set", "orchestration.gpu_memory_cap_gib=0.25",
        "--set", "search_space={trainer.pack_length: {type: categorical, choices: [320, 65536]}}")
    status = json.loads(cli("status", "--storage", storage, "--study", "oom", "--format", "json"))
    failed, done = status["trials"]
    assert failed["params"] == {"trainer.pack_length": 65536} and failed["state"] == "FAIL"
    assert failed["fail_reason"].startswith("out of memory at step 1: packed row of 65536 tokens")
    assert "memory cap 0.25 GiB" in failed["fail_reason"]
    assert done["params"] == {"trainer.pack_length": 320} and done["state"] == "COMPLETE"
    assert done["memory_cap_gib"] == 0.25 and 0 < done["peak_memory_gib"] <= 0.25
    assert done["feasible"] is True and 0 < done["mfu"] < 1 and done["tokens_per_second"] > 0
    assert status["best"]["number"] == done["number"]
