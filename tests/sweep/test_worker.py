"""The worker side of a trial on a GPU: the profile's memory cap is enforced, and running out of it is a clean FAIL."""

from __future__ import annotations

import os

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


def _digits_trial_on_gpu(tmp_path, **kwargs):
    """A 100-step trial of the demo base on the digit task, scored on its held-out split, on the GPU."""
    from evaluator.harness import write_choice_task
    from sweep.worker import TrialSpec
    from trainer.data import write_choice_docs
    from trainer.synthetic import heldout_docs

    source = SourceConfig(name="digits", kind="synthetic", num_train=2400, num_eval=100)
    data_file = write_choice_docs(heldout_docs(source), tmp_path / "data" / "digits.jsonl", "alpaca")
    write_choice_task("gpu_digits", data_file, tmp_path / "tasks")
    return TrialSpec(
        study_name="gpu", trial_number=0, seed=0, params={},
        model=ModelConfig(name_or_path=DEMO_MODEL_ID),
        data=DataConfig(sources=[source], template="alpaca", max_seq_length=64),
        train=TrainConfig(learning_rate=1e-3, epochs=3, max_steps=100, pack_length=320,
                          lora=LoraConfig(r=8, alpha=16)),
        eval=EvalConfig(tasks=[TaskConfig(name="gpu_digits", metric="acc")], batch_size=32),
        task_dir=str(tmp_path / "tasks"), adapter_dir=str(tmp_path / "adapter"), device="cuda",
        memory_cap_gib=39.35, target_tflops=312.0, **kwargs,
    )


@pytest.mark.gpu
def test_a_gpu_trial_trains_packed_then_scores_and_saves(demo_base_dir, tmp_path):
    """The whole trial on a GPU: packed training (flex-attention), scoring with lm-eval (sdpa), the adapter saved."""
    from sweep.worker import run_trial

    result = run_trial(_digits_trial_on_gpu(tmp_path))
    print(f"GPU trial: acc={result.scores['gpu_digits']:.3f} tok/s={result.tokens_per_second:.0f} "
          f"peak={result.peak_memory_gib:.3f} GiB mfu={result.mfu:.2e} "
          f"full run={result.projected_full_run_hours:.4f} h")
    assert 0.0 <= result.scores["gpu_digits"] <= 1.0 and result.train_steps == 100
    assert result.final_loss is not None and result.final_loss < 1.5  # starts near 8 on the random base
    assert 0 < result.peak_memory_gib < 39.35 and result.memory_cap_gib == 39.35
    assert 0 < result.mfu < 1 and result.projected_full_run_hours > 0
    assert result.wall_seconds >= result.train_seconds + result.eval_seconds
    assert (tmp_path / "adapter" / "adapter_model.safetensors").exists()
    timeline = result.timeline  # where it ran: this process, on a card named by its UUID
    assert timeline["pid"] == os.getpid() and timeline["device_uuid"]
    assert 0 < timeline["memory_reserved_gib"] <= timeline["device_memory_used_gib"]


@pytest.mark.gpu
def test_a_gpu_trial_with_a_rung_scores_it_on_the_dense_copy_and_trains_on(demo_base_dir, tmp_path):
    """A rung's quick eval on a GPU (dense copy of the base, fused kernels) leaves the resident base and the
    adapter's training as they were: the trial trains on to its last step and its loss still falls."""
    from evaluator.fast import quantized_linears
    from sweep.worker import TrialSlot

    spec = _digits_trial_on_gpu(tmp_path, rungs=(0.5,), rung_eval_docs=32)

    class Reporter:
        rungs: list = []

        def progress(self, trial_number, step, total_steps, loss):
            pass

        def rung(self, trial_number, step, value):
            self.rungs.append((step, value))
            return False  # train on

    slot, reporter = TrialSlot(resident=True), Reporter()
    result = slot.run(spec, reporter)
    assert [step for step, _ in reporter.rungs] == [50] and 0.0 <= reporter.rungs[0][1] <= 1.0
    assert result.train_steps == 100 and not result.pruned
    assert len(result.timeline["rung_waits_s"]) == 1
    assert result.final_loss is not None and result.final_loss < 1.5
    assert 0.0 <= result.scores["gpu_digits"] <= 1.0
    assert len(quantized_linears(slot._base)) > 0  # the resident base, its adapter detached


def test_a_rungs_quick_eval_takes_the_first_documents_of_the_objectives_tasks():
    from evaluator.config import SuiteConfig
    from sweep.worker import rung_tasks

    config = EvalConfig(suites={
        "open": SuiteConfig(tasks=[TaskConfig(name="gsm8k", limit=200), TaskConfig(name="small", limit=10),
                                   TaskConfig(name="mmlu", limit=20, rung_limit=1), TaskConfig(name="all")]),
        "heldout": SuiteConfig(tasks=[TaskConfig(name="ethics", limit=300)]),
    }, optimize="open")
    limits = {t.name: t.limit for t in rung_tasks(config, 32)}
    # mmlu's limit holds per subject (57 of them): its own rung_limit keeps the rung quick.
    assert limits == {"gsm8k": 32, "small": 10, "mmlu": 1, "all": 32}



def test_a_rungs_scoring_leaves_the_random_generators_training_draws_from():
    """lm-eval seeds Python's, NumPy's and torch's generators when it scores: after a rung, the trial must draw
    the dropout masks (and anything else random) it would have drawn without the rung."""
    import random

    import numpy as np
    import torch

    from sweep.worker import _random_state_kept

    def draws():
        return random.random(), float(np.random.rand()), torch.rand(3).tolist()

    torch.manual_seed(7), random.seed(7), np.random.seed(7)
    expected = draws()
    torch.manual_seed(7), random.seed(7), np.random.seed(7)
    with _random_state_kept("cpu"):
        random.seed(0), np.random.seed(1234), torch.manual_seed(1234)  # what lm-eval's evaluate does
        seeded = draws()
    assert draws() == expected and seeded != expected
