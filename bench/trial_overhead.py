"""Trial overhead: the time from the end of one trial to the first training step of the next, and the busy fraction.

Runs the same short sweep twice through Ray, with the 4-bit base resident in
each slot and with a fresh load per trial, and reads the workers' timelines
(`sweep status`'s `timeline`: `started`, `first_step`, `finished` per trial):

- gap: next trial's first training step - previous trial's end, on the same
  slot (the driver's turnaround, data preparation, loading the base when it
  is not resident, attaching the adapter, the first step's own time);
- busy fraction: the time workers spent inside trials / (wall time of the
  trials x slots), the wall time running from the first trial's start to the
  last one's end.

    python bench/trial_overhead.py                       # CPU, the demo model
    python bench/trial_overhead.py --gpu h100 --shape mistral-7b --trials 6 --steps 50
    python bench/trial_overhead.py --gpu h200 --shape mistral-7b --trials 3 --steps 30 \\
        --set trainer.pack_length=8192 --set data.num_examples=12000 --project-steps 200   # the config's rows

`--project-steps N` adds the busy fraction a trial of N training steps would
have with the measured gaps and scoring times (training time scaled from the
measured one): what a sweep of the config's full proxy would see.

`--shape mistral-7b` builds a Mistral-7B-shaped model with random weights
from its config (nothing from the hub; 14 GB written to --model-dir once) and
uses the demo tokenizer; the evaluation is the demo's micro-suite.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

MISTRAL_7B = dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                  num_key_value_heads=8, vocab_size=32000, max_position_embeddings=4096)


def build_mistral_shape(out: Path) -> Path:
    """A Mistral-7B-shaped model with random weights (bf16) and the demo tokenizer, saved once to `out`."""
    if (out / "config.json").exists():
        return out
    import torch
    from transformers import MistralConfig, MistralForCausalLM

    from trainer.config import ModelConfig
    from trainer.demo_base import DEMO_MODEL_ID, resolve_model_path
    from trainer.model import load_tokenizer

    torch.manual_seed(0)
    # Built in bf16 (14 GB, not 28) and on the GPU when there is one: random init of 7B weights on a CPU takes minutes.
    device = "cuda" if torch.cuda.is_available() else "cpu"
    default_dtype = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device(device):
            model = MistralForCausalLM(MistralConfig(**MISTRAL_7B))
    finally:
        torch.set_default_dtype(default_dtype)
    model.save_pretrained(out)
    load_tokenizer(ModelConfig(name_or_path=DEMO_MODEL_ID)).save_pretrained(out)
    del model
    print(f"built {out} (demo tokenizer from {resolve_model_path(DEMO_MODEL_ID)})", flush=True)
    return out


def measure(mode: str, args, model_path: str, work: Path, profile) -> dict:
    from sweep.config import load_config
    from sweep.driver import run_sweep
    from sweep.store import Store

    overrides = [
        f"trainer.max_steps={args.steps}", "study.pruner=none", f"study.seed={args.seed}",
        f"orchestration.resident_base={'true' if mode == 'resident' else 'false'}",
        f"orchestration.concurrency={args.slots}", f"orchestration.artifacts_dir={work / 'runs'}",
        f"model.name_or_path={model_path}", *args.set,
    ]
    config = load_config(None, overrides)
    work.mkdir(parents=True, exist_ok=True)
    storage = f"sqlite:///{work / 'studies.db'}"
    run_sweep(config, storage_url=storage, study_name=mode, n_trials=args.trials, profile=profile)
    records = sorted(Store(storage).trials(mode).values(), key=lambda r: r.trial_number)
    timelines = [r.timeline for r in records if r.state == "COMPLETE" and r.timeline]
    if len(timelines) < 2:
        raise SystemExit(f"{mode}: fewer than 2 trials completed; see {work / 'runs'}")
    gaps = []
    for slot in {t["slot"] for t in timelines}:
        mine = sorted((t for t in timelines if t["slot"] == slot), key=lambda t: t["started"])
        gaps += [b["first_step"] - a["finished"] for a, b in zip(mine, mine[1:], strict=False)]
    wall = max(t["finished"] for t in timelines) - min(t["started"] for t in timelines)
    busy = sum(t["finished"] - t["started"] for t in timelines)
    return {
        "trials": len(timelines),
        "gaps_s": [round(g, 3) for g in gaps],
        "mean_gap_s": round(statistics.mean(gaps), 3),
        "base_loads": sum(1 for r in records if r.base_load_seconds is not None),
        "mean_base_load_s": round(statistics.mean([r.base_load_seconds for r in records if r.base_load_seconds]
                                                   or [0.0]), 3),
        "mean_train_s": round(statistics.mean(r.train_seconds for r in records if r.state == "COMPLETE"), 3),
        "mean_eval_s": round(statistics.mean(r.eval_seconds for r in records if r.state == "COMPLETE"), 3),
        "wall_s": round(wall, 3),
        "busy_fraction": round(busy / (wall * args.slots), 4),
        **_projection(records, gaps, args),
    }


def _projection(records, gaps, args) -> dict:
    """The busy fraction of a sweep whose trials train `--project-steps` steps, the gaps as measured."""
    if not args.project_steps:
        return {}
    done = [r for r in records if r.state == "COMPLETE"]
    trial = statistics.mean(r.train_seconds * args.project_steps / args.steps + r.eval_seconds for r in done)
    gap = statistics.mean(gaps)
    return {"projected_steps": args.project_steps, "projected_trial_s": round(trial, 3),
            "projected_busy_fraction": round(trial / (trial + gap), 4)}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--gpu", default="cpu", help="GPU profile (cpu, a100, 4090, h100, ...)")
    parser.add_argument("--shape", choices=["demo", "mistral-7b"], default="demo")
    parser.add_argument("--model-dir", default=str(Path(tempfile.gettempdir()) / "sweep-mistral-7b-random"))
    parser.add_argument("--trials", type=int, default=5)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--slots", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--modes", default="resident,reload", help="comma-separated, in this order")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="config override for every trial (as `sweep start --set`)")
    parser.add_argument("--project-steps", type=int, default=0,
                        help="also project the busy fraction at this many training steps per trial")
    parser.add_argument("--out", help="JSON file (default: bench/results/trial_overhead-<gpu>.json)")
    args = parser.parse_args(argv)
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from sweep.gpus import resolve_profile
    from trainer.demo_base import DEMO_MODEL_ID

    profile = resolve_profile(args.gpu, local_check=True)
    model_path = DEMO_MODEL_ID if args.shape == "demo" else str(build_mistral_shape(Path(args.model_dir)))
    results = {}
    with tempfile.TemporaryDirectory(prefix="trial-overhead-") as tmp:
        for mode in args.modes.split(","):
            started = time.perf_counter()
            results[mode] = measure(mode, args, model_path, Path(tmp) / mode, profile)
            print(f"{mode}: {json.dumps(results[mode])} ({time.perf_counter() - started:.0f}s)", flush=True)
    import torch

    report = {
        "benchmark": "trial_overhead",
        "command": f"python bench/trial_overhead.py --gpu {args.gpu} --shape {args.shape} --trials {args.trials} "
                   f"--steps {args.steps} --slots {args.slots}"
                   + "".join(f" --set {o}" for o in args.set)
                   + (f" --project-steps {args.project_steps}" if args.project_steps else ""),
        "profile": profile.name,
        "device": torch.cuda.get_device_name(0) if profile.uses_gpu else f"cpu ({os.cpu_count()} cores)",
        "shape": args.shape,
        "trials_per_mode": args.trials,
        "steps_per_trial": args.steps,
        "slots": args.slots,
        "overrides": args.set,
        "modes": results,
    }
    if {"resident", "reload"} <= set(results):
        report["gap_saved_s"] = round(results["reload"]["mean_gap_s"] - results["resident"]["mean_gap_s"], 3)
    out = Path(args.out or Path(__file__).parent / "results" / f"trial_overhead-{profile.name}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
