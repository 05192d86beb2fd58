"""Contamination check: 13-gram overlap between each training source and each evaluation task.

An evaluation document counts as seen in training when one of its word
13-grams (lowercased, punctuation ignored) also occurs in a training example,
as in the GPT-3 and HELM contamination checks. The report counts, per (source,
task), the training examples that share a 13-gram with the task's documents.
Documents come from lm-eval itself (`Task.eval_docs`, rendered with the task's
own `doc_to_text` and target), so local and hub tasks are read the same way.
Texts shorter than 13 words have no 13-gram and never overlap.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from evaluator.config import TaskConfig
from sweep.config import SweepConfig
from trainer.data import example_text, ngrams, read_examples

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
        examples, _ = read_examples(source)
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
    from trainer.data import fingerprint

    key = hashlib.sha256(json.dumps({
        "version": 1,
        "sources": [fingerprint(s) for s in config.data.sources],
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
    widths = [max(len(x[i]) for x in [header, *body]) for i in range(len(header))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(x, widths, strict=True)).rstrip() for x in [header, *body])
