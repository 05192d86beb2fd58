"""The merged model of an export is the model the sweep scored: logits against the 4-bit base + adapter (the
`dequantized` merge) and against the 16-bit base + adapter (the `original` merge)."""

from __future__ import annotations

import pytest

from trainer.config import DataConfig, LoraConfig, ModelConfig, SourceConfig, TrainConfig
from trainer.demo_base import DEMO_MODEL_ID

PROMPTS = ["### Instruction:\nIs 4 7 1 even or odd?\n\n### Response:\n", "Which is larger, 3 or 7?"]


@pytest.fixture(scope="module")
def adapter(demo_base_dir, tmp_path_factory):
    """An adapter of the demo base trained 40 steps at a high learning rate: its delta is far from zero."""
    from evaluator.config import EvalConfig, TaskConfig
    from evaluator.harness import write_choice_task
    from sweep.worker import TrialSlot, TrialSpec
    from trainer.data import write_choice_docs
    from trainer.synthetic import heldout_docs

    tmp = tmp_path_factory.mktemp("merge")
    source = SourceConfig(name="digits", kind="synthetic", num_train=800, num_eval=8)
    write_choice_task("digits", write_choice_docs(heldout_docs(source), tmp / "d.jsonl", "alpaca"), tmp / "tasks")
    spec = TrialSpec(
        study_name="merge", trial_number=0, seed=0, params={}, model=ModelConfig(name_or_path=DEMO_MODEL_ID),
        data=DataConfig(sources=[source], template="alpaca", max_seq_length=64),
        train=TrainConfig(learning_rate=5e-3, epochs=1, max_steps=40, pack_length=320,
                          lora=LoraConfig(r=8, alpha=16, dropout=0.0)),
        eval=EvalConfig(tasks=[TaskConfig(name="digits", metric="acc")], batch_size=8),
        task_dir=str(tmp / "tasks"), adapter_dir=str(tmp / "adapter"), num_threads=2,
        hyperparameters={"model": {"name_or_path": DEMO_MODEL_ID}},
    )
    TrialSlot(resident=False).run(spec)
    return tmp / "adapter"


def _logits(model, tokenizer):
    import torch

    batch = tokenizer(PROMPTS, return_tensors="pt", padding=True)
    with torch.no_grad():
        return model(**batch).logits.float()


def _scale(reference) -> float:
    return float(reference.abs().max())


def test_the_dequantized_merge_is_the_scored_model(adapter):
    """Against the model the sweep scores (the 4-bit base with the adapter unmerged, on CPU in float32): the
    merged bf16 model's logits agree to 2% of their largest magnitude (bf16 keeps 8 bits of mantissa), and far
    closer than the untrained base's or the original merge's do."""
    from sweep.submission import merged_model
    from trainer.model import load_adapter, load_base_model

    config = ModelConfig(name_or_path=DEMO_MODEL_ID)
    scored, tokenizer = load_adapter(adapter, device="cpu")
    reference = _logits(scored, tokenizer)
    merged = merged_model(adapter, config, "dequantized", device="cpu")
    assert not hasattr(merged, "peft_config") and not getattr(merged.config, "quantization_config", None)
    assert {p.dtype for p in merged.parameters()} == {__import__("torch").bfloat16}
    error = float((_logits(merged, tokenizer) - reference).abs().max())
    assert error <= 0.02 * _scale(reference), (error, _scale(reference))
    base_only = float((_logits(load_base_model(config, "cpu", "sdpa"), tokenizer) - reference).abs().max())
    original = float((_logits(merged_model(adapter, config, "original", device="cpu"), tokenizer)
                      - reference).abs().max())
    assert error < base_only / 10 and error < original, (error, base_only, original)


def test_the_original_merge_is_the_16_bit_base_with_the_adapter(adapter):
    """peft's merge into the base's own bf16 weights, against that base with the adapter unmerged."""
    import peft
    import torch
    from transformers import AutoModelForCausalLM

    from sweep.submission import merged_model
    from trainer.demo_base import resolve_model_path
    from trainer.model import load_tokenizer

    config = ModelConfig(name_or_path=DEMO_MODEL_ID)
    tokenizer = load_tokenizer(config)
    base = AutoModelForCausalLM.from_pretrained(resolve_model_path(DEMO_MODEL_ID), dtype=torch.bfloat16)
    reference = _logits(peft.PeftModel.from_pretrained(base, str(adapter)), tokenizer)
    merged = merged_model(adapter, config, "original", device="cpu")
    assert not hasattr(merged, "peft_config")
    error = float((_logits(merged, tokenizer) - reference).abs().max())
    assert error <= 0.02 * _scale(reference), (error, _scale(reference))


def test_an_unknown_merge_base_is_refused(adapter):
    from sweep.submission import merged_model

    with pytest.raises(ValueError, match="--merge: expected one of dequantized, original, got 'nf4'"):
        merged_model(adapter, ModelConfig(name_or_path=DEMO_MODEL_ID), "nf4", device="cpu")
