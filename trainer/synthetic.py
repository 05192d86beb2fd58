"""The generated sources (`kind: synthetic`): the digit task here, the micro tasks' shapes in `evaluator.micro`.

Each has a training split, read like any other source (`trainer.sources.read_source`), and a held-out split
that never overlaps it, which the sweep scores (`heldout_docs`).
"""

from __future__ import annotations

import random

from trainer.config import SourceConfig
from trainer.examples import ChoiceDoc, Example


def synthetic_examples(source: SourceConfig) -> list[Example]:
    """The training examples of a synthetic source (generated: none is ever skipped)."""
    if source.generator != "digits":
        from evaluator.micro import example, split_docs

        train, _ = split_docs(source.generator, source.seed, source.num_train, 0)
        return [Example(*example(source.generator, d)) for d in train]
    train, _ = digit_task(source.seed, source.num_train, source.num_eval)
    return [Example(d.instruction, d.choices[d.answer]) for d in train]


def synthetic_fingerprint(source: SourceConfig) -> str:
    """What identifies a synthetic source's training split: the generator (and its version), seed and sizes."""
    if source.generator != "digits":
        from evaluator.micro import GENERATOR_VERSION

        return f"synthetic:{source.generator}:{GENERATOR_VERSION}:{source.seed}:{source.num_train}"
    return f"synthetic:{source.seed}:{source.num_train}:{source.num_eval}"


def heldout_docs(source: SourceConfig) -> list:
    """The held-out split of a source that has one (a synthetic source).

    `ChoiceDoc`s of the digit task; for a micro shape, lm-eval documents of
    that micro task (`evaluator.micro`), drawn from names and places its
    training split never uses.
    """
    if source.kind != "synthetic":
        raise ValueError(f"source {source.name!r} ({source.kind}) has no held-out split")
    if source.generator != "digits":
        from evaluator.micro import split_docs

        return split_docs(source.generator, source.seed, 0, source.num_eval)[1]
    _, heldout = digit_task(source.seed, source.num_train, source.num_eval)
    return heldout


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
