"""The real QLoRA path on CPU: a 4-bit NF4 base, a LoRA adapter, training, saving, loading."""

from __future__ import annotations

import json

import pytest

torch = pytest.importorskip("torch")

from trainer.config import DataConfig, LoraConfig, ModelConfig, SourceConfig, TrainConfig  # noqa: E402
from trainer.data import prepare_data, tokenize_examples  # noqa: E402
from trainer.demo_base import DEMO_MODEL_ID  # noqa: E402
from trainer.examples import Example  # noqa: E402
from trainer.model import attach_lora, load_adapter, load_base_model, load_tokenizer, save_adapter  # noqa: E402
from trainer.train import (  # noqa: E402
    TrainingOutOfMemory,
    collate_packed,
    collate_padded,
    pack,
    padded_batches,
    response_loss_sum,
    train,
)

MODEL = ModelConfig(name_or_path=DEMO_MODEL_ID)


@pytest.fixture(scope="module")
def rows(demo_base_dir):
    data = DataConfig(sources=[SourceConfig(name="digits", kind="synthetic", num_train=256, num_eval=16)],
                      max_seq_length=64)
    return prepare_data(load_tokenizer(MODEL), data).rows


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
    config = TrainConfig(learning_rate=3e-3, epochs=3, max_steps=40, pack_length=256, warmup_fraction=0.0,
                         lora=LoraConfig(r=8, alpha=16, dropout=0.0))
    result = train(model, tok, rows, config, seed=0)
    assert result.steps == 40
    assert result.train_tokens > 0 and result.tokens_per_second > 0
    assert result.peak_memory_gib is None  # CPU: not measured
    assert result.checkpointed_layers == 0  # auto: no memory cap on CPU
    assert result.losses[0][1] > 4.0 and result.final_loss is not None and result.final_loss < 2.0
    assert result.full_run_tokens == 3 * sum(len(r["input_ids"]) for r in rows)  # three epochs
    assert 0 < result.projected_full_run_hours < 1
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
    result = train(model, tok, rows, TrainConfig(max_steps=5, pack_length=512), seed=0)
    assert result.peak_memory_gib is not None and result.peak_memory_gib > 0


@pytest.mark.gpu
def test_a_checkpoints_memory_is_not_counted_in_the_training_peak(rows):
    tok = load_tokenizer(MODEL)
    model = attach_lora(load_base_model(MODEL, "cuda"), LoraConfig(r=8, alpha=16))
    held = []

    def rung(step):  # a rung's eval: 2 GiB for a while, freed before training goes on
        held.append(torch.empty(2 * 2**30, dtype=torch.uint8, device="cuda"))
        held.clear()
        return False

    result = train(model, tok, rows, TrainConfig(max_steps=6, pack_length=512), seed=0, checkpoints=(0.5,),
                   on_checkpoint=rung)
    assert result.steps == 6
    assert 0 < result.peak_memory_gib < 1.0  # the tiny model's training alone


@pytest.mark.gpu
def test_out_of_memory_names_the_micro_batch(rows):
    tok = load_tokenizer(MODEL)
    model = attach_lora(load_base_model(MODEL, "cuda"), LoraConfig(r=8, alpha=16))
    torch.cuda.set_per_process_memory_fraction(0.0004)  # about 30 MiB: far below what a 65536-token row needs
    try:
        with pytest.raises(TrainingOutOfMemory, match=r"^out of memory at step 1: packed row of 65536 tokens"):
            train(model, tok, rows * 16, TrainConfig(max_steps=2, pack_length=65536, gradient_checkpointing=False),
                  seed=0)
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0)


# --- packing ---------------------------------------------------------------------

EXAMPLES = [
    Example("Is 1 2 3 even or odd?", "odd"),
    Example("Which is larger, 3 or 7? Answer with a single digit and nothing else.", "7"),
    Example("Say hello to a friend you have not seen for a long time.", "Hello there, old friend!"),
    Example("Is 4 4 8 even or odd?", "even"),
]


@pytest.fixture(scope="module")
def lora_model(demo_base_dir):
    model = attach_lora(load_base_model(MODEL, "cpu"), LoraConfig(r=8, alpha=16, dropout=0.0))
    # A trained-looking adapter: random LoRA B so the adapter path matters in the comparison.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05, generator=torch.Generator().manual_seed(len(name)))
    return model.train()


def _rows():
    tokenized = tokenize_examples(load_tokenizer(MODEL), EXAMPLES, "alpaca", 128)
    return [tokenized.row(i) for i in range(len(tokenized))]


def test_packed_and_padded_give_the_same_loss(lora_model):
    rows = _rows()
    pad = load_tokenizer(MODEL).pad_token_id
    with torch.no_grad():
        packed, n_packed = response_loss_sum(lora_model, collate_packed(rows, [0, 1, 2, 3], pad), "cpu")
        padded, n_padded = response_loss_sum(lora_model, collate_padded(rows, [0, 1, 2, 3], pad), "cpu")
    assert n_packed == n_padded > 0
    assert abs(float(packed) / n_packed - float(padded) / n_padded) < 1e-3


def test_attention_does_not_cross_example_boundaries_in_a_packed_row(lora_model):
    rows = _rows()
    pad = load_tokenizer(MODEL).pad_token_id
    batch = collate_packed(rows, [0, 1, 2, 3], pad)
    with torch.no_grad():
        logits = lora_model(input_ids=batch["input_ids"], position_ids=batch["position_ids"]).logits[0]
        start = 0
        for i, n in enumerate(batch["seq_lens"]):
            alone = lora_model(input_ids=torch.tensor([rows[i]["input_ids"]])).logits[0]
            assert torch.allclose(logits[start: start + n], alone, atol=1e-4), f"example {i} sees its neighbours"
            start += n
        # Per-example losses too: each example's loss in the row equals its loss alone.
        for i in range(len(rows)):
            only_i = collate_packed(rows, [0, 1, 2, 3], pad)
            offsets = [0, *torch.tensor(only_i["seq_lens"]).cumsum(0).tolist()]
            keep = torch.zeros_like(only_i["labels"], dtype=torch.bool)
            keep[0, offsets[i]: offsets[i + 1]] = True
            only_i["labels"] = only_i["labels"].masked_fill(~keep, -100)
            in_row, _ = response_loss_sum(lora_model, only_i, "cpu")
            alone, _ = response_loss_sum(lora_model, collate_packed(rows, [i], pad), "cpu")
            assert abs(float(in_row) - float(alone)) < 1e-3


def test_pad_to_adds_a_segment_with_no_labels():
    rows = _rows()
    batch = collate_packed(rows, [0, 1], pad_token_id=0, pad_to=200)
    assert batch["input_ids"].shape == (1, 200)
    real = batch["real_tokens"]
    assert real == len(rows[0]["input_ids"]) + len(rows[1]["input_ids"])
    assert (batch["labels"][0, real:] == -100).all() and batch["position_ids"][0, real] == 0


def test_pack_fills_rows_without_splitting_examples():
    import random

    lengths = [random.Random(i).randint(5, 300) for i in range(500)]
    rows = pack(lengths, 1024, random.Random(0))
    assert sorted(i for r in rows for i in r) == list(range(500))
    assert all(sum(lengths[i] for i in r) <= 1024 for r in rows)
    fill = sum(lengths) / (len(rows) * 1024)
    assert fill > 0.9
    assert rows == pack(lengths, 1024, random.Random(0))  # seeded


def test_length_grouping_reduces_padding():
    import random

    lengths = [random.Random(i).randint(5, 500) for i in range(800)]

    def padded_tokens(batches):
        return sum(len(b) * max(lengths[i] for i in b) for b in batches)

    plain = padded_batches(lengths, 8, random.Random(0), group_by_length=False)
    grouped = padded_batches(lengths, 8, random.Random(0), group_by_length=True)
    assert sorted(i for b in grouped for i in b) == list(range(800))
    assert padded_tokens(grouped) < 0.7 * padded_tokens(plain)


@pytest.mark.parametrize("options", [
    {"packing": False, "micro_batch_size": 8, "group_by_length": True},
    {"neftune_alpha": 5.0, "gradient_checkpointing": True},
    {"lora": LoraConfig(r=4, alpha=8, use_rslora=True, use_dora=True, target_modules=["q_proj", "v_proj"])},
])
def test_training_options_run(rows, options):
    tok = load_tokenizer(MODEL)
    config = TrainConfig(learning_rate=3e-3, max_steps=3, pack_length=256, **options)
    model = attach_lora(load_base_model(MODEL, "cpu"), config.lora)
    result = train(model, tok, rows, config, seed=0)
    assert result.steps == 3 and result.final_loss is not None
    if options.get("gradient_checkpointing") is True:
        assert result.checkpointed_layers == result.num_layers


def test_max_steps_null_trains_the_full_run(rows):
    tok = load_tokenizer(MODEL)
    config = TrainConfig(epochs=2, max_steps=None, pack_length=1024, lora=LoraConfig(r=4, alpha=8))
    model = attach_lora(load_base_model(MODEL, "cpu"), config.lora)
    result = train(model, tok, rows, config, seed=0)
    tokens = sum(len(r["input_ids"]) for r in rows)
    assert result.train_tokens == result.full_run_tokens == 2 * tokens


def test_memory_model_plans_the_fewest_checkpointed_layers(lora_model):
    from trainer.train import memory_model

    estimate = memory_model(lora_model, tokens=4096, allocated_bytes=10**8)
    assert estimate.num_layers == 2 and estimate.full_layer > estimate.checkpointed_layer > 0
    assert estimate.peak(2) < estimate.peak(1) < estimate.peak(0)
    assert estimate.plan(estimate.peak(0)) == 0  # everything fits: recompute nothing
    assert estimate.plan(estimate.peak(1)) == 1
    assert estimate.plan(estimate.peak(1) - 1) == 2
    assert estimate.plan(0) == 2  # nothing fits: checkpoint all, the run may still go out of memory
    # Longer rows keep more activations per layer.
    assert memory_model(lora_model, tokens=8192, allocated_bytes=10**8).full_layer == 2 * estimate.full_layer
