"""The evaluator's scoring from lm-eval's own command line: `python -m evaluator.cli --model sweep ...`."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _printed_scores(table: str) -> dict[str, float]:
    """Task -> value of each row of lm-eval's printed results table (`| task | version | filter | ... |`)."""
    scores = {}
    for line in table.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 9 and re.fullmatch(r"-?\d+(\.\d+)?", cells[6]) and cells[0]:
            scores[cells[0]] = float(cells[6])
    return scores


def test_lm_evals_cli_scores_with_the_sweep_backend_as_the_harness_does(demo_base_dir, tmp_path, fingerprint_task):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from evaluator.config import TaskConfig
    from evaluator.harness import evaluate
    from evaluator.micro import write_micro_task

    task_dir = tmp_path / "tasks"
    write_micro_task("entry_mc", "micro_mc", task_dir, n=30)
    write_micro_task("entry_sum", "micro_sum", task_dir, n=8)
    tasks = [TaskConfig(name="entry_mc", generator="micro_mc", num_docs=30),
             fingerprint_task(task_dir, task_dir / "data" / "entry_sum.jsonl")]
    command = [sys.executable, "-m", "evaluator.cli", "--model", "sweep",
               "--model_args", f"pretrained={demo_base_dir},dtype=float32", "--tasks", "entry_mc,fingerprint",
               "--include_path", str(task_dir), "--batch_size", "8"]
    run = subprocess.run(command, cwd=ROOT, env={**os.environ, "HF_HUB_OFFLINE": "1"}, capture_output=True,
                         text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout.lstrip().startswith("sweep ("), run.stdout[-2000:]  # lm-eval ran our backend
    printed = _printed_scores(run.stdout)
    assert set(printed) == {"entry_mc", "fingerprint"}, run.stdout[-2000:]

    # The same model as HFLM loads it there: the saved float32 weights, the saved tokenizer.
    model = AutoModelForCausalLM.from_pretrained(demo_base_dir, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(demo_base_dir)
    ours = evaluate(model, tokenizer, tasks, task_dir, batch_size=8)
    assert ours.fast_path
    # lm-eval prints at most four decimals: enough to tell 30 documents' accuracies apart, and any change in one
    # of the 8 generations moves their mean fingerprint by about 1/8 of a hash's spread.
    assert {name: round(score, 4) for name, score in ours.scores.items()} == printed
