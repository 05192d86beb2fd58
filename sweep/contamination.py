"""Contamination check: 13-gram overlap between each training source and each evaluation task.

An evaluation document counts as seen in training when one of its word
13-grams (lowercased, punctuation ignored) also occurs in a training example,
as in the GPT-3 and HELM contamination checks. The report counts, per (source,
task), the training examples that share a 13-gram with the task's documents.
Documents come from lm-eval itself (`Task.eval_docs`, rendered with the task's
own `doc_to_text` and target), so local and hub tasks are read the same way.
Texts shorter than 13 words have no 13-gram and never overlap.

A coarser check needs no data at all: a hub source whose dataset is the one an
evaluation task reads (lm-eval's `dataset_path`, from the task's YAML) trains on
the very dataset being scored (`shared_datasets`). It runs offline, before
anything is downloaded, when the 13-gram check cannot.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional

import numpy as np

from evaluator.config import TaskConfig
from sweep.config import SweepConfig
from trainer.data import example_text, ngrams
from trainer.sources import read_source

log = logging.getLogger("sweep")


@dataclass(frozen=True)
class Overlap:
    """One row of the report."""

    source: str
    task: str
    overlapping: int
    """Training examples of `source` sharing a 13-gram with the task's documents."""
    source_examples: int
    task_docs: int


@dataclass(frozen=True)
class SharedDataset:
    """A hub source that is the dataset an evaluation task reads: training on the dataset being scored."""

    source: str
    task: str
    dataset: str
    """The source's dataset id, as the config writes it."""
    task_dataset: str
    """The dataset the task reads (its `dataset_path`), which `dataset` names up to case or the org prefix."""
    trained_split: str
    scored_split: Optional[str]
    """The split lm-eval scores (the task's test split, else its validation split; a group's subtasks may
    score several: comma-separated); None when the task's YAML does not say."""

    @property
    def same_split(self) -> bool:
        """Whether the split trained on is one the task scores: the very documents scored are trained on."""
        return self.scored_split is not None and self.trained_split in self.scored_split.split(",")

    def as_record(self) -> dict:
        return {**self.__dict__, "same_split": self.same_split}

    def describe(self) -> str:
        same = ": the same split" if self.same_split else ""
        return (f"source {self.source} trains on {self.dataset}, the dataset task {self.task} reads (split "
                f"{self.trained_split} trained, {self.scored_split or 'unknown'} scored{same})")


def shared_datasets(config: SweepConfig) -> list[SharedDataset]:
    """Each (hub source, lm-eval task) pair where the source's dataset is one the task reads.

    Reads lm-eval's task index only (YAML, no dataset): it answers offline. A
    group (or tag) counts when any of its subtasks reads the dataset. Ids match
    case-insensitively, and a bare name matches any org's (`gsm8k` is
    `openai/gsm8k`); two different orgs do not match, nor does a local path.
    """
    sources = [s for s in config.data.sources if s.kind == "hub" and s.dataset]
    tasks = [t for t in config.evaluator.all_tasks() if not t.is_local]
    if not sources or not tasks:
        return []
    from evaluator.harness import task_manager

    logging.getLogger("lm_eval").setLevel(logging.WARNING)
    index = task_manager(tasks, None).task_index
    rows = []
    for task in tasks:
        leaves = [c for c in _leaf_configs(index, task.name) if isinstance(c.get("dataset_path"), str)]
        for source in sources:
            matched = [c for c in leaves if _same_dataset(source.dataset, c["dataset_path"])]
            if not matched:
                continue
            splits = sorted({split for c in matched if isinstance(split := _scored_split(c), str)})
            rows.append(SharedDataset(source.name, task.name, source.dataset, matched[0]["dataset_path"],
                                      source.split, ",".join(splits) or None))
    return rows


def _leaf_configs(index, item, overrides: Optional[dict] = None, base_dir: Optional[Path] = None,
                  depth: int = 0) -> Iterator[dict]:
    """The config of every task `item` (a name, or a group's entry) stands for, as lm-eval's TaskFactory builds
    groups: a name is a task, a group (its `task` list) or a tag (its tasks); a dict refers to a registered
    task or group with overrides, or defines one inline (its `include` read relative to the group's YAML)."""
    if depth > 16:  # a cycle of groups: lm-eval refuses it when loading
        return
    overrides = overrides or {}
    if isinstance(item, dict):
        rest = {k: v for k, v in item.items() if k not in ("task", "group")}
        name = item.get("group", item.get("task"))
        if isinstance(name, str) and name in index:
            yield from _leaf_configs(index, name, {**overrides, **rest}, base_dir, depth + 1)
        elif "group" in item:
            for child in _as_list(item.get("task")):
                yield from _leaf_configs(index, child, overrides, base_dir, depth + 1)
        else:
            included = _task_yaml(base_dir / rest.pop("include")) if base_dir and "include" in rest else {}
            yield {**included, **overrides, **rest}
        return
    entry = index.get(item) if isinstance(item, str) else None
    if entry is None:
        return
    base_dir = entry.yaml_path.parent if entry.yaml_path else base_dir
    kind = entry.kind.name  # lm-eval's Kind: TASK, PY_TASK, GROUP, TAG
    if kind == "TAG":
        for name in sorted(entry.tags):
            yield from _leaf_configs(index, name, overrides, base_dir, depth + 1)
    elif kind == "GROUP":
        for child in _as_list((entry.cfg or {}).get("task")):
            yield from _leaf_configs(index, child, overrides, base_dir, depth + 1)
    else:
        yield {**(entry.cfg or {}), **overrides}


def _as_list(value) -> list:
    return value if isinstance(value, list) else [value] if value is not None else []


def _task_yaml(path: Path, depth: int = 0) -> dict:
    """A task YAML with its includes merged (theirs first), `!function` values read as None."""
    import yaml

    loader = type("_TaskLoader", (yaml.SafeLoader,), {})
    loader.add_constructor("!function", lambda _loader, _node: None)
    try:
        cfg = yaml.load(path.read_text(), Loader=loader)  # noqa: S506 - a SafeLoader
    except (OSError, yaml.YAMLError):
        return {}
    if not isinstance(cfg, dict):
        return {}
    merged: dict = {}
    for include in _as_list(cfg.pop("include", None)):
        if depth < 8 and isinstance(include, str):
            merged.update(_task_yaml(path.parent / include, depth + 1))
    return {**merged, **cfg}


def _scored_split(cfg: dict) -> Optional[str]:
    # lm-eval scores the test documents when a task has them, else the validation ones.
    return cfg.get("test_split") or cfg.get("validation_split")


def _hub_id(dataset: str) -> Optional[tuple[Optional[str], str]]:
    """(org, name) of a hub dataset id, lowercased (org None for a bare name); None for a local path."""
    text = dataset.strip().lower().rstrip("/")
    if text.startswith((".", "/", "~")) or text.count("/") > 1 or not text:
        return None
    org, _, name = text.rpartition("/")
    return org or None, name


def _same_dataset(source_dataset: str, task_dataset: str) -> bool:
    if source_dataset.strip().lower() == task_dataset.strip().lower():
        return True
    a, b = _hub_id(source_dataset), _hub_id(task_dataset)
    if a is None or b is None or a[1] != b[1]:
        return False
    return a[0] is None or b[0] is None or a[0] == b[0]


def hub_unreachable(error: BaseException) -> bool:
    """Whether `error` (or one it came from) is the hub out of reach: offline mode, no connection, or a file
    that is neither in the local cache nor downloadable. Other errors are real faults."""
    from huggingface_hub.errors import LocalEntryNotFoundError

    seen = 0
    while error is not None and seen < 16:
        # datasets raises the built-in ConnectionError; httpx's and requests' connection errors are not one.
        if isinstance(error, (ConnectionError, TimeoutError, LocalEntryNotFoundError)) or type(error).__name__ in (
            "ConnectError", "ConnectTimeout", "OfflineModeIsEnabled"
        ):
            return True
        error = error.__cause__ or error.__context__
        seen += 1
    return False


def format_shared(rows: list[SharedDataset]) -> str:
    """The dataset-level rows as a table under one line saying what they mean."""
    header = ["source", "task", "dataset", "trained split", "scored split"]
    body = [[r.source, r.task, r.dataset if r.dataset.lower() == r.task_dataset.lower()
             else f"{r.dataset} ({r.task_dataset})", r.trained_split,
             (r.scored_split or "unknown") + (" (same)" if r.same_split else "")] for r in rows]
    title = "Training sources that are the dataset an evaluation task reads:"
    return title + "\n" + _table(header, body)


def task_documents(tasks: list[TaskConfig], task_dir: str | Path) -> dict[str, list[str]]:
    """The text (prompt and target) of every evaluation document of each task, through lm-eval."""
    from lm_eval.tasks import get_task_dict

    from evaluator.harness import task_manager

    logging.getLogger("lm_eval").setLevel(logging.WARNING)
    try:
        import datasets

        datasets.disable_progress_bars()
    except ImportError:
        pass
    manager = task_manager(tasks, task_dir)
    docs: dict[str, list[str]] = {}
    for task in tasks:
        texts: list[str] = []
        _collect(get_task_dict([task.name], manager), texts)
        docs[task.name] = texts
    return docs


def _collect(node, texts: list[str]) -> None:
    """Walks lm-eval's task dict (groups nest their subtasks) and renders each document."""
    if isinstance(node, dict):
        for child in node.values():
            _collect(child, texts)
        return
    for doc in node.eval_docs:
        prompt = node.doc_to_text(doc)
        target = node.doc_to_target(doc)
        if isinstance(target, int) and node.OUTPUT_TYPE == "multiple_choice":
            choices = node.doc_to_choice(doc)
            target = choices[target] if 0 <= target < len(choices) else ""
        texts.append(f"{prompt} {target}")


def overlap_report(config: SweepConfig, task_dir: str | Path) -> tuple[list[Overlap], frozenset[int]]:
    """The (source, task) overlaps, and the n-gram hashes of all evaluation documents."""
    documents = task_documents(config.evaluator.all_tasks(), task_dir)
    task_ngrams = {name: set().union(*(ngrams(t) for t in texts)) for name, texts in documents.items()}
    rows = []
    for source in config.data.sources:
        examples = read_source(source).examples
        counts = dict.fromkeys(task_ngrams, 0)
        for ex in examples:  # one example's n-grams at a time: a large source never sits in memory as n-grams
            grams = ngrams(example_text(ex))
            for name, task_grams in task_ngrams.items():
                counts[name] += not grams.isdisjoint(task_grams)
        rows.extend(Overlap(source.name, name, n, len(examples), len(documents[name])) for name, n in counts.items())
    return rows, frozenset().union(*task_ngrams.values())


def cached_overlap_report(config: SweepConfig, task_dir: str | Path, cache_dir: str | Path):
    """`overlap_report`, reused from `cache_dir` while the sources' content and the tasks are unchanged.

    Hashing every 13-gram of large sources takes minutes: a resumed sweep
    must not pay it again. Returns (rows, path of the saved evaluation n-grams).
    """
    import hashlib
    import json

    from sweep.config import to_dict
    from trainer.sources import source_fingerprint

    key = hashlib.sha256(json.dumps({
        "version": 1,
        "sources": [source_fingerprint(s) for s in config.data.sources],
        "tasks": [to_dict(t) for t in config.evaluator.all_tasks()],
        "task_files": sorted(p.name for p in Path(task_dir).glob("*.yaml")),
        "data_files": [hashlib.sha256(Path(t.data_file).read_bytes()).hexdigest()
                       for t in config.evaluator.all_tasks() if t.data_file],
    }, sort_keys=True, default=str).encode()).hexdigest()[:16]
    cache = Path(cache_dir)
    report, grams_file = cache / f"report-{key}.json", cache / f"eval-ngrams-{key}.npy"
    if report.is_file() and grams_file.is_file():
        return [Overlap(**row) for row in json.loads(report.read_text())], grams_file
    rows, grams = overlap_report(config, task_dir)
    save_ngrams(grams, grams_file)
    report.write_text(json.dumps([r.__dict__ for r in rows], indent=2) + "\n")
    return rows, grams_file


def save_ngrams(grams: frozenset[int], path: str | Path) -> Path:
    """Writes n-gram hashes for the workers (a sorted uint64 array)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    np.save(path, np.sort(np.fromiter(grams, dtype=np.uint64, count=len(grams))))
    return path


def load_ngrams(path: str | Path) -> frozenset[int]:
    return frozenset(int(x) for x in np.load(path))


def format_report(rows: list[Overlap]) -> str:
    header = ["source", "task", "overlapping examples", "source examples", "task docs"]
    body = [[r.source, r.task, str(r.overlapping), str(r.source_examples), str(r.task_docs)] for r in rows]
    return _table(header, body)


def _table(header: list[str], body: list[list[str]]) -> str:
    widths = [max(len(x[i]) for x in [header, *body]) for i in range(len(header))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(x, widths, strict=True)).rstrip() for x in [header, *body])
