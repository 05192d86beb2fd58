"""Training data: the demo task's split, templates, response-only labels, JSONL sources."""

from __future__ import annotations

import json

from trainer.config import DataConfig, SourceConfig
from trainer.data import (
    IGNORE_INDEX,
    DataStats,
    Example,
    digit_task,
    format_prompt,
    load_train_examples,
    tokenize_examples,
)
from trainer.demo_base import build_tokenizer


def test_digit_task_is_seeded_and_split_disjoint():
    train, heldout = digit_task(seed=0, num_train=500, num_eval=100)
    again, _ = digit_task(seed=0, num_train=500, num_eval=100)
    assert train == again
    assert len(train) == 500 and len(heldout) == 100
    assert not {d.instruction for d in train} & {d.instruction for d in heldout}
    kinds = {("parity" if d.instruction.startswith("Is ") else d.instruction.split()[2]) for d in heldout}
    assert kinds == {"parity", "larger,", "smaller,"}
    for d in heldout:
        if d.instruction.startswith("Is "):
            last_digit = int(d.instruction.split(" even")[0][-1])
            assert d.choices[d.answer] == ("odd" if last_digit % 2 else "even")


def test_labels_cover_only_the_response():
    tok = build_tokenizer()
    ex = Example(instruction="Which is larger, 3 or 7?", response="7")
    (row,) = tokenize_examples(tok, [ex], "alpaca", 128)
    prompt_len = len(tok(format_prompt("alpaca", ex.instruction))["input_ids"])
    assert row["labels"][:prompt_len] == [IGNORE_INDEX] * prompt_len
    learned = [t for t in row["labels"] if t != IGNORE_INDEX]
    assert learned[-1] == tok.eos_token_id
    assert tok.decode(learned[:-1]).strip() == "7"


def test_jsonl_source_maps_fields_and_counts_skipped_rows(tmp_path):
    path = tmp_path / "d.jsonl"
    rows = [{"q": "Say hi", "a": "hi"}, {"q": "", "a": "x"}, {"q": "Say yes", "a": "yes", "ctx": "now"},
            {"q": "No answer"}]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n[1, 2]\n\n")
    source = SourceConfig(name="mine", kind="jsonl", path=str(path),
                          fields={"instruction": "q", "response": "a", "input": "ctx"})
    stats = DataStats()
    examples = load_train_examples(DataConfig(sources=[source]), stats)
    assert sorted(e.response for e in examples) == ["hi", "yes"]
    assert stats.rows_used == {"mine": 2} and stats.rows_skipped == {"mine": 3}
    assert "now" in format_prompt("alpaca", "Say yes", "now")
