"""`sweep serve`: an export behind the challenge's HTTP API, as HELM's HTTP model client calls it.

The organisers scored submissions through HELM's `HTTPModelClient` (crfm-helm's
`clients/http_model_client.py`; `proxy/clients/http_model_client.py` at the
challenge's time), which posts `prompt`, `temperature` (1e-7 for 0),
`num_return_sequences`, `max_new_tokens`, `top_p`, `echo_prompt`,
`top_k_per_token` and `stop_sequences` to `/process`, and `text`, `truncation`,
`max_length` to `/tokenize` (and `tokens` to `/decode`). The challenge's sample
servers also took `num_samples`, `top_k` and `seed`. Every one of those fields
is honoured here; unknown fields are ignored. HELM does not cut completions at
stop sequences itself, so the server does, at the earliest match.

One model serves every request, one request at a time (a lock): concurrent
clients queue and all get their own answers. Greedy requests (a temperature at
or below 1e-5) decode with the evaluator's greedy decoder (static KV cache; a
CUDA-graph decode step on a GPU); sampled ones with a KV-cached loop seeded by
`seed`. The returned log-probabilities come from one forward pass over the
prompt and the completion: each token's log-probability under the model (at
temperature 1) and the `top_k_per_token` most likely tokens at its position.
"""

from __future__ import annotations

import json
import logging
import math
import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Optional

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, StrictStr

log = logging.getLogger("sweep")

GREEDY_TEMPERATURE = 1e-5
"""At or below this temperature decoding is greedy (HELM sends 1e-7 for a temperature of 0)."""
MAX_NEW_TOKENS = 65536
"""Far above any context here: a larger `max_new_tokens` is refused as absurd before the context check."""
MAX_TOP_K_PER_TOKEN = 100
DEFAULT_PORT = 8080  # HELM's HTTPModelClient's default base URL is http://localhost:8080


class BadRequest(ValueError):
    """A request the model cannot answer (prompt too long, ...): a 4xx with this one-line message."""


@dataclass
class ServedModel:
    """The loaded model of an export and what the server says of it."""

    model: Any
    tokenizer: Any
    device: str
    context_length: int
    description: str
    """E.g. "trial 5 of study demo: the adapter on its 4-bit base sweep-demo/tiny-llama"."""


def export_problem(export_dir: Path, merged: bool) -> Optional[str]:
    """Why `export_dir` cannot be served (with `--merged`: its merged model), or None."""
    if not export_dir.is_dir():
        return f"no directory at {export_dir} (pass the directory `sweep export --out` wrote)"
    if merged:
        if not (export_dir / "merged" / "config.json").is_file():
            return (f"{export_dir} has no merged model (merged/config.json): export it with `sweep export ... "
                    f"--merge`, or serve the adapter (leave out --merged)")
        return None
    from sweep.submission import BASE_EXPORT_FILE

    if not (export_dir / "adapter_config.json").is_file() and not (export_dir / BASE_EXPORT_FILE).is_file():
        return (f"{export_dir} is not a sweep export (no adapter_config.json); pass the directory `sweep export "
                f"--out` wrote")
    return None


def load_export(export_dir: str | Path, merged: bool = False, device: Optional[str] = None) -> ServedModel:
    """The export's model: its adapter on the 4-bit base it was trained and scored on (as recorded in its
    hyperparameters.yaml), or with `merged` its merged 16-bit model (`sweep export --merge`)."""
    import torch
    import yaml
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from trainer.model import default_device

    _quiet_loading()
    export_dir = Path(export_dir)
    device = device or default_device()
    scores = _read_json(export_dir / "scores.json")
    what = f"trial {scores['trial']} of study {scores.get('study', '?')}" if "trial" in scores else str(export_dir)
    if merged:
        path = export_dir / "merged"
        dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
        model = AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype, device_map={"": device})
        tokenizer = AutoTokenizer.from_pretrained(str(path))
        description = f"{what}: the merged model"
    else:
        from sweep.submission import BASE_EXPORT_FILE, model_config_of
        from trainer.model import base_label, describe_base, load_base_model, trained_mode

        untuned = not (export_dir / "adapter_config.json").is_file()  # the untuned base's export (the pick)
        if untuned:
            record = _read_json(export_dir / BASE_EXPORT_FILE)
            trained = {"model": record.get("model") or {"name_or_path": record.get("base_model")},
                       "trainer": {"mode": record.get("mode", "qlora")}}
            what = f"the untuned base, the pick of study {record.get('study', '?')}"
        else:
            trained = yaml.safe_load((export_dir / "hyperparameters.yaml").read_text()) or {}
        model_config, mode = model_config_of(trained), trained_mode(trained)
        model = load_base_model(model_config, device, attn_implementation="sdpa", mode=mode)
        if not untuned:
            import peft

            model = peft.PeftModel.from_pretrained(model, str(export_dir))
        tokenizer = AutoTokenizer.from_pretrained(str(export_dir))
        form = f"{model_config.name_or_path} ({base_label(describe_base(model_config, mode, device))})"
        description = f"{what}: {form}" if untuned else f"{what}: the adapter on its base {form}"
    model.eval()
    for config in (getattr(model, "config", None), getattr(model, "generation_config", None)):
        if config is not None:
            config.use_cache = True  # trials train without the KV cache; generation wants it
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    context = getattr(model.config, "max_position_embeddings", None) or 2048
    return ServedModel(model=model, tokenizer=tokenizer, device=device, context_length=int(context),
                       description=description)


def _quiet_loading() -> None:
    """No progress bars, deprecation notices or optional-kernel notices between the command and its banner."""
    import warnings

    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", category=FutureWarning)


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


class Engine:
    """Answers the API's requests on one model, one at a time.

    On a GPU, when it fits in half the free memory, the adapter on its 4-bit base runs as the
    evaluator's dense copy (`evaluator.fast.dense_base`: the 4-bit weights dequantized once, the
    adapter merged in, the projections fused), the model the sweep scored up to bf16 rounding, and
    generation reads 16-bit weights instead of dequantizing 4-bit ones at every token.
    """

    def __init__(self, served: ServedModel, dense: bool | str = "auto"):
        import contextlib

        from evaluator.fast import dense_base, use_dense

        self.served = served
        self.lock = threading.Lock()
        self._decoder = None
        self._dense = contextlib.ExitStack()
        self.dense = use_dense(served.model, dense, served.device, None)
        if self.dense:
            self._dense.enter_context(dense_base(served.model))

    def close(self) -> None:
        """Puts the 4-bit layers back (drops the dense copy)."""
        self._dense.close()

    # --- /process ---

    def process(self, prompt: str, max_new_tokens: int, temperature: float, top_k: int, top_p: float,
                seed: Optional[int], echo_prompt: bool, top_k_per_token: int,
                stop_sequences: list[str]) -> dict[str, Any]:
        """The completion of `prompt` as the API answers it: `text`, `tokens`, `logprob`, `request_time`."""
        import torch

        started = time.perf_counter()
        tokenizer = self.served.tokenizer
        prompt_ids = tokenizer(prompt, add_special_tokens=True)["input_ids"]
        if not prompt_ids:
            raise BadRequest("prompt: encodes to no token")
        context = self.served.context_length
        if len(prompt_ids) + max_new_tokens > context:
            raise BadRequest(f"prompt: {len(prompt_ids)} tokens plus max_new_tokens {max_new_tokens} exceed the "
                             f"model's context of {context} tokens")
        stops = [s for s in stop_sequences if s]
        with self.lock, torch.no_grad():
            if max_new_tokens == 0:
                new_ids: list[int] = []
            elif temperature <= GREEDY_TEMPERATURE:
                new_ids = self._greedy(prompt_ids, max_new_tokens, stops)
            else:
                new_ids = self._sample(prompt_ids, max_new_tokens, temperature, top_k, top_p, seed, stops)
            eos = tokenizer.eos_token_id
            if eos is not None and eos in new_ids:
                new_ids = new_ids[: new_ids.index(eos)]
            logprobs, tops = self._score(prompt_ids, new_ids, top_k_per_token)
        tokens = self._tokens(prompt_ids, new_ids, logprobs, tops)
        prompt_tokens, completion = tokens[: len(prompt_ids)], tokens[len(prompt_ids):]
        completion = cut_at_stop(completion, stops)
        returned = prompt_tokens + completion if echo_prompt else completion
        return {
            "text": "".join(t["text"] for t in returned),
            "tokens": returned,
            "logprob": sum(t["logprob"] for t in completion),
            "request_time": time.perf_counter() - started,
        }

    def _greedy(self, prompt_ids: list[int], max_new_tokens: int, stops: list[str]) -> list[int]:
        import torch

        from evaluator.decode import GreedyDecoder

        if self._decoder is None:
            self._decoder = GreedyDecoder(self.served.model)
        tokenizer = self.served.tokenizer
        ids = torch.tensor([prompt_ids], device=self.served.device)

        def finished(rows: list[list[int]]) -> list[bool]:
            return [any(s in tokenizer.decode(row, skip_special_tokens=True) for s in stops) for row in rows]

        out = self._decoder.generate(
            ids, torch.ones_like(ids), max_new_tokens, stop_check=finished if stops else None,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0, check_every=4,
        )
        return out[0, len(prompt_ids):].tolist()

    def _sample(self, prompt_ids: list[int], max_new_tokens: int, temperature: float, top_k: int, top_p: float,
                seed: Optional[int], stops: list[str]) -> list[int]:
        """Sampling with a KV cache, from a generator seeded by `seed` (the same seed, the same tokens)."""
        import torch

        model, tokenizer, device = self.served.model, self.served.tokenizer, self.served.device
        generator = torch.Generator(device=device)
        generator.manual_seed(seed if seed is not None else int.from_bytes(os.urandom(8), "little") % 2**63)
        input_ids = torch.tensor([prompt_ids], device=device)
        past, new_ids = None, []
        for _ in range(max_new_tokens):
            out = model(input_ids=input_ids, past_key_values=past, use_cache=True)
            past = out.past_key_values
            logits = out.logits[0, -1].float() / temperature
            token = int(torch.multinomial(filtered_probabilities(logits, top_k, top_p), 1, generator=generator))
            new_ids.append(token)
            if token == tokenizer.eos_token_id:
                break
            if stops and any(s in tokenizer.decode(new_ids, skip_special_tokens=True) for s in stops):
                break
            input_ids = torch.tensor([[token]], device=device)
        return new_ids

    def _score(self, prompt_ids: list[int], new_ids: list[int], top_k: int):
        """Each token's log-probability given what precedes it (None for the first) and the `top_k` most likely
        tokens at its position, from one forward pass."""
        import torch

        ids = torch.tensor([prompt_ids + new_ids], device=self.served.device)
        logits = self.served.model(input_ids=ids, use_cache=False).logits[0, :-1].float()
        logprobs = torch.log_softmax(logits, dim=-1)
        chosen = logprobs.gather(1, ids[0, 1:, None])[:, 0].tolist()
        tops: list[list[tuple[int, float]]] = [[] for _ in chosen]
        if top_k > 0:
            values, indices = logprobs.topk(min(top_k, logprobs.shape[-1]), dim=-1)
            tops = [list(zip(i, v, strict=True)) for i, v in zip(indices.tolist(), values.tolist(), strict=True)]
        return [None, *chosen], [[], *tops]

    def _tokens(self, prompt_ids: list[int], new_ids: list[int], logprobs: list, tops: list) -> list[dict]:
        tokenizer = self.served.tokenizer
        texts = token_texts(tokenizer, prompt_ids + new_ids)
        tokens = []
        for text, logprob, top in zip(texts, logprobs, tops, strict=True):
            top_logprob: dict[str, float] = {}
            for token_id, value in top:
                key = tokenizer.decode([token_id], skip_special_tokens=False)
                top_logprob[key] = max(value, top_logprob.get(key, -math.inf))
            tokens.append({"text": text, "logprob": 0.0 if logprob is None else logprob, "top_logprob": top_logprob})
        return tokens

    # --- /tokenize, /decode ---

    def tokenize(self, text: str, truncation: bool, max_length: int) -> dict[str, Any]:
        started = time.perf_counter()
        ids = self.served.tokenizer(text, add_special_tokens=True)["input_ids"]
        if truncation:
            ids = ids[:max_length]
        return {"tokens": ids, "request_time": time.perf_counter() - started}

    def decode(self, tokens: list[int]) -> dict[str, Any]:
        started = time.perf_counter()
        vocabulary = len(self.served.tokenizer)
        bad = [t for t in tokens if not 0 <= t < vocabulary]
        if bad:
            raise BadRequest(f"tokens: {bad[0]} is not a token id (the vocabulary has {vocabulary})")
        text = self.served.tokenizer.decode(tokens, skip_special_tokens=True)
        return {"text": text, "request_time": time.perf_counter() - started}


def filtered_probabilities(logits, top_k: int, top_p: float):
    """Softmax of `logits` keeping the `top_k` most likely tokens (0: all) within nucleus `top_p`."""
    import torch

    if 0 < top_k < logits.shape[-1]:
        threshold = torch.topk(logits, top_k).values[-1]
        logits = logits.masked_fill(logits < threshold, -math.inf)
    probs = torch.softmax(logits, dim=-1)
    if top_p < 1.0:
        sorted_probs, order = torch.sort(probs, descending=True)
        keep = torch.cumsum(sorted_probs, dim=-1) - sorted_probs < top_p  # the smallest set reaching top_p
        mask = torch.zeros_like(probs, dtype=torch.bool).scatter(0, order, keep)
        probs = torch.where(mask, probs, torch.zeros_like(probs))
        probs = probs / probs.sum()
    return probs


TOKEN_TEXT_WINDOW = 8
"""Tokens decoded before each token to find its text (`token_texts`): enough context for a byte split over
several tokens or a tokenizer's word-start space, and no more, so the cost does not grow with the sequence."""


def token_texts(tokenizer, ids: list[int]) -> list[str]:
    """Each token's text such that their concatenation is the decoded sequence (special tokens as "").

    A token's text is what it adds to the decode of the few tokens before it (`TOKEN_TEXT_WINDOW`), so a
    2,000-token echo costs 2,000 short decodes; where those pieces do not make the whole decode (a
    tokenizer that decodes a window otherwise than the sequence), the texts come from decodes of whole
    prefixes instead. A token that ends inside a multi-byte character gets "" and the character goes to the
    token that completes it.
    """
    whole = tokenizer.decode(ids, skip_special_tokens=True)
    texts, pending = [], 0
    for end in range(1, len(ids) + 1):
        start = max(0, end - 1 - pending - TOKEN_TEXT_WINDOW)
        before = tokenizer.decode(ids[start:end - 1 - pending], skip_special_tokens=True)
        text = tokenizer.decode(ids[start:end], skip_special_tokens=True)
        if (text.endswith("\ufffd") and end < len(ids)) or not text.startswith(before):
            texts.append("")
            pending += 1
            continue
        texts.append(text[len(before):])
        pending = 0
    if "".join(texts) == whole:
        return texts
    return _prefix_token_texts(tokenizer, ids, whole)


def _prefix_token_texts(tokenizer, ids: list[int], whole: str) -> list[str]:
    """`token_texts` from decodes of whole prefixes: exact for any tokenizer, quadratic in the length."""
    texts, shown = [], ""
    for end in range(1, len(ids) + 1):
        text = tokenizer.decode(ids[:end], skip_special_tokens=True)
        if (text.endswith("\ufffd") and end < len(ids)) or not text.startswith(shown):
            texts.append("")
            continue
        texts.append(text[len(shown):])
        shown = text
    if texts and "".join(texts) != whole:  # the sequence ended inside a character: the rest goes to the last token
        texts[-1] += whole[len(shown):]
    return texts


def cut_at_stop(tokens: list[dict], stops: list[str]) -> list[dict]:
    """The tokens up to the earliest match of any stop sequence (excluded) in their text; the token it
    begins in keeps the text before it, so that the tokens' texts still make the returned text."""
    text = "".join(t["text"] for t in tokens)
    cut = min((i for i in (text.find(s) for s in stops if s) if i >= 0), default=None)
    if cut is None:
        return tokens
    kept, length = [], 0
    for token in tokens:
        if length >= cut:
            break
        piece = token["text"][: cut - length]
        kept.append({**token, "text": piece} if piece != token["text"] else token)
        length += len(token["text"])
    return kept


# --- the HTTP API ---

class Body(BaseModel):
    model_config = ConfigDict(extra="ignore")  # HELM or a sample client may send more: ignored, not refused


class ProcessRequest(Body):
    """Every field HELM's HTTPModelClient sends, and the challenge's sample servers' (`num_samples`, `top_k`,
    `seed`); a null is the field's default. One completion is returned whatever `num_samples` or
    `num_return_sequences` ask (the response holds one)."""

    prompt: StrictStr
    num_samples: Optional[Annotated[StrictInt, Field(ge=1, le=64)]] = None
    num_return_sequences: Optional[Annotated[StrictInt, Field(ge=1, le=64)]] = None
    max_new_tokens: Optional[Annotated[StrictInt, Field(ge=0, le=MAX_NEW_TOKENS)]] = None
    top_k: Optional[Annotated[StrictInt, Field(ge=0)]] = None
    top_p: Optional[Annotated[float, Field(gt=0, le=1)]] = None
    temperature: Optional[Annotated[float, Field(ge=0, le=100)]] = None
    seed: Optional[StrictInt] = None
    echo_prompt: Optional[StrictBool] = None
    top_k_per_token: Optional[Annotated[StrictInt, Field(ge=0, le=MAX_TOP_K_PER_TOKEN)]] = None
    stop_sequences: Optional[list[StrictStr]] = None


class TokenizeRequest(Body):
    text: StrictStr
    truncation: Optional[StrictBool] = None
    max_length: Optional[Annotated[StrictInt, Field(ge=1)]] = None


class DecodeRequest(Body):
    tokens: list[StrictInt]



def create_app(engine: Engine):
    """The FastAPI app of the challenge's API on `engine`.

    Request bodies are validated (wrong types, negative or absurd sizes: 422; a body that is not JSON:
    400), each error one line in `{"error": ...}`; unknown fields are ignored. An error while
    answering is a 500 with one line, and the server goes on serving.
    """
    from fastapi import FastAPI, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse

    app = FastAPI(title="sweep serve", description=engine.served.description)

    @app.exception_handler(RequestValidationError)
    def invalid(request: Request, error: RequestValidationError) -> JSONResponse:
        problems = error.errors()
        if any(p.get("type") == "json_invalid" for p in problems):
            return JSONResponse({"error": "the request body is not valid JSON"}, status_code=400)
        return JSONResponse({"error": "; ".join(_problem(p) for p in problems)}, status_code=422)

    @app.exception_handler(BadRequest)
    def bad_request(request: Request, error: BadRequest) -> JSONResponse:
        return JSONResponse({"error": str(error)}, status_code=422)

    @app.exception_handler(Exception)
    def failed(request: Request, error: Exception) -> JSONResponse:
        log.exception("%s failed", request.url.path)
        return JSONResponse({"error": f"{type(error).__name__}: {_first_line(error)}"}, status_code=500)

    @app.post("/process")
    def process(body: ProcessRequest) -> dict[str, Any]:
        return engine.process(
            body.prompt,
            max_new_tokens=50 if body.max_new_tokens is None else body.max_new_tokens,
            temperature=0.8 if body.temperature is None else body.temperature,  # the sample servers' defaults
            top_k=200 if body.top_k is None else body.top_k,
            top_p=1.0 if body.top_p is None else body.top_p,
            seed=body.seed,
            echo_prompt=bool(body.echo_prompt),
            top_k_per_token=1 if body.top_k_per_token is None else body.top_k_per_token,
            stop_sequences=body.stop_sequences or [],
        )

    @app.post("/tokenize")
    def tokenize(body: TokenizeRequest) -> dict[str, Any]:
        truncation = True if body.truncation is None else body.truncation
        return engine.tokenize(body.text, truncation, body.max_length or engine.served.context_length)

    @app.post("/decode")
    def decode(body: DecodeRequest) -> dict[str, Any]:
        return engine.decode(body.tokens)

    @app.get("/")
    def about() -> dict[str, Any]:
        return {"model": engine.served.description, "device": engine.served.device,
                "context_length": engine.served.context_length, "endpoints": ["/process", "/tokenize", "/decode"]}

    return app


def _problem(problem: dict) -> str:
    where = ".".join(str(p) for p in problem.get("loc", ()) if p != "body") or "body"
    return f"{where}: {problem.get('msg', 'invalid')}"


def _first_line(error: BaseException) -> str:
    return next((line.strip() for line in str(error).splitlines() if line.strip()), "")


def bind(host: str, port: int):
    """A listening socket on host:port (port 0: a free one), so a taken port fails before the model loads."""
    import socket

    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError:
        sock.close()
        raise
    sock.listen(128)
    sock.set_inheritable(True)
    return sock


def run(engine: Engine, sock, announce=None) -> None:
    """Serves `engine` on the bound `sock` with uvicorn until interrupted."""
    import uvicorn

    config = uvicorn.Config(create_app(engine), log_level="warning", access_log=False, timeout_keep_alive=30)
    server = uvicorn.Server(config)
    if announce is not None:
        announce()
    server.run(sockets=[sock])
