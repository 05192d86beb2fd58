"""`process_results` of summarisation tasks: ROUGE-2 F1 with `rouge_score` (lm-eval has no ROUGE metric).

Used by `sweep_cnn_dailymail` beside it and copied beside the micro
summarisation task at run time (lm-eval loads `!function` helpers from the
task's own directory), so it imports nothing from this project.
"""

from __future__ import annotations


def process_rouge(doc: dict, results: list[str]) -> dict:
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(["rouge2"], use_stemmer=True)
    prediction = results[0].strip() if results else ""
    return {"rouge2": scorer.score(doc["highlights"], prediction)["rouge2"].fmeasure}
