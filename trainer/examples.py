"""The records training data is made of, shared by the readers (`trainer.sources`, `trainer.synthetic`) and the
preparation (`trainer.data`), which import this module and not each other."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Example:
    """One instruction-following example."""

    instruction: str
    response: str
    input: str = ""
    history: tuple[tuple[str, str], ...] = ()
    """Earlier (user, assistant) turns of a conversation, oldest first."""


@dataclass(frozen=True)
class ChoiceDoc:
    """A held-out multiple-choice item: the instruction, the options and the right one."""

    instruction: str
    choices: tuple[str, ...]
    answer: int
