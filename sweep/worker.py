"""The worker side of a trial: a plain `TrialSpec` in, a plain `TrialResult` out.

These functions run inside Ray workers (or any process). They never touch the
study database: the driver records what they return.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from evaluator.config import EvalConfig
from trainer.config import DataConfig, ModelConfig, TrainConfig


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


@dataclass(frozen=True)
class TrialResult:
    """What a finished trial reports back (plain values)."""

    trial_number: int
    scores: dict[str, float]
    adapter_dir: str
    train_seconds: float
    eval_seconds: float
    tokens_per_second: float
    peak_memory_gib: Optional[float]
    train_tokens: int
    train_steps: int
    final_loss: Optional[float]
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


@dataclass(frozen=True)
class BaselineResult:
    scores: dict[str, float]
    eval_seconds: float


def run_trial(spec: TrialSpec) -> TrialResult:
    """Loads the 4-bit base, trains a fresh LoRA adapter, scores it, saves it."""
    with _output_to(spec.log_file):
        return _run_trial(spec)


def _run_trial(spec: TrialSpec) -> TrialResult:
    _setup_process(spec.num_threads)
    from transformers import set_seed

    from evaluator.harness import evaluate
    from trainer.data import DataStats, load_train_examples, tokenize_examples
    from trainer.model import attach_lora, load_base_model, load_tokenizer, save_adapter
    from trainer.train import train

    set_seed(spec.seed)
    tokenizer = load_tokenizer(spec.model)
    stats = DataStats()
    rows = tokenize_examples(
        tokenizer, load_train_examples(spec.data, stats), spec.data.template, spec.data.max_seq_length
    )
    model = attach_lora(load_base_model(spec.model, spec.device), spec.train.lora, spec.train.gradient_checkpointing)
    with tempfile.TemporaryDirectory(prefix="sweep-trainer-") as work_dir:
        trained = train(model, tokenizer, rows, spec.train, seed=spec.seed, work_dir=work_dir)
    evaluated = evaluate(model, tokenizer, spec.eval.tasks, spec.task_dir, spec.eval.batch_size)
    save_adapter(model, spec.adapter_dir, spec.model, spec.hyperparameters)
    return TrialResult(
        trial_number=spec.trial_number,
        scores=evaluated.scores,
        adapter_dir=str(Path(spec.adapter_dir).resolve()),
        train_seconds=trained.train_seconds,
        eval_seconds=evaluated.eval_seconds,
        tokens_per_second=trained.tokens_per_second,
        peak_memory_gib=trained.peak_memory_gib,
        train_tokens=trained.train_tokens,
        train_steps=trained.steps,
        final_loss=trained.final_loss,
        data={"rows_used": stats.rows_used, "rows_skipped": stats.rows_skipped, "examples": len(rows)},
    )


def run_baseline(spec: BaselineSpec) -> BaselineResult:
    """Scores the untuned 4-bit base (building the demo base first if that is the model)."""
    with _output_to(spec.log_file):
        _setup_process(spec.num_threads)
        from evaluator.harness import evaluate
        from trainer.model import load_base_model, load_tokenizer

        tokenizer = load_tokenizer(spec.model)
        model = load_base_model(spec.model, spec.device)
        evaluated = evaluate(model, tokenizer, spec.eval.tasks, spec.task_dir, spec.eval.batch_size)
        return BaselineResult(scores=evaluated.scores, eval_seconds=evaluated.eval_seconds)


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
