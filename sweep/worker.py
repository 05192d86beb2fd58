"""The worker side of a trial: a plain `TrialSpec` in, a plain `TrialResult` out.

These functions run inside Ray workers (or any process). They never touch the
study database: the driver records what they return.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from evaluator.config import EvalConfig
from trainer.config import DataConfig, ModelConfig, TrainConfig

MAX_REASON_CHARS = 500


@dataclass(frozen=True)
class TrialSpec:
    """Everything a worker needs to run one trial (picklable, no live handles)."""

    study_name: str
    trial_number: int
    seed: int
    params: dict
    model: ModelConfig
    data: DataConfig
    train: TrainConfig
    eval: EvalConfig
    task_dir: str
    """Directory of the local lm-eval task files (absolute)."""
    adapter_dir: str
    """Where the adapter is saved (absolute, readable by the driver)."""
    hyperparameters: dict = field(default_factory=dict)
    """The resolved config, saved as hyperparameters.yaml beside the adapter."""
    num_threads: Optional[int] = None
    log_file: Optional[str] = None
    """Where the worker's stdout and stderr go (library logs, progress bars); None: inherited."""
    device: str = "cpu"
    """`cuda` for GPU profiles; `cpu` keeps a trial off the GPU even where one is visible."""
    memory_cap_gib: Optional[float] = None
    """The GPU profile's memory cap, enforced on a bigger card; None: the card's own memory."""
    target_tflops: Optional[float] = None
    """Dense bf16 peak of the profile's card: the full-run projection is scaled to it."""
    exclude_ngrams_file: Optional[str] = None
    """Evaluation n-grams (a .npy of uint64) that training examples must not share; None: keep all."""


@dataclass(frozen=True)
class TrialResult:
    """What a finished trial reports back (plain values)."""

    trial_number: int
    scores: dict[str, float]
    adapter_dir: str
    train_seconds: float
    eval_seconds: float
    wall_seconds: float
    """The whole trial in its worker: loading, data, training, scoring, saving."""
    tokens_per_second: float
    peak_memory_gib: Optional[float]
    memory_cap_gib: Optional[float]
    mfu: Optional[float]
    """Model FLOPs utilisation against the dense bf16 peak of the card the trial ran on; None on CPU."""
    train_tokens: int
    train_steps: int
    final_loss: Optional[float]
    checkpointed_layers: int
    full_run_tokens: int
    projected_full_run_hours: Optional[float]
    """Hours of the full run (the whole mix, all epochs) on the profile's card, from the measured speed."""
    data: dict


@dataclass(frozen=True)
class BaselineSpec:
    """Scoring the untuned base model."""

    model: ModelConfig
    eval: EvalConfig
    task_dir: str
    num_threads: Optional[int] = None
    log_file: Optional[str] = None
    device: str = "cpu"
    memory_cap_gib: Optional[float] = None


@dataclass(frozen=True)
class BaselineResult:
    scores: dict[str, float]
    eval_seconds: float


def run_trial(spec: TrialSpec) -> TrialResult:
    """Loads the 4-bit base, trains a fresh LoRA adapter, scores it, saves it."""
    with _output_to(spec.log_file):
        return _run_trial(spec)


def _run_trial(spec: TrialSpec) -> TrialResult:
    started = time.perf_counter()
    _setup_process(spec.num_threads)
    card = _setup_gpu(spec.device, spec.memory_cap_gib)
    from transformers import set_seed

    from trainer.data import prepare_data
    from trainer.model import attach_lora, load_base_model, load_tokenizer, save_adapter, use_attention
    from trainer.train import train

    set_seed(spec.seed)
    tokenizer = load_tokenizer(spec.model)
    exclude = None
    if spec.exclude_ngrams_file:
        from sweep.contamination import load_ngrams

        exclude = load_ngrams(spec.exclude_ngrams_file)
    data = prepare_data(tokenizer, spec.data, exclude=exclude)
    model = attach_lora(load_base_model(spec.model, spec.device), spec.train.lora)
    trained = train(model, tokenizer, data.rows, spec.train, seed=spec.seed, memory_budget_gib=spec.memory_cap_gib)
    use_attention(model, "sdpa")  # scoring runs padded batches of varying shapes
    _release_cached_memory(spec.device)  # the optimizer's and activations' blocks: room for the dense copy
    evaluated = _score(model, tokenizer, spec.eval, spec.task_dir, spec.memory_cap_gib)
    save_adapter(model, spec.adapter_dir, spec.model, spec.hyperparameters)
    card_tflops = card.bf16_tflops if card is not None else None
    # The measured speed, scaled from this card to the profile's by their dense bf16 peaks.
    scale = card_tflops / spec.target_tflops if card_tflops and spec.target_tflops else 1.0
    hours = trained.projected_full_run_hours * scale
    return TrialResult(
        trial_number=spec.trial_number,
        scores=evaluated.scores,
        adapter_dir=str(Path(spec.adapter_dir).resolve()),
        train_seconds=trained.train_seconds,
        eval_seconds=evaluated.eval_seconds,
        wall_seconds=time.perf_counter() - started,
        tokens_per_second=trained.tokens_per_second,
        peak_memory_gib=trained.peak_memory_gib,
        memory_cap_gib=spec.memory_cap_gib if spec.device != "cpu" else None,
        mfu=trained.tokens_per_second * trained.flops_per_token / (card_tflops * 1e12) if card_tflops else None,
        train_tokens=trained.train_tokens,
        train_steps=trained.steps,
        final_loss=trained.final_loss,
        checkpointed_layers=trained.checkpointed_layers,
        full_run_tokens=trained.full_run_tokens,
        projected_full_run_hours=hours if math.isfinite(hours) else None,
        data=data.stats.as_record(),
    )


def _setup_gpu(device: str, memory_cap_gib: Optional[float]):
    """Enforces the profile's memory cap on a bigger card; returns the profile of the card (None on CPU)."""
    if device == "cpu":
        return None
    import torch

    from sweep.gpus import detect_profile

    props = torch.cuda.get_device_properties(0)
    total_gib = props.total_memory / 2**30
    # Always set: a worker process that runs several trials must not keep an earlier trial's cap.
    cap = memory_cap_gib if memory_cap_gib is not None else total_gib
    torch.cuda.set_per_process_memory_fraction(min(1.0, cap / total_gib), 0)
    return detect_profile([(props.name, total_gib)])


def run_baseline(spec: BaselineSpec) -> BaselineResult:
    """Scores the untuned 4-bit base (building the demo base first if that is the model)."""
    with _output_to(spec.log_file):
        _setup_process(spec.num_threads)
        from trainer.model import load_base_model, load_tokenizer

        _setup_gpu(spec.device, spec.memory_cap_gib)
        tokenizer = load_tokenizer(spec.model)
        model = load_base_model(spec.model, spec.device, attn_implementation="sdpa")
        evaluated = _score(model, tokenizer, spec.eval, spec.task_dir, spec.memory_cap_gib)
        return BaselineResult(scores=evaluated.scores, eval_seconds=evaluated.eval_seconds)


def _score(model, tokenizer, config: EvalConfig, task_dir: str, memory_cap_gib: Optional[float]):
    from evaluator.harness import evaluate

    evaluated = evaluate(
        model, tokenizer, config.all_tasks(), task_dir, config.batch_size, config.generation,
        dequantize=config.dequantize, memory_budget_gib=memory_cap_gib,
    )
    print(f"scored in {evaluated.eval_seconds:.1f}s ({'dense copy of the base' if evaluated.dense else '4-bit base'})",
          flush=True)
    return evaluated


def _release_cached_memory(device: str) -> None:
    if device == "cpu":
        return
    import gc

    import torch

    gc.collect()
    torch.cuda.empty_cache()


def failure_reason(error: BaseException) -> str:
    """One line saying why a trial failed, from the worker's original exception if any."""
    cause = getattr(error, "cause", None) or error
    message = " ".join(line.strip() for line in str(cause).splitlines() if line.strip())
    if message.lower().startswith("out of memory"):
        reason = message
    elif type(cause).__name__ == "OutOfMemoryError" or "out of memory" in message.lower():
        reason = f"out of memory: {message}"
    else:
        reason = f"{type(cause).__name__}: {message}" if message else type(cause).__name__
    return reason if len(reason) <= MAX_REASON_CHARS else reason[: MAX_REASON_CHARS - 3] + "..."


@contextlib.contextmanager
def _output_to(log_file: Optional[str]):
    """Sends this process's stdout and stderr (file descriptors included) to `log_file`.

    Library output (progress bars, warnings, subprocesses) lands in the
    trial's log instead of the driver's terminal. Safe because each trial has
    a worker process of its own.
    """
    if log_file is None:
        yield
        return
    Path(log_file).parent.mkdir(parents=True, exist_ok=True)
    sys.stdout.flush()
    sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    with open(log_file, "a", buffering=1) as log:
        os.dup2(log.fileno(), 1)
        os.dup2(log.fileno(), 2)
        try:
            yield
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            os.close(saved[0])
            os.close(saved[1])


def _setup_process(num_threads: Optional[int]) -> None:
    """Thread count and quiet logs; the offline flags arrive through Ray's runtime_env."""
    import torch

    if num_threads:
        torch.set_num_threads(num_threads)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    for name in ("lm_eval", "bitsandbytes", "datasets", "peft"):
        logging.getLogger(name).setLevel(logging.ERROR)
    try:
        import datasets

        datasets.disable_progress_bars()
        datasets.logging.set_verbosity_error()
    except ImportError:
        pass
