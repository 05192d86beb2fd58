"""`process_results` of the micro summarisation task: ROUGE-2 F1 with `rouge_score`.

Copied beside the task's YAML at run time (lm-eval loads `!function` helpers
from the task's directory); it must import nothing from this project.
"""

from __future__ import annotations


def process_rouge(doc: dict, results: list[str]) -> dict:
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(["rouge2"], use_stemmer=True)
    prediction = results[0].strip() if results else ""
    return {"rouge2": scorer.score(doc["highlights"], prediction)["rouge2"].fmeasure}
