"""The real QLoRA path on CPU: a 4-bit NF4 base, a LoRA adapter, training, saving, loading."""

from __future__ import annotations

import json

import pytest

torch = pytest.importorskip("torch")

from trainer.config import DataConfig, LoraConfig, ModelConfig, SourceConfig, TrainConfig  # noqa: E402
from trainer.data import load_train_examples, tokenize_examples  # noqa: E402
from trainer.demo_base import DEMO_MODEL_ID  # noqa: E402
from trainer.model import attach_lora, load_adapter, load_base_model, load_tokenizer, save_adapter  # noqa: E402
from trainer.train import train  # noqa: E402

MODEL = ModelConfig(name_or_path=DEMO_MODEL_ID)


@pytest.fixture(scope="module")
def rows(demo_base_dir):
    data = DataConfig(sources=[SourceConfig(name="digits", kind="synthetic", num_train=256, num_eval=16)],
                      max_seq_length=64)
    return tokenize_examples(load_tokenizer(MODEL), load_train_examples(data), "alpaca", 64)


def test_base_is_loaded_in_4bit_nf4_with_double_quant(demo_base_dir):
    import bitsandbytes as bnb

    model = load_base_model(MODEL, "cpu")
    layers = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert layers, "no 4-bit linear layers"
    state = layers[0].weight.quant_state
    assert state.quant_type == "nf4"
    assert state.nested  # double quantization
    assert model.config.quantization_config.bnb_4bit_use_double_quant


def test_qlora_training_lowers_the_loss_and_saves_the_adapter(rows, tmp_path):
    tok = load_tokenizer(MODEL)
    model = attach_lora(load_base_model(MODEL, "cpu"), LoraConfig(r=8, alpha=16, dropout=0.0))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    before = {n: p.detach().clone() for n, p in model.named_parameters() if "lora_B" in n}
    config = TrainConfig(learning_rate=3e-3, max_steps=40, micro_batch_size=16, warmup_fraction=0.0,
                         lora=LoraConfig(r=8, alpha=16, dropout=0.0))
    result = train(model, tok, rows, config, seed=0, work_dir=str(tmp_path / "work"))
    assert result.steps == 40
    assert result.train_tokens > 0 and result.tokens_per_second > 0
    assert result.peak_memory_gib is None  # CPU: not measured
    assert result.final_loss is not None and result.final_loss < 2.0  # starts near 8 on the random base
    changed = [n for n, p in model.named_parameters() if "lora_B" in n and not torch.equal(p, before[n])]
    assert changed, "LoRA weights did not move"

    out = save_adapter(model, tmp_path / "adapter", MODEL, {"trainer": {"learning_rate": 3e-3}})
    assert (out / "adapter_model.safetensors").exists()
    recorded = json.loads((out / "adapter_config.json").read_text())
    assert recorded["base_model_name_or_path"] == DEMO_MODEL_ID
    assert (out / "hyperparameters.yaml").read_text().startswith("trainer:")

    loaded, _ = load_adapter(out, "cpu")
    batch = torch.tensor([rows[0]["input_ids"]])
    model.eval()
    with torch.no_grad():
        expected = model(input_ids=batch).logits
        got = loaded(input_ids=batch).logits
    assert torch.allclose(expected, got, atol=1e-4)


@pytest.mark.gpu
def test_qlora_step_on_gpu_uses_bfloat16_compute(rows, tmp_path):
    tok = load_tokenizer(MODEL)
    model = attach_lora(load_base_model(MODEL, "cuda"), LoraConfig(r=8, alpha=16))
    import bitsandbytes as bnb

    layer = next(m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit))
    assert layer.compute_dtype == torch.bfloat16
    result = train(model, tok, rows, TrainConfig(max_steps=5, micro_batch_size=8), seed=0,
                   work_dir=str(tmp_path))
    assert result.peak_memory_gib is not None and result.peak_memory_gib > 0
