"""Scoring a loaded model with lm-eval: local tasks written at run time, hub tasks by name."""

from __future__ import annotations

import time
from dataclasses import dataclass
from itertools import groupby
from pathlib import Path

import yaml

from evaluator.config import GenerationConfig, TaskConfig


@dataclass(frozen=True)
class EvalResult:
    """Per-task scores and the wall time they took."""

    scores: dict[str, float]
    eval_seconds: float


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
) -> EvalResult:
    """Scores `model` on `tasks` with lm-eval and returns each task's metric.

    Args:
        model: a loaded model, a `PeftModel` for an adapter (lm-eval ignores
            `peft=` for model objects, so the adapter must already be attached).
        tokenizer: its tokenizer, passed explicitly.
        tasks: the tasks; local ones must already have a YAML in `task_dir`.
        task_dir: directory of local task YAML files, or None.
        batch_size: requests per forward pass.
        generation: greedy decoding settings of generation tasks (max new
            tokens, stop sequences); None: each task's own.
    """
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM

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
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
    manager = task_manager(tasks, task_dir)
    scores: dict[str, float] = {}
    # simple_evaluate takes one few-shot count, one limit and one set of generation settings per call.
    def key(t: TaskConfig):
        return t.num_fewshot, t.limit or 0, t.max_new_tokens or 0

    for (num_fewshot, limit, max_new_tokens), group in groupby(sorted(tasks, key=key), key=key):
        group = list(group)
        settings = generation or GenerationConfig()
        if max_new_tokens:
            settings = GenerationConfig(max_new_tokens=max_new_tokens, until=settings.until)
        results = simple_evaluate(
            model=lm,
            tasks=[t.name for t in group],
            num_fewshot=num_fewshot,
            limit=limit or None,
            task_manager=manager,
            log_samples=False,
            bootstrap_iters=0,
            gen_kwargs=_gen_kwargs(settings) if generation or max_new_tokens else None,
        )
        for t in group:
            scores[t.name] = _metric(results["results"], t)
    for c, value in zip(configs, saved_cache, strict=True):
        c.use_cache = value
    if was_training:
        model.train()
    return EvalResult(scores=scores, eval_seconds=time.perf_counter() - start)


def task_manager(tasks: list[TaskConfig], task_dir: str | Path | None):
    """lm-eval's task index: the local tasks, the evaluator's shipped ones, and lm-eval's own for hub names."""
    from lm_eval.tasks import TaskManager

    from evaluator.micro import SHIPPED_TASKS

    paths = [str(p) for p in (task_dir, SHIPPED_TASKS) if p]
    shipped = {p.stem for p in SHIPPED_TASKS.glob("*.yaml")}
    # The default index costs seconds to build: only load it when a task needs it.
    return TaskManager(
        include_path=paths, include_defaults=any(not t.is_local and t.name not in shipped for t in tasks)
    )


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
