"""Scoring a trial's model with lm-eval: local tasks written at run time, hub tasks by name.

Two paths give the same scores: the fast one (every task in one lm-eval `evaluate` call, requests built once
per worker, `evaluator.lm.SweepLM`'s speed layer, the dense copy and fused kernels where they apply), and plain
lm-eval (stock HFLM and `simple_evaluate`), the reference the fast one is checked against and what runs when
lm-eval is outside the releases `evaluator.compat` was checked against.
"""

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

from evaluator import compat
from evaluator.config import GenerationConfig, TaskConfig
from evaluator.decode import grouped_attention
from evaluator.fast import dense_base, use_dense
from evaluator.fuse import fused_elementwise
from trainer.model import unwrap_peft

log = logging.getLogger(__name__)


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
    fast_path: bool = True
    """Scored by the fast path; False: by plain lm-eval (asked for, or lm-eval outside its checked versions)."""


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
    fast_path: bool = True,
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
        fast_path: false: score with plain lm-eval (`_score_plain`), the
            reference the fast path is checked against; also taken when an
            lm-eval hook is outside its checked versions (`evaluator.compat`).
            The plain path ignores `dequantize`, `fuse_kernels` and the
            generation batch size.
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
    fast = fast_path and compat.fast_scoring()
    dense = False
    try:
        if fast:
            scores, per_doc, dense = _score_fast(model, tokenizer, tasks, task_dir, batch_size, generation,
                                                 dequantize, memory_budget_gib, fuse_kernels)
        else:
            log.info("scoring with plain lm-eval (%s)", "asked for" if not fast_path else "lm-eval out of range")
            scores, per_doc = _score_plain(model, tokenizer, tasks, task_dir, batch_size, generation)
    finally:
        for c, value in zip(configs, saved_cache, strict=True):
            c.use_cache = value
        if was_training:
            model.train()
    stderrs = {name: se for name, values in per_doc.items() if (se := standard_error(values)) is not None}
    return EvalResult(scores=scores, eval_seconds=time.perf_counter() - start, dense=dense, stderrs=stderrs,
                      num_docs={name: len(values) for name, values in per_doc.items() if values}, fast_path=fast)


def _score_fast(model, tokenizer, tasks, task_dir, batch_size, generation, dequantize, memory_budget_gib,
                fuse_kernels) -> tuple[dict[str, float], dict[str, list[float]], bool]:
    """Scores, per-document values and whether the dense copy was used, with the whole speed layer.

    Scoring passes explicit 4D masks (padding, shared-prefix blocks): flex attention, which trials train
    with, would turn each into a block mask. Scoring runs sdpa, reading each key/value head once for its
    group of query heads (`evaluator.decode.grouped_attention`), and puts the model's own back afterwards.
    """
    from evaluator.lm import SweepLM

    device = next(model.parameters()).device
    dense = use_dense(model, dequantize, device, memory_budget_gib)
    fuse = fuse_kernels is True or (fuse_kernels == "auto" and device.type == "cuda")
    with grouped_attention(unwrap_peft(model)), dense_base(model) if dense else contextlib.nullcontext(), \
            fused_elementwise(model) if fuse else contextlib.nullcontext():
        lm = SweepLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, memory_budget_gib=memory_budget_gib,
                     generation_batch_size=generation.batch_size if generation is not None else "auto")
        scores, per_doc = score_tasks(lm, tasks, task_manager(tasks, task_dir), generation)
        del lm  # its decoder's KV cache and CUDA graph go before the dense copy does
    return scores, per_doc, dense


def _score_plain(model, tokenizer, tasks: list[TaskConfig], task_dir, batch_size: int,
                 generation: GenerationConfig | None) -> tuple[dict[str, float], dict[str, list[float]]]:
    """Scores and per-document values from plain lm-eval: stock HFLM on the same in-memory model, and
    `simple_evaluate` with its own seeds, once per set of tasks that share a few-shot count, a limit and
    generation settings (it takes one of each per call). None of the speed layer runs.
    """
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM

    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
    manager = task_manager(tasks, task_dir)
    by_settings: dict[tuple, list[TaskConfig]] = {}
    for t in tasks:
        gen_kwargs = _task_gen_kwargs(t, generation)
        by_settings.setdefault((t.num_fewshot, t.limit, json.dumps(gen_kwargs, sort_keys=True)), []).append(t)
    scores, per_doc = {}, {}
    for (num_fewshot, limit, gen_kwargs), group in by_settings.items():
        results = simple_evaluate(model=lm, tasks=[t.name for t in group], num_fewshot=num_fewshot, limit=limit,
                                  gen_kwargs=json.loads(gen_kwargs), task_manager=manager, bootstrap_iters=0,
                                  log_samples=True)
        for t in group:
            scores[t.name] = _metric(results["results"], t)
            per_doc[t.name] = _sample_values(results, t)
    return scores, per_doc


def _sample_values(results: dict, task: TaskConfig) -> list[float]:
    """The per-document values of the task's metric in `simple_evaluate`'s logged samples (pooled over the
    subtasks of a group)."""
    name, _, filter_key = task.metric.partition(",")
    filter_key = filter_key or "none"
    values = []
    for leaf in _leaf_tasks(task.name, results.get("group_subtasks") or {}):
        for sample in results.get("samples", {}).get(leaf, []):
            value = sample.get(name)
            if sample.get("filter") == filter_key and isinstance(value, bool | int | float):
                values.append(float(value))
    return values


def _leaf_tasks(name: str, subtasks: dict[str, list[str]]) -> list[str]:
    """The tasks under a group (and its groups), or the task itself."""
    if name not in subtasks:
        return [name]
    return [leaf for child in subtasks[name] for leaf in _leaf_tasks(child, subtasks)]


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


def score_tasks(lm, tasks: list[TaskConfig], manager,
                generation: GenerationConfig | None) -> tuple[dict[str, float], dict[str, list[float]]]:
    """Scores every task in one lm-eval `evaluate` call, each with its own few-shot count, limit and generation
    settings.

    `simple_evaluate` takes one few-shot count, one limit and one set of
    generation settings per call, so the default suites took eight calls: eight
    rounds of lm-eval's setup, and the model run eight times at batch sizes
    each call's requests leave. Here the tasks are loaded and set up as
    `simple_evaluate` does (its seeds, its few-shot rules: `evaluator.compat`),
    each with its own settings, and `evaluate` runs them together: all
    log-likelihood requests in one pass, generation batched by settings
    (`SweepLM.generate_until`).

    Returns each task's score and its per-document values of the task's metric (pooled over the
    subtasks of a group).
    """
    from lm_eval.evaluator import evaluate as lm_evaluate

    settings = [_task_gen_kwargs(t, generation) for t in tasks]
    key = _MANAGER_KEYS.get(manager)
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
    compat.seed_as_simple_evaluate()
    merged, members = prepared
    for task in (task for group in members.values() for task in group):
        _DOC_METRICS[task] = []
    with compat.template_cache():
        results = lm_evaluate(lm=lm, task_dict=merged, bootstrap_iters=0, log_samples=False)
    scores = {t.name: _metric(results["results"], t) for t in tasks}
    return scores, {t.name: _doc_values(members[t.name], t.metric) for t in tasks}


_DOC_METRICS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()
"""What each set-up task's `process_results` returned in the current `evaluate` call, in call order."""


def _record_doc_metrics(task, metrics: dict) -> None:
    _DOC_METRICS.setdefault(task, []).append(metrics)


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
"""The last few task sets `score_tasks` loaded and built the requests of, by task settings and files."""


def _task_gen_kwargs(task: TaskConfig, generation: GenerationConfig | None) -> dict | None:
    settings = generation or GenerationConfig()
    if task.max_new_tokens:
        settings = dataclasses.replace(settings, max_new_tokens=task.max_new_tokens)
    return _gen_kwargs(settings) if generation or task.max_new_tokens else None


def _load_tasks(manager, tasks: list[TaskConfig], settings: list[dict | None]) -> tuple[dict, dict[str, list]]:
    """lm-eval's task dict of `tasks`, each set up as `simple_evaluate` would, its requests kept after they are
    first built.

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
            compat.set_up_task(task, t.num_fewshot, t.limit, gen_kwargs)
            compat.keep_requests(task)
            compat.keep_doc_metrics(task, _record_doc_metrics)
        members[t.name] = list(loaded["tasks"].values())
        for key in merged:
            merged[key].update(loaded.get(key) or {})
    return merged, members


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
        _MANAGER_KEYS[manager] = key  # `score_tasks` keeps built requests per index
        _MANAGERS[key] = manager
        while len(_MANAGERS) > 4:
            _MANAGERS.popitem(last=False)
    else:
        _MANAGERS.move_to_end(key)
    return manager


_MANAGERS: collections.OrderedDict = collections.OrderedDict()
_MANAGER_KEYS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
"""The key each index was built under (`task_manager`), which keys the requests built from it (`_PREPARED`)."""


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
