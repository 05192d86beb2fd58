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
    enforced with `torch.cuda.set_per_process_memory_fraction`.

Tokens per second count real tokens only (no padding), timed after warm-up
steps. MFU counts 4 x frozen matmul parameters + 6 x LoRA parameters FLOPs
per token against the card's dense bf16 peak. Writes JSON (`--out`) and, with
`--markdown`, the table for docs/benchmarks.md.

    python bench/trainer_throughput.py --out bench/results/trainer_throughput-h100.json
    python bench/trainer_throughput.py --render bench/results/trainer_throughput-h100.json  # the table only
    python bench/trainer_throughput.py --shape tiny --device cpu --steps 2 --out /tmp/t.json  # smoke test
"""

from __future__ import annotations

import argparse
import gc
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
        num_key_value_heads=2, vocab_size=512, max_position_embeddings=4096, rope_theta=10000.0,
    ),
}
LENGTHS = {"median": 326, "sigma": 0.68, "min": 16, "max": 2048}
PROMPT_FRACTION = 0.4
CAPS = {"a100": 39.35, "4090": 23.55}


@dataclass
class Run:
    name: str
    kind: str  # "baseline" or "ours"
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

    path = cache / f"random-{shape}"
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


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", choices=sorted(SHAPES), default="mistral-7b")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--steps", type=int, default=8, help="timed steps per setting (after warm-up)")
    parser.add_argument("--baseline-steps", type=int, default=12, help="timed steps of each baseline")
    parser.add_argument("--baseline-warmup", type=int, default=2)
    parser.add_argument("--examples", type=int, default=6000)
    parser.add_argument("--ours", default="a100-8k,a100-4k,a100-16k,4090-8k,a100-8k-all-ckpt,a100-8k-sdpa",
                        help="comma-separated settings of our trainer to time (see SETTINGS)")
    parser.add_argument("--cache", default=os.path.join(tempfile.gettempdir(), "sweep-bench"))
    parser.add_argument("--out", help="JSON result file")
    parser.add_argument("--markdown", help="write the results table (Markdown) here")
    parser.add_argument("--render", help="only render the Markdown table of an existing JSON result")
    args = parser.parse_args(argv)
    if args.render:
        print(render(json.loads(Path(args.render).read_text())))
        return 0

    import torch
    import transformers

    from sweep.gpus import detect_profile

    device = args.device
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
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__},
        "base_load_seconds": load_seconds,
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

    # Baselines first and the random-order one again at the end: the two show how stable the reference is.
    for grouped in (False, True):
        record(run_baseline(base, rows, grouped, args.baseline_steps, args.baseline_warmup, device, peak_tflops))
    for name in [s for s in args.ours.split(",") if s]:
        s = {"name": name, **settings[name]}
        cap = CAPS.get(s["profile"]) if device == "cuda" else None
        record(run_ours(base, rows, s, args.steps + 1, device, cap, peak_tflops))
    repeat = run_baseline(base, rows, False, args.baseline_steps, args.baseline_warmup, device, peak_tflops)
    repeat.name += " (repeated last)"
    record(repeat)
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
    best = {}
    for profile, cap in CAPS.items():
        fitting = [r for r in runs if r["kind"] == "ours" and r["tokens_per_second"] and r["peak_memory_gib"]
                   and r["peak_memory_gib"] <= cap and r.get("profile") == profile]
        if fitting:
            top = max(fitting, key=lambda r: r["tokens_per_second"])
            best[profile] = {"run": top["name"], "tokens_per_second": top["tokens_per_second"],
                             "peak_memory_gib": top["peak_memory_gib"], "speedup": top.get("speedup")}
    result["best_within_cap"] = best


def render(result: dict) -> str:
    lines = [
        f"Trainer throughput, {result['shape']} shape, 4-bit NF4 + LoRA r=64 (all linear), on {result['gpu']} "
        f"(torch {result['versions']['torch']}, transformers {result['versions']['transformers']}). "
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
        lines.append("| " + " | ".join([
            r["name"],
            f"{r['profile']} ({cap} GiB)" if cap else "-",
            s.get("attn", ""),
            str(s.get("pack_length", "-")),
            "all" if r["kind"] == "baseline" else str(r.get("checkpointed_layers")),
            _f(r.get("tokens_per_second"), "{:,.0f}"),
            _f(r.get("speedup"), "{:.2f}x"),
            _f(r.get("peak_memory_gib"), "{:.1f}"),
            _f(r.get("estimated_peak_gib"), "{:.1f}"),
            _f(r.get("mfu"), "{:.1%}"),
            (r.get("error") or "")[:80],
        ]) + " |")
    best = result.get("best_within_cap") or {}
    if best:
        lines.append("")
        for profile, b in best.items():
            lines.append(f"Best within the {profile} cap ({CAPS[profile]} GiB): {b['run']}, "
                         f"{b['tokens_per_second']:,.0f} real tok/s, {b['peak_memory_gib']:.1f} GiB"
                         + (f", {b['speedup']:.2f}x the padded baseline." if b.get("speedup") else "."))
    return "\n".join(lines)


def _f(value, fmt: str) -> str:
    return "" if value is None else fmt.format(value)


if __name__ == "__main__":
    sys.exit(main())
