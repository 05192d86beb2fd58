"""The evaluation tasks of a start: the local lm-eval tasks written into its work area, and the contamination
step that compares them with the training data."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Optional

from evaluator.harness import write_choice_task
from evaluator.micro import write_micro_task
from sweep.config import SweepConfig
from sweep.faults import SweepError
from sweep.worker import failure_reason
from trainer.data import render, resolve_template, write_choice_docs
from trainer.examples import Example
from trainer.synthetic import heldout_docs

log = logging.getLogger("sweep")


def prepare_tasks(config: SweepConfig, work_dir: Path) -> Path:
    """Writes the local lm-eval tasks (and their held-out data) into the sweep's work area."""
    task_dir = work_dir / "tasks"
    sources = {s.name: s for s in config.data.sources}
    tokenizer = _prompt_tokenizer(config)
    template = resolve_template(tokenizer, config.data.template)

    def render_prompt(text: str) -> str:  # generated tasks are prompted as the model is trained
        return render(tokenizer, template, Example(text, ""))[0]

    for task in config.evaluator.all_tasks():
        source = sources.get(task.source) if task.source is not None else None
        if source is not None and source.generator != "digits":
            write_micro_task(task.name, source.generator, task_dir, docs=heldout_docs(source), render=render_prompt)
        elif source is not None:
            data_file = write_choice_docs(
                heldout_docs(source), work_dir / "data" / f"{task.name}.jsonl", config.data.template, tokenizer
            )
            write_choice_task(task.name, data_file, task_dir)
        elif task.data_file is not None:
            write_choice_task(task.name, task.data_file, task_dir)
        elif task.generator is not None:
            write_micro_task(task.name, task.generator, task_dir, n=task.num_docs, render=render_prompt)
    task_dir.mkdir(parents=True, exist_ok=True)
    return task_dir


def check_contamination(config: SweepConfig, task_dir: str, work_dir: Path) -> Optional[str]:
    """The contamination step of a sweep start: logs the overlaps and writes them to contamination.json.

    Returns the file of evaluation n-grams the workers drop examples by
    (with `data.drop_contaminated`), else None. A check that cannot run (an
    evaluation dataset out of reach) is a warning unless dropping was asked for.
    Hub sources that are an evaluation task's dataset are warned about first,
    n-gram check or not, and written to contamination-datasets.json.
    """
    from sweep.contamination import cached_overlap_report, shared_datasets

    try:
        shared = shared_datasets(config)
    except Exception as e:  # noqa: BLE001 - a report, like the n-gram one below
        log.warning("Dataset-level contamination check skipped: %s", failure_reason(e))
    else:
        (work_dir / "contamination-datasets.json").write_text(
            json.dumps([r.as_record() for r in shared], indent=2) + "\n")
        for r in shared:
            log.warning("Contamination: %s", r.describe())
    try:
        rows, grams_file = cached_overlap_report(config, task_dir, work_dir / "contamination")
    except Exception as e:  # noqa: BLE001 - the report must not stop a sweep that does not drop examples
        if config.data.drop_contaminated:
            raise SweepError(f"contamination check failed: {failure_reason(e)}") from None
        log.warning("Contamination check skipped: %s", failure_reason(e))
        return None
    (work_dir / "contamination.json").write_text(json.dumps([r.__dict__ for r in rows], indent=2) + "\n")
    found = [r for r in rows if r.overlapping]
    for r in found:
        log.warning("Contamination: %d of %d examples of source %s share a 13-gram with task %s%s",
                    r.overlapping, r.source_examples, r.source, r.task,
                    " (dropped from training)" if config.data.drop_contaminated else "")
    if not found:
        log.info("Contamination check: no training example shares a 13-gram with an evaluation task")
    return str(grams_file) if config.data.drop_contaminated else None


def _prompt_tokenizer(config: SweepConfig):
    """The base tokenizer when prompts depend on it (template `auto`: its chat template, if any)."""
    if config.data.template != "auto":
        return None
    from trainer.model import load_tokenizer

    return load_tokenizer(config.model)

