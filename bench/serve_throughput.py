"""`sweep serve` throughput: `/process` latency and generated tokens per second, through the real server.

Builds an export-shaped directory (a fresh LoRA adapter on the base, saved as
`sweep export` saves one: adapter, hyperparameters.yaml, tokenizer, scores.json),
starts `sweep serve` on it on 127.0.0.1, and sends HELM-shaped `/process` requests
(`stop_sequences: []`, `top_k_per_token: 1`, greedy or sampled) from 1 and from N
concurrent clients, each asking for `--new-tokens` tokens (a request stops early
only at the model's end-of-sequence token; the tokens counted are those returned).
The server answers one request at a time, so more clients raise the latency and
overlap only the HTTP and tokenization work.

    python bench/serve_throughput.py                                  # CPU, the demo model
    python bench/serve_throughput.py --shape mistral-7b --requests 32 --new-tokens 128   # on a GPU

`--shape mistral-7b` builds a Mistral-7B-shaped model with random weights from its
config (nothing from the hub; see bench/trial_overhead.py) and serves it in 4 bits.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parents[1]
PROMPTS = [
    "### Instruction:\nSummarize: The river town of {town} held a market on Monday where farmers sold {goods}."
    "\n\n### Response:\n".format(town=town, goods=goods)
    for town in ("Alder", "Birch", "Cedar", "Dunmore") for goods in ("apples", "fish", "wool", "honey")
]


def build_export(model_path: str, out: Path, lora_r: int) -> Path:
    """An export-shaped directory: a fresh LoRA adapter on `model_path` (B = 0: the base's own outputs)."""
    import torch

    from sweep.config import to_dict
    from trainer.config import LoraConfig, ModelConfig
    from trainer.model import attach_lora, default_device, load_base_model, load_tokenizer, save_adapter

    model_config = ModelConfig(name_or_path=model_path)
    torch.manual_seed(0)
    model = attach_lora(load_base_model(model_config, default_device()), LoraConfig(r=lora_r, alpha=2 * lora_r))
    save_adapter(model, out, model_config, {"model": to_dict(model_config)})
    load_tokenizer(model_config).save_pretrained(out)
    (out / "scores.json").write_text(json.dumps({"study": "bench", "trial": 0}) + "\n")
    del model
    return out


def start_server(export: Path, port: int) -> tuple[subprocess.Popen, str]:
    log = tempfile.NamedTemporaryFile(prefix="serve-bench-", suffix=".log", delete=False)
    process = subprocess.Popen([sys.executable, "-m", "sweep.cli", "serve", str(export), "--port", str(port)],
                               stdout=log, stderr=subprocess.STDOUT, cwd=ROOT,
                               env={**os.environ, "PYTHONUNBUFFERED": "1"})
    deadline = time.monotonic() + 1800
    while True:
        text = Path(log.name).read_text(errors="replace")
        found = re.search(r"Serving (.+) at (http://127\.0\.0\.1:\d+) ", text)
        if found:
            return process, found.group(2)
        if process.poll() is not None or time.monotonic() > deadline:
            raise SystemExit(f"sweep serve did not start:\n{text[-3000:]}")
        time.sleep(0.5)


def post(url: str, body: dict) -> dict:
    req = urllib.request.Request(f"{url}/process", data=json.dumps(body).encode(), method="POST",
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=3600) as response:
        return json.loads(response.read())


def run_clients(url: str, clients: int, requests: int, new_tokens: int, temperature: float) -> dict:
    """`requests` requests from `clients` threads at once: latency per request, generated tokens per second."""
    latencies: list[float] = []
    tokens = [0]
    lock = threading.Lock()
    queue = list(range(requests))

    def client() -> None:
        while True:
            with lock:
                if not queue:
                    return
                i = queue.pop()
            body = {"prompt": PROMPTS[i % len(PROMPTS)], "temperature": temperature, "num_return_sequences": 1,
                    "max_new_tokens": new_tokens, "top_p": 1, "echo_prompt": False, "top_k_per_token": 1,
                    "stop_sequences": [], "seed": i}
            started = time.perf_counter()
            answer = post(url, body)
            elapsed = time.perf_counter() - started
            with lock:
                latencies.append(elapsed)
                tokens[0] += len(answer["tokens"])

    started = time.perf_counter()
    threads = [threading.Thread(target=client) for _ in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - started
    latencies.sort()
    return {
        "clients": clients, "requests": requests, "new_tokens_asked": new_tokens, "temperature": temperature,
        "tokens_returned": tokens[0], "wall_s": round(wall, 3),
        "tokens_per_second": round(tokens[0] / wall, 1),
        "latency_p50_s": round(statistics.median(latencies), 4),
        "latency_p95_s": round(latencies[min(len(latencies) - 1, int(0.95 * len(latencies)))], 4),
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shape", choices=["demo", "mistral-7b"], default="demo")
    parser.add_argument("--model-dir", default=str(Path(tempfile.gettempdir()) / "sweep-mistral-7b-random"))
    parser.add_argument("--requests", type=int, default=16)
    parser.add_argument("--clients", type=int, default=8, help="concurrent clients of the second run")
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--lora-r", type=int, default=16)
    parser.add_argument("--out", help="JSON file (default: bench/results/serve_throughput-<device>.json)")
    args = parser.parse_args(argv)
    sys.path.insert(0, str(ROOT))
    import torch

    from trainer.demo_base import DEMO_MODEL_ID

    device = f"cuda ({torch.cuda.get_device_name()})" if torch.cuda.is_available() else \
        f"cpu ({os.cpu_count()} cores)"
    if args.shape == "mistral-7b":
        sys.path.insert(0, str(ROOT / "bench"))
        from trial_overhead import build_mistral_shape

        model_path = str(build_mistral_shape(Path(args.model_dir)))
    else:
        model_path = DEMO_MODEL_ID
    with tempfile.TemporaryDirectory(prefix="serve-bench-") as work:
        export = build_export(model_path, Path(work) / "export", args.lora_r)
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        process, url = start_server(export, port)
        try:
            post(url, {"prompt": PROMPTS[0], "max_new_tokens": 4, "temperature": 0})  # warm-up
            runs = {
                "greedy_1_client": run_clients(url, 1, args.requests, args.new_tokens, 0.0),
                f"greedy_{args.clients}_clients": run_clients(url, args.clients, args.requests, args.new_tokens, 0.0),
                "sampled_1_client": run_clients(url, 1, args.requests, args.new_tokens, 0.8),
            }
        finally:
            process.terminate()
            process.wait(30)
    result = {
        "benchmark": "serve_throughput",
        "command": "python bench/serve_throughput.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "device": device, "shape": args.shape, "python": platform.python_version(), "torch": torch.__version__,
        "runs": runs,
    }
    name = "cpu" if not torch.cuda.is_available() else re.sub(r"[^a-z0-9]+", "-", torch.cuda.get_device_name().lower())
    out = Path(args.out) if args.out else ROOT / "bench" / "results" / f"serve_throughput-{name}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result, indent=1))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
