"""HELM's requests to the challenge's HTTP API, built line for line from crfm-helm's `http_model_client.py`
(shared by the serving tests)."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from dataclasses import dataclass, field


def post(url: str, body, timeout: float = 120) -> tuple[int, dict]:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, method="POST", headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"{}")


# --- HELM's requests, line for line ---


@dataclass(frozen=True)
class Request:
    """The fields of HELM's `helm.common.request.Request` that its HTTP client reads, with HELM's defaults."""

    prompt: str = ""
    temperature: float = 1.0
    num_completions: int = 1
    top_k_per_token: int = 1
    max_tokens: int = 100
    stop_sequences: list = field(default_factory=list)
    echo_prompt: bool = False
    top_p: float = 1


def helm_raw_request(request: Request) -> dict:
    """`raw_request` of `HTTPModelClient.make_request`, as in crfm-helm 0.5.16 (`helm/clients/http_model_client.py`)
    and 0.2.4, the challenge's time (`helm/proxy/clients/http_model_client.py`): the two build it alike."""
    return {
        "prompt": request.prompt,
        "temperature": 1e-7 if request.temperature == 0 else request.temperature,
        "num_return_sequences": request.num_completions,
        "max_new_tokens": request.max_tokens,
        "top_p": request.top_p,
        "echo_prompt": request.echo_prompt,
        "top_k_per_token": request.top_k_per_token,
        "stop_sequences": request.stop_sequences,
    }


def helm_completion(url: str, request: Request) -> dict:
    """What HELM's client makes of the answer: 0.2.4 reads each token's `top_logprob`, 0.5.16 `text` and `logprob`."""
    status, response = post(f"{url}/process", helm_raw_request(request))
    assert status == 200, response
    tokens = [{"text": t["text"], "logprob": t["logprob"], "top_logprobs": t["top_logprob"]}
              for t in response["tokens"]]
    assert isinstance(response["request_time"], float) and response["request_time"] >= 0
    return {"text": response["text"], "logprob": response["logprob"], "tokens": tokens}
