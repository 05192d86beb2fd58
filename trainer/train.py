"""One QLoRA training run: tokenized rows in, a trained adapter and its measurements out.

The loop is ours, not transformers' `Trainer`, because the levers that make
QLoRA fast need control of each step:

- **Padding-free packing** (default): examples are packed into rows of
  `pack_length` tokens. Position ids restart at each example, which
  transformers turns into attention that never crosses an example boundary
  (varlen kernels with flash-attention, a block mask with flex-attention or
  sdpa). No token is padding (flex-attention rows are topped up to a fixed
  length so its kernel compiles once; those tokens are not counted).
- **Loss on response tokens only, computed where it is needed**: the hidden
  states of the positions that have a label go through the output layer in
  chunks, so the full `tokens x vocab` logits never exist.
- **Checkpointing only where memory requires it**: `auto` recomputes the
  activations of as few decoder layers as the memory cap allows.
- **Real-token accounting**: tokens per second count only real tokens.
"""

from __future__ import annotations

import contextlib
import math
import random
import time
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import numpy as np

from trainer import compat
from trainer.config import TrainConfig
from trainer.data import IGNORE_INDEX
from trainer.model import unwrap_peft
from trainer.units import GIB

# Bytes kept per token and decoder layer for the backward pass with LoRA on
# every linear layer and bf16 compute: about 30 x hidden + 9 x intermediate
# (norm inputs, projections' inputs and outputs, attention output, MLP
# activations, LoRA dropout masks). Fitted to the peaks measured on a
# Mistral-7B shape on an H100 at 4k, 8k and 16k-token rows (218k-255k bytes per
# token and layer against 252k here); bench/trainer_throughput.py prints the
# estimate beside the measured peak.
_ACT_BYTES_PER_HIDDEN = 30
_ACT_BYTES_PER_INTERMEDIATE = 9
_INT8_KEPT_BYTES = 4
_MEMORY_HEADROOM = 0.92  # the share of the cap the plan may fill (fragmentation, workspaces)


@dataclass(frozen=True)
class TrainResult:
    """Measurements of one training run (plain values)."""

    steps: int
    train_seconds: float
    train_tokens: int
    """Real (non-pad) tokens processed, prompts included."""
    tokens_per_second: float
    """Real tokens per second, timed from the second step on (the first compiles kernels)."""
    peak_memory_gib: Optional[float]
    """Peak GPU memory allocated by torch; None on CPU, where it is not measured."""
    final_loss: Optional[float]
    flops_per_token: float
    """Training FLOPs per token: 4 x matmul parameters (forward, input gradients) + 6 x LoRA parameters."""
    full_run_tokens: int
    """Tokens of the full run: the whole mix, all epochs."""
    projected_full_run_hours: float
    """The full run's time at the measured speed, on this device."""
    checkpointed_layers: int
    """Decoder layers whose activations are recomputed in the backward pass."""
    num_layers: int
    losses: tuple[tuple[int, float], ...] = ()
    """(step, loss) of every logged step."""
    learning_rates: tuple[tuple[int, float], ...] = ()
    """(step, learning rate) the optimizer stepped with, at every step."""
    planned_steps: int = 0
    """Steps the run was set to train; more than `steps` when a checkpoint callback stopped it early."""


class TrainingOutOfMemory(RuntimeError):
    """The GPU ran out of memory; the message says at which micro-batch."""


# --- batching -----------------------------------------------------------------


def pack(lengths: list[int], pack_length: int, rng: random.Random, window: int = 64) -> list[list[int]]:
    """Groups example indices into rows of at most `pack_length` tokens.

    Examples are taken in a random order and each goes into the first of the
    last `window` open rows it fits (first fit, bounded so packing stays
    linear); rows are returned in a random order.
    """
    order = list(range(len(lengths)))
    rng.shuffle(order)
    rows: list[list[int]] = []
    room: list[int] = []
    for i in order:
        n = min(lengths[i], pack_length)
        start = max(0, len(rows) - window)
        for j in range(start, len(rows)):
            if room[j] >= n:
                rows[j].append(i)
                room[j] -= n
                break
        else:
            rows.append([i])
            room.append(pack_length - n)
    rng.shuffle(rows)
    return rows


def padded_batches(lengths: list[int], batch_size: int, rng: random.Random, group_by_length: bool) -> list[list[int]]:
    """Batches of example indices for padding mode, in a random order.

    With `group_by_length`, each run of 50 batches' worth of examples is
    sorted by length before it is cut into batches, so a batch holds
    examples of similar length (less padding), and the batches are shuffled.
    """
    order = list(range(len(lengths)))
    rng.shuffle(order)
    if group_by_length:
        mega = batch_size * 50
        order = [i for k in range(0, len(order), mega) for i in sorted(order[k: k + mega], key=lambda i: -lengths[i])]
    batches = [order[k: k + batch_size] for k in range(0, len(order), batch_size)]
    if group_by_length:
        rng.shuffle(batches)
    return batches


def collate_packed(rows: list[dict], indices: list[int], pad_token_id: int, pad_to: Optional[int] = None) -> dict:
    """One packed row: examples side by side, position ids restarting at each one.

    The first token of each example has no label, so no example learns to
    predict the next one's start. `pad_to` tops the row up with a last
    segment of padding that has no labels and attends only to itself.
    Rows may hold lists or NumPy arrays.
    """
    import torch

    ids = [np.asarray(rows[i]["input_ids"], dtype=np.int64) for i in indices]
    labels = [np.asarray(rows[i]["labels"], dtype=np.int64) for i in indices]
    seq_lens = [len(x) for x in ids]
    real = sum(seq_lens)
    if pad_to is not None and pad_to > real:
        ids.append(np.full(pad_to - real, pad_token_id, dtype=np.int64))
        labels.append(np.full(pad_to - real, IGNORE_INDEX, dtype=np.int64))
        seq_lens.append(pad_to - real)
    flat_labels = np.concatenate(labels)
    starts = np.cumsum([0, *seq_lens[:-1]])
    flat_labels[starts] = IGNORE_INDEX
    positions = np.concatenate([np.arange(n, dtype=np.int64) for n in seq_lens])
    return {
        "input_ids": torch.from_numpy(np.concatenate(ids))[None],
        "labels": torch.from_numpy(flat_labels)[None],
        "position_ids": torch.from_numpy(positions)[None],
        "seq_lens": seq_lens,
        "real_tokens": real,
    }


def collate_padded(rows: list[dict], indices: list[int], pad_token_id: int) -> dict:
    """A batch padded on the right to its longest example (rows may hold lists or NumPy arrays)."""
    import torch

    batch = [rows[i] for i in indices]
    length = max(len(r["input_ids"]) for r in batch)
    input_ids = torch.full((len(batch), length), pad_token_id, dtype=torch.long)
    labels = torch.full((len(batch), length), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((len(batch), length), dtype=torch.long)
    for i, r in enumerate(batch):
        n = len(r["input_ids"])
        input_ids[i, :n] = torch.as_tensor(np.asarray(r["input_ids"], dtype=np.int64))
        labels[i, :n] = torch.as_tensor(np.asarray(r["labels"], dtype=np.int64))
        attention_mask[i, :n] = 1
    return {
        "input_ids": input_ids,
        "labels": labels,
        "attention_mask": attention_mask,
        "seq_lens": [len(r["input_ids"]) for r in batch],
        "real_tokens": int(attention_mask.sum()),
    }


class Batches:
    """Micro-batches of the training rows, epoch after epoch, each epoch reshuffled (and repacked) by seed."""

    def __init__(self, rows: list[dict], config: TrainConfig, seed: int, pad_token_id: int, pad_to: Optional[int]):
        self.rows = rows
        self.config = config
        self.seed = seed
        self.pad_token_id = pad_token_id
        self.pad_to = pad_to
        self.lengths = [len(r["input_ids"]) for r in rows]
        self.per_epoch = len(self._epoch(0))

    def _epoch(self, epoch: int) -> list[list[int]]:
        rng = random.Random(f"{self.seed}:{epoch}")
        if self.config.packing:
            return pack(self.lengths, self.config.pack_length, rng)
        return padded_batches(self.lengths, self.config.micro_batch_size, rng, self.config.group_by_length)

    def __iter__(self):
        epoch = 0
        while True:
            for indices in self._epoch(epoch):
                if self.config.packing:
                    yield collate_packed(self.rows, indices, self.pad_token_id, self.pad_to)
                else:
                    yield collate_padded(self.rows, indices, self.pad_token_id)
            epoch += 1

    def longest_micro_batch_tokens(self) -> int:
        """Tokens of the largest micro-batch (what memory must hold)."""
        if self.config.packing:
            return self.config.pack_length
        longest = sorted(self.lengths, reverse=True)[: self.config.micro_batch_size]
        return len(longest) * max(longest)


# --- the model's pieces -------------------------------------------------------


def decoder_layers(model) -> list:
    decoder = unwrap_peft(model).get_decoder()
    return list(getattr(decoder, "layers", []))


def flops_per_token(model) -> float:
    """Training FLOPs per token: 4 x frozen matmul parameters + 6 x trainable ones.

    The frozen base does a forward (2 FLOPs per weight) and an input-gradient
    backward (2 more); LoRA weights also get weight gradients (2 more).
    Embedding lookups and attention scores are not counted.
    """
    import torch

    frozen = trainable = 0
    for module in model.modules():
        if not isinstance(module, torch.nn.Linear):
            continue
        n = module.in_features * module.out_features
        if module.weight.requires_grad:
            trainable += n
        else:
            frozen += n
    return 4.0 * frozen + 6.0 * trainable


def warmup_steps(config: TrainConfig, steps: int, full_steps: int) -> int:
    """Warmup steps of a run of `steps` (a trial's proxy) out of the full run's `full_steps`: the config's
    `warmup_steps` (of the full run) scaled to the proxy, else `warmup_fraction` of `steps`."""
    if config.warmup_steps is not None:
        return min(steps, int(round(config.warmup_steps * steps / max(full_steps, steps))))
    return int(round(config.warmup_fraction * steps))


@dataclass(frozen=True)
class MemoryModel:
    """The planner's estimate of a training step's memory, in bytes."""

    fixed: int
    """Weights, adapter gradients and AdamW state, one chunk of the loss, one layer being recomputed."""
    full_layer: int
    """Activations a plain decoder layer keeps for the backward pass."""
    checkpointed_layer: int
    """What a checkpointed layer keeps: its input."""
    num_layers: int

    def peak(self, checkpointed: int) -> int:
        return self.fixed + (self.num_layers - checkpointed) * self.full_layer + checkpointed * self.checkpointed_layer

    def plan(self, budget_bytes: float) -> int:
        """The fewest layers to checkpoint for the peak to fit `budget_bytes` (all layers when none fits)."""
        for k in range(self.num_layers + 1):
            if self.peak(k) <= budget_bytes:
                return k
        return self.num_layers


def memory_model(model, tokens: int, allocated_bytes: int) -> MemoryModel:
    """The memory model of training `model` (a PeftModel) on micro-batches of `tokens` tokens.

    `allocated_bytes` is what the loaded base and adapter already take.
    """
    config = unwrap_peft(model).config
    hidden = config.hidden_size
    intermediate = getattr(config, "intermediate_size", 4 * hidden)
    # On a GPU, bitsandbytes' int8 matmul (MatMul8bitLt) keeps what its backward needs on the autograd context
    # itself (`ctx.tensors`), out of reach of checkpointing's saved-tensor hooks: every layer, checkpointed or
    # not, holds about 4 bytes a token for each of its seven linear layers' inputs (measured with
    # bench/base_formats.py on a Mistral-7B shape and 4096-token rows: 0.60 GiB a layer; this gives 0.59).
    kept = tokens * _INT8_KEPT_BYTES * (6 * hidden + intermediate) if _has_int8_linears(model) else 0
    full = tokens * (_ACT_BYTES_PER_HIDDEN * hidden + _ACT_BYTES_PER_INTERMEDIATE * intermediate) + kept
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    checkpointed = tokens * 2 * hidden + kept
    return MemoryModel(
        fixed=allocated_bytes + trainable * 12 + _loss_chunk_bytes(config.vocab_size) + full,
        full_layer=full,
        checkpointed_layer=checkpointed,
        num_layers=len(decoder_layers(model)),
    )


def _has_int8_linears(model) -> bool:
    try:
        from bitsandbytes.nn import Linear8bitLt
    except ImportError:
        return False
    return any(isinstance(m, Linear8bitLt) for m in model.modules())


def plan_checkpointing(model, tokens: int, memory_budget_gib: Optional[float], device: str) -> int:
    """How many decoder layers to checkpoint so a micro-batch of `tokens` fits the budget.

    Returns 0 on CPU or with no budget (see `memory_model` for the estimate).
    """
    import torch

    if not device.startswith("cuda") or memory_budget_gib is None or not decoder_layers(model):
        return 0
    estimate = memory_model(model, tokens, torch.cuda.memory_allocated())
    return estimate.plan(memory_budget_gib * GIB * _MEMORY_HEADROOM)


def set_checkpointing(model, num_layers: int) -> int:
    """Recomputes the activations of the first `num_layers` decoder layers in the backward pass; returns how many
    layers are checkpointed: every one where transformers' per-layer flag is out of reach
    (`trainer.compat.checkpoint_layers`), which the run's record and the planner's peak must count."""
    return compat.checkpoint_layers(unwrap_peft(model), decoder_layers(model), num_layers)


def _loss_chunk_tokens(vocab_size: int) -> int:
    return max(256, 2**27 // max(vocab_size, 1))


def _loss_chunk_bytes(vocab_size: int) -> int:
    # bf16 logits, their float32 copy and its gradient, for one chunk
    return _loss_chunk_tokens(vocab_size) * vocab_size * 10


def response_loss_sum(model, batch: dict, device) -> tuple["torch.Tensor", int]:  # noqa: F821
    """Sum of the token losses of `batch` and the number of tokens with a label.

    Only positions whose next token has a label go through the output layer,
    in chunks whose logits are recomputed in the backward pass instead of kept.
    """
    import torch
    import torch.nn.functional as F
    from torch.utils.checkpoint import checkpoint

    causal_lm = unwrap_peft(model)
    kwargs = {"input_ids": batch["input_ids"].to(device)}
    for key in ("attention_mask", "position_ids"):
        if key in batch:
            kwargs[key] = batch[key].to(device)
    hidden = causal_lm.get_decoder()(**kwargs, use_cache=False).last_hidden_state
    targets = batch["labels"][:, 1:].to(device)
    keep = targets != IGNORE_INDEX
    hidden = hidden[:, :-1][keep]
    targets = targets[keep]
    head = causal_lm.get_output_embeddings()
    softcap = getattr(causal_lm.config, "final_logit_softcapping", None)

    def chunk_loss(h, t):
        logits = head(h).float()
        if softcap:
            logits = softcap * torch.tanh(logits / softcap)
        return F.cross_entropy(logits, t, reduction="sum")

    total = hidden.new_zeros((), dtype=torch.float32)
    step = _loss_chunk_tokens(causal_lm.config.vocab_size)
    for k in range(0, targets.numel(), step):
        h, t = hidden[k: k + step], targets[k: k + step]
        total = total + (checkpoint(chunk_loss, h, t, use_reentrant=False) if h.requires_grad else chunk_loss(h, t))
    return total, int(targets.numel())


class _NEFTune:
    """NEFTune: uniform noise on the input embeddings while training, alpha / sqrt(L x d) per example.

    L is each example's own length (in a packed row, its segment's), not the row's.
    """

    def __init__(self, model, alpha: float):
        self.alpha = alpha
        self.scale = None
        self.handle = unwrap_peft(model).get_input_embeddings().register_forward_hook(self._hook)

    def set_batch(self, batch: dict, device) -> None:
        import torch

        lengths = torch.tensor(batch["seq_lens"], dtype=torch.float32)
        if "attention_mask" in batch:  # padded: one length per row
            per_token = lengths[:, None].expand(batch["input_ids"].shape)
        else:  # packed: one length per segment
            per_token = torch.repeat_interleave(lengths, lengths.long())[None, :]
        self.scale = per_token.to(device)

    def _hook(self, module, inputs, output):
        if not module.training or self.scale is None:
            return output
        dim = output.shape[-1]
        scale = (self.alpha / (self.scale * dim).sqrt())[..., None].to(output.dtype)
        return output + (output.new_empty(output.shape).uniform_(-1, 1) * scale)

    def remove(self) -> None:
        self.handle.remove()


# --- the loop -----------------------------------------------------------------


def train(
    model,
    tokenizer,
    rows: list[dict],
    config: TrainConfig,
    seed: int,
    memory_budget_gib: Optional[float] = None,
    on_step: Optional[Callable[[int, float], None]] = None,
    checkpoints: Sequence[float] = (),
    on_checkpoint: Optional[Callable[[int], bool]] = None,
    on_start: Optional[Callable[[int], None]] = None,
) -> TrainResult:
    """Trains the LoRA parameters of `model` (a PeftModel) on `rows`.

    Args:
        model: the 4-bit base with a LoRA adapter attached.
        tokenizer: its tokenizer (for the pad id).
        rows: tokenized examples (`input_ids`, `labels`), prompts already masked,
            one epoch of the mix.
        config: the training settings of this trial.
        seed: seeds the data order and dropout of this run.
        memory_budget_gib: GPU memory the run may use (the profile's cap);
            `gradient_checkpointing: auto` plans within it. None: the card's.
        on_step: called with (step, loss) after each optimizer step.
        checkpoints: fractions of the planned steps (e.g. 0.25, 0.5) at which
            `on_checkpoint` is called (multi-fidelity rungs).
        on_checkpoint: called with the step at each checkpoint, after the
            optimizer step; returning True stops the run there (the result
            then has `steps` < `planned_steps`).
        on_start: called with the planned number of steps before the first one.

    Raises:
        TrainingOutOfMemory: the GPU ran out of memory (the message names the micro-batch).
    """
    import torch
    from transformers import get_scheduler

    if not rows:
        raise ValueError("no training examples left after tokenization")
    device = next(model.parameters()).device
    on_gpu = device.type == "cuda"
    torch.manual_seed(seed)
    # flex-attention compiles once for a fixed row length; an unknown kernel (None) is padded too, which any kernel
    # keeps apart (the padding is a segment of its own).
    attn = compat.attention_of(unwrap_peft(model))
    batches = Batches(
        rows, config, seed, tokenizer.pad_token_id,
        pad_to=config.pack_length if config.packing and attn in ("flex_attention", None) else None,
    )
    accumulation = config.gradient_accumulation_steps
    full_steps = max(1, math.ceil(batches.per_epoch * config.epochs / accumulation))
    steps = min(config.max_steps, full_steps) if config.max_steps is not None else full_steps
    full_run_tokens = int(sum(batches.lengths) * config.epochs)
    checkpoint_steps = checkpoint_steps_of(checkpoints, steps)
    planned = steps

    if on_gpu:  # never plan for more than the card has (a profile bigger than the card)
        card_gib = torch.cuda.get_device_properties(device).total_memory / GIB
        memory_budget_gib = min(memory_budget_gib or card_gib, card_gib)
    tokens_per_micro_batch = batches.longest_micro_batch_tokens()
    if config.gradient_checkpointing == "auto":
        checkpointed = plan_checkpointing(model, tokens_per_micro_batch, memory_budget_gib, device.type)
    else:
        checkpointed = len(decoder_layers(model)) if config.gradient_checkpointing else 0
    checkpointed = set_checkpointing(model, checkpointed)
    model.train()

    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(
        params, lr=config.learning_rate, weight_decay=config.weight_decay, fused=on_gpu
    )
    scheduler = get_scheduler(
        config.lr_scheduler if config.lr_scheduler != "constant" else "constant_with_warmup",
        optimizer,
        num_warmup_steps=warmup_steps(config, steps, full_steps),
        num_training_steps=steps,
    )
    neftune = _NEFTune(model, config.neftune_alpha) if config.neftune_alpha else None
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if on_gpu and _bf16_compute(model) else None
    if on_gpu:
        torch.cuda.reset_peak_memory_stats(device)

    if on_start is not None:
        on_start(steps)
    stream = iter(batches)
    losses: list[tuple[int, float]] = []
    learning_rates: list[tuple[int, float]] = []
    real_tokens = timed_tokens = 0
    start = time.perf_counter()
    timed_from = start
    paused = 0.0
    training_peak = 0
    try:
        for step in range(1, steps + 1):
            micro = [next(stream) for _ in range(accumulation)]
            n_labels = sum(int((m["labels"][:, 1:] != IGNORE_INDEX).sum()) for m in micro)
            step_loss = 0.0
            for m in micro:
                current = m
                if neftune is not None:
                    neftune.set_batch(m, device)
                with autocast if autocast is not None else contextlib.nullcontext():
                    loss_sum, _ = response_loss_sum(model, m, device)
                loss = loss_sum / max(n_labels, 1)
                loss.backward()
                step_loss += float(loss.detach())
                real_tokens += m["real_tokens"]
                if step > 1:
                    timed_tokens += m["real_tokens"]
            torch.nn.utils.clip_grad_norm_(params, config.max_grad_norm)
            learning_rates.append((step, float(optimizer.param_groups[0]["lr"])))
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            if step == 1:
                if on_gpu:
                    torch.cuda.synchronize(device)
                timed_from = time.perf_counter()
            losses.append((step, step_loss))
            if on_step is not None:
                on_step(step, step_loss)
            if on_checkpoint is not None and step in checkpoint_steps:
                paused_from = time.perf_counter()
                if on_gpu:  # nor is its memory: the training peak so far is kept, the eval's left out
                    training_peak = max(training_peak, torch.cuda.max_memory_allocated(device))
                stop = on_checkpoint(step)
                paused += time.perf_counter() - paused_from  # a rung's eval is not training time
                if on_gpu:
                    torch.cuda.reset_peak_memory_stats(device)
                if stop:
                    steps = step
                    break
        if on_gpu:
            torch.cuda.synchronize(device)
    except torch.OutOfMemoryError:
        optimizer.zero_grad(set_to_none=True)
        desc = (
            f"packed row of {config.pack_length} tokens" if config.packing
            else f"micro_batch_size={config.micro_batch_size} ({current['input_ids'].numel()} tokens)"
        )
        cap = f", memory cap {memory_budget_gib:.2f} GiB" if memory_budget_gib else ""
        raise TrainingOutOfMemory(
            f"out of memory at step {step}: {desc}, {checkpointed} of {len(decoder_layers(model))} layers "
            f"checkpointed{cap}"
        ) from None
    finally:
        if neftune is not None:
            neftune.remove()
        set_checkpointing(model, 0)
    end = time.perf_counter() - paused
    seconds = end - start
    if steps > 1:
        tps = timed_tokens / (end - timed_from) if end > timed_from else 0.0
    else:
        tps = real_tokens / seconds if seconds > 0 else 0.0
    peak = max(training_peak, torch.cuda.max_memory_allocated(device)) / GIB if on_gpu else None
    final = losses[-1][1] if losses else None
    return TrainResult(
        steps=steps,
        train_seconds=seconds,
        train_tokens=real_tokens,
        tokens_per_second=tps,
        peak_memory_gib=peak,
        final_loss=final if final is not None and math.isfinite(final) else None,
        flops_per_token=flops_per_token(model),
        full_run_tokens=full_run_tokens,
        projected_full_run_hours=full_run_tokens / tps / 3600 if tps > 0 else math.inf,
        checkpointed_layers=checkpointed,
        num_layers=len(decoder_layers(model)),
        losses=tuple(losses),
        learning_rates=tuple(learning_rates),
        planned_steps=planned,
    )


def checkpoint_steps_of(fractions: Sequence[float], steps: int) -> list[int]:
    """The steps (1..steps-1) at `fractions` of a run of `steps` steps; the last step is never one."""
    return sorted({max(1, round(f * steps)) for f in fractions if 0 < f < 1} - {steps})


def _bf16_compute(model) -> bool:
    """Whether the 4-bit layers compute in bfloat16 (then LoRA and the rest run under bf16 autocast)."""
    import torch

    for module in model.modules():
        dtype = getattr(module, "compute_dtype", None)
        if dtype is not None:
            return dtype == torch.bfloat16
    return next(model.parameters()).dtype == torch.bfloat16
