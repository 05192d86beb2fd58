"""Evaluation cost per trial: the default suites' scoring as a share of a trial's time, on a GPU.

The real suites (configs/suites/open.yaml and heldout.yaml) need datasets
from the hub, which this machine may not reach. So each task is stood in for by
a local lm-eval task of the same shape: the same output type, the same number
of documents (the suites' `limit`s), the same number of choices, and prompts
and answers of about the same length in tokens. The lengths are estimates for
a Llama-2/Mistral tokenizer, listed in `SHAPES`. The model is a Mistral-7B
shape with random weights, in 4-bit NF4 with a LoRA r=64 adapter, scored
through `evaluator.harness.evaluate` as a trial does. Random weights never
stop early, so every generation runs to `max_new_tokens`: the worst case.

The trial's training time is the proxy run of configs/mistral-7b-a100.yaml
(`max_steps` x `pack_length` tokens) at the tokens/s measured by
bench/trainer_throughput.py on the same card (its JSON).

The peer (`--peer FRACTION`) is plain lm-eval as a user would run it: its
Hugging Face backend (`HFLM`, stock) and `simple_evaluate`, through
`evaluate(..., fast_path=False)`, on the very same in-memory 4-bit + LoRA model
(so both sides' adapters are the same weights), the same task files, limits
and generation settings, with a fixed batch size (`--peer-batch-size`; lm-eval's
`auto` sizes itself from the model's maximum length). Both sides score the
first FRACTION of each task's documents, task by task; the generated tokens of
each side are counted (lm-eval stops at the end-of-sequence token, which random
weights can emit), so generation compares in tokens/s too.

    python bench/eval_throughput.py --probe --repeat 3 --train-json bench/results/trainer_throughput-h100.json \\
        --out bench/results/eval_throughput-h100.json
    python bench/eval_throughput.py --first-call --repeat 2 --peer 0.25 \\
        --train-json bench/results/trainer_throughput-h200.json \\
        --out bench/results/eval_throughput-h200.json   # against plain lm-eval; first pass as a trial's first
    python bench/eval_throughput.py --shape tiny --device cpu --scale 0.02 --out /tmp/e.json   # smoke test
"""

from __future__ import annotations

import argparse
import contextlib
import cProfile
import dataclasses
import functools
import json
import logging
import math
import pstats
import random
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

# name: (suite, output type, documents, choices, prompt tokens, answer tokens)
# One answer token: the choices are single letters or words (mmlu's "A".."D", ethics' "no"/"yes"), which
# lm-eval scores with one forward pass per document; longer answers cost one pass per choice.
SHAPES = {
    "mmlu": ("open", "multiple_choice", 57 * 20, 4, 120, 1),
    "truthfulqa_mc1": ("open", "multiple_choice", 400, 6, 280, 12),
    "bbq": ("open", "multiple_choice", 500, 3, 100, 4),
    "gsm8k": ("open", "generate_until", 200, 0, 800, 0),
    "cnn_dailymail_abisee": ("open", "generate_until", 100, 0, 900, 0),
    "bigbench_anachronisms": ("open", "multiple_choice", 200, 2, 40, 2),
    "bigbench_analogical_similarity": ("open", "multiple_choice", 200, 7, 150, 6),
    "ethics_x5": ("heldout", "multiple_choice", 5 * 300, 2, 60, 1),
    "hendrycks_math": ("heldout", "generate_until", 7 * 30, 0, 120, 0),
}
# Generation lengths the suites set per task (configs/suites/open.yaml); others use --max-new-tokens.
MAX_NEW_TOKENS = {"gsm8k": 192, "cnn_dailymail_abisee": 128}
WORDS = ("the quick brown fox jumps over lazy dog river stone market school report budget city "
         "people answer question number value because after before during while simple example").split()


def _text(rng: random.Random, tokens: int, tokens_per_word: float) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(max(1, round(tokens / tokens_per_word))))


def write_tasks(task_dir: Path, tokenizer, scale: float, max_new_tokens: int) -> dict[str, int]:
    """Writes one local lm-eval task per shape; returns the documents of each."""
    import yaml

    sample = " ".join(WORDS)
    tokens_per_word = len(tokenizer(sample, add_special_tokens=False)["input_ids"]) / len(WORDS)
    rng = random.Random(0)
    counts = {}
    (task_dir / "data").mkdir(parents=True, exist_ok=True)
    for name, (_, kind, docs, choices, prompt, answer) in SHAPES.items():
        n = max(1, round(docs * scale))
        counts[name] = n
        rows = []
        for _ in range(n):
            row = {"prompt": _text(rng, prompt, tokens_per_word)}
            if kind == "multiple_choice" and answer == 1:
                row["choices"] = [" " + "ABCDEFG"[i] for i in range(choices)]
                row["answer"] = rng.randrange(choices)
            elif kind == "multiple_choice":
                row["choices"] = [" " + _text(rng, answer, tokens_per_word) for _ in range(choices)]
                row["answer"] = rng.randrange(choices)
            else:
                row["target"] = "42"
            rows.append(row)
        data = (task_dir / "data" / f"{name}.jsonl").resolve()
        data.write_text("".join(json.dumps(r) + "\n" for r in rows))
        spec = {
            "task": f"bench_{name}", "dataset_path": "json",
            "dataset_kwargs": {"data_files": {"test": str(data)}}, "test_split": "test",
            "output_type": kind, "doc_to_text": "{{prompt}}", "metadata": {"version": 1.0},
        }
        if kind == "multiple_choice":
            spec.update({"doc_to_choice": "{{choices}}", "doc_to_target": "answer", "target_delimiter": "",
                         "metric_list": [{"metric": "acc", "aggregation": "mean", "higher_is_better": True}]})
        else:
            # No stop sequence a random model could hit: generation runs to max_new_tokens (the worst case).
            spec.update({"doc_to_target": "target", "generation_kwargs": {
                "until": ["<never>"], "do_sample": False, "max_gen_toks": MAX_NEW_TOKENS.get(name, max_new_tokens)},
                "metric_list": [{"metric": "exact_match", "aggregation": "mean", "higher_is_better": True}]})
        (task_dir / f"bench_{name}.yaml").write_text(yaml.safe_dump(spec, sort_keys=False))
    return counts


def probe(model, device: str, vocab: int, batch: int = 32, prompt: int = 800) -> dict:
    """Milliseconds per decode step: transformers' `generate` on the 4-bit model and on the dense merged copy,
    and this project's decode loop (`evaluator.decode`) on the dense copy.

    Random token ids, `prompt`-token prompts (the gsm8k shape), `batch` at a time;
    a step is the difference between 65 and 1 new tokens, over 64.
    """
    import contextlib

    import torch

    from evaluator.decode import greedy_generate
    from evaluator.fast import dense_base

    def timed(fn) -> float:
        torch.cuda.synchronize() if device == "cuda" else None
        start = time.perf_counter()
        with torch.no_grad():
            fn()
        torch.cuda.synchronize() if device == "cuda" else None
        return time.perf_counter() - start

    ids = torch.randint(100, vocab, (batch, prompt), generator=torch.Generator().manual_seed(0)).to(device)
    mask = torch.ones_like(ids)

    def hf(new):
        model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new, min_new_tokens=new, do_sample=False,
                       use_cache=True, pad_token_id=0)

    def ours(new):
        greedy_generate(model, ids, mask, new)

    out = {"batch": batch, "prompt_tokens": prompt}
    for name, context, fn in (("generate_4bit", contextlib.nullcontext, hf), ("generate_dense", dense_base, hf),
                              ("sweep_decode_dense", dense_base, ours)):
        with context(model) if context is dense_base else context():
            fn(4)  # warm-up
            ones = [timed(functools.partial(fn, 1)) for _ in range(2)]
            manys = [timed(functools.partial(fn, 65)) for _ in range(2)]
        one, many = min(ones), min(manys)
        out[name] = {"prefill_seconds": one, "step_ms": (many - one) / 64 * 1000, "calls_seconds": ones + manys}
        print(json.dumps({name: out[name]}), flush=True)
    return out


@contextlib.contextmanager
def counting_generation(tokenizer):
    """Counts the tokens lm-eval's `HFLM.generate_until` returns (both sides end there: SweepLM decodes
    through it, one call per set of generation settings)."""
    from lm_eval.models.huggingface import HFLM

    counts = {"requests": 0, "tokens": 0}
    original = HFLM.generate_until

    def generate_until(self, requests, *args, **kwargs):
        answers = original(self, requests, *args, **kwargs)
        counts["requests"] += len(answers)
        counts["tokens"] += sum(len(tokenizer(a, add_special_tokens=False)["input_ids"]) for a in answers)
        return answers

    HFLM.generate_until = generate_until
    try:
        yield counts
    finally:
        HFLM.generate_until = original


def compare_with_plain(model, tokenizer, tasks: dict, task_dir, counts: dict, fraction: float, batch_size: int,
                       peer_batch_size: int, generation, dequantize, memory_cap_gib, fuse, save, result) -> dict:
    """Ours and plain lm-eval task by task on the first `fraction` of each task's documents: seconds, generated
    tokens, scores and their standard errors. Ours also in one call over all tasks, as a trial scores."""
    from evaluator.harness import evaluate

    limited = {name: dataclasses.replace(t, limit=max(1, round(counts[name] * fraction))) for name, t in tasks.items()}
    out = result.setdefault("peer", {"name": "lm-eval HFLM + simple_evaluate (evaluate(fast_path=False))",
                                     "fraction": fraction, "peer_batch_size": peer_batch_size, "tasks": {}})
    for name, task in limited.items():
        row = {"documents": task.limit, "output_type": SHAPES[name][1]}
        for side, kwargs in (("ours", {"batch_size": batch_size, "dequantize": dequantize, "fuse_kernels": fuse,
                                       "memory_budget_gib": memory_cap_gib}),
                             ("plain", {"batch_size": peer_batch_size, "fast_path": False})):
            with counting_generation(tokenizer) as generated:
                evaluated = evaluate(model, tokenizer, [task], task_dir, generation=generation, **kwargs)
            row[side] = {"seconds": evaluated.eval_seconds, "score": evaluated.scores[task.name],
                         "stderr": evaluated.stderrs.get(task.name), "fast_path": evaluated.fast_path,
                         "generated_tokens": generated["tokens"], "generated_requests": generated["requests"]}
            if generated["tokens"]:
                row[side]["generated_tokens_per_second"] = generated["tokens"] / evaluated.eval_seconds
        row["speedup"] = row["plain"]["seconds"] / row["ours"]["seconds"]
        # Same model, same documents: the scores differ only by numerics (the dense copy, fused kernels,
        # greedy ties). Tolerance: two standard errors of plain's score (0 where every document agrees).
        diff = abs(row["ours"]["score"] - row["plain"]["score"])
        row["score_diff"] = diff
        row["scores_agree"] = diff <= 2 * (row["plain"]["stderr"] or 0) + 1e-9
        out["tasks"][name] = row
        print(json.dumps({f"peer {name}": row}), flush=True)
        save()
    with counting_generation(tokenizer) as generated:
        evaluated = evaluate(model, tokenizer, list(limited.values()), task_dir, batch_size, generation,
                             dequantize=dequantize, memory_budget_gib=memory_cap_gib, fuse_kernels=fuse)
    rows = out["tasks"].values()
    out.update({
        "ours_seconds": sum(r["ours"]["seconds"] for r in rows),
        "plain_seconds": sum(r["plain"]["seconds"] for r in rows),
        "ours_one_call_seconds": evaluated.eval_seconds,
        "ours_one_call_generated_tokens": generated["tokens"],
        "ours_generated_tokens": sum(r["ours"]["generated_tokens"] for r in rows),
        "plain_generated_tokens": sum(r["plain"]["generated_tokens"] for r in rows),
        "scores_agree": all(r["scores_agree"] for r in rows),
        "tolerance": "per task: |ours - plain| <= 2 standard errors of plain's score",
    })
    out["peer_speedup"] = out["plain_seconds"] / out["ours_seconds"]
    out["peer_speedup_one_call"] = out["plain_seconds"] / out["ours_one_call_seconds"]
    for kind in ("generate_until", "multiple_choice"):
        part = [r for r in rows if r["output_type"] == kind]
        if part:
            out[f"peer_speedup_{kind}"] = sum(r["plain"]["seconds"] for r in part) / sum(
                r["ours"]["seconds"] for r in part)
    save()
    return out


def _print_profile(profiler, cumulative: int, tottime: int) -> None:
    """Stops `profiler` (if any) and prints its top functions by cumulative and by own time."""
    if profiler:
        profiler.disable()
        stats = pstats.Stats(profiler)
        stats.sort_stats("cumulative").print_stats(cumulative)
        stats.sort_stats("tottime").print_stats(tottime)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", default="mistral-7b")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--batch-size", type=int, default=32,
                        help="evaluator.batch_size (log-likelihood), as in configs/mistral-7b-a100.yaml")
    parser.add_argument("--gen-batch-size", default="auto", help="evaluator.generation.batch_size")
    parser.add_argument("--dequantize", default="auto", choices=("auto", "true", "false"),
                        help="evaluator.dequantize")
    parser.add_argument("--memory-cap-gib", type=float, default=39.35,
                        help="the GPU profile's memory cap (default: a100's, the config's profile)")
    parser.add_argument("--fuse-kernels", default="auto", choices=("auto", "true", "false"),
                        help="evaluator.fuse_kernels")
    parser.add_argument("--repeat", type=int, default=1,
                        help="passes over the tasks in one process: the first task by task, later ones in one call "
                             "as a trial does, without the process's one-time costs")
    parser.add_argument("--max-new-tokens", type=int, default=256, help="the config's generation.max_new_tokens")
    parser.add_argument("--scale", type=float, default=1.0, help="fraction of each task's documents (smoke tests)")
    parser.add_argument("--train-json", help="bench/trainer_throughput.py result of the same card")
    parser.add_argument("--train-steps", type=int, default=200, help="the trial's max_steps")
    parser.add_argument("--pack-length", type=int, default=8192)
    parser.add_argument("--probe", action="store_true", help="also time decode steps of each scoring variant")
    parser.add_argument("--first-call", action="store_true",
                        help="score the first pass in one call, as a worker's first trial does (default: task by "
                             "task, for per-task times)")
    parser.add_argument("--peer", type=float, default=0.0, metavar="FRACTION",
                        help="also compare with plain lm-eval on this fraction of each task's documents")
    parser.add_argument("--peer-batch-size", type=int, default=32, help="plain lm-eval's fixed batch size")
    parser.add_argument("--cprofile", metavar="TASKS", default="",
                        help="print the Python profile of scoring these tasks (comma-separated; `all`: the "
                             "last one-call pass)")
    # Generation first: it dominates, and a run cut short still measures it.
    parser.add_argument("--tasks", default="gsm8k,cnn_dailymail_abisee,hendrycks_math,ethics_x5,mmlu,truthfulqa_mc1,"
                                           "bbq,bigbench_anachronisms,bigbench_analogical_similarity")
    parser.add_argument("--cache", default=str(Path(tempfile.gettempdir()) / "sweep-bench"))
    parser.add_argument("--out")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(relativeCreated)d %(name)s: %(message)s")
    logging.getLogger("evaluator").setLevel(logging.DEBUG)  # per-batch decode and scoring timings

    import torch
    from trainer_throughput import _set_cap, build_base

    from evaluator.config import GenerationConfig, TaskConfig
    from evaluator.fast import dense_base, use_dense
    from evaluator.harness import evaluate
    from trainer.config import LoraConfig
    from trainer.demo_base import build_tokenizer
    from trainer.model import attach_lora

    tokenizer = build_tokenizer()
    _set_cap(args.device, args.memory_cap_gib)
    base, load_seconds = build_base(args.shape, args.device, "sdpa", Path(args.cache))
    model = attach_lora(base, LoraConfig(r=64, alpha=16, dropout=0.05))
    with torch.no_grad():  # a trained adapter's shape: B is zero only before training
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.01)
    model.eval()
    task_dir = Path(tempfile.mkdtemp(prefix="sweep-eval-bench-"))
    counts = write_tasks(task_dir, tokenizer, args.scale, args.max_new_tokens)
    train_tps = None
    if args.train_json:
        train = json.loads(Path(args.train_json).read_text())
        train_tps = max(r["tokens_per_second"] for r in train["runs"]
                        if r["kind"] == "ours" and r["settings"].get("pack_length") == args.pack_length
                        and r.get("profile") == "a100" and r["tokens_per_second"])
    dequantize = {"true": True, "false": False}.get(args.dequantize, "auto")
    gen_batch = args.gen_batch_size if args.gen_batch_size == "auto" else int(args.gen_batch_size)
    result = {
        "benchmark": "eval_throughput",
        "gpu": torch.cuda.get_device_name(0) if args.device == "cuda" else "cpu",
        "shape": args.shape, "batch_size": args.batch_size, "generation_batch_size": gen_batch,
        "max_new_tokens": args.max_new_tokens, "memory_cap_gib": args.memory_cap_gib, "scale": args.scale,
        "base_load_seconds": load_seconds, "tasks": {},
    }

    def save():
        if args.out:
            Path(args.out).parent.mkdir(parents=True, exist_ok=True)
            Path(args.out).write_text(json.dumps(result, indent=2) + "\n")

    if args.probe:
        result["probe"] = probe(model, args.device, model.config.vocab_size)
        save()
    generation = GenerationConfig(max_new_tokens=args.max_new_tokens, batch_size=gen_batch)
    fuse = {"true": True, "false": False}.get(args.fuse_kernels, "auto")
    result.update(fuse_kernels=fuse, repeats=[])
    tasks = {}
    for name in [t for t in args.tasks.split(",") if t]:
        suite, kind, *_ = SHAPES[name]
        metric = "acc" if kind == "multiple_choice" else "exact_match"
        data_file = str(task_dir / "data" / f"{name}.jsonl")
        tasks[name] = TaskConfig(name=f"bench_{name}", metric=metric, data_file=data_file,
                                 max_new_tokens=MAX_NEW_TOKENS.get(name))
    # Pass 1 pays the one-time costs of a process (kernel compilation, CUDA warm-up), as a worker's first
    # trial does: in one call as a trial scores (--first-call), or task by task for the per-task times, the
    # dense copy (one per trial) then made once and its cost counted separately.
    if args.first_call:
        evaluated = evaluate(model, tokenizer, list(tasks.values()), task_dir, args.batch_size, generation,
                             dequantize=dequantize, memory_budget_gib=args.memory_cap_gib, fuse_kernels=fuse)
        result.update(first_call_seconds=evaluated.eval_seconds, dense=evaluated.dense, dense_setup_seconds=0.0)
        print(json.dumps({"first call, all tasks": evaluated.eval_seconds, "dense": evaluated.dense}), flush=True)
        save()
    else:
        start = time.perf_counter()
        dense = use_dense(model, dequantize, args.device, args.memory_cap_gib)
        with dense_base(model) if dense else contextlib.nullcontext():
            result.update(dense=dense, dense_setup_seconds=time.perf_counter() - start)
            for name, task in tasks.items():
                suite, kind, *_ = SHAPES[name]
                profiler = cProfile.Profile() if name in args.cprofile.split(",") else None
                profiler.enable() if profiler else None
                evaluated = evaluate(model, tokenizer, [task], task_dir, args.batch_size, generation,
                                     dequantize=False, memory_budget_gib=args.memory_cap_gib, fuse_kernels=fuse)
                _print_profile(profiler, 40, 25)
                result["tasks"][name] = {"suite": suite, "output_type": kind, "documents": counts[name],
                                         "seconds": evaluated.eval_seconds}
                print(json.dumps({name: result["tasks"][name]}), flush=True)
                save()
    # Later passes score all tasks in one call, exactly as a trial does (the dense copy made and dropped
    # inside it), in a process that has scored before: a worker that keeps its base loaded from trial to trial.
    for repeat in range(1, args.repeat):
        profiler = cProfile.Profile() if "all" in args.cprofile.split(",") and repeat == args.repeat - 1 else None
        profiler.enable() if profiler else None
        evaluated = evaluate(model, tokenizer, list(tasks.values()), task_dir, args.batch_size, generation,
                             dequantize=dequantize, memory_budget_gib=args.memory_cap_gib, fuse_kernels=fuse)
        _print_profile(profiler, 60, 30)
        result["repeats"].append(evaluated.eval_seconds)
        result["repeats_dense"] = evaluated.dense
        print(json.dumps({"all tasks in one call": evaluated.eval_seconds, "dense": evaluated.dense}), flush=True)
        save()
    if args.peer:
        compare_with_plain(model, tokenizer, tasks, task_dir, counts, args.peer, args.batch_size,
                           args.peer_batch_size, generation, dequantize, args.memory_cap_gib, fuse, save, result)
    if args.device == "cuda":
        result["peak_memory_gib"] = torch.cuda.max_memory_allocated() / 2**30
    eval_seconds = result.get("first_call_seconds") or (
        result["dense_setup_seconds"] + sum(t["seconds"] for t in result["tasks"].values()))
    result["eval_seconds"] = eval_seconds
    if train_tps:
        train_seconds = args.train_steps * args.pack_length / train_tps
        result.update({
            "train_tokens_per_second": train_tps, "train_steps": args.train_steps, "pack_length": args.pack_length,
            "train_seconds": train_seconds, "eval_share": eval_seconds / (eval_seconds + train_seconds),
            "train_steps_for_15_percent": math.ceil(eval_seconds * 85 / 15 * train_tps / args.pack_length),
            **({"eval_share_repeats": [r / (r + train_seconds) for r in result["repeats"]]}
               if result["repeats"] else {}),
        })
    save()
    print(json.dumps({k: v for k, v in result.items() if k not in ("tasks", "probe", "peer")}, indent=2))
    if "peer" in result:
        print(json.dumps({k: v for k, v in result["peer"].items() if k != "tasks"}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
