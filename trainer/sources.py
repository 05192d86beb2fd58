"""Reading one training data source into `Example`s: hub datasets, local JSON/JSONL files and the generated
sources (`trainer.synthetic`).

Each named source keeps its own row layout and `format_row` turns one row into its
example. OpenAssistant's oasst1 is the exception: its rows are the messages of
conversation trees, which become examples only together. A bad row never stops a
run: it is skipped and counted by reason, so the trial record says what was left
out and why.

Skip reasons:
    not_json: a line of a JSON Lines file that is not valid JSON (a `.json`
        file that does not parse is an error: there are no rows to keep).
    not_object: the row is not a JSON object.
    missing_field: a required field is absent, null or of the wrong type.
    empty_text: a required text is empty after stripping whitespace.
    bad_answer: mmlu and bbq, the answer (bbq's `label`) names none of the choices.
    no_reply: a user turn without a usable answer (an oasst1 prompter message
        without an English reply, a lima conversation without a complete pair).
    not_english: oasst1, a message whose `lang` is not `en`.
    deleted: oasst1, a message marked deleted.
    review_failed: oasst1, a message whose `review_result` is false.
    missing_parent: oasst1, a prompter message whose earlier turns were not
        read (skipped, or beyond `max_rows`).
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from trainer import compat
from trainer.config import SourceConfig
from trainer.examples import Example
from trainer.synthetic import synthetic_examples, synthetic_fingerprint

DEFAULT_FIELDS = {"instruction": "instruction", "input": "input", "response": "response"}
JSON_LIST_KEYS = ("data", "train", "rows")
"""Keys under which a `.json` object file may hold its list of rows."""
SUMMARIZE_INSTRUCTION = "Summarize the following news article."
CHOICE_LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"
NOT_JSON = object()
"""Stands for a JSON Lines row that did not parse (skipped as `not_json`)."""


@dataclass
class SourceRows:
    """The examples of one source, the rows skipped and what identifies the content read."""

    examples: list[Example]
    skipped: dict[str, int]
    """Rows skipped, by reason (see the module docstring); reasons with no rows are absent."""
    fingerprint: str
    """sha256 hex digest that changes when the content read changes: a cache key for tokenized data."""


def read_source(source: SourceConfig) -> SourceRows:
    """Reads a source into examples, skipping and counting bad rows (a `synthetic` one is generated: none).

    `source.max_rows` caps the rows read, bad ones included. For oasst1 the rows
    are messages: the first `max_rows` messages are read, then the trees are built
    from them (a reply beyond the cap is missing, its prompter counted `no_reply`).

    Args:
        source: The source; a file path is used as given (the caller resolves it
            against the config file's directory).

    Returns:
        The examples in row order, the skip counts and the content's fingerprint.

    Raises:
        ValueError: The kind is unknown, the dataset or path is missing, a file is not valid JSON (the message
            names path:line), or a `.json` file holds no list of rows.
    """
    if source.kind == "hub" and not source.dataset:
        raise ValueError(f"source {source.name!r}: dataset: required for a hub source")
    if source.kind in ("file", "jsonl") and not source.path:
        raise ValueError(f"source {source.name!r}: path: required for a {source.kind} source")
    if source.kind == "synthetic":
        return SourceRows(examples=synthetic_examples(source), skipped={}, fingerprint=synthetic_fingerprint(source))
    if source.kind == "hub":
        rows, fingerprint = _read_hub_rows(source)
    elif source.kind in ("file", "jsonl"):
        rows, fingerprint = _read_file_rows(source)
    else:
        raise ValueError(f"source {source.name!r}: unknown kind {source.kind!r}")
    examples, skipped = _rows_to_examples(source.row_format, rows, source.fields)
    return SourceRows(examples=examples, skipped=skipped, fingerprint=fingerprint)


def source_fingerprint(source: SourceConfig) -> str:
    """The fingerprint `read_source` would give, without parsing any row (for cache lookups).

    Files are hashed; hub datasets are opened (datasets keeps them memory-mapped
    after the first download) only to read their fingerprint; generated sources are named by their settings.
    """
    if source.kind == "synthetic":
        return synthetic_fingerprint(source)
    if source.kind == "hub":
        import datasets

        dataset = datasets.load_dataset(
            source.dataset, source.dataset_subset, split=source.split, revision=source.revision
        )
        return _hub_fingerprint(source, dataset)
    if source.kind in ("file", "jsonl"):
        return _file_fingerprint(source, Path(source.path).read_bytes())
    raise ValueError(f"source {source.name!r}: unknown kind {source.kind!r}")


def format_row(fmt: str, row: dict, fields: dict[str, str] | None = None) -> list[Example] | str:
    """One row of a named format as its examples (usually one), or the reason to skip it.

    Strings are stripped. mmlu rows become the question, the lettered choices and
    "Answer:" (the MMLU prompt), answered by "<letter>. <choice text>". bbq and
    sciq rows are lettered the same way, after bbq's context or sciq's support
    paragraph, and answered by the right choice's text (what lm-eval scores).

    Args:
        fmt: A row format of `SOURCE_FORMATS` other than oasst1, whose examples
            need the whole message tree (`read_source` builds them).
        row: The row as read.
        fields: For format `fields`, target (instruction, input, response) to the
            row's key; input is optional. Default: the same names.

    Returns:
        The row's examples, or a skip reason such as "missing_field".

    Raises:
        ValueError: `fmt` is oasst1 or unknown (bad rows never raise).
    """
    if row is NOT_JSON:
        return "not_json"
    if not isinstance(row, dict):
        return "not_object"
    if fmt == "oasst1":
        raise ValueError("oasst1 rows are messages of conversation trees: read them with read_source")
    if fmt not in _ROW_FORMATTERS:
        raise ValueError(f"unknown row format {fmt!r}")
    if fmt == "fields":
        return _fields_row(row, fields or DEFAULT_FIELDS)
    return _ROW_FORMATTERS[fmt](row)


# ---- reading ----


def _read_file_rows(source: SourceConfig) -> tuple[list[object], str]:
    path = Path(source.path)
    data = path.read_bytes()
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    rows = _json_file_rows(path, text) if path.suffix.lower() == ".json" else _jsonl_rows(text, source.max_rows)
    if source.max_rows is not None:
        rows = rows[: source.max_rows]
    return rows, _file_fingerprint(source, data)


def _file_fingerprint(source: SourceConfig, data: bytes) -> str:
    digest = hashlib.sha256(data)
    digest.update(_canonical({"format": source.row_format, "fields": source.fields, "max_rows": source.max_rows}))
    return digest.hexdigest()


def _json_file_rows(path: Path, text: str) -> list[object]:
    try:
        doc = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}:{e.lineno}: not valid JSON ({e.msg})") from None
    if isinstance(doc, list):
        return doc
    if isinstance(doc, dict):
        for key in JSON_LIST_KEYS:
            if isinstance(doc.get(key), list):
                return doc[key]
    raise ValueError(f"{path}: expected a list of objects, or an object with a list under 'data', 'train' or 'rows'")


def _jsonl_rows(text: str, max_rows: int | None) -> list[object]:
    rows: list[object] = []
    # split("\n"), not splitlines(): JSON strings may hold U+2028 and other line separators.
    for line in text.split("\n"):
        if max_rows is not None and len(rows) >= max_rows:
            break
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            rows.append(NOT_JSON)  # a bad row, skipped and counted like the others
    return rows


def _read_hub_rows(source: SourceConfig) -> tuple[list[object], str]:
    import datasets

    dataset = datasets.load_dataset(source.dataset, source.dataset_subset, split=source.split, revision=source.revision)
    fingerprint = _hub_fingerprint(source, dataset)
    if source.max_rows is not None and source.max_rows < len(dataset):
        dataset = dataset.select(range(source.max_rows))
    return list(dataset), fingerprint


def _hub_fingerprint(source: SourceConfig, dataset) -> str:
    key = {
        "dataset": source.dataset,
        "subset": source.dataset_subset,
        "split": source.split,
        "revision": source.revision,
        "dataset_fingerprint": compat.dataset_fingerprint(dataset),
        "format": source.row_format,
        "fields": source.fields,
        "max_rows": source.max_rows,
    }
    return hashlib.sha256(_canonical(key)).hexdigest()


def _canonical(value: object) -> bytes:
    return json.dumps(value, sort_keys=True, ensure_ascii=True).encode()


def _rows_to_examples(fmt: str, rows: list[object], fields: dict[str, str]) -> tuple[list[Example], dict[str, int]]:
    if fmt == "oasst1":
        return _oasst1_examples(rows)
    examples: list[Example] = []
    skipped: Counter[str] = Counter()
    for row in rows:
        result = format_row(fmt, row, fields)
        if isinstance(result, str):
            skipped[result] += 1
        else:
            examples.extend(result)
    return examples, dict(skipped)


# ---- row formats ----


@dataclass(frozen=True)
class _Skip:
    reason: str


def _text(row: dict, key: str, required: bool = True) -> str | _Skip:
    """The stripped string under `key`; an optional field absent or null reads as ""."""
    value = row.get(key)
    if value is None:
        return _Skip("missing_field") if required else ""
    if not isinstance(value, str):
        return _Skip("missing_field")
    value = value.strip()
    if required and not value:
        return _Skip("empty_text")
    return value


def _example(instruction: str | _Skip, response: str | _Skip, input: str | _Skip = "") -> list[Example] | str:
    for part in (instruction, input, response):
        if isinstance(part, _Skip):
            return part.reason
    return [Example(instruction=instruction, response=response, input=input)]


def _fields_row(row: dict, fields: dict[str, str]) -> list[Example] | str:
    extra = _text(row, fields["input"], required=False) if "input" in fields else ""
    return _example(_text(row, fields["instruction"]), _text(row, fields["response"]), extra)


def _dolly_row(row: dict) -> list[Example] | str:
    return _example(_text(row, "instruction"), _text(row, "response"), _text(row, "context", required=False))


def _alpaca_row(row: dict) -> list[Example] | str:
    # Alpaca's `text` column is the same example already templated: ignored. Platypus shares the layout.
    return _example(_text(row, "instruction"), _text(row, "output"), _text(row, "input", required=False))


def _cnn_dailymail_row(row: dict) -> list[Example] | str:
    return _example(SUMMARIZE_INSTRUCTION, _text(row, "highlights"), _text(row, "article"))


def _gsm8k_row(row: dict) -> list[Example] | str:
    # The answer keeps its worked solution and the final "#### N" line: the model learns both.
    return _example(_text(row, "question"), _text(row, "answer"))


def _lima_row(row: dict) -> list[Example] | str:
    turns = row.get("conversations")
    if not isinstance(turns, list) or not all(isinstance(t, str) for t in turns):
        return "missing_field"
    turns = [t.strip() for t in turns[: len(turns) // 2 * 2]]  # an unanswered last turn is dropped
    if not turns:
        return "no_reply"
    if not all(turns):
        return "empty_text"
    pairs = list(zip(turns[0::2], turns[1::2], strict=True))
    instruction, response = pairs[-1]
    return [Example(instruction=instruction, response=response, history=tuple(pairs[:-1]))]


def _mmlu_row(row: dict) -> list[Example] | str:
    # Some versions of cais/mmlu's auxiliary_train nest each row under "train".
    if "question" not in row and isinstance(row.get("train"), dict):
        row = row["train"]
    question = _text(row, "question")
    if isinstance(question, _Skip):
        return question.reason
    choices = row.get("choices")
    if not isinstance(choices, list) or not 2 <= len(choices) <= len(CHOICE_LETTERS):
        return "missing_field"
    if not all(isinstance(c, str) for c in choices):
        return "missing_field"
    choices = [c.strip() for c in choices]
    if not all(choices):
        return "empty_text"
    answer = _choice_index(row.get("answer"), len(choices))
    if isinstance(answer, _Skip):
        return answer.reason
    lettered = "\n".join(f"{CHOICE_LETTERS[i]}. {c}" for i, c in enumerate(choices))
    instruction = f"{question}\n{lettered}\nAnswer:"
    return [Example(instruction=instruction, response=f"{CHOICE_LETTERS[answer]}. {choices[answer]}")]


def _bbq_row(row: dict) -> list[Example] | str:
    # lm-eval's bbq prompts "{context}\n\nQ: {question}\nA:" and scores the answer's text; here the three answers
    # are lettered as in mmlu, and the response is the right one's text.
    parts = [_text(row, key) for key in ("context", "question", "ans0", "ans1", "ans2")]
    for part in parts:
        if isinstance(part, _Skip):
            return part.reason
    context, question, *choices = parts
    answer = _choice_index(row.get("label"), len(choices))
    if isinstance(answer, _Skip):
        return answer.reason
    lettered = "\n".join(f"{CHOICE_LETTERS[i]}. {c}" for i, c in enumerate(choices))
    return [Example(instruction=f"{context}\n{question}\n{lettered}\nAnswer:", response=choices[answer])]


def _sciq_row(row: dict) -> list[Example] | str:
    parts = [_text(row, key) for key in ("question", "correct_answer", "distractor1", "distractor2", "distractor3")]
    support = _text(row, "support", required=False)  # empty in about a tenth of the rows
    for part in (*parts, support):
        if isinstance(part, _Skip):
            return part.reason
    question, correct, *distractors = parts
    # The rows hold the correct answer apart: the four are ordered by a hash of question and choice, so its letter
    # varies from row to row while a row always reads the same.
    choices = sorted([correct, *distractors], key=lambda c: hashlib.sha256(f"{question}\n{c}".encode()).digest())
    lettered = "\n".join(f"{CHOICE_LETTERS[i]}. {c}" for i, c in enumerate(choices))
    prompt = f"Question: {question}\n{lettered}\nAnswer:"
    return [Example(instruction=f"{support}\n{prompt}" if support else prompt, response=correct)]


def _choice_index(answer: object, num_choices: int) -> int | _Skip:
    """The answer as a choice index: an int index (a ClassLabel) or a letter."""
    if isinstance(answer, bool) or answer is None:
        return _Skip("missing_field")
    if isinstance(answer, int):
        index = answer
    elif isinstance(answer, str) and answer.strip():
        letter = answer.strip().upper()
        index = CHOICE_LETTERS.find(letter) if len(letter) == 1 else -1
    else:
        return _Skip("missing_field")
    return index if 0 <= index < num_choices else _Skip("bad_answer")


_ROW_FORMATTERS = {
    "fields": _fields_row,
    "dolly": _dolly_row,
    "lima": _lima_row,
    "alpaca": _alpaca_row,
    "platypus": _alpaca_row,
    "mmlu": _mmlu_row,
    "cnn_dailymail": _cnn_dailymail_row,
    "gsm8k": _gsm8k_row,
    "bbq": _bbq_row,
    "sciq": _sciq_row,
}


# ---- oasst1 message trees ----


@dataclass(frozen=True)
class _Message:
    id: str
    parent_id: str | None
    role: str
    text: str
    rank: float | None
    order: int


def _oasst1_examples(rows: list[object]) -> tuple[list[Example], dict[str, int]]:
    """One example per English prompter message with an English reply, its thread as history.

    The reply is the top-ranked one (lowest rank; unranked replies after ranked
    ones; ties by row order). The history follows the message's actual parent
    chain, so a turn that answered a lower-ranked reply keeps that reply.
    """
    skipped: Counter[str] = Counter()
    messages: dict[str, _Message] = {}
    for order, row in enumerate(rows):
        message = _oasst1_message(row, order)
        if isinstance(message, _Skip):
            skipped[message.reason] += 1
        else:
            messages[message.id] = message
    top_reply: dict[str, _Message] = {}
    for message in messages.values():
        if message.role == "assistant" and message.parent_id is not None:
            best = top_reply.get(message.parent_id)
            if best is None or _reply_order(message) < _reply_order(best):
                top_reply[message.parent_id] = message
    examples = []
    for message in messages.values():
        if message.role != "prompter":
            continue
        reply = top_reply.get(message.id)
        if reply is None:
            skipped["no_reply"] += 1
            continue
        history = _oasst1_history(message, messages)
        if history is None:
            skipped["missing_parent"] += 1
            continue
        examples.append(Example(instruction=message.text, response=reply.text, history=history))
    return examples, dict(skipped)


def _oasst1_message(row: object, order: int) -> _Message | _Skip:
    if row is NOT_JSON:
        return _Skip("not_json")
    if not isinstance(row, dict):
        return _Skip("not_object")
    message_id, parent_id, role = row.get("message_id"), row.get("parent_id"), row.get("role")
    if not isinstance(message_id, str) or not message_id or role not in ("prompter", "assistant"):
        return _Skip("missing_field")
    if parent_id is not None and not isinstance(parent_id, str):
        return _Skip("missing_field")
    if row.get("deleted") is True:
        return _Skip("deleted")
    if row.get("review_result") is False:
        return _Skip("review_failed")
    if not isinstance(row.get("lang"), str):
        return _Skip("missing_field")
    if row["lang"] != "en":
        return _Skip("not_english")
    text = _text(row, "text")
    if isinstance(text, _Skip):
        return text
    rank = row.get("rank")
    rank = rank if isinstance(rank, (int, float)) and not isinstance(rank, bool) else None
    return _Message(message_id, parent_id, role, text, rank, order)


def _reply_order(message: _Message) -> tuple[bool, float, int]:
    return (message.rank is None, message.rank or 0.0, message.order)


def _oasst1_history(prompt: _Message, messages: dict[str, _Message]) -> tuple[tuple[str, str], ...] | None:
    """The (prompter, assistant) turns above `prompt`, oldest first; None when a turn was not read."""
    pairs = []
    seen = {prompt.id}
    node = prompt
    while node.parent_id is not None:
        reply = messages.get(node.parent_id)
        if reply is None or reply.role != "assistant" or reply.parent_id is None:
            return None
        asker = messages.get(reply.parent_id)
        if asker is None or asker.role != "prompter" or asker.id in seen:
            return None
        seen.add(asker.id)
        pairs.append((asker.text, reply.text))
        node = asker
    return tuple(reversed(pairs))
