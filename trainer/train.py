"""One QLoRA training run: tokenized rows in, a trained adapter and its measurements out."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Optional

from trainer.config import TrainConfig
from trainer.data import IGNORE_INDEX


@dataclass(frozen=True)
class TrainResult:
    """Measurements of one training run (plain values)."""

    steps: int
    train_seconds: float
    train_tokens: int
    """Real (non-pad) tokens processed, prompts included."""
    tokens_per_second: float
    peak_memory_gib: Optional[float]
    """Peak GPU memory allocated by torch; None on CPU, where it is not measured."""
    final_loss: Optional[float]


class PadCollator:
    """Pads a batch to its longest row and counts the real tokens it handed out."""

    def __init__(self, pad_token_id: int):
        self.pad_token_id = pad_token_id
        self.real_tokens = 0

    def __call__(self, rows: list[dict]) -> dict:
        import torch

        length = max(len(r["input_ids"]) for r in rows)
        input_ids = torch.full((len(rows), length), self.pad_token_id, dtype=torch.long)
        labels = torch.full((len(rows), length), IGNORE_INDEX, dtype=torch.long)
        attention_mask = torch.zeros((len(rows), length), dtype=torch.long)
        for i, r in enumerate(rows):
            n = len(r["input_ids"])
            input_ids[i, :n] = torch.tensor(r["input_ids"])
            labels[i, :n] = torch.tensor(r["labels"])
            attention_mask[i, :n] = 1
        self.real_tokens += int(attention_mask.sum())
        return {"input_ids": input_ids, "labels": labels, "attention_mask": attention_mask}


def train(model, tokenizer, rows: list[dict], config: TrainConfig, seed: int, work_dir: str) -> TrainResult:
    """Trains the LoRA parameters of `model` (a PeftModel) on `rows` with transformers' Trainer.

    Args:
        model: the 4-bit base with a LoRA adapter attached.
        tokenizer: its tokenizer (for the pad id).
        rows: tokenized examples (`input_ids`, `labels`), prompts already masked.
        config: the training settings of this trial.
        seed: seeds the data order, dropout and initialisation of this run.
        work_dir: scratch directory for the Trainer (nothing is checkpointed).
    """
    import torch
    from transformers import PrinterCallback, Trainer, TrainingArguments

    if not rows:
        raise ValueError("no training examples left after tokenization")
    on_gpu = next(model.parameters()).device.type == "cuda"
    args = TrainingArguments(
        output_dir=work_dir,
        max_steps=config.max_steps,
        per_device_train_batch_size=config.micro_batch_size,
        gradient_accumulation_steps=config.gradient_accumulation_steps,
        learning_rate=config.learning_rate,
        lr_scheduler_type=config.lr_scheduler,
        warmup_steps=config.warmup_fraction,
        weight_decay=config.weight_decay,
        max_grad_norm=config.max_grad_norm,
        optim="adamw_torch",
        **{_checkpointing_arg(): config.gradient_checkpointing},
        bf16=on_gpu and torch.cuda.is_bf16_supported(),
        use_cpu=not on_gpu,
        seed=seed,
        data_seed=seed,
        logging_steps=max(1, config.max_steps // 10),
        save_strategy="no",
        report_to=[],
        disable_tqdm=True,
        remove_unused_columns=False,
        dataloader_num_workers=0,
    )
    collator = PadCollator(tokenizer.pad_token_id)
    trainer = Trainer(model=model, args=args, train_dataset=rows, data_collator=collator)
    trainer.remove_callback(PrinterCallback)  # losses stay in trainer.state.log_history
    if on_gpu:
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    output = trainer.train()
    seconds = time.perf_counter() - start
    peak = torch.cuda.max_memory_allocated() / 2**30 if on_gpu else None
    losses = [log["loss"] for log in trainer.state.log_history if "loss" in log]
    final_loss = losses[-1] if losses else output.training_loss
    return TrainResult(
        steps=int(trainer.state.global_step),
        train_seconds=seconds,
        train_tokens=collator.real_tokens,
        tokens_per_second=collator.real_tokens / seconds if seconds > 0 else 0.0,
        peak_memory_gib=peak,
        final_loss=float(final_loss) if final_loss is not None and math.isfinite(final_loss) else None,
    )


def _checkpointing_arg() -> str:
    """transformers 5.2x renamed `gradient_checkpointing` (kept as a deprecated alias)."""
    import dataclasses

    from transformers import TrainingArguments

    names = {f.name for f in dataclasses.fields(TrainingArguments)}
    return "activation_checkpointing" if "activation_checkpointing" in names else "gradient_checkpointing"
