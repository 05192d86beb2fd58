"""Training data: the demo task's split, templates, response-only labels, JSONL sources."""

from __future__ import annotations

import json

from trainer.config import DataConfig, SourceConfig
from trainer.data import (
    IGNORE_INDEX,
    draw_mix,
    format_prompt,
    prepare_data,
    render,
    resolve_template,
    tokenize_examples,
)
from trainer.demo_base import build_tokenizer
from trainer.examples import Example
from trainer.synthetic import digit_task


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
    row = tokenize_examples(tok, [ex], "alpaca", 128).row(0)
    prompt_len = len(tok(format_prompt("alpaca", ex.instruction))["input_ids"])
    assert row["labels"][:prompt_len].tolist() == [IGNORE_INDEX] * prompt_len
    learned = [t for t in row["labels"].tolist() if t != IGNORE_INDEX]
    assert learned[-1] == tok.eos_token_id
    assert tok.decode(learned[:-1]).strip() == "7"


def test_overlong_examples_are_skipped_or_truncated():
    tok = build_tokenizer()
    examples = [Example("Say hi", "hi"), Example("Tell a long story", "once upon a time " * 40)]
    skipped = tokenize_examples(tok, examples, "alpaca", 48)
    assert len(skipped) == 1 and skipped.skipped == {"overlong": 1}
    cut = tokenize_examples(tok, examples, "alpaca", 48, overlong="truncate")
    assert len(cut) == 2 and len(cut.row(1)["input_ids"]) == 48 and not cut.skipped


def test_chat_template_is_used_when_the_tokenizer_has_one():
    tok = build_tokenizer()
    assert resolve_template(tok, "auto") == "alpaca"  # the demo tokenizer has none
    tok.chat_template = (
        "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}</s>{% endfor %}"
        "{% if add_generation_prompt %}<|assistant|>{% endif %}"
    )
    assert resolve_template(tok, "auto") == "chat"
    ex = Example("Which is larger, 3 or 7?", "7", history=(("Hi", "Hello"),))
    prompt, full = render(tok, "chat", ex)
    assert prompt == "<|user|>Hi</s><|assistant|>Hello</s><|user|>Which is larger, 3 or 7?</s><|assistant|>"
    assert full == prompt + "7</s>"
    row = tokenize_examples(tok, [ex], "auto", 256).row(0)
    learned = [t for t in row["labels"].tolist() if t != IGNORE_INDEX]
    assert tok.decode(learned).replace(" ", "") == "7</s>"  # the earlier turns are prompt, not loss


def test_llama2_template_writes_inst_turns():
    assert format_prompt("llama2", "Say hi.") == "[INST] Say hi. [/INST] "
    assert format_prompt("llama2", "Translate.", "bonjour") == "[INST] Translate.\n\nbonjour [/INST] "
    ex = Example("And in German?", "Hallo.", history=(("Say hi.", "Hi."), ("In French?", "Salut.")))
    prompt, full = render(None, "llama2", ex)
    assert prompt == ("[INST] Say hi. [/INST] Hi. </s><s>[INST] In French? [/INST] Salut. </s><s>"
                      "[INST] And in German? [/INST] ")
    assert full == prompt + "Hallo."
    tok = build_tokenizer()  # its BOS and EOS are <s> and </s>, as Llama 2's
    row = tokenize_examples(tok, [ex], "llama2", 256).row(0)
    assert row["input_ids"].tolist().count(tok.eos_token_id) == 3  # two earlier turns end in EOS, then the reply
    learned = [t for t in row["labels"].tolist() if t != IGNORE_INDEX]
    assert learned[-1] == tok.eos_token_id
    assert tok.decode(learned[:-1]).strip() == "Hallo."  # the earlier turns are prompt, not loss


def plain(rows):
    """Rows as lists, to compare them."""
    return [{k: v.tolist() for k, v in r.items()} for r in rows]


def _write_jsonl(path, rows):
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return str(path)


def _three_sources(tmp_path):
    dolly = _write_jsonl(tmp_path / "dolly.jsonl", [
        {"instruction": f"Name number {i}", "context": "", "response": f"It is {i}", "category": "qa"}
        for i in range(30)
    ] + [{"instruction": "", "context": "", "response": "x", "category": "qa"}])
    alpaca = _write_jsonl(tmp_path / "alpaca.jsonl", [
        {"instruction": f"Double {i}", "input": "", "output": str(2 * i)} for i in range(10)
    ] + [{"instruction": "Missing output"}])
    mine = _write_jsonl(tmp_path / "mine.jsonl", [{"q": f"Echo {i}", "a": f"{i}"} for i in range(5)])
    return [
        SourceConfig(name="dolly", kind="file", path=dolly, format="dolly"),
        SourceConfig(name="alpaca", kind="file", path=alpaca, format="alpaca"),
        SourceConfig(name="mine", kind="jsonl", path=mine, fields={"instruction": "q", "response": "a"}),
    ]


def test_prepare_data_takes_every_row_without_a_mix(tmp_path):
    sources = _three_sources(tmp_path)
    data = prepare_data(build_tokenizer(), DataConfig(sources=sources), cache_dir=tmp_path / "cache")
    stats = data.stats
    assert stats.rows_used == {"dolly": 30, "alpaca": 10, "mine": 5}
    assert stats.rows_skipped == {"dolly": 1, "alpaca": 1, "mine": 0}
    assert stats.skip_reasons == {"dolly": {"empty_text": 1}, "alpaca": {"missing_field": 1}, "mine": {}}
    assert stats.selected == stats.rows_used and len(data.rows) == 45
    assert stats.tokens == sum(len(r["input_ids"]) for r in data.rows)


def test_mix_draws_by_weight_and_is_seeded(tmp_path):
    sources = _three_sources(tmp_path)
    config = DataConfig(sources=sources, mix={"dolly": 1.0, "alpaca": 2.0, "mine": 1.0}, num_examples=40)
    tok = build_tokenizer()
    data = prepare_data(tok, config, cache_dir=tmp_path / "cache")
    assert data.stats.selected == {"dolly": 10, "alpaca": 20, "mine": 10}  # alpaca and mine repeat rows
    assert data.stats.weights == {"dolly": 0.25, "alpaca": 0.5, "mine": 0.25}
    again = prepare_data(tok, config, cache_dir=tmp_path / "cache")
    assert plain(again.rows) == plain(data.rows)
    other_seed = prepare_data(tok, DataConfig(**{**config.__dict__, "seed": 1}), cache_dir=tmp_path / "cache")
    assert plain(other_seed.rows) != plain(data.rows) and other_seed.stats.selected == data.stats.selected


def test_draw_mix_rounds_to_the_budget():
    picks = draw_mix({"a": 100, "b": 100, "c": 3}, {"a": 1 / 3, "b": 1 / 3, "c": 1 / 3}, 10, seed=0)
    counts = {k: len(v) for k, v in picks.items()}
    assert sum(counts.values()) == 10 and sorted(counts.values()) == [3, 3, 4]
    assert set(picks["c"]) == {0, 1, 2}  # a small source gives all its rows before repeating any
    zero = draw_mix({"a": 5, "b": 5}, {"a": 1.0, "b": 0.0}, 4, seed=0)
    assert len(zero["a"]) == 4 and zero["b"] == []


def test_tokenized_sources_are_cached_by_content(tmp_path):
    sources = _three_sources(tmp_path)
    tok = build_tokenizer()
    config = DataConfig(sources=sources)
    first = prepare_data(tok, config, cache_dir=tmp_path / "cache")
    second = prepare_data(tok, config, cache_dir=tmp_path / "cache")
    assert first.stats.cache_hits == 0 and second.stats.cache_hits == 3
    assert plain(second.rows) == plain(first.rows) and second.stats.skip_reasons == first.stats.skip_reasons
    # Changed content: that source is tokenized again, the others still come from the cache.
    _write_jsonl(tmp_path / "mine.jsonl", [{"q": "Echo once", "a": "once"}])
    third = prepare_data(tok, config, cache_dir=tmp_path / "cache")
    assert third.stats.cache_hits == 2 and third.stats.rows_used["mine"] == 1
