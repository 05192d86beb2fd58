"""A 4-bit base kept loaded across trials: each trial's adapter comes and goes without a trace."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

from trainer.config import DataConfig, LoraConfig, ModelConfig, SourceConfig, TrainConfig  # noqa: E402
from trainer.data import prepare_data  # noqa: E402
from trainer.demo_base import DEMO_MODEL_ID  # noqa: E402
from trainer.model import attach_lora, detach_lora, load_base_model, load_tokenizer, restore_training_layout  # noqa: E402
from trainer.train import checkpoint_steps_of, train  # noqa: E402

MODEL = ModelConfig(name_or_path=DEMO_MODEL_ID)
CONFIG = TrainConfig(learning_rate=3e-3, max_steps=6, pack_length=256, warmup_fraction=0.0,
                     lora=LoraConfig(r=8, alpha=16, dropout=0.1))


@pytest.fixture(scope="module")
def data(demo_base_dir):
    tokenizer = load_tokenizer(MODEL)
    rows = prepare_data(tokenizer, DataConfig(
        sources=[SourceConfig(name="digits", kind="synthetic", num_train=256, num_eval=16)], max_seq_length=64,
    )).rows
    return tokenizer, rows


def _trial(base, data, seed: int, lr: float = 3e-3):
    """One trial on `base`: a fresh adapter trained with a scoring pass mid-way and at the end, then removed."""
    import dataclasses

    tokenizer, rows = data
    torch.manual_seed(seed)
    model = attach_lora(base, CONFIG.lora)
    sample = torch.as_tensor(rows[0]["input_ids"])[None].to(next(base.parameters()).device)

    def score(step: int) -> bool:  # what a rung's quick eval does to the model
        model.eval()
        with torch.no_grad():
            model(input_ids=sample)
        model.train()
        restore_training_layout(model)
        return False

    result = train(model, tokenizer, rows, dataclasses.replace(CONFIG, learning_rate=lr), seed=seed,
                   checkpoints=[0.5], on_checkpoint=score)
    score(CONFIG.max_steps)
    return detach_lora(model), result.losses


def test_the_base_is_bit_identical_after_a_trial_and_no_adapter_leaks(data):
    base = load_base_model(MODEL, "cpu")
    loaded = {k: v.clone() for k, v in base.state_dict().items()}
    base, first = _trial(base, data, seed=1)
    after = base.state_dict()
    assert set(after) == set(loaded)  # no lora_ keys left
    assert all(torch.equal(after[k], loaded[k]) for k in loaded), "a 4-bit weight or its quantization state changed"
    assert not any("lora" in type(m).__module__.lower() for m in base.modules())
    assert not hasattr(base, "peft_config")
    # A trial after another one on the same base trains exactly as on a freshly loaded base.
    base, _ = _trial(base, data, seed=2, lr=1e-2)
    base, again = _trial(base, data, seed=1)
    assert again == first
    _, fresh = _trial(load_base_model(MODEL, "cpu"), data, seed=1)
    assert fresh == first


def test_a_checkpoint_callback_stops_the_run_early(data):
    tokenizer, rows = data
    seen = []
    model = attach_lora(load_base_model(MODEL, "cpu"), CONFIG.lora)
    planned = []
    result = train(model, tokenizer, rows, CONFIG, seed=0, checkpoints=[0.25, 0.5],
                   on_checkpoint=lambda step: seen.append(step) or step >= 3, on_start=planned.append)
    assert seen == [2, 3] == checkpoint_steps_of([0.25, 0.5], 6) and planned == [6]
    assert result.steps == 3 and result.planned_steps == 6 and len(result.losses) == 3
    assert checkpoint_steps_of([0.5, 1.0, 0.99], 4) == [2]  # never the last step


@pytest.mark.gpu
def test_a_resident_base_on_the_gpu_keeps_its_weights_and_memory(data):
    """On a GPU the base stays bit-identical too, and trials leave no allocated memory behind."""
    import gc

    base = load_base_model(MODEL, "cuda")
    loaded = {k: v.clone() for k, v in base.state_dict().items()}
    base, first = _trial(base, data, seed=1)
    gc.collect()
    torch.cuda.empty_cache()
    after_first = torch.cuda.memory_allocated()
    for seed in (2, 3):
        base, _ = _trial(base, data, seed=seed)
    base, again = _trial(base, data, seed=1)
    gc.collect()
    torch.cuda.empty_cache()
    assert [loss for _, loss in again] == pytest.approx([loss for _, loss in first], rel=1e-3)  # GPU kernels
    after = base.state_dict()
    assert all(torch.equal(after[k], loaded[k]) for k in loaded)
    assert torch.cuda.memory_allocated() - after_first < 2**20  # under 1 MiB grown over three trials
