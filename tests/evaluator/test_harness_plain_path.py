"""Plain lm-eval scoring (stock HFLM, `simple_evaluate`): the reference the fast path is checked against, and what
scoring falls back to when lm-eval is outside the versions `evaluator.compat` was checked against."""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

import pytest
import yaml

from evaluator.config import GenerationConfig, TaskConfig

SUITE = Path(__file__).resolve().parents[2] / "configs" / "suites" / "micro_open.yaml"
# Fewer documents than the suite's (a test's time), and a few-shot count and a limit that both paths must apply.
SHRUNK = {"micro_mc": dict(num_docs=40, limit=30, num_fewshot=2), "micro_gen": dict(num_docs=12),
          "micro_sum": dict(num_docs=12)}


@pytest.fixture
def micro_open(tmp_path, fingerprint_task) -> tuple[list[TaskConfig], Path]:
    """The micro_open suite's tasks, shrunk (`SHRUNK`), written into a task directory, and a `fingerprint_task`
    of the summaries' prompts (an untrained model's summaries score 0 on micro_sum, whatever they are)."""
    from evaluator.micro import write_micro_task

    task_dir = tmp_path / "tasks"
    tasks = []
    for spec in yaml.safe_load(SUITE.read_text())["tasks"]:
        task = dataclasses.replace(TaskConfig(**spec), **SHRUNK[spec["name"]])
        write_micro_task(task.name, task.generator, task_dir, n=task.num_docs)
        tasks.append(task)
    return tasks + [fingerprint_task(task_dir, task_dir / "data" / "micro_sum.jsonl")], task_dir


def test_fast_and_plain_paths_give_the_same_scores_and_unchecked_lm_eval_takes_the_plain_one(
        adapted, micro_open, monkeypatch, caplog):
    from evaluator.harness import evaluate

    model, tok = adapted
    tasks, task_dir = micro_open
    # One batch size for both: HFLM batches the prompts the same way for its generate and for our decoder, so both
    # decode the same padded batches.
    generation = GenerationConfig(max_new_tokens=24, batch_size=8)
    fast = evaluate(model, tok, tasks, task_dir, 8, generation)
    plain = evaluate(model, tok, tasks, task_dir, 8, generation, fast_path=False)
    assert fast.fast_path and not plain.fast_path
    assert set(plain.scores) == {"micro_mc", "micro_gen", "micro_sum", "fingerprint"}
    assert plain.num_docs == fast.num_docs == {"micro_mc": 30, "micro_gen": 12, "micro_sum": 12, "fingerprint": 12}
    assert 0 < plain.scores["fingerprint"] < 1 and plain.stderrs["fingerprint"] > 0
    # Equal, not close: greedy decoding gives the same tokens (so exact match, ROUGE and the generations'
    # fingerprints are the same), and the
    # log-likelihood sums of the two paths differ by float32 rounding (about 1e-6, checked to 1e-3 against HFLM
    # in test_upstream_contracts), far below the gaps between the choices, so every document's pick and the
    # accuracies are the same.
    assert fast.scores == plain.scores
    assert fast.stderrs == pytest.approx(plain.stderrs)

    monkeypatch.setenv("SWEEP_COMPAT_UNCHECKED", "lm-eval")
    caplog.set_level(logging.INFO, logger="evaluator.harness")
    unchecked = evaluate(model, tok, tasks, task_dir, 8, generation, fast_path=True)
    assert not unchecked.fast_path and not unchecked.dense
    assert "scoring with plain lm-eval (lm-eval out of range)" in caplog.text
    assert unchecked.scores == plain.scores and unchecked.num_docs == plain.num_docs


def test_a_hook_out_of_range_warns_once_and_its_stock_path_runs(adapted, monkeypatch, caplog):
    """transformers out of range: scoring keeps the model's own attention and kernels; bitsandbytes out of
    range: no dense copy."""
    from evaluator import compat
    from evaluator.decode import grouped_attention
    from evaluator.fast import use_dense
    from evaluator.fuse import fused_elementwise
    from trainer.compat import _warn_once, problems

    model, _ = adapted
    core = model.get_base_model()
    assert compat.HOOKS and all(hook.active() for hook in compat.HOOKS)
    monkeypatch.setenv("SWEEP_COMPAT_UNCHECKED", "transformers,bitsandbytes")
    warnings, errors = problems(compat.HOOKS)  # every hook has a stock path: warnings, no errors
    assert len(warnings) == 4 and not errors
    _warn_once.cache_clear()  # an earlier test of this process may have warned already
    caplog.set_level(logging.WARNING)
    attention = core.config._attn_implementation
    with grouped_attention(core):
        assert core.config._attn_implementation == attention
    with fused_elementwise(model, backend="eager") as fused:
        assert not fused and not any("forward" in vars(m) for m in core.modules())
    assert use_dense(model, True, "cpu", None) is False
    assert "was checked against bitsandbytes" in caplog.text and "was checked against transformers" in caplog.text
    assert caplog.text.count("compiled RMSNorm") == 1  # once, however often the hook is asked
    with fused_elementwise(model, backend="eager") as fused:
        assert not fused
    assert caplog.text.count("compiled RMSNorm") == 1
    monkeypatch.delenv("SWEEP_COMPAT_UNCHECKED")
    assert use_dense(model, True, "cpu", None) is True


def test_sweeplm_is_plain_hflm_where_lm_eval_is_out_of_range(adapted, monkeypatch):
    """lm-eval out of range: `SweepLM` (what `--model sweep` builds) routes nothing to our speed layer."""
    import torch
    from lm_eval.models.huggingface import HFLM

    from evaluator.lm import SweepLM

    model, tok = adapted
    lm = SweepLM(pretrained=model, tokenizer=tok, batch_size=4)
    requests = []
    for context in ("Question: which is even?\nAnswer:", "Q: 12 plus 7 is\nA:"):
        for choice in (" one", " two apples", " 19"):
            requests.append(((context, choice), tok(context)["input_ids"], tok(choice, add_special_tokens=False)
                             ["input_ids"]))
    prompt = tok(["Question: 3 plus 4 is"], return_tensors="pt")
    with torch.no_grad():
        theirs = HFLM._loglikelihood_tokens(lm, requests)
        assert lm._loglikelihood_tokens(requests) != theirs  # in range: shared-prefix sums, rounded otherwise
        monkeypatch.setenv("SWEEP_COMPAT_UNCHECKED", "lm-eval")
        assert lm._loglikelihood_tokens(requests) == theirs  # HFLM's own code ran
        lm._model_generate(prompt["input_ids"], prompt["input_ids"].shape[1] + 4, ["\n"],
                           attention_mask=prompt["attention_mask"], do_sample=False)
    assert lm.decoder is None  # transformers' generate, not our decoder
