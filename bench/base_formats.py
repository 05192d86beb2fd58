"""Base formats a sweep can search (`trainer.mode`, `model.quant_type`): what each costs and what fits a profile.

A Mistral-7B-shaped model with random weights (speed and memory do not depend on weight values) is saved once
as a bf16 checkpoint, then, in one process on one GPU, loaded in each format through the path trials use
(`trainer.model.load_base_model`), each load replacing the last as a slot's resident base is swapped:

- `nf4`: QLoRA's 4-bit NF4 with double quantization (mode qlora, the default);
- `int8`: bitsandbytes' LLM.int8() (mode qlora, `model.quant_type: int8`);
- `16-bit`: the bf16 base (mode lora).

For each, LoRA r=64 on every linear layer trains a few steps of packed rows through `trainer.train.train`
under a GPU profile's memory cap (enforced with `set_per_process_memory_fraction`): 8192-token rows on the
RTX 4090's 23.55 GiB with checkpointing off and planned (`auto`), and on the A100's 39.35 GiB planned. A run
that runs out of memory under the cap is what a trial of that setting records as infeasible. It reports the
load (swap) seconds, the base's allocated memory, tokens per second and the peak, or the error.

    python bench/base_formats.py --out bench/results/base_formats-h200.json
    python bench/base_formats.py --shape tiny --device cpu --steps 2 --out /tmp/b.json  # smoke test
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.trainer_throughput import SHAPES, make_examples  # noqa: E402
from trainer.config import LoraConfig, ModelConfig, TrainConfig  # noqa: E402

FORMATS = (("nf4", "qlora", "nf4"), ("int8", "qlora", "int8"), ("16-bit", "lora", "nf4"))
"""(label, trainer.mode, model.quant_type)."""
SETTINGS = (
    # Uncapped, to set the measured peak beside the planner's estimate (`trainer.train.memory_model`).
    {"profile": None, "cap_gib": None, "pack_length": 4096, "checkpointing": False},
    {"profile": None, "cap_gib": None, "pack_length": 4096, "checkpointing": True},
    {"profile": "4090", "cap_gib": 23.55, "pack_length": 8192, "checkpointing": False},
    {"profile": "4090", "cap_gib": 23.55, "pack_length": 8192, "checkpointing": "auto"},
    {"profile": "a100", "cap_gib": 39.35, "pack_length": 8192, "checkpointing": "auto"},
)


def save_random_base(shape: str, cache: Path, device: str) -> Path:
    import torch
    from transformers import AutoModelForCausalLM, MistralConfig

    path = cache / f"random-{shape}"
    if not (path / "config.json").exists():
        config = MistralConfig(**SHAPES[shape], sliding_window=None, tie_word_embeddings=False)
        torch.manual_seed(0)
        with torch.device(device):  # a GPU initialises 7B random weights in seconds, a CPU in minutes
            model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
        model.save_pretrained(path, max_shard_size="2GB")
        del model
        gc.collect()
    return path


def _reset(device: str) -> None:
    import torch

    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def _set_cap(device: str, cap_gib) -> None:
    import torch

    if device != "cuda":
        return
    total = torch.cuda.get_device_properties(0).total_memory / 2**30
    torch.cuda.set_per_process_memory_fraction(min(1.0, (cap_gib or total) / total), 0)


def train_once(base, rows, setting: dict, steps: int, device: str) -> dict:
    import torch

    from trainer.model import attach_lora, detach_lora
    from trainer.train import memory_model, train

    lora = LoraConfig(r=64, alpha=16, dropout=0.05, target_modules="all-linear")
    model = attach_lora(base, lora)
    estimate = None
    if device == "cuda":
        estimate = memory_model(model, setting["pack_length"], torch.cuda.memory_allocated())
    config = TrainConfig(learning_rate=1e-4, max_steps=steps, packing=True, pack_length=setting["pack_length"],
                         gradient_checkpointing=setting["checkpointing"], warmup_fraction=0.0, lora=lora)
    cap = setting["cap_gib"] if device == "cuda" else None
    out = dict(setting)
    _set_cap(device, cap)
    _reset(device)
    try:
        result = train(model, SimpleNamespace(pad_token_id=0), rows, config, seed=0, memory_budget_gib=cap)
        out.update(tokens_per_second=round(result.tokens_per_second, 1), steps=result.steps,
                   peak_memory_gib=None if result.peak_memory_gib is None else round(result.peak_memory_gib, 2),
                   checkpointed_layers=result.checkpointed_layers, fits=True)
        if estimate is not None:
            out["estimated_peak_gib"] = round(estimate.peak(result.checkpointed_layers) / 2**30, 2)
    except Exception as e:  # noqa: BLE001 - a setting that does not fit is a result
        out.update(fits=False, error=f"{type(e).__name__}: {str(e).splitlines()[0][:300]}")
    finally:
        _set_cap(device, None)
        detach_lora(model)
        del model
        _reset(device)
    return out


def main(argv=None) -> int:
    import torch

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", choices=sorted(SHAPES), default="mistral-7b")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--cache", default=os.path.join(tempfile.gettempdir(), "sweep-bench"))
    parser.add_argument("--out", required=True)
    args = parser.parse_args(argv)
    from trainer.model import base_label, describe_base, load_base_model

    path = save_random_base(args.shape, Path(args.cache), args.device)
    rows = make_examples(600, SHAPES[args.shape]["vocab_size"])
    result = {
        "benchmark": "base_formats", "shape": args.shape, "device": args.device,
        "card": torch.cuda.get_device_name(0) if args.device == "cuda" else platform.processor() or "cpu",
        "torch": torch.__version__, "steps": args.steps, "formats": [],
    }
    base = None
    for label, mode, quant in FORMATS:
        model_config = ModelConfig(name_or_path=str(path), quant_type=quant, attn_implementation="sdpa")
        del base
        _reset(args.device)
        started = time.perf_counter()
        base = load_base_model(model_config, args.device, mode=mode)  # the slot's swap: drop, then load
        seconds = time.perf_counter() - started
        allocated = torch.cuda.memory_allocated() / 2**30 if args.device == "cuda" else None
        entry = {"format": label, "base": base_label(describe_base(model_config, mode, args.device)),
                 "mode": mode, "load_seconds": round(seconds, 2),
                 "base_allocated_gib": None if allocated is None else round(allocated, 2), "runs": []}
        for setting in SETTINGS:
            entry["runs"].append(train_once(base, rows, setting, args.steps, args.device))
            print(json.dumps({"format": label, **entry["runs"][-1]}), flush=True)
        result["formats"].append(entry)
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
