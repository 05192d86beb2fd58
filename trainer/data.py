"""Training data: sources, prompt templates and tokenization with response-only labels."""

from __future__ import annotations

import json
import random
from dataclasses import dataclass, field
from pathlib import Path

from trainer.config import DataConfig, SourceConfig

IGNORE_INDEX = -100

TEMPLATES = {
    "alpaca": {
        "with_input": "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n",
        "no_input": "### Instruction:\n{instruction}\n\n### Response:\n",
    },
    "chatml": {
        "with_input": "<|im_start|>user\n{instruction}\n\n{input}<|im_end|>\n<|im_start|>assistant\n",
        "no_input": "<|im_start|>user\n{instruction}<|im_end|>\n<|im_start|>assistant\n",
    },
    "plain": {
        "with_input": "{instruction}\n{input}\n",
        "no_input": "{instruction}\n",
    },
}


@dataclass(frozen=True)
class Example:
    """One instruction-following example."""

    instruction: str
    response: str
    input: str = ""


@dataclass(frozen=True)
class ChoiceDoc:
    """A held-out multiple-choice item: the instruction, the options and the right one."""

    instruction: str
    choices: tuple[str, ...]
    answer: int


@dataclass
class DataStats:
    """Counts of rows used and skipped per source, for the trial record."""

    rows_used: dict[str, int] = field(default_factory=dict)
    rows_skipped: dict[str, int] = field(default_factory=dict)
    tokens: int = 0


def format_prompt(template: str, instruction: str, input: str = "") -> str:
    """The prompt text the model sees before its response."""
    parts = TEMPLATES[template]
    if input:
        return parts["with_input"].format(instruction=instruction, input=input)
    return parts["no_input"].format(instruction=instruction)


def load_train_examples(config: DataConfig, stats: DataStats | None = None) -> list[Example]:
    """All training examples of all sources, in a seeded shuffled order."""
    stats = stats if stats is not None else DataStats()
    examples: list[Example] = []
    for source in config.sources:
        rows, skipped = load_source(source)
        stats.rows_used[source.name] = len(rows)
        stats.rows_skipped[source.name] = skipped
        examples.extend(rows)
    random.Random(0).shuffle(examples)
    return examples


def load_source(source: SourceConfig) -> tuple[list[Example], int]:
    """The training split of one source and the number of rows skipped as unusable."""
    if source.kind == "synthetic":
        train, _ = digit_task(source.seed, source.num_train, source.num_eval)
        return [Example(d.instruction, d.choices[d.answer]) for d in train], 0
    if source.kind == "jsonl":
        return _load_jsonl(source)
    raise ValueError(f"unknown source kind {source.kind!r}")


def heldout_docs(source: SourceConfig) -> list[ChoiceDoc]:
    """The held-out split of a source that has one (the synthetic task)."""
    if source.kind != "synthetic":
        raise ValueError(f"source {source.name!r} ({source.kind}) has no held-out split")
    _, heldout = digit_task(source.seed, source.num_train, source.num_eval)
    return heldout


def _load_jsonl(source: SourceConfig) -> tuple[list[Example], int]:
    fields = source.fields
    examples, skipped = [], 0
    with open(source.path, encoding="utf-8") as f:
        for line_no, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{source.path}:{line_no}: not valid JSON ({e.msg})") from None
            if not isinstance(row, dict):
                skipped += 1
                continue
            instruction = row.get(fields["instruction"])
            response = row.get(fields["response"])
            if not instruction or not response:
                skipped += 1
                continue
            extra = row.get(fields["input"], "") if "input" in fields else ""
            examples.append(Example(str(instruction), str(response), str(extra or "")))
    return examples, skipped


def digit_task(seed: int, num_train: int, num_eval: int) -> tuple[list[ChoiceDoc], list[ChoiceDoc]]:
    """The demo task: three kinds of two-choice questions about digits.

    Parity of a three-digit number (decided by its last digit), the larger and
    the smaller of two digits. A randomly initialised base answers at chance;
    a LoRA adapter learns the rules within a hundred or so steps, faster or
    slower depending on its learning rate and rank. The held-out questions
    never occur in training (the space of 1180 questions is small, so training
    repeats some of its own).
    """
    rng = random.Random(seed)
    heldout: dict[str, ChoiceDoc] = {}
    while len(heldout) < num_eval:
        doc = _draw_digit_question(rng)
        heldout.setdefault(doc.instruction, doc)
    train: list[ChoiceDoc] = []
    while len(train) < num_train:
        doc = _draw_digit_question(rng)
        if doc.instruction not in heldout:
            train.append(doc)
    return train, list(heldout.values())


def _draw_digit_question(rng: random.Random) -> ChoiceDoc:
    kind = rng.randrange(3)
    if kind == 0:
        digits = [rng.randrange(10) for _ in range(3)]
        number = " ".join(map(str, digits))
        return ChoiceDoc(f"Is {number} even or odd?", ("even", "odd"), digits[-1] % 2)
    a, b = rng.sample(range(10), 2)
    word = "larger" if kind == 1 else "smaller"
    pick = max(a, b) if kind == 1 else min(a, b)
    return ChoiceDoc(f"Which is {word}, {a} or {b}?", (str(a), str(b)), (a, b).index(pick))


def tokenize_examples(tokenizer, examples: list[Example], template: str, max_seq_length: int):
    """Token ids and labels per example; labels mask the prompt (loss on the response only).

    The prompt and the whole text are tokenized the way lm-eval does for
    scoring (whole text, then split at the prompt's length), so training and
    evaluation see the same tokens.
    """
    eos = tokenizer.eos_token_id
    rows = []
    for ex in examples:
        prompt = format_prompt(template, ex.instruction, ex.input)
        prompt_ids = tokenizer(prompt)["input_ids"]
        ids = tokenizer(prompt + ex.response)["input_ids"] + [eos]
        n_prompt = min(len(prompt_ids), len(ids) - 1)
        ids = ids[:max_seq_length]
        labels = [IGNORE_INDEX] * n_prompt + ids[n_prompt:]
        labels = labels[: len(ids)]
        if all(label == IGNORE_INDEX for label in labels):
            continue  # the response was truncated away: nothing to learn from
        rows.append({"input_ids": ids, "labels": labels})
    return rows


def write_choice_docs(docs: list[ChoiceDoc], template: str, path: Path) -> Path:
    """Writes held-out items as JSONL (`prompt`, `choices`, `answer`) for an lm-eval task."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for d in docs:
            row = {"prompt": format_prompt(template, d.instruction), "choices": list(d.choices), "answer": d.answer}
            f.write(json.dumps(row) + "\n")
    return path
