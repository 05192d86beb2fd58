"""Training data: prompt templates, tokenization with response-only labels, the cache and the weighted mix.

Every source, read or generated, comes from `trainer.sources` as `Example`s; this module only consumes them.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import random
import re
import tempfile
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from trainer.config import DataConfig, SourceConfig
from trainer.demo_base import cache_root
from trainer.examples import ChoiceDoc, Example
from trainer.sources import read_source, source_fingerprint

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
    # Llama-2-chat's turns, written out for a base without a chat template; an earlier turn's reply ends with
    # `turn_end` (EOS, then BOS before the next [INST], as Llama 2 was trained; its tokenizer reads them as tokens).
    "llama2": {
        "with_input": "[INST] {instruction}\n\n{input} [/INST] ",
        "no_input": "[INST] {instruction} [/INST] ",
        "turn_end": " </s><s>",
    },
    "plain": {
        "with_input": "{instruction}\n{input}\n",
        "no_input": "{instruction}\n",
    },
}
DEFAULT_TURN_END = "\n\n"
"""What follows an earlier turn's reply in a template without a `turn_end` of its own."""


@dataclass
class DataStats:
    """What the data preparation did, per source, for the trial record."""

    rows_used: dict[str, int] = field(default_factory=dict)
    """Usable examples each source has (after skipping bad and over-long rows)."""
    rows_skipped: dict[str, int] = field(default_factory=dict)
    skip_reasons: dict[str, dict[str, int]] = field(default_factory=dict)
    """Per source: reason (missing_field, empty_text, overlong, ...) -> count."""
    selected: dict[str, int] = field(default_factory=dict)
    """Examples each source contributes to the mix."""
    weights: dict[str, float] = field(default_factory=dict)
    """The normalised mix weights."""
    tokens: int = 0
    """Tokens of the selected examples (one epoch)."""
    cache_hits: int = 0
    """Sources whose tokenized rows came from the cache."""

    def as_record(self) -> dict:
        return {
            "rows_used": self.rows_used, "rows_skipped": self.rows_skipped, "skip_reasons": self.skip_reasons,
            "selected": self.selected, "weights": {k: round(v, 6) for k, v in self.weights.items()},
            "examples": sum(self.selected.values()), "tokens": self.tokens, "cache_hits": self.cache_hits,
        }


def format_prompt(template: str, instruction: str, input: str = "") -> str:
    """The prompt text a named template puts before the response."""
    parts = TEMPLATES[template]
    if input:
        return parts["with_input"].format(instruction=instruction, input=input)
    return parts["no_input"].format(instruction=instruction)


def resolve_template(tokenizer, template: str) -> str:
    """`auto` -> `chat` when the tokenizer has a chat template, else alpaca; other names unchanged."""
    if template != "auto":
        return template
    return "chat" if getattr(tokenizer, "chat_template", None) else "alpaca"


def render(tokenizer, template: str, example: Example) -> tuple[str, str]:
    """(prompt, full text) of an example; the loss covers only what follows the prompt.

    `template` is resolved (see `resolve_template`). With `chat`, the
    tokenizer's chat template renders the conversation; both texts then carry
    their special tokens, so they are tokenized without adding more.
    """
    user = f"{example.instruction}\n\n{example.input}" if example.input else example.instruction
    if template == "chat":
        messages = []
        for past_user, past_reply in example.history:
            messages += [{"role": "user", "content": past_user}, {"role": "assistant", "content": past_reply}]
        messages.append({"role": "user", "content": user})
        prompt = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        full = tokenizer.apply_chat_template(
            messages + [{"role": "assistant", "content": example.response}], tokenize=False
        )
        if not full.startswith(prompt):  # templates that rewrite earlier turns: keep the prompt as rendered
            full = prompt + example.response
        return prompt, full
    turn_end = TEMPLATES[template].get("turn_end", DEFAULT_TURN_END)
    history = "".join(format_prompt(template, u) + a + turn_end for u, a in example.history)
    prompt = history + format_prompt(template, example.instruction, example.input)
    return prompt, prompt + example.response


NGRAM = 13
"""Length of the word n-grams that decide contamination (as GPT-3's and HELM's checks)."""


def ngrams(text: str, n: int = NGRAM) -> set[int]:
    """64-bit hashes of the text's word n-grams (lowercased letters and digits; punctuation ignored)."""
    words = re.findall(r"[a-z0-9]+", text.lower())
    return {
        int.from_bytes(hashlib.blake2b(" ".join(words[i: i + n]).encode(), digest_size=8).digest(), "little")
        for i in range(len(words) - n + 1)
    }


def example_text(example: Example) -> str:
    """All the text of an example (earlier turns included), for overlap checks."""
    turns = [part for pair in example.history for part in pair]
    return "\n".join([*turns, example.instruction, example.input, example.response])


@dataclass(frozen=True)
class TokenizedSource:
    """One source's examples as token ids, with the length of each prompt (labels mask it).

    Stored flat (`tokens`, with `offsets` of len n + 1) so a large source
    caches and loads as a few arrays.
    """

    tokens: np.ndarray
    offsets: np.ndarray
    prompt_lengths: np.ndarray
    skipped: dict[str, int]

    @classmethod
    def from_lists(cls, ids: list[list[int]], prompt_lengths: list[int], skipped: dict[str, int]):
        offsets = np.zeros(len(ids) + 1, dtype=np.int64)
        offsets[1:] = np.cumsum([len(x) for x in ids])
        tokens = np.fromiter((t for x in ids for t in x), dtype=np.int64, count=int(offsets[-1]))
        return cls(tokens, offsets, np.asarray(prompt_lengths, dtype=np.int64), skipped)

    def __len__(self) -> int:
        return len(self.prompt_lengths)

    def row(self, i: int) -> dict:
        """Example i as NumPy int64 arrays `input_ids` and `labels` (the prompt masked)."""
        ids = self.tokens[self.offsets[i]: self.offsets[i + 1]].astype(np.int64)
        labels = ids.copy()
        labels[: int(self.prompt_lengths[i])] = IGNORE_INDEX
        return {"input_ids": ids, "labels": labels}


def tokenize_examples(
    tokenizer, examples: list[Example], template: str, max_seq_length: int, overlong: str = "skip"
) -> TokenizedSource:
    """Token ids of each example and the length of its prompt (loss on the response only).

    The prompt and the whole text are tokenized the way lm-eval scores
    (whole text, then split at the prompt's length), so training and
    evaluation see the same tokens. An example longer than `max_seq_length`
    is skipped (counted as `overlong`) or, with `overlong="truncate"`, cut.
    """
    template = resolve_template(tokenizer, template)
    special = template != "chat"  # chat templates write their own special tokens
    eos = tokenizer.eos_token_id
    ids_out, prompts, skipped = [], [], Counter()
    for ex in examples:
        prompt, full = render(tokenizer, template, ex)
        if special:
            # A prompt's trailing spaces (llama2's "[/INST] ") go with the response, as lm-eval moves them to the
            # continuation: SentencePiece joins the space to the response's first word.
            prompt = prompt.rstrip(" ")
        prompt_ids = tokenizer(prompt, add_special_tokens=special)["input_ids"]
        ids = tokenizer(full, add_special_tokens=special)["input_ids"]
        if eos is not None and (not ids or ids[-1] != eos):
            ids = ids + [eos]
        n_prompt = min(len(prompt_ids), len(ids) - 1)
        if len(ids) > max_seq_length:
            if overlong == "skip" or n_prompt >= max_seq_length:
                skipped["overlong"] += 1  # with truncation, a cut that leaves no response is skipped too
                continue
            ids = ids[:max_seq_length]
        ids_out.append(ids)
        prompts.append(n_prompt)
    return TokenizedSource.from_lists(ids_out, prompts, dict(skipped))


# --- preparation: read, tokenize (cached), mix -------------------------------

_CACHE_VERSION = 1


@dataclass(frozen=True)
class PreparedData:
    """The training rows of a trial (one epoch of the mix, in selection order) and what was done.

    Rows hold NumPy arrays (`input_ids`, `labels`): a mix of 100k examples stays
    a few hundred MB instead of gigabytes of Python ints.
    """

    rows: list[dict]
    stats: DataStats


def prepare_data(
    tokenizer, config: DataConfig, cache_dir: str | Path | None = None, exclude: frozenset[int] | None = None
) -> PreparedData:
    """Reads every source, tokenizes it (cached by content hash) and draws the weighted mix.

    Args:
        tokenizer: the base model's tokenizer.
        config: sources, mix weights and budget, template and length limit.
        cache_dir: where tokenized sources are cached; default
            `$SWEEP_CACHE_DIR/data` (~/.cache/sweep/data). Trials sharing a
            source, tokenizer and template reuse its entry.
        exclude: n-gram hashes (`ngrams`) of evaluation documents; an example
            sharing one is dropped and counted `contaminated`.
    """
    stats = DataStats(weights=config.weights())
    tokenized: dict[str, TokenizedSource] = {}
    for source, (tokenized[source.name], hit) in zip(
        config.sources, tokenize_sources(tokenizer, config, cache_dir, exclude), strict=True
    ):
        stats.cache_hits += hit
        stats.rows_used[source.name] = len(tokenized[source.name])
        stats.skip_reasons[source.name] = dict(sorted(tokenized[source.name].skipped.items()))
        stats.rows_skipped[source.name] = sum(tokenized[source.name].skipped.values())
    picks = draw_mix(stats.rows_used, stats.weights, config.num_examples, config.seed, every_row=not config.mix)
    rows = []
    for name, indices in picks.items():
        stats.selected[name] = len(indices)
        rows.extend(tokenized[name].row(i) for i in indices)
    stats.tokens = sum(len(r["input_ids"]) for r in rows)
    return PreparedData(rows, stats)


def tokenize_sources(
    tokenizer, config: DataConfig, cache_dir: str | Path | None = None, exclude: frozenset[int] | None = None
):
    """Yields (tokenized rows, 1 if read from the cache) of each source in turn, filtered as a trial's are.

    The rows left are the source's usable examples: bad rows, overlong ones
    (with `overlong: skip`) and excluded ones are counted in `skipped`. Entries
    go to the same cache as `prepare_data`'s, so a check at start costs the
    first trial nothing.
    """
    cache = Path(cache_dir) if cache_dir is not None else cache_root() / "data"
    shared_key = _shared_key(tokenizer, config, exclude)  # once: hashing a large vocabulary takes time
    for source in config.sources:
        yield _tokenized_source(tokenizer, source, config, cache, shared_key, exclude)


def draw_mix(
    sizes: dict[str, int], weights: dict[str, float], num_examples: int | None, seed: int, every_row: bool = False
) -> dict[str, list[int]]:
    """Row indices drawn from each source: `num_examples` split by weight, seeded.

    Shares are rounded by largest remainder so they add up to the budget. A
    source asked for more rows than it has is repeated whole, the remainder
    drawn without replacement. With `every_row` and no budget, every row of
    every source is taken once. Same sizes, weights, budget and seed: same
    indices.
    """
    if every_row and num_examples is None:
        return {name: list(range(n)) for name, n in sizes.items()}
    live = {name: w for name, w in weights.items() if w > 0 and sizes.get(name, 0) > 0}
    if not live:
        raise ValueError("the data mix is empty: every source with a weight > 0 has no usable rows")
    budget = num_examples if num_examples is not None else sum(sizes[name] for name in live)
    total = sum(live.values())
    exact = {name: budget * w / total for name, w in live.items()}
    counts = {name: int(x) for name, x in exact.items()}
    for name in sorted(exact, key=lambda n: (counts[n] - exact[n], n))[: budget - sum(counts.values())]:
        counts[name] += 1
    picks = {}
    for name in sizes:
        n, size = counts.get(name, 0), sizes[name]
        rng = random.Random(f"{seed}:{name}")
        repeats, rest = divmod(n, size) if size else (0, 0)
        indices = list(range(size)) * repeats + sorted(rng.sample(range(size), rest))
        picks[name] = indices
    return picks


def _tokenized_source(
    tokenizer, source: SourceConfig, config: DataConfig, cache: Path, shared_key: str,
    exclude: frozenset[int] | None = None,
) -> tuple[TokenizedSource, int]:
    """The tokenized rows of a source, from the cache when its key matches; (rows, 1 if cached).

    A hit reads no row of the source: the key needs only its fingerprint and
    what all sources share (`_shared_key`).
    """
    key = _digest({"shared": shared_key, "source": source_fingerprint(source), "format": source.row_format,
                   "fields": source.fields})
    path = cache / f"{source.name}-{key[:16]}.npz"
    if path.is_file():
        try:
            with np.load(path) as data:
                if str(data["key"]) == key:
                    skipped_cached = json.loads(str(data["skipped"]))
                    return TokenizedSource(data["tokens"], data["offsets"], data["prompt_lengths"], skipped_cached), 1
        except (OSError, ValueError, KeyError):
            pass  # a broken entry is rebuilt
    rows = read_source(source)
    examples, skipped = rows.examples, dict(rows.skipped)
    if exclude:
        kept = [ex for ex in examples if not ngrams(example_text(ex)) & exclude]
        if len(kept) < len(examples):
            skipped = {**skipped, "contaminated": len(examples) - len(kept)}
        examples = kept
    result = tokenize_examples(tokenizer, examples, config.template, config.max_seq_length, config.overlong)
    result = dataclasses.replace(result, skipped=dict(Counter(skipped) + Counter(result.skipped)))
    cache.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=cache, suffix=".tmp.npz", delete=False) as f:
        np.savez(
            f, key=np.array(key), skipped=np.array(json.dumps(result.skipped)),
            tokens=result.tokens.astype(np.int32),
            offsets=result.offsets, prompt_lengths=result.prompt_lengths,
        )
    os.replace(f.name, path)  # atomic: concurrent trials never read half an entry
    return result, 0


def _shared_key(tokenizer, config: DataConfig, exclude: frozenset[int] | None) -> str:
    """What every source's cache key depends on: the tokenizer, the template, the limits, the excluded n-grams."""
    vocab = tokenizer.get_vocab()
    excluded = np.sort(np.fromiter(exclude, dtype=np.uint64)).tobytes() if exclude else b""
    return _digest({
        "version": _CACHE_VERSION,
        "tokenizer": hashlib.sha256(json.dumps(sorted(vocab.items())).encode()).hexdigest(),
        "tokenizer_class": type(tokenizer).__name__,
        "chat_template": getattr(tokenizer, "chat_template", None), "eos": tokenizer.eos_token_id,
        "template": config.template, "max_seq_length": config.max_seq_length, "overlong": config.overlong,
        "exclude": hashlib.sha256(excluded).hexdigest(),
    })


def _digest(parts: dict) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()


def write_choice_docs(docs: list[ChoiceDoc], path: Path, template: str, tokenizer=None) -> Path:
    """Writes held-out items as JSONL (`prompt`, `choices`, `answer`) for an lm-eval task.

    Prompts are rendered as in training (`tokenizer` is needed for `auto` and chat templates).
    """
    template = resolve_template(tokenizer, template)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for d in docs:
            prompt, _ = render(tokenizer, template, Example(d.instruction, ""))
            row = {"prompt": prompt, "choices": list(d.choices), "answer": d.answer}
            f.write(json.dumps(row) + "\n")
    return path
