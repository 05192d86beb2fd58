"""The demo as a new user runs it: `sweep start` with no config, then `sweep status` (slow: the whole demo)."""

from __future__ import annotations

import json

import pytest

pytestmark = pytest.mark.integration  # every test here starts Ray or runs a sweep


@pytest.mark.slow
def test_the_demo_searches_the_mix_and_every_task_learns(tmp_path, monkeypatch, cli, ray_session):
    monkeypatch.chdir(tmp_path)
    cli("start")
    status = json.loads(cli("status", "--format", "json"))
    trials, baseline = status["trials"], status["baseline"]
    complete = [t for t in trials if t["state"] == "COMPLETE"]
    assert len(trials) == 10 and len(complete) >= 4
    assert any(t["state"] == "PRUNED" for t in trials)  # the pruner at work
    for t in trials:  # the mix weights and the budget are searched with the training settings
        assert {f"data.mix.{s}" for s in ("digits", "letters", "sums", "news")} | {
            "data.num_examples", "trainer.learning_rate", "trainer.lora.r", "trainer.lora.alpha",
            "trainer.lora.dropout"} == set(t["params"])
    assert status["rank_correlation"] is not None
    assert max(t["open_value"] for t in complete) >= 2 * baseline["values"]["open"]
    # Every task, trained or held out, scores above zero for some trial.
    assert all(max(t["scores"][task] for t in complete) > 0 for task in baseline["scores"])
    assert set(baseline["scores"]) == {"demo_digits", "micro_mc", "micro_gen", "micro_sum", "micro_math",
                                       "micro_parity"}
    # The pick: the best on heldout among the top 3 on open.
    top = sorted(complete, key=lambda t: t["open_value"], reverse=True)[:3]
    assert status["pick"]["number"] == max(top, key=lambda t: t["heldout_value"])["number"]
    assert "Pick (best on heldout among the top 3 on open, the untuned base included)" in cli("status")
