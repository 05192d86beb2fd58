"""The worker side of a trial on a GPU: the profile's memory cap is enforced, and running out of it is a clean FAIL."""

from __future__ import annotations

import pytest

from evaluator.config import EvalConfig, TaskConfig
from trainer.config import DataConfig, LoraConfig, ModelConfig, SourceConfig, TrainConfig
from trainer.demo_base import DEMO_MODEL_ID


def _spec(tmp_path, memory_cap_gib, pack_length):
    from sweep.worker import TrialSpec

    return TrialSpec(
        study_name="gpu", trial_number=0, seed=0, params={},
        model=ModelConfig(name_or_path=DEMO_MODEL_ID),
        data=DataConfig(sources=[SourceConfig(name="digits", kind="synthetic", num_train=4000, num_eval=10)],
                        max_seq_length=64),
        train=TrainConfig(max_steps=2, pack_length=pack_length, gradient_checkpointing=False,
                          lora=LoraConfig(r=8, alpha=16)),
        eval=EvalConfig(tasks=[TaskConfig(name="unused", metric="acc")]),
        task_dir=str(tmp_path / "tasks"), adapter_dir=str(tmp_path / "adapter"), device="cuda",
        memory_cap_gib=memory_cap_gib, target_tflops=312.0,
    )


@pytest.mark.gpu
def test_a_trial_over_the_memory_cap_fails_with_the_reason_and_the_next_one_trains(demo_base_dir, tmp_path):
    import torch

    from sweep.worker import _setup_gpu, failure_reason, run_trial
    from trainer.data import prepare_data
    from trainer.model import attach_lora, load_base_model, load_tokenizer
    from trainer.train import TrainingOutOfMemory, train

    # 0.03 GiB holds the tiny base but not the activations of a 65536-token packed row.
    with pytest.raises(TrainingOutOfMemory) as failed:
        run_trial(_spec(tmp_path, memory_cap_gib=0.03, pack_length=65536))
    reason = failure_reason(failed.value)
    assert reason.startswith("out of memory at step 1: packed row of 65536 tokens"), reason
    assert "memory cap 0.03 GiB" in reason

    # The next trial in the same process gets its own cap (here: the whole card) and trains.
    spec = _spec(tmp_path, memory_cap_gib=None, pack_length=2048)
    _setup_gpu("cuda", spec.memory_cap_gib)
    tokenizer = load_tokenizer(spec.model)
    model = attach_lora(load_base_model(spec.model, "cuda"), spec.train.lora)
    result = train(model, tokenizer, prepare_data(tokenizer, spec.data).rows, spec.train, seed=0)
    assert result.steps == 2 and result.peak_memory_gib > 0
    torch.cuda.empty_cache()
