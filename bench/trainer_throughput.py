"""QLoRA training throughput: our trainer against a hand-written transformers + peft + bitsandbytes loop.

A Mistral-7B-shaped model with random weights (speed and memory do not
depend on weight values) is loaded in 4-bit NF4 through the same path real
runs use, with LoRA r=64 on every linear layer. Examples are token ids whose
lengths follow an instruction-like distribution: log-normal with median 326
and mean 411 tokens (mu = ln 326, sigma = 0.68), clipped to [16, 2048]; 40% of
each example is prompt (no loss), the rest response.

In one process, on one GPU, it times:

(a) the hand-written baseline: `prepare_model_for_kbit_training` with
    gradient checkpointing, sdpa attention, bf16 autocast, AdamW, batches of 8
    examples in random order padded to their longest (and, as a second
    baseline, grouped by length);
(b) our trainer (`trainer.train.train`) with padding-free packing and
    checkpointing planned within each GPU profile's memory cap, the cap
    enforced with `torch.cuda.set_per_process_memory_fraction`;
(c) the peer users would pick instead: TRL's `SFTTrainer` with the same peft
    LoRA on the same 4-bit model and the same token-id examples (their labels
    as the loss mask), `packing=True` with the best-fit-decreasing,
    padding-free strategy its docs recommend, `max_length` 8192, gradient
    checkpointing and bf16 as TRL defaults them, under the same memory cap;
    attention flex_attention or sdpa, with and without `use_liger_kernel`.
    flash-attention is not in the comparison: it needs a CUDA compiler
    toolchain to build and no wheel matched the GPU machine's torch.

`--check` first runs both trainers on one packed row of the tiny shape and on
each of its examples alone: the token losses must add up to the same sum and
the supervised tokens must be the same, so neither side trains on other labels
or lets attention cross an example's boundary.

Tokens per second count real tokens only (no padding), timed after warm-up
steps. MFU counts 4 x frozen matmul parameters + 6 x LoRA parameters FLOPs
per token against the card's dense bf16 peak. Writes JSON (`--out`) and, with
`--markdown`, the table for docs/benchmarks.md.

    python bench/trainer_throughput.py --out bench/results/trainer_throughput-h100.json
    python bench/trainer_throughput.py --render bench/results/trainer_throughput-h100.json  # the table only
    python bench/trainer_throughput.py --shape tiny --device cpu --steps 2 --out /tmp/t.json  # smoke test
    python bench/trainer_throughput.py --check-only --device cpu   # the packed-row check alone, on CPU
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import hashlib
import json
import math
import os
import platform
import random
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Optional

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from trainer.config import LoraConfig, ModelConfig, TrainConfig  # noqa: E402

SHAPES = {
    # Mistral-7B-v0.1's dimensions (full attention instead of its 4096-token sliding window).
    "mistral-7b": dict(
        hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
        num_key_value_heads=8, vocab_size=32000, max_position_embeddings=32768, rope_theta=10000.0,
    ),
    "tiny": dict(
        hidden_size=128, intermediate_size=384, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=1024, max_position_embeddings=4096, rope_theta=10000.0,
    ),
}
# The packed-row check's model: the tiny shape with weights large enough that attention changes the loss
# (at the usual 0.02 a random model's output barely depends on what it attends to).
SHAPES["tiny-check"] = {**SHAPES["tiny"], "initializer_range": 0.3}
LENGTHS = {"median": 326, "sigma": 0.68, "min": 16, "max": 2048}
PROMPT_FRACTION = 0.4
CAPS = {"a100": 39.35, "4090": 23.55}
TRAINER_PACKAGES = ("torch", "transformers", "peft", "bitsandbytes", "trl", "liger-kernel", "datasets")
# TRL SFTTrainer settings (bench/trainer_throughput.py's peer). Each runs under the A100 cap; its measured peak says
# whether it also fits the 4090's. `pad_to_multiple_of` equal to `max_length` tops each packed row up to a fixed
# length, as ours does for flex-attention (one compiled kernel instead of recompiling as row lengths change).
PEERS = {
    "trl-flex": {"attn": "flex_attention", "max_length": 8192},
    "trl-flex-padded": {"attn": "flex_attention", "max_length": 8192, "pad_to_multiple_of": 8192},
    "trl-sdpa": {"attn": "sdpa", "max_length": 8192},
    "trl-flex-liger": {"attn": "flex_attention", "max_length": 8192, "liger": True},
    "trl-flex-padded-liger": {"attn": "flex_attention", "max_length": 8192, "pad_to_multiple_of": 8192,
                              "liger": True},
    "trl-sdpa-liger": {"attn": "sdpa", "max_length": 8192, "liger": True},
    "trl-flex-4k": {"attn": "flex_attention", "max_length": 4096},
}


@dataclass
class Run:
    name: str
    kind: str  # "baseline", "ours" or "peer"
    settings: dict
    profile: Optional[str] = None
    tokens_per_second: Optional[float] = None
    padded_tokens_per_second: Optional[float] = None
    peak_memory_gib: Optional[float] = None
    estimated_peak_gib: Optional[float] = None
    mfu: Optional[float] = None
    steps: int = 0
    seconds: float = 0.0
    checkpointed_layers: Optional[int] = None
    fits: Optional[dict] = None
    error: Optional[str] = None
    losses: list = field(default_factory=list)


def make_examples(n: int, vocab: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        length = int(round(math.exp(rng.gauss(math.log(LENGTHS["median"]), LENGTHS["sigma"]))))
        length = max(LENGTHS["min"], min(LENGTHS["max"], length))
        ids = [rng.randrange(3, vocab) for _ in range(length)]
        n_prompt = int(length * PROMPT_FRACTION)
        rows.append({"input_ids": ids, "labels": [-100] * n_prompt + ids[n_prompt:]})
    return rows


def build_base(shape: str, device: str, attn: str, cache: Path) -> tuple:
    """Random weights saved once as a bf16 checkpoint, then loaded in 4-bit through `load_base_model`."""
    import torch
    from transformers import AutoModelForCausalLM, MistralConfig

    from trainer.model import load_base_model

    # Keyed by the shape's settings too: a cached checkpoint of an older shape is never reused.
    digest = hashlib.sha256(json.dumps(SHAPES[shape], sort_keys=True).encode()).hexdigest()[:8]
    path = cache / f"random-{shape}-{digest}"
    if not (path / "config.json").exists():
        config = MistralConfig(**SHAPES[shape], sliding_window=None, tie_word_embeddings=False)
        torch.manual_seed(0)
        with torch.device(device):
            model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
        model.save_pretrained(path, max_shard_size="2GB")
        del model
        gc.collect()
        if device == "cuda":
            torch.cuda.empty_cache()
    start = time.perf_counter()
    model = load_base_model(ModelConfig(name_or_path=str(path), attn_implementation=attn), device)
    return model, time.perf_counter() - start


def _reset(device: str) -> None:
    import torch

    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def _set_cap(device: str, cap_gib: Optional[float]) -> None:
    import torch

    if device != "cuda":
        return
    total = torch.cuda.get_device_properties(0).total_memory / 2**30
    torch.cuda.set_per_process_memory_fraction(min(1.0, (cap_gib or total) / total), 0)


def run_ours(base, rows, settings: dict, steps: int, device: str, cap: Optional[float], peak_tflops) -> Run:
    import torch

    from trainer.model import attach_lora, use_attention
    from trainer.train import memory_model, train

    run = Run(name=settings["name"], kind="ours", settings=settings, profile=settings.get("profile"))
    use_attention(base, settings["attn"])
    lora = LoraConfig(r=64, alpha=16, dropout=0.05, target_modules="all-linear")
    model = attach_lora(base, lora)
    config = TrainConfig(
        learning_rate=1e-4, max_steps=steps, packing=True, pack_length=settings["pack_length"],
        gradient_checkpointing=settings.get("checkpointing", "auto"), warmup_fraction=0.0, lora=lora,
    )
    _set_cap(device, cap)
    _reset(device)
    try:
        result = train(model, SimpleNamespace(pad_token_id=0), rows, config, seed=0, memory_budget_gib=cap)
        run.tokens_per_second = result.tokens_per_second
        run.peak_memory_gib = result.peak_memory_gib
        run.steps, run.seconds = result.steps, result.train_seconds
        run.checkpointed_layers = result.checkpointed_layers
        run.losses = [round(v, 4) for _, v in result.losses]
        if peak_tflops:
            run.mfu = result.tokens_per_second * result.flops_per_token / (peak_tflops * 1e12)
        if device == "cuda":
            estimate = memory_model(model, settings["pack_length"], torch.cuda.memory_allocated())
            run.estimated_peak_gib = estimate.peak(result.checkpointed_layers) / 2**30
    except Exception as e:  # noqa: BLE001 - a setting that fails is a result too
        run.error = f"{type(e).__name__}: {str(e).splitlines()[0][:300]}"
    finally:
        _set_cap(device, None)
        base = model.unload()
        del model
        _reset(device)
    return run


def run_baseline(base, rows, grouped: bool, steps: int, warmup: int, device: str, peak_tflops) -> Run:
    """The hand-written loop: padded batches of 8, gradient checkpointing, sdpa."""
    import peft
    import torch

    from trainer.model import use_attention
    from trainer.train import flops_per_token, padded_batches

    name = "baseline, padded, length-grouped" if grouped else "baseline, padded, random order"
    run = Run(name=name, kind="baseline", settings={"batch_size": 8, "grouped": grouped, "attn": "sdpa",
                                                     "gradient_checkpointing": True})
    use_attention(base, "sdpa")
    model = peft.prepare_model_for_kbit_training(base, use_gradient_checkpointing=True)
    model = peft.get_peft_model(model, peft.LoraConfig(
        r=64, lora_alpha=16, lora_dropout=0.05, target_modules="all-linear", task_type="CAUSAL_LM"))
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    lengths = [len(r["input_ids"]) for r in rows]
    batches = padded_batches(lengths, 8, random.Random(0), group_by_length=grouped)
    _reset(device)
    real = padded = 0
    t0 = None
    try:
        for step, batch in enumerate(batches[: warmup + steps]):
            if step == warmup:
                if device == "cuda":
                    torch.cuda.synchronize()
                t0 = time.perf_counter()
                real = padded = 0
            width = max(lengths[i] for i in batch)
            ids = torch.zeros((len(batch), width), dtype=torch.long)
            labels = torch.full((len(batch), width), -100, dtype=torch.long)
            mask = torch.zeros((len(batch), width), dtype=torch.long)
            for j, i in enumerate(batch):
                n = lengths[i]
                ids[j, :n] = torch.tensor(rows[i]["input_ids"])
                labels[j, :n] = torch.tensor(rows[i]["labels"])
                mask[j, :n] = 1
            with torch.autocast(device, dtype=torch.bfloat16, enabled=device == "cuda"):
                loss = model(input_ids=ids.to(device), attention_mask=mask.to(device), labels=labels.to(device)).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            run.losses.append(round(float(loss.detach()), 4))
            real += int(mask.sum())
            padded += ids.numel()
        if device == "cuda":
            torch.cuda.synchronize()
        seconds = time.perf_counter() - t0
        run.tokens_per_second = real / seconds
        run.padded_tokens_per_second = padded / seconds
        run.steps, run.seconds = steps, seconds
        run.peak_memory_gib = torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else None
        if peak_tflops:
            run.mfu = run.tokens_per_second * flops_per_token(model) / (peak_tflops * 1e12)
    except Exception as e:  # noqa: BLE001
        run.error = f"{type(e).__name__}: {str(e).splitlines()[0][:300]}"
    finally:
        base = model.unload()
        del model, optimizer
        _restore(base)
        _reset(device)
    return run


def _restore(base) -> None:
    """Undoes what `prepare_model_for_kbit_training` did to the shared base (float32 copies, checkpointing)."""
    import torch

    for param in base.parameters():
        if param.dtype == torch.float32:
            param.data = param.data.to(torch.bfloat16)
        param.requires_grad_(False)
    base.gradient_checkpointing_disable()


def _strip_trl(model):
    """The base again after a TRL run: adapter unloaded, and the hooks and patches TRL added removed."""
    base = model.unload() if hasattr(model, "unload") else model
    for m in (base, getattr(base, "model", None)):
        if m is not None and "forward" in vars(m):  # TRL's fused LM head is an instance attribute
            del m.forward
    with contextlib.suppress(Exception):
        base.disable_input_require_grads()
    _restore(base)
    return base


def trl_trainer(base, rows: list[dict], settings: dict, max_steps: int, device: str, output_dir: str,
                tokenizer, callbacks=()):
    """TRL's SFTTrainer as its docs set up QLoRA SFT with packing, on token-id rows (labels mask the prompt)."""
    import datasets
    import peft
    import trl

    from trainer.model import use_attention

    use_attention(base, settings["attn"])
    config = trl.SFTConfig(
        output_dir=output_dir, max_steps=max_steps, per_device_train_batch_size=1, gradient_accumulation_steps=1,
        learning_rate=1e-4, lr_scheduler_type="constant", warmup_steps=0, seed=0,
        packing=True, packing_strategy="bfd", max_length=settings["max_length"],
        pad_to_multiple_of=settings.get("pad_to_multiple_of"),
        gradient_checkpointing=True, bf16=device == "cuda", use_cpu=device == "cpu",
        use_liger_kernel=settings.get("liger", False),
        report_to="none", save_strategy="no", logging_steps=max(1, max_steps), disable_tqdm=True,
        dataloader_num_workers=0,
    )
    dataset = datasets.Dataset.from_list([{"input_ids": r["input_ids"], "labels": r["labels"]} for r in rows])
    lora = peft.LoraConfig(r=64, lora_alpha=16, lora_dropout=settings.get("dropout", 0.05),
                           target_modules="all-linear", task_type="CAUSAL_LM")
    return trl.SFTTrainer(model=base, args=config, train_dataset=dataset, processing_class=tokenizer,
                          peft_config=lora, callbacks=list(callbacks))


def _real_tokens(batch: dict) -> int:
    """Tokens of a padding-free TRL batch that are not padding: the row is topped up (pad_to_multiple_of) with
    position ids 0, after the last example, whose positions end above 0 (examples are at least 16 tokens)."""
    positions = batch["position_ids"][0]
    nonzero = (positions != 0).nonzero()
    return int(nonzero[-1]) + 1 if len(nonzero) else int(positions.numel())


def run_trl(base, rows, settings: dict, steps: int, warmup: int, device: str, cap: Optional[float],
            peak_tflops, tokenizer) -> tuple[Run, object]:
    """Times TRL's SFTTrainer; returns the run and the base (TRL's adapter and patches removed)."""
    import torch
    from transformers import TrainerCallback

    from trainer.train import flops_per_token

    run = Run(name=settings["name"], kind="peer", settings=settings, profile=settings.get("profile"))
    step_ends: list[float] = []
    step_tokens: list[int] = []

    class StepClock(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if device == "cuda":
                torch.cuda.synchronize()
            step_ends.append(time.perf_counter())

    trainer = None
    _set_cap(device, cap)
    _reset(device)
    try:
        with tempfile.TemporaryDirectory(prefix="trl-bench-") as out:
            trainer = trl_trainer(base, rows, settings, warmup + steps, device, out, tokenizer, [StepClock()])
            model = trainer.model
            run.settings = {**settings, "trl": __import__("trl").__version__,
                            "gradient_checkpointing": trainer.args.gradient_checkpointing,
                            "lora_dtype": str(next(p.dtype for n, p in model.named_parameters() if "lora_" in n))}
            original = trainer.training_step

            def counted(model, inputs, num_items_in_batch=None):
                step_tokens.append(_real_tokens(inputs))
                return original(model, inputs, num_items_in_batch)

            trainer.training_step = counted
            if device == "cuda":
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
            trainer.train()
            seconds = step_ends[-1] - step_ends[warmup - 1]
            run.tokens_per_second = sum(step_tokens[warmup:]) / seconds
            run.steps, run.seconds = len(step_ends) - warmup, seconds
            run.peak_memory_gib = torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else None
            run.losses = [round(e["loss"], 4) for e in trainer.state.log_history if "loss" in e]
            if peak_tflops:
                run.mfu = run.tokens_per_second * flops_per_token(model) / (peak_tflops * 1e12)
    except Exception as e:  # noqa: BLE001 - a setting that fails is a result too
        run.error = f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}"
    finally:
        _set_cap(device, None)
        if trainer is not None:
            base = _strip_trl(trainer.model)
            trainer.model = trainer.model_wrapped = None
            trainer.optimizer = trainer.lr_scheduler = None
            del trainer
        _reset(device)
    return run, base


def check_packing(device: str, attns: list[str]) -> list[dict]:
    """Both trainers on one packed row of the tiny shape against each of its examples alone.

    The loss of a row is a sum over its supervised tokens; if attention never
    crosses an example's boundary, the row's sum equals the sum of the examples'
    own, and both sides supervise the same tokens. Dropout is off so the passes
    are deterministic. Run on CPU (sdpa) before the GPU run, and there with
    each kernel.
    """
    import torch

    from trainer.demo_base import build_tokenizer
    from trainer.model import attach_lora, use_attention
    from trainer.train import collate_packed, response_loss_sum

    torch.manual_seed(0)
    tokenizer = build_tokenizer()
    rows = make_examples(4, SHAPES["tiny"]["vocab_size"], seed=1)
    for r in rows:  # short rows: the tiny model's check is about boundaries, not length
        n = 24 + len(r["input_ids"]) % 40
        r["input_ids"] = r["input_ids"][:n]
        r["labels"] = [-100] * (n // 2) + r["input_ids"][n // 2:]
    total = sum(len(r["input_ids"]) for r in rows)
    base, _ = build_base("tiny-check", device, "sdpa", Path(tempfile.gettempdir()) / "sweep-bench")
    results = []
    for attn in attns:
        use_attention(base, attn)
        entry = {"attn": attn, "shape": "tiny-check", "device": device, "tokens": total}
        pad_to = total + 8 if attn == "flex_attention" else None  # as trained: topped up to a fixed length

        # Ours: the packed row as the trainer builds it, and each example as a row of its own.
        model = attach_lora(base, LoraConfig(r=8, alpha=16, dropout=0.0, target_modules="all-linear"))
        model.train()
        with torch.no_grad(), torch.autocast(device, dtype=torch.bfloat16, enabled=device == "cuda"):
            packed = collate_packed(rows, list(range(len(rows))), tokenizer.pad_token_id, pad_to)
            row_sum, row_n = response_loss_sum(model, packed, device)
            alone = [response_loss_sum(model, collate_packed(rows, [i], tokenizer.pad_token_id), device)
                     for i in range(len(rows))]
            # The control: the same row with attention across examples (no restarting positions) must differ.
            crossing, _ = response_loss_sum(model, {k: v for k, v in packed.items() if k != "position_ids"}, device)
        ours_targets = packed["input_ids"][0, 1:][packed["labels"][0, 1:] != -100].tolist()
        entry["ours"] = {"packed_sum": float(row_sum), "alone_sum": float(sum(a for a, _ in alone)),
                         "packed_tokens": row_n, "alone_tokens": sum(n for _, n in alone),
                         "control_crossing_sum": float(crossing)}
        base = model.unload()

        # TRL: its own collator's packed row (bfd into one bin of max_length) and each example alone.
        with tempfile.TemporaryDirectory(prefix="trl-check-") as out:
            trainer = trl_trainer(base, rows, {"attn": attn, "max_length": total, "dropout": 0.0,
                                               "pad_to_multiple_of": pad_to}, 1, device, out, tokenizer)
            batch = next(iter(trainer.get_train_dataloader()))
            trl_model = trainer.model
            trl_model.train()

            def trl_sum(b, trainer=trainer, trl_model=trl_model):
                b = {k: v.to(device) if hasattr(v, "to") else v for k, v in b.items()}
                targets = b["labels"][:, 1:]
                n = int((targets != -100).sum())
                with torch.no_grad(), torch.autocast(device, dtype=torch.bfloat16, enabled=device == "cuda"):
                    loss = trainer.compute_loss(trl_model, dict(b))
                return float(loss) * n, n, b

            packed_sum, packed_n, b = trl_sum(batch)
            trl_targets = b["input_ids"][0, 1:][b["labels"][0, 1:] != -100].tolist()
            singles = [trl_sum(trainer.data_collator([{"input_ids": r["input_ids"], "labels": r["labels"],
                                                       "seq_lengths": [len(r["input_ids"])]}]))
                       for r in rows]
            entry["trl"] = {"packed_sum": packed_sum, "alone_sum": sum(s for s, _, _ in singles),
                            "packed_tokens": packed_n, "alone_tokens": sum(n for _, n, _ in singles),
                            "examples_in_row": int((b["position_ids"][0] == 0).sum())}
            base = _strip_trl(trl_model)
        entry["same_supervised_tokens"] = sorted(ours_targets) == sorted(trl_targets)
        # float32 on CPU: a correct row matches its examples to about 1e-4 (flex) or 1e-7 (sdpa), while the
        # control, whose attention crosses examples, is about 4e-3 off.
        tolerance = 1e-3
        for side in ("ours", "trl"):
            e = entry[side]
            e["relative_difference"] = abs(e["packed_sum"] - e["alone_sum"]) / max(abs(e["alone_sum"]), 1e-9)
            e["boundaries_kept"] = (e["relative_difference"] < tolerance and e["packed_tokens"] == e["alone_tokens"]
                                    and e["packed_tokens"] > 0)
        control = abs(entry["ours"]["control_crossing_sum"] - entry["ours"]["alone_sum"]) / entry["ours"]["alone_sum"]
        entry["control_detected"] = control >= tolerance  # the check can tell a row whose attention crosses
        entry["passed"] = (entry["same_supervised_tokens"] and entry["ours"]["boundaries_kept"]
                           and entry["trl"]["boundaries_kept"] and entry["control_detected"])
        entry["tolerance"] = tolerance
        results.append(entry)
        print(json.dumps({"check": entry}), flush=True)
    del base
    _reset(device)
    return results


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", choices=sorted(set(SHAPES) - {"tiny-check"}), default="mistral-7b")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--steps", type=int, default=8, help="timed steps per setting (after warm-up)")
    parser.add_argument("--baseline-steps", type=int, default=12, help="timed steps of each baseline")
    parser.add_argument("--baseline-warmup", type=int, default=2)
    parser.add_argument("--examples", type=int, default=6000)
    parser.add_argument("--ours", default="a100-8k,a100-4k,a100-16k,4090-8k,a100-8k-all-ckpt,a100-8k-sdpa",
                        help="comma-separated settings of our trainer to time (see SETTINGS)")
    parser.add_argument("--peers", default="trl-flex,trl-flex-padded,trl-sdpa,trl-flex-liger,trl-sdpa-liger",
                        help="comma-separated TRL settings to time (see PEERS; empty: none)")
    parser.add_argument("--baselines", default="random,grouped", help="padded baselines: random, grouped, or none")
    parser.add_argument("--peer-steps", type=int, default=8, help="timed steps of each TRL setting")
    parser.add_argument("--peer-warmup", type=int, default=3, help="TRL steps before timing (flex compiles in them)")
    parser.add_argument("--check", action="store_true", help="run the packed-row check first (tiny shape)")
    parser.add_argument("--check-only", action="store_true", help="run only the packed-row check")
    parser.add_argument("--check-attn", default="sdpa,flex_attention")
    parser.add_argument("--deadline", type=float, default=None,
                        help="seconds after which settings not yet started are skipped (a GPU call's limit)")
    parser.add_argument("--cache", default=os.path.join(tempfile.gettempdir(), "sweep-bench"))
    parser.add_argument("--out", help="JSON result file")
    parser.add_argument("--markdown", help="write the results table (Markdown) here")
    parser.add_argument("--render", help="only render the Markdown table of an existing JSON result")
    args = parser.parse_args(argv)
    if args.render:
        print(render(json.loads(Path(args.render).read_text())))
        return 0

    import torch

    from sweep.gpus import detect_profile

    started = time.perf_counter()
    device = args.device
    if args.check_only:
        checks = check_packing(device, [a for a in args.check_attn.split(",") if a])
        if args.out:
            Path(args.out).parent.mkdir(parents=True, exist_ok=True)
            Path(args.out).write_text(json.dumps({
                "benchmark": "trainer_throughput packed-row check", "device": device,
                "command": "python bench/trainer_throughput.py --check-only --device " + device,
                "versions": versions(), "checks": checks}, indent=2) + "\n")
        return 0 if all(c["passed"] for c in checks) else 1
    gpu_name = torch.cuda.get_device_name(0) if device == "cuda" else platform.processor() or "cpu"
    total = torch.cuda.get_device_properties(0).total_memory / 2**30 if device == "cuda" else None
    card = detect_profile([(gpu_name, total)]) if device == "cuda" else None
    peak_tflops = card.bf16_tflops if card else None
    attn_fast = "flex_attention" if device == "cuda" else "sdpa"
    settings = {
        "a100-16k": {"profile": "a100", "pack_length": 16384, "attn": attn_fast},
        "a100-8k": {"profile": "a100", "pack_length": 8192, "attn": attn_fast},
        "a100-4k": {"profile": "a100", "pack_length": 4096, "attn": attn_fast},
        "a100-8k-sdpa": {"profile": "a100", "pack_length": 8192, "attn": "sdpa"},
        "a100-8k-all-ckpt": {"profile": "a100", "pack_length": 8192, "attn": attn_fast, "checkpointing": True},
        "4090-8k": {"profile": "4090", "pack_length": 8192, "attn": attn_fast},
        "4090-4k": {"profile": "4090", "pack_length": 4096, "attn": attn_fast},
        "cpu-512": {"profile": None, "pack_length": 512, "attn": "sdpa"},
    }
    rows = make_examples(args.examples, SHAPES[args.shape]["vocab_size"])
    base, load_seconds = build_base(args.shape, device, attn_fast, Path(args.cache))
    result = {
        "benchmark": "trainer_throughput",
        "gpu": gpu_name,
        "gpu_memory_gib": total,
        "peak_bf16_tflops": peak_tflops,
        "shape": args.shape,
        "model": SHAPES[args.shape],
        "lora": {"r": 64, "alpha": 16, "dropout": 0.05, "target_modules": "all-linear"},
        "quantization": "4-bit NF4, double quantization, bf16 compute",
        "lengths": {**LENGTHS, "distribution": "log-normal", "prompt_fraction": PROMPT_FRACTION,
                    "mean_measured": sum(len(r["input_ids"]) for r in rows) / len(rows)},
        "steps": args.steps,
        "versions": versions(),
        "base_load_seconds": load_seconds,
        "peer_note": "flash-attention is not compared: it must be compiled against the installed torch, and the "
                     "GPU machine has no network to fetch a build and no wheel matched its torch 2.11 + CUDA 13.",
        "runs": [],
    }

    def save():
        if args.out:
            Path(args.out).parent.mkdir(parents=True, exist_ok=True)
            Path(args.out).write_text(json.dumps(result, indent=2) + "\n")

    def record(run: Run) -> None:
        run.fits = {p: run.peak_memory_gib is not None and run.peak_memory_gib <= c for p, c in CAPS.items()}
        result["runs"].append(asdict(run))
        print(json.dumps({k: v for k, v in asdict(run).items() if k != "losses"}), flush=True)
        save()

    if args.check:
        result["checks"] = check_packing(device, [a for a in args.check_attn.split(",") if a])
        save()

    def in_time(name: str) -> bool:
        if args.deadline is None or time.perf_counter() - started < args.deadline:
            return True
        result.setdefault("skipped", []).append(name)
        print(f"skipped {name}: past the {args.deadline:.0f} s deadline", flush=True)
        return False

    # Baselines first and the random-order one again after ours: the two show how stable the reference is.
    baselines = [b for b in args.baselines.split(",") if b in ("random", "grouped")]
    for grouped in [b == "grouped" for b in baselines]:
        if in_time("baseline"):
            record(run_baseline(base, rows, grouped, args.baseline_steps, args.baseline_warmup, device, peak_tflops))
    for name in [s for s in args.ours.split(",") if s]:
        s = {"name": name, **settings[name]}
        cap = CAPS.get(s["profile"]) if device == "cuda" else None
        if in_time(name):
            record(run_ours(base, rows, s, args.steps + 1, device, cap, peak_tflops))
    if "random" in baselines and in_time("baseline (repeated)"):
        repeat = run_baseline(base, rows, False, args.baseline_steps, args.baseline_warmup, device, peak_tflops)
        repeat.name += " (repeated after ours)"
        record(repeat)
    # The peer last: Liger's kernels patch the model's modules for good, so its settings come after the rest.
    peers = sorted([p for p in args.peers.split(",") if p], key=lambda p: PEERS[p].get("liger", False))
    if peers:
        from trainer.demo_base import build_tokenizer

        tokenizer = build_tokenizer()  # TRL's `processing_class` reads its pad token; the rows are token ids
        attn_peer = {"flex_attention": attn_fast, "sdpa": "sdpa"}
        for name in peers:
            s = {"name": name, **PEERS[name], "attn": attn_peer[PEERS[name]["attn"]]}
            if s.get("liger") and device != "cuda":
                continue  # Liger's kernels are Triton: GPU only
            if in_time(name):
                run, base = run_trl(base, rows, s, args.peer_steps, args.peer_warmup, device,
                                    CAPS["a100"] if device == "cuda" else None, peak_tflops, tokenizer)
                record(run)
    summarize(result)
    save()
    if args.markdown:
        Path(args.markdown).write_text(render(result) + "\n")
    print(render(result))
    return 0


def summarize(result: dict) -> None:
    """Speedups over the random-order padded baseline, and the best setting within each profile's cap.

    The reference is the faster of the baseline's two measurements (first and
    repeated last), so run-to-run noise never inflates the speedup.
    """
    runs = result["runs"]
    references = [r["tokens_per_second"] for r in runs
                  if r["kind"] == "baseline" and not r["settings"]["grouped"] and r["tokens_per_second"]]
    reference = max(references) if references else None
    result["baseline_tokens_per_second"] = reference
    for r in runs:
        if reference and r["tokens_per_second"]:
            r["speedup"] = r["tokens_per_second"] / reference
    best, peer_best = {}, {}
    for profile, cap in CAPS.items():
        # Ours as planned for the profile; the peer (TRL, run under the a100 cap) wherever its measured peak fits.
        if top := _fastest_within(runs, "ours", cap, profile):
            best[profile] = {"run": top["name"], "tokens_per_second": top["tokens_per_second"],
                             "peak_memory_gib": top["peak_memory_gib"], "speedup": top.get("speedup")}
        if top := _fastest_within(runs, "peer", cap):
            peer_best[profile] = {"run": top["name"], "tokens_per_second": top["tokens_per_second"],
                                  "peak_memory_gib": top["peak_memory_gib"]}
    result["best_within_cap"] = best
    result["peer_best_within_cap"] = peer_best
    result["peer_speedup"] = {p: best[p]["tokens_per_second"] / peer_best[p]["tokens_per_second"]
                              for p in peer_best if p in best}
    # Like for like: ours with every layer checkpointed, as TRL checkpoints them all.
    all_ckpt = [r for r in runs if r["kind"] == "ours" and r["settings"].get("checkpointing") is True
                and r["tokens_per_second"] and r.get("profile") == "a100"]
    if all_ckpt and "a100" in peer_best:
        result["peer_speedup_all_layers_checkpointed"] = (
            max(r["tokens_per_second"] for r in all_ckpt) / peer_best["a100"]["tokens_per_second"])


def _fastest_within(runs: list[dict], kind: str, cap: float, profile: Optional[str] = None) -> Optional[dict]:
    """The fastest run of `kind` whose measured peak fits `cap` (and planned for `profile`, when given)."""
    fitting = [r for r in runs if r["kind"] == kind and r["tokens_per_second"] and r["peak_memory_gib"]
               and r["peak_memory_gib"] <= cap and (profile is None or r.get("profile") == profile)]
    return max(fitting, key=lambda r: r["tokens_per_second"], default=None)


def render(result: dict) -> str:
    lines = [
        f"Trainer throughput, {result['shape']} shape, 4-bit NF4 + LoRA r=64 (all linear), on {result['gpu']} "
        f"({', '.join(f'{k} {v}' for k, v in result['versions'].items())}). "
        f"Lengths: log-normal, median {result['lengths']['median']}, measured mean "
        f"{result['lengths']['mean_measured']:.0f}, capped at {result['lengths']['max']}. "
        "Real (non-pad) tokens per second; speedup over the random-order padded baseline (the faster of its "
        "two measurements).",
        "",
        "| setting | profile cap | attention | packed row | checkpointed layers | real tok/s | speedup | "
        "peak GiB | planner estimate GiB | MFU | note |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in result["runs"]:
        s = r["settings"]
        cap = CAPS.get(r.get("profile") or "", None)
        if r["kind"] == "peer":
            cap = CAPS["a100"]
            extras = [("Liger kernels" if s.get("liger") else ""),
                      ("rows padded to max_length" if s.get("pad_to_multiple_of") else ""),
                      (f"LoRA {s['lora_dtype'].replace('torch.', '')}" if s.get("lora_dtype") else "")]
            note = ", ".join(e for e in extras if e)
            r = {**r, "error": "; ".join(e for e in (note, r.get("error")) if e)}
        lines.append("| " + " | ".join([
            (f"TRL SFTTrainer: {r['name']}" if r["kind"] == "peer" else r["name"]),
            (f"a100 ({cap} GiB)" if r["kind"] == "peer" else f"{r['profile']} ({cap} GiB)") if cap else "-",
            s.get("attn", ""),
            str(s.get("pack_length", s.get("max_length", "-"))),
            "all" if r["kind"] in ("baseline", "peer") else str(r.get("checkpointed_layers")),
            _f(r.get("tokens_per_second"), "{:,.0f}"),
            _f(r.get("speedup"), "{:.2f}x"),
            _f(r.get("peak_memory_gib"), "{:.1f}"),
            _f(r.get("estimated_peak_gib"), "{:.1f}"),
            _f(r.get("mfu"), "{:.1%}"),
            (r.get("error") or "")[:120],
        ]) + " |")
    best = result.get("best_within_cap") or {}
    if best:
        lines.append("")
        for profile, b in best.items():
            lines.append(f"Best within the {profile} cap ({CAPS[profile]} GiB): {b['run']}, "
                         f"{b['tokens_per_second']:,.0f} real tok/s, {b['peak_memory_gib']:.1f} GiB"
                         + (f", {b['speedup']:.2f}x the padded baseline." if b.get("speedup") else "."))
    peers = result.get("peer_best_within_cap") or {}
    for profile, b in peers.items():
        ratio = (result.get("peer_speedup") or {}).get(profile)
        lines.append(f"Best TRL setting within the {profile} cap: {b['run']}, "
                     f"{b['tokens_per_second']:,.0f} real tok/s, {b['peak_memory_gib']:.1f} GiB"
                     + (f"; ours is **{ratio:.2f}x** it." if ratio else "."))
    if result.get("peer_speedup_all_layers_checkpointed"):
        lines.append("Like for like (ours with every layer checkpointed, as TRL does, against TRL's best within the "
                     f"a100 cap): {result['peer_speedup_all_layers_checkpointed']:.2f}x.")
    if result.get("skipped"):
        lines.append(f"Not run (past the call's deadline): {', '.join(result['skipped'])}.")
    return "\n".join(lines)


def versions(*names: str) -> dict:
    """The installed release of each of `names` (those installed), for a benchmark's JSON."""
    import importlib.metadata as md

    out = {}
    for name in names or TRAINER_PACKAGES:
        with contextlib.suppress(md.PackageNotFoundError):
            out[name] = md.version(name)
    return out


def _f(value, fmt: str) -> str:
    return "" if value is None else fmt.format(value)


if __name__ == "__main__":
    sys.exit(main())
