"""`sweep serve` and `sweep submission` on the demo's export: the challenge's HTTP API as HELM's HTTP model client
calls it (its requests built line for line from crfm-helm's `http_model_client.py`), bad requests, concurrent
clients, and the Docker submission's command run outside Docker."""

from __future__ import annotations

import json
import math
import socket
import subprocess
import sys
import threading

import pytest
from helm_requests import Request, helm_completion, helm_raw_request, post
from sweep_processes import serving_process

# The demo's template (alpaca) around a summary, a shape the demo trains: its completions run several tokens.
PROMPT = ("### Instruction:\nSummarize: The river town of Alder held a market on Monday where farmers sold apples "
          "and bread.\n\n### Response:\n")
TOWNS = ["Alder", "Birch", "Cedar", "Dunmore", "Elm", "Fenwick", "Glen", "Harrow"]
GOODS = ["apples and bread", "fish", "wool and cheese", "honey"]


def _agrees(completion: dict) -> None:
    """The returned tokens make the returned text, and the logprob is their sum."""
    assert "".join(t["text"] for t in completion["tokens"]) == completion["text"]
    assert completion["logprob"] == pytest.approx(sum(t["logprob"] for t in completion["tokens"]), abs=1e-4)
    assert all(t["logprob"] <= 0 for t in completion["tokens"])


@pytest.mark.integration
def test_greedy_completions_from_helms_request_are_deterministic_and_consistent(demo_server):
    request = Request(prompt=PROMPT, temperature=0, max_tokens=12, top_k_per_token=4)
    first = helm_completion(demo_server, request)
    assert first["tokens"] and first["text"]
    _agrees(first)
    assert helm_completion(demo_server, request) == first
    for token in first["tokens"]:  # greedy: each token is the most likely one at its position
        assert 1 <= len(token["top_logprobs"]) <= 4
        assert token["logprob"] == pytest.approx(max(token["top_logprobs"].values()), abs=1e-4)


@pytest.mark.integration
def test_stop_sequences_are_cut_at_the_earliest_match(demo_server):
    full = helm_completion(demo_server, Request(prompt=PROMPT, temperature=0, max_tokens=16))
    text = full["text"]
    assert len(text) >= 4, text
    # Two stops, one later in the text than the other: the completion ends before the earliest match.
    stops = [text[-2:], text[2:4]]
    earliest = min(text.find(stop) for stop in stops)
    cut = helm_completion(demo_server, Request(prompt=PROMPT, temperature=0, max_tokens=16, stop_sequences=stops))
    assert cut["text"] == text[:earliest]
    assert not any(stop in cut["text"] for stop in stops)
    _agrees(cut)
    assert len(cut["tokens"]) <= len(full["tokens"])


@pytest.mark.integration
def test_echo_prompt_returns_the_prompt_with_its_tokens_logprobs(demo_server):
    scored = helm_completion(demo_server, Request(prompt=PROMPT, echo_prompt=True, max_tokens=0, top_k_per_token=2))
    assert scored["text"] == PROMPT
    assert scored["logprob"] == 0.0  # no token generated
    assert "".join(t["text"] for t in scored["tokens"]) == PROMPT
    assert scored["tokens"][0]["logprob"] == 0.0  # the first token has nothing before it
    assert all(t["logprob"] < 0 for t in scored["tokens"][1:] if t["text"])
    echoed = helm_completion(demo_server, Request(prompt=PROMPT, echo_prompt=True, max_tokens=6, temperature=0))
    plain = helm_completion(demo_server, Request(prompt=PROMPT, max_tokens=6, temperature=0))
    assert echoed["text"] == PROMPT + plain["text"]
    assert echoed["logprob"] == pytest.approx(plain["logprob"], abs=1e-4)


@pytest.mark.integration
def test_the_same_seed_gives_the_same_sample(demo_server):
    def sample(seed: int) -> str:
        status, response = post(f"{demo_server}/process", {"prompt": PROMPT, "num_samples": 1, "max_new_tokens": 12,
                                                            "top_k": 200, "temperature": 1.5, "seed": seed,
                                                            "echo_prompt": False})
        assert status == 200, response
        return response["text"]

    first = sample(7)
    assert sample(7) == first
    assert any(sample(seed) != first for seed in range(8, 14))  # and the seed matters


@pytest.mark.integration
def test_tokenize_and_decode_round_trip_with_truncation(demo_server):
    status, tokenized = post(f"{demo_server}/tokenize", {"text": PROMPT, "truncation": False, "max_length": 2048})
    assert status == 200 and all(isinstance(t, int) for t in tokenized["tokens"]) and tokenized["request_time"] >= 0
    status, decoded = post(f"{demo_server}/decode", {"tokens": tokenized["tokens"]})
    assert status == 200 and decoded["text"] == PROMPT
    status, truncated = post(f"{demo_server}/tokenize", {"text": PROMPT, "truncation": True, "max_length": 3})
    assert truncated["tokens"] == tokenized["tokens"][:3]


@pytest.mark.integration
def test_unknown_fields_are_ignored_and_nulls_take_defaults(demo_server):
    body = {**helm_raw_request(Request(prompt=PROMPT, temperature=0, max_tokens=5)), "presence_penalty": 0,
            "some_future_field": {"x": 1}, "stop_sequences": None, "top_k_per_token": None}
    status, response = post(f"{demo_server}/process", body)
    assert status == 200 and response["tokens"], response


@pytest.mark.integration
def test_bad_requests_get_a_4xx_with_one_line_and_the_server_keeps_serving(demo_server):
    too_long = " ".join(["digits"] * 5000)
    cases = [
        (b"{not json", "/process"),
        ({"prompt": 42}, "/process"),
        ({"max_new_tokens": 5}, "/process"),
        ({"prompt": "x", "max_new_tokens": -1}, "/process"),
        ({"prompt": "x", "max_new_tokens": 10**9}, "/process"),
        ({"prompt": "x", "max_new_tokens": "ten"}, "/process"),
        ({"prompt": too_long, "max_new_tokens": 5}, "/process"),
        ({"prompt": "x", "temperature": -1}, "/process"),
        ({"prompt": "x", "stop_sequences": "\n"}, "/process"),
        ({"prompt": "x", "top_k_per_token": 10**6}, "/process"),
        ({"tokens": ["a"]}, "/decode"),
        ({"tokens": [10**9]}, "/decode"),
        ({"text": None}, "/tokenize"),
    ]
    for body, path in cases:
        status, answer = post(demo_server + path, body)
        assert 400 <= status < 500, (body, status, answer)
        assert isinstance(answer.get("error"), str) and answer["error"] and "\n" not in answer["error"], answer
    status, answer = post(f"{demo_server}/process", {"prompt": too_long, "max_new_tokens": 5})
    assert "exceed the model's context" in answer["error"]
    status, response = post(f"{demo_server}/process", {"prompt": PROMPT, "max_new_tokens": 3, "temperature": 0})
    assert status == 200 and response["tokens"]


@pytest.mark.integration
def test_sixteen_concurrent_clients_all_get_their_own_answers(demo_server):
    prompts = [PROMPT.replace("Alder", TOWNS[i % 8]).replace("apples and bread", GOODS[i // 4]) for i in range(16)]
    expected = [helm_completion(demo_server, Request(prompt=p, temperature=0, max_tokens=8)) for p in prompts]
    results: list = [None] * 16

    def call(i: int) -> None:
        results[i] = helm_completion(demo_server, Request(prompt=prompts[i], temperature=0, max_tokens=8))

    threads = [threading.Thread(target=call, args=(i,)) for i in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    for got, want in zip(results, expected, strict=True):
        assert got is not None
        assert got["text"] == want["text"]
        assert got["logprob"] == pytest.approx(want["logprob"], abs=1e-4)
    assert len({r["text"] for r in results}) > 1  # the prompts differ, and so do their answers


@pytest.mark.integration
def test_serve_refuses_a_taken_port_and_a_directory_that_is_no_export_in_one_line(demo_export, tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        result = subprocess.run([sys.executable, "-m", "sweep.cli", "serve", str(demo_export), "--port", str(port)],
                                capture_output=True, text=True, timeout=60)
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr.strip().splitlines() == [
        f"sweep serve: error: --port {port}: 127.0.0.1:{port} is in use (Address already in use); pass another "
        f"--port, or --port 0 for a free one"]
    result = subprocess.run([sys.executable, "-m", "sweep.cli", "serve", str(tmp_path)], capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 2 and len(result.stderr.strip().splitlines()) == 1
    assert "is not a sweep export (no adapter_config.json)" in result.stderr


@pytest.mark.integration
def test_the_submission_packs_the_export_and_its_command_serves_it(demo_export, demo_server, tmp_path):
    from sweep.cli import main

    out = tmp_path / "submission"
    assert main(["submission", str(demo_export), "--out", str(out)]) == 0
    dockerfile = (out / "Dockerfile").read_text()
    assert "FROM ${BASE_IMAGE}" in dockerfile and "ARG BASE_IMAGE=pytorch/pytorch:" in dockerfile
    assert "cuda" in dockerfile.split("ARG BASE_IMAGE=")[1].splitlines()[0]
    assert 'CMD ["./start.sh"]' in dockerfile and "ENV HOST=0.0.0.0 PORT=80" in dockerfile
    recorded = json.loads((demo_export / "environment.json").read_text())["packages"]
    pins = [line for line in (out / "requirements.txt").read_text().splitlines() if not line.startswith("#")]
    assert pins and all("==" in line for line in pins)
    assert {line.split("==")[0]: line.split("==")[1] for line in pins} == {
        k: v for k, v in recorded.items() if k != "torch"}
    assert (out / "export" / "adapter_model.safetensors").read_bytes() == \
        (demo_export / "adapter_model.safetensors").read_bytes()
    assert main(["submission", str(demo_export), "--out", str(out)]) == 2  # not empty: refused without --force
    # The image's command, run here on loopback: it answers as `sweep serve` does.
    request = Request(prompt=PROMPT, temperature=0, max_tokens=8, top_k_per_token=2)
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    env = {"HOST": "127.0.0.1", "PORT": str(port), "PYTHONPATH": ""}
    with serving_process([str(out / "start.sh")], env=env, cwd=tmp_path) as url:
        assert url == f"http://127.0.0.1:{port}"
        assert helm_completion(url, request) == helm_completion(demo_server, request)


BLOCKED = ("optuna", "ray", "sqlalchemy", "lm_eval", "datasets", "matplotlib", "optuna_dashboard")
WITHOUT_ORCHESTRATION = f"""
import importlib.abc, sys
class Blocked(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in {BLOCKED!r}:
            raise ModuleNotFoundError(f"No module named {{name!r}} (not in the submission's image)")
sys.meta_path.insert(0, Blocked())
from sweep.cli import main
sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.integration
def test_sweep_serve_runs_without_the_orchestration_libraries(demo_export):
    """The image installs only what serving needs: `sweep serve`, errors included, imports no optuna, ray,
    SQLAlchemy, lm-eval, datasets or matplotlib (each import of them fails here)."""
    command = [sys.executable, "-c", WITHOUT_ORCHESTRATION]
    with serving_process([*command, "serve", str(demo_export), "--port", "0"]) as url:
        status, answer = post(f"{url}/process", {"prompt": PROMPT, "max_new_tokens": 4, "temperature": 0})
        assert status == 200 and answer["tokens"], answer
    result = subprocess.run([*command, "serve", str(demo_export / "nowhere")], capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 2 and result.stderr.startswith("sweep serve: error: no directory at "), result.stderr


def test_token_texts_and_stop_cuts_keep_tokens_and_text_in_agreement():
    from sweep.serve import cut_at_stop

    tokens = [{"text": t, "logprob": -1.0, "top_logprob": {}} for t in ["Hel", "lo", " wor", "ld", "!"]]
    cut = cut_at_stop(tokens, ["or", "!"])
    assert "".join(t["text"] for t in cut) == "Hello w" and len(cut) == 3 and cut[2]["text"] == " w"
    assert cut_at_stop(tokens, ["zzz"]) == tokens and cut_at_stop(tokens, ["Hel"]) == []
    assert math.isclose(sum(t["logprob"] for t in cut), -3.0)


def test_the_serve_benchmark_runs_on_the_tiny_cpu_shape(tmp_path):
    """bench/serve_throughput.py end to end (its own export and server), on a few short requests."""
    from pathlib import Path

    out = tmp_path / "serve.json"
    root = Path(__file__).resolve().parents[2]
    result = subprocess.run([sys.executable, str(root / "bench" / "serve_throughput.py"), "--requests", "4",
                             "--clients", "2", "--new-tokens", "4", "--out", str(out)],
                            capture_output=True, text=True, timeout=600, cwd=root)
    assert result.returncode == 0, result.stderr[-3000:]
    runs = json.loads(out.read_text())["runs"]
    assert set(runs) == {"greedy_1_client", "greedy_2_clients", "sampled_1_client"}
    for run in runs.values():
        assert run["requests"] == 4 and 0 < run["tokens_returned"] <= 16 and run["tokens_per_second"] > 0
        assert 0 < run["latency_p50_s"] <= run["latency_p95_s"]


@pytest.mark.integration
@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_the_greedy_decoder_and_the_sampling_loop_agree_where_sampling_has_one_choice(demo_export, device):
    """Greedy requests take the evaluator's decoder (static cache; a CUDA graph on a GPU), sampled ones the
    KV-cached loop: with top_k 1 the loop has one choice, the greedy one, so both give the same tokens."""
    from sweep.serve import Engine, load_export

    engine = Engine(load_export(demo_export, device=device))
    for prompt in (PROMPT, PROMPT.replace("Alder", "Birch"), "### Instruction:\nWhat is 12 plus 7?\n\n### Response:\n"):
        greedy = engine.process(prompt, 12, 0.0, 0, 1.0, None, True, 2, [])
        one_choice = engine.process(prompt, 12, 1.0, 1, 1.0, 123, True, 2, [])
        assert greedy["text"] == one_choice["text"] and greedy["text"].startswith(prompt)
        assert greedy["logprob"] == pytest.approx(one_choice["logprob"], abs=1e-3)
