"""Scoring a loaded model with lm-eval: local tasks written at run time, hub tasks by name."""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import json
import logging
import math
import time
import weakref
from dataclasses import dataclass
from pathlib import Path

import yaml

from evaluator.config import GenerationConfig, TaskConfig
from evaluator.decode import grouped_attention
from evaluator.fast import core_model, dense_base, free_bytes, generation_plan, use_dense
from evaluator.fuse import fused_elementwise

log = logging.getLogger(__name__)
# Generation settings that do not change a greedy decode.
GREEDY_IGNORED = {"top_p", "top_k", "min_p"}


@dataclass(frozen=True)
class EvalResult:
    """Per-task scores and the wall time they took."""

    scores: dict[str, float]
    eval_seconds: float
    dense: bool = False  # scored with the dense copy of the base (`evaluator.fast.dense_base`)
    stderrs: dict[str, float] = dataclasses.field(default_factory=dict)
    """Each task's standard error, from its per-document values (`standard_error`); absent where unknown."""
    num_docs: dict[str, int] = dataclasses.field(default_factory=dict)
    """Documents each task was scored on."""


def write_choice_task(name: str, data_file: str | Path, task_dir: str | Path) -> Path:
    """Writes an lm-eval multiple-choice task over a JSONL file of `prompt`, `choices`, `answer`.

    The data path is written absolute: lm-eval resolves `data_files` against
    its own working directory, not the task file's.
    """
    task_dir = Path(task_dir)
    task_dir.mkdir(parents=True, exist_ok=True)
    spec = {
        "task": name,
        "dataset_path": "json",
        "dataset_kwargs": {"data_files": {"test": str(Path(data_file).resolve())}},
        "test_split": "test",
        "output_type": "multiple_choice",
        "doc_to_text": "prompt",
        "doc_to_choice": "choices",
        "doc_to_target": "answer",
        # The prompt ends where the response starts (as in training): no space.
        "target_delimiter": "",
        "metric_list": [{"metric": "acc", "aggregation": "mean", "higher_is_better": True}],
        "metadata": {"version": 1.0},
    }
    path = task_dir / f"{name}.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


def evaluate(
    model,
    tokenizer,
    tasks: list[TaskConfig],
    task_dir: str | Path | None,
    batch_size: int = 16,
    generation: GenerationConfig | None = None,
    dequantize: bool | str = "auto",
    memory_budget_gib: float | None = None,
    fuse_kernels: bool | str = "auto",
) -> EvalResult:
    """Scores `model` on `tasks` with lm-eval and returns each task's metric.

    Args:
        model: a loaded model, a `PeftModel` for an adapter (lm-eval ignores
            `peft=` for model objects, so the adapter must already be attached).
        tokenizer: its tokenizer, passed explicitly.
        tasks: the tasks; local ones must already have a YAML in `task_dir`.
        task_dir: directory of local task YAML files, or None.
        batch_size: sizes a log-likelihood forward pass (batch_size x 512
            tokens); on CPU, also the generation batch.
        generation: greedy decoding settings of generation tasks (max new
            tokens, stop sequences, batch size); None: each task's own.
        dequantize: score with a dense copy of the 4-bit base and the adapter
            merged in (`evaluator.fast.dense_base`): true, false, or `auto`
            (on a GPU, when it fits in half the free memory).
        memory_budget_gib: the memory cap (GiB) that sizes the dense copy and
            generation batches; None: the whole card.
        fuse_kernels: run RMSNorm, rotary embeddings and the SiLU gate as
            compiled kernels (`evaluator.fuse`): true, false, or `auto` (on a GPU).
    """
    start = time.perf_counter()
    was_training = model.training
    # Caution for callers that train again afterwards: on CPUs with AVX512-BF16,
    # bitsandbytes repacks 4-bit weights for inference the first time a
    # Linear4bit runs in eval mode without grad, and that layout has no backward
    # through the base layers. Trials therefore train before they evaluate; a
    # base kept across trials must restore the training layout first.
    model.eval()
    # Training loads the model with use_cache=False; generation without the KV cache recomputes the
    # whole sequence at every new token. Scoring turns it on and restores it afterwards.
    configs = [c for c in (getattr(model, "config", None), getattr(model, "generation_config", None)) if c]
    saved_cache = [getattr(c, "use_cache", None) for c in configs]
    for c in configs:
        c.use_cache = True
    # Scoring passes explicit 4D masks (padding, shared-prefix blocks): flex attention, which trials train
    # with, would turn each into a block mask. Scoring runs sdpa, reading each key/value head once for its
    # group of query heads (`evaluator.decode.grouped_attention`), and puts the model's own back afterwards.
    device = next(model.parameters()).device
    dense = use_dense(model, dequantize, device, memory_budget_gib)
    fuse = fuse_kernels is True or (fuse_kernels == "auto" and device.type == "cuda")
    try:
        with grouped_attention(core_model(model)), dense_base(model) if dense else contextlib.nullcontext(), \
                fused_elementwise(model) if fuse else contextlib.nullcontext():
            lm = _language_model(model, tokenizer, batch_size, generation, memory_budget_gib)
            scores, per_doc = _score(lm, tasks, task_manager(tasks, task_dir), generation)
            del lm  # its decoder's KV cache and CUDA graph go before the dense copy does
    finally:
        for c, value in zip(configs, saved_cache, strict=True):
            c.use_cache = value
        if was_training:
            model.train()
    stderrs = {name: se for name, values in per_doc.items() if (se := standard_error(values)) is not None}
    return EvalResult(scores=scores, eval_seconds=time.perf_counter() - start, dense=dense, stderrs=stderrs,
                      num_docs={name: len(values) for name, values in per_doc.items() if values})


def standard_error(values: list[float]) -> float | None:
    """The standard error of a mean over per-document values; None under two documents.

    Scoring runs without lm-eval's bootstrap (`bootstrap_iters=0`), so the errors come from the
    documents: binomial, sqrt(p (1 - p) / n), where every value is 0 or 1 (accuracies, exact
    match), else the sample standard deviation over sqrt(n) (ROUGE, say).
    """
    n = len(values)
    if n < 2:
        return None
    mean = sum(values) / n
    if all(v in (0, 1) for v in values):
        return math.sqrt(mean * (1 - mean) / n)
    return math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1) / n)


@contextlib.contextmanager
def _lean_lm_eval():
    """Keeps Jinja from compiling each task template again for every document while scoring (about a
    millisecond each, two or three per document): compiled templates are kept by their text."""
    import functools

    import lm_eval.utils as lm_utils

    compiled = functools.lru_cache(maxsize=1024)(lm_utils.env.from_string)

    def apply_template(template: str, doc: dict) -> str:
        return compiled(template).render(**doc)

    saved = lm_utils.apply_template
    lm_utils.apply_template = apply_template
    try:
        yield
    finally:
        lm_utils.apply_template = saved


def _score(lm, tasks: list[TaskConfig], manager,
           generation: GenerationConfig | None) -> tuple[dict[str, float], dict[str, list[float]]]:
    with _lean_lm_eval():
        return _score_tasks(lm, tasks, manager, generation)


def _score_tasks(lm, tasks: list[TaskConfig], manager,
                 generation: GenerationConfig | None) -> tuple[dict[str, float], dict[str, list[float]]]:
    """Scores every task in one lm-eval `evaluate` call, each with its own few-shot count, limit and generation
    settings.

    `simple_evaluate` takes one few-shot count, one limit and one set of
    generation settings per call, so the default suites took eight calls: eight
    rounds of lm-eval's setup, and the model run eight times at batch sizes
    each call's requests leave. Here the tasks are loaded and set up as
    `simple_evaluate` does (its seeds, its few-shot rules), each with its own
    settings, and `evaluate` runs them together: all log-likelihood requests
    in one pass, generation batched by settings (`SweepLM.generate_until`).

    Returns each task's score and its per-document values of the task's metric (pooled over the
    subtasks of a group).
    """
    import random

    import numpy as np
    import torch
    from lm_eval.evaluator import evaluate as lm_evaluate

    settings = [_task_gen_kwargs(t, generation) for t in tasks]
    key = getattr(manager, "sweep_key", None)
    if key is not None:
        key = (key, tuple((t.name, t.num_fewshot, t.limit, json.dumps(g, sort_keys=True))
                          for t, g in zip(tasks, settings, strict=True)),
               _files_state([t.data_file for t in tasks if t.data_file]))
    prepared = _PREPARED.get(key) if key is not None else None
    if prepared is None:
        prepared = _load_tasks(manager, tasks, settings)
        if key is not None:
            _PREPARED[key] = prepared
            while len(_PREPARED) > 4:
                _PREPARED.popitem(last=False)
    else:
        _PREPARED.move_to_end(key)
    # simple_evaluate's seeds: the same few-shot examples, and the same draws for any sampled generation.
    random.seed(0)
    np.random.seed(1234)
    torch.manual_seed(1234)
    merged, members = prepared
    for task in (task for group in members.values() for task in group):
        _DOC_METRICS[task] = []
    results = lm_evaluate(lm=lm, task_dict=merged, bootstrap_iters=0, log_samples=False)
    scores = {t.name: _metric(results["results"], t) for t in tasks}
    return scores, {t.name: _doc_values(members[t.name], t.metric) for t in tasks}


_DOC_METRICS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()
"""What each set-up task's `process_results` returned in the current `evaluate` call, in call order."""


def _keep_doc_metrics(task) -> None:
    """Keeps what `process_results` returns for each document (lm-eval keeps it only inside `evaluate`)."""
    import functools

    process = task.process_results

    @functools.wraps(process)
    def process_results(doc, results):
        metrics = process(doc, results)
        _DOC_METRICS.setdefault(task, []).append(metrics)
        return metrics

    task.process_results = process_results


def _doc_values(tasks: list, metric: str) -> list[float]:
    """The per-document values of `metric` ("acc", or "exact_match,flexible-extract") over `tasks`.

    lm-eval calls `process_results` once per document for each filter, filter after filter in the
    order of the instances' `filtered_resps`; a call count that does not split that way gives nothing.
    """
    name, _, filter_key = metric.partition(",")
    filter_key = filter_key or "none"
    values: list[float] = []
    for task in tasks:
        calls = _DOC_METRICS.get(task) or []
        filters = list(task.instances[0].filtered_resps) if task.instances else []
        if filter_key not in filters or len(calls) % len(filters):
            return []
        per_filter = len(calls) // len(filters)
        block = calls[filters.index(filter_key) * per_filter:(filters.index(filter_key) + 1) * per_filter]
        for metrics in block:
            value = metrics.get(name)
            if isinstance(value, bool | int | float):
                values.append(float(value))
    return values


_PREPARED: collections.OrderedDict = collections.OrderedDict()
"""The last few task sets `_score_tasks` loaded and built the requests of, by task settings and files."""


def _task_gen_kwargs(task: TaskConfig, generation: GenerationConfig | None) -> dict | None:
    settings = generation or GenerationConfig()
    if task.max_new_tokens:
        settings = dataclasses.replace(settings, max_new_tokens=task.max_new_tokens)
    return _gen_kwargs(settings) if generation or task.max_new_tokens else None


def _load_tasks(manager, tasks: list[TaskConfig], settings: list[dict | None]) -> tuple[dict, dict[str, list]]:
    """lm-eval's task dict of `tasks`, each set up (`_set_up`), its requests kept after they are first built.

    Loading a task and building its requests (templates over every document,
    few-shot sampling) took about a second of each trial's scoring of the
    default suites; a worker scores the same requests trial after trial.
    """
    merged: dict = {"tasks": {}, "groups": {}, "group_map": {}}
    members: dict[str, list] = {}
    for t, gen_kwargs in zip(tasks, settings, strict=True):
        loaded = manager.load([t.name])
        for name, task in loaded["tasks"].items():
            if name in merged["tasks"]:
                raise ValueError(f"lm-eval task {name!r} is scored twice (by {t.name!r} and an earlier task)")
            _set_up(task, t.num_fewshot, t.limit, gen_kwargs)
            _keep_requests(task)
            _keep_doc_metrics(task)
        members[t.name] = list(loaded["tasks"].values())
        for key in merged:
            merged[key].update(loaded.get(key) or {})
    return merged, members


def _keep_requests(task) -> None:
    """Makes the task build its requests once: later calls get the same ones back, their answers cleared."""
    import functools

    build = task.build_all_requests
    kept: list = []

    @functools.wraps(build)
    def build_all_requests(*args, **kwargs):
        if not kept:
            build(*args, **kwargs)
            kept.extend(task._instances)
            return
        for instance in kept:
            instance.resps.clear()
            instance.filtered_resps.clear()
        task._instances = list(kept)

    task.build_all_requests = build_all_requests


def _set_up(task, num_fewshot: int | None, limit: int | None, gen_kwargs: dict | None) -> None:
    """Configures one lm-eval task as `simple_evaluate` would with these arguments."""
    import functools

    if task.get_config("output_type") == "generate_until" and gen_kwargs is not None:
        task.set_config(key="generation_kwargs", value=gen_kwargs, update=True)
    if num_fewshot is not None:
        if task.get_config("num_fewshot") != 0:  # a task whose config says 0 keeps it, as in simple_evaluate
            task.set_config(key="num_fewshot", value=num_fewshot)
    elif task.get_config("num_fewshot") is None:
        task.set_config(key="num_fewshot", value=0)
    task.set_fewshot_seed(seed=1234)
    # `evaluate` gives every task one limit, both when it builds the requests and when it reads the answers
    # back: this task's own goes in instead (the first `limit` documents).
    documents = task.doc_iterator

    @functools.wraps(documents)
    def doc_iterator(*args, **kwargs):
        return documents(*args, **{**kwargs, "limit": limit or None})

    task.doc_iterator = doc_iterator


def _language_model(model, tokenizer, batch_size: int, generation: GenerationConfig | None, budget_gib):
    """lm-eval's HF wrapper around the loaded model, with generation batches of their own size.

    Decoding is bound by per-step overhead, not arithmetic, so it wants far
    larger batches than log-likelihood scoring (whose logits grow with
    batch x length x vocabulary). `generation.batch_size: auto` fits as many
    sequences as the KV cache and the prefill leave room for.
    """
    import torch
    from lm_eval.models.huggingface import HFLM

    from evaluator.decode import GreedyDecoder
    from evaluator.prefix import shared_prefix_loglikelihoods

    planned = generation.batch_size if generation is not None else "auto"

    class SweepLM(HFLM):
        decoder = None  # a GreedyDecoder, made at the first generation request and kept for the next ones
        prefill_rows = None  # rows prefilled at once (the memory plan of the current requests); None: all

        def _model_generate(self, context, max_length, stop, **generation_kwargs):
            kwargs = dict(generation_kwargs)
            attention_mask = kwargs.pop("attention_mask", None)
            sampling = kwargs.pop("do_sample", False) or (kwargs.pop("temperature", 0.0) or 0.0) > 0
            if sampling or set(kwargs) - GREEDY_IGNORED:  # sampling, beams, penalties: transformers' generate
                return super()._model_generate(context, max_length, stop, **generation_kwargs)
            stops = [s for s in stop if s]

            def finished(rows: list[list[int]]) -> list[bool]:
                texts = self.tokenizer.batch_decode(rows, skip_special_tokens=False)
                return [any(s in text for s in stops) for text in texts]

            if self.decoder is None:
                self.decoder = GreedyDecoder(self.model)
            return self.decoder.generate(
                context,
                attention_mask if attention_mask is not None else torch.ones_like(context),
                max_length - context.shape[1], stop_check=finished, eos_token_id=self.eot_token_id,
                pad_token_id=self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0,
                prefill_rows=self.prefill_rows,
            )

        def tok_encode(self, string: str, add_special_tokens: bool | None = None, left_truncate_len=None,
                       **kwargs):
            if kwargs:
                return super().tok_encode(string, add_special_tokens, left_truncate_len, **kwargs)
            cache = token_cache(self.tokenizer)
            key = ("text", self.add_bos_token, add_special_tokens, string)
            ids = cache.get(key)
            if ids is None:
                ids = super().tok_encode(string, add_special_tokens)
                cache.put(key, ids)
            ids = list(ids)
            return ids[-left_truncate_len:] if left_truncate_len else ids

        def loglikelihood(self, requests, disable_tqdm: bool = False):
            pairs = [req.args for req in requests]
            if self.backend != "causal" or any(context == "" for context, _ in pairs):
                return super().loglikelihood(requests, disable_tqdm)
            encoded = encode_pairs(self, pairs)
            return self._loglikelihood_tokens([(pair, *enc) for pair, enc in zip(pairs, encoded, strict=True)],
                                              disable_tqdm=disable_tqdm)

        def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, override_bs=None):
            if self.backend != "causal" or any(len(c) + len(k) > self.max_length for _, c, k in requests):
                return super()._loglikelihood_tokens(requests, disable_tqdm, override_bs)
            started = time.perf_counter()
            results = shared_prefix_loglikelihoods(
                self.model, [(c, k) for _, c, k in requests], self.max_length, token_budget=batch_size * 512
            )
            log.debug("scored %d continuations in %.2fs", len(requests), time.perf_counter() - started)
            for (request, _, _), answer in zip(requests, results, strict=True):
                self.cache_hook.add_partial("loglikelihood", request, answer)
            return results

        def generate_until(self, requests, disable_tqdm: bool = False):
            if not requests:
                return []
            # Tasks with their own settings (max_gen_toks above all) come in one call: each set is planned
            # and decoded on its own, and the answers go back in the requests' order.
            by_settings: dict[str, list[int]] = {}
            for i, request in enumerate(requests):
                by_settings.setdefault(json.dumps(request.args[1], sort_keys=True, default=str), []).append(i)
            if len(by_settings) > 1:
                answers = [""] * len(requests)
                for indices in by_settings.values():
                    part = self.generate_until([requests[i] for i in indices], disable_tqdm)
                    for i, answer in zip(indices, part, strict=True):
                        answers[i] = answer
                return answers
            size, self.prefill_rows = planned, None
            if size == "auto":
                contexts = max(len(self.tok_encode(r.args[0])) for r in requests)
                new = max(int(r.args[1].get("max_gen_toks", self.max_gen_toks)) for r in requests)
                free = free_bytes(self.device, budget_gib)
                if free is not None and self.decoder is not None:  # the kept cache goes if the plan needs more
                    free += self.decoder.cache_bytes()
                plan = generation_plan(self.model.config, free, contexts, new, len(requests), batch_size)
                # Even batches: a short last batch would decode as slowly as a full one (its cache is as wide).
                size = -(-len(requests) // -(-len(requests) // plan.rows))
                self.prefill_rows = min(size, plan.prefill_rows)
                log.info("decoding %d requests %d at a time, prefilled %d at a time (prompts up to %d tokens, "
                         "up to %d new)", len(requests), size, self.prefill_rows, contexts, new)
            saved = self.batch_size_per_gpu
            self.batch_size_per_gpu = size
            try:
                return super().generate_until(requests, disable_tqdm)
            finally:
                self.batch_size_per_gpu = saved

    return SweepLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)


def encode_pairs(lm, pairs: list[tuple[str, str]]) -> list[tuple[list[int], list[int]]]:
    """Token ids of each (context, continuation), as lm-eval's `_encode_pair` makes them, in a few batched calls.

    lm-eval tokenizes each request twice, one call at a time (the context, and
    context plus continuation); a multiple-choice document repeats its context
    once per choice. Here each distinct text is tokenized once, in batches.
    As in `_encode_pair`, a context's trailing spaces move to its continuation,
    and the continuation's tokens are what the whole has past the context's.
    """
    split = []
    for context, continuation in pairs:
        spaces = len(context) - len(context.rstrip())
        split.append((context[:-spaces], context[-spaces:] + continuation) if spaces else (context, continuation))
    texts = list(dict.fromkeys(t for context, continuation in split for t in (context, context + continuation)))
    tokens = dict(zip(texts, _encode_texts(lm, texts), strict=True))
    out = []
    for context, continuation in split:
        context_ids = tokens[context]
        out.append((context_ids, tokens[context + continuation][len(context_ids):]))
    return out


def _encode_texts(lm, texts: list[str]) -> list[list[int]]:
    """`lm.tok_encode` of each text, batched: texts that start with the BOS string get no special tokens.

    Texts seen before with this tokenizer come from `token_cache`.
    """
    bos = lm.tokenizer.decode(lm.prefix_token_id)
    default = {} if lm.add_bos_token is None else {"add_special_tokens": lm.add_bos_token}
    cache = token_cache(lm.tokenizer)
    groups: dict[bool, list[int]] = {}
    out: list[list[int]] = [[] for _ in texts]
    for i, text in enumerate(texts):
        has_bos = bool(bos) and text.startswith(bos)
        hit = cache.get(("pair", lm.add_bos_token, has_bos, text))
        if hit is not None:
            out[i] = list(hit)
        else:
            groups.setdefault(has_bos, []).append(i)
    for has_bos, indices in groups.items():
        kwargs = {"add_special_tokens": False} if has_bos else default
        for i, ids in zip(indices, lm.tokenizer([texts[i] for i in indices], **kwargs)["input_ids"], strict=True):
            out[i] = list(ids)
            cache.put(("pair", lm.add_bos_token, has_bos, texts[i]), out[i])
    return out


class _TokenCache:
    """Token ids by text (and encoding settings), at most `limit` entries; the oldest go first."""

    def __init__(self, limit: int = 500_000):
        self.limit = limit
        self.entries: dict[tuple, tuple[int, ...]] = {}

    def get(self, key: tuple) -> tuple[int, ...] | None:
        return self.entries.get(key)

    def put(self, key: tuple, ids: list[int]) -> None:
        if len(self.entries) >= self.limit:
            for old in list(self.entries)[: self.limit // 4]:
                del self.entries[old]
        self.entries[key] = tuple(ids)


_TOKEN_CACHES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def token_cache(tokenizer) -> _TokenCache:
    """The token ids this tokenizer has produced for scoring, by text.

    A trial scores the same documents with the same prompts (lm-eval seeds
    its few-shot sampling) as the trials before it, and a worker that keeps its
    base keeps its tokenizer: from the second trial on, a worker tokenizes
    nothing it has scored before (on an H100 host, tokenizing the default
    suites' log-likelihood requests took about 0.7 s of a trial's scoring).
    """
    cache = _TOKEN_CACHES.get(tokenizer)
    if cache is None:
        cache = _TOKEN_CACHES[tokenizer] = _TokenCache()
    return cache


def task_manager(tasks: list[TaskConfig], task_dir: str | Path | None):
    """lm-eval's task index: the local tasks, the evaluator's shipped ones, and lm-eval's own for hub names."""
    from lm_eval.tasks import TaskManager

    from evaluator.micro import SHIPPED_TASKS

    paths = [str(p) for p in (task_dir, SHIPPED_TASKS) if p]
    shipped = {p.stem for p in SHIPPED_TASKS.glob("*.yaml")}
    # The default index costs seconds to build (about 10 s on 2 CPU cores): only load it when a task needs it,
    # and keep it for the process's later scoring (every trial of a worker) while the task files stay the same.
    include_defaults = any(not t.is_local and t.name not in shipped for t in tasks)
    key = (tuple(paths), include_defaults, _files_state(paths))
    manager = _MANAGERS.get(key)
    if manager is None:
        manager = TaskManager(include_path=paths, include_defaults=include_defaults)
        manager.sweep_key = key  # `_score_tasks` keeps built requests per index
        _MANAGERS[key] = manager
        while len(_MANAGERS) > 4:
            _MANAGERS.popitem(last=False)
    else:
        _MANAGERS.move_to_end(key)
    return manager


_MANAGERS: collections.OrderedDict = collections.OrderedDict()


def _files_state(paths: list[str]) -> tuple:
    """(path, size, modification time) of every file at or under `paths`: what a cached index or request set
    was built from."""
    state = []
    for path in paths:
        root = Path(path)
        files = [root] if root.is_file() else sorted(root.rglob("*")) if root.is_dir() else []
        for f in files:
            if not f.is_file() or "__pycache__" in f.parts:  # Python's own caches appear after a first import
                continue
            stat = f.stat()
            state.append((str(f), stat.st_size, stat.st_mtime_ns))
    return tuple(state)


def _gen_kwargs(generation: GenerationConfig | None) -> dict | None:
    if generation is None:
        return None
    kwargs = {"max_gen_toks": generation.max_new_tokens, "do_sample": False}
    if generation.until:
        kwargs["until"] = list(generation.until)
    return kwargs


def _metric(results: dict, task: TaskConfig) -> float:
    row = results.get(task.name)
    if row is None:
        raise KeyError(f"lm-eval returned no results for task {task.name!r}")
    for key in (f"{task.metric},none", task.metric):
        if key in row and row[key] is not None:
            return float(row[key])
    available = sorted(k for k in row if "," in k and "stderr" not in k)
    raise KeyError(f"task {task.name!r} has no metric {task.metric!r}; it reports {available}")
