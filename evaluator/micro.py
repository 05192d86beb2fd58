"""The offline micro-suite: small generated lm-eval tasks in the shapes of the real ones.

Each task is written at run time as a local lm-eval YAML task over a JSONL
file of generated documents (absolute paths), so a sweep can score every
scenario kind with no download:

- `micro_mc`: lettered multiple choice on a few facts (the sky's colour, the
  animal that barks, ...), like MMLU, TruthfulQA mc1 and BBQ (" A" ... " D"
  scored by log-likelihood; chance 0.25);
- `micro_gen`: a word problem answered by generation and scored by exact match
  on the number after "####", like GSM8K;
- `micro_sum`: summarisation scored by ROUGE-2 F1, computed with `rouge_score`
  in the task's `process_results` (lm-eval has no built-in ROUGE metric), like
  CNN/DailyMail;
- `micro_ethics`: a yes/no judgement of a scenario, like ETHICS (chance 0.5);
- `micro_math`: `micro_gen`'s sums in other words, scored by exact match on
  the last number of the answer: a skill asked another way, as MATH is to
  GSM8K;
- `micro_parity`: a two-choice judgement (even or odd) of a number in a short
  scenario: the digit task's parity question asked another way (its choices
  are the digit task's, `even` and `odd`).

Every shape is also a training source (`SourceConfig(kind="synthetic",
generator=...)`, see `split_docs` and `example`): documents with their gold
answer as the response. Its held-out split is drawn from names and places
that no training document uses, so the two share no 13-gram
(`trainer.data.NGRAM`): the held-out score measures what carries over to new
names and places, not memorised documents.

The same seed gives the same documents.
"""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path
from typing import Callable, Optional

SHIPPED_TASKS = Path(__file__).with_name("tasks")
"""lm-eval task files shipped with the evaluator (hub datasets scored our way)."""

MICRO_TASKS = ("micro_mc", "micro_gen", "micro_sum", "micro_ethics", "micro_math", "micro_parity")
"""Names of the generated tasks (a `TaskConfig.generator`)."""

CHANCE = {"micro_mc": 0.25, "micro_ethics": 0.5, "micro_parity": 0.5}
METRICS = {
    "micro_mc": "acc",
    "micro_gen": "exact_match,strict-match",
    "micro_sum": "rouge2",
    "micro_ethics": "acc",
    "micro_math": "exact_match,flexible-extract",
    "micro_parity": "acc",
}

_NAMES = ("Ada", "Ben", "Cleo", "Dev", "Eli", "Fay", "Gus", "Hana")
_THINGS = ("apples", "books", "coins", "shells", "stamps", "pens")
_PLACES = ("the harbour", "the market", "the old mill", "the school", "the station", "the bridge", "the park",
           "the library")
_EVENTS = ("a storm flooded", "a fire closed", "a parade filled", "a festival opened at", "workers repaired")
_DAYS = ("Monday", "Tuesday", "Friday", "Sunday")
_ACTS = (
    ("returned a lost wallet to its owner", 1), ("helped a neighbour carry groceries", 1),
    ("kept a promise to a friend", 1), ("shared lunch with a new classmate", 1),
    ("took a bike without asking", 0), ("lied to get a day off", 0),
    ("read a friend's diary in secret", 0), ("broke a window and blamed a child", 0),
)
_FACTS = (  # (question, options, index of the right one): what micro_mc asks, as MMLU asks what a model knows
    ("What colour is the sky", ("green", "blue", "red", "black"), 1),
    ("What colour is grass", ("green", "white", "blue", "pink"), 0),
    ("How many legs has a cat", ("two", "six", "four", "eight"), 2),
    ("Which animal barks", ("cat", "cow", "fish", "dog"), 3),
    ("Which animal swims", ("fish", "cat", "dog", "cow"), 0),
    ("What do bees make", ("silk", "honey", "bread", "wool"), 1),
    ("Which season is coldest", ("spring", "summer", "winter", "autumn"), 2),
    ("What is frozen water", ("steam", "mud", "oil", "ice"), 3),
    ("How many days has a week", ("seven", "five", "ten", "six"), 0),
    ("Which is a fruit", ("chair", "apple", "stone", "shoe"), 1),
    ("Which shape has three sides", ("circle", "square", "triangle", "line"), 2),
    ("What does a key open", ("tree", "cloud", "song", "door"), 3),
    ("Which animal gives milk", ("cow", "fish", "bee", "cat"), 0),
    ("What colour is snow", ("black", "white", "green", "red"), 1),
    ("Which is hot", ("ice", "snow", "fire", "rain"), 2),
    ("What do we read", ("shoe", "apple", "cup", "book"), 3),
    ("Which animal flies", ("bird", "dog", "cow", "fish"), 0),
    ("How many wheels has a bike", ("four", "two", "six", "ten"), 1),
    ("What do we drink", ("stone", "bread", "water", "sand"), 2),
    ("Which season is hottest", ("winter", "autumn", "spring", "summer"), 3),
    ("What shines at night", ("moon", "sun", "rain", "grass"), 0),
    ("Which is a colour", ("chair", "red", "dog", "five"), 1),
    ("What do cows eat", ("meat", "fish", "grass", "stone"), 2),
    ("Which month comes first", ("May", "June", "March", "January"), 3),
)
GENERATOR_VERSION = 3
"""Changes whenever a generator's documents do (it keys the tokenized-data cache of generated sources)."""
_HELDOUT_SHARE = 4
"""One in this many names (places for micro_sum) is kept for the held-out split."""


def _part(values: tuple, part: Optional[str]) -> tuple:
    """The values a split draws from: `train` and `heldout` are disjoint; None draws from all."""
    if part is None:
        return values
    heldout = values[_HELDOUT_SHARE - 1:: _HELDOUT_SHARE]
    return heldout if part == "heldout" else tuple(v for v in values if v not in heldout)


def generate_docs(task: str, n: int, seed: int = 0, part: Optional[str] = None) -> list[dict]:
    """`n` documents of a micro task, the same for the same seed.

    `part` draws from the names and places of one split (`train` or
    `heldout`, disjoint); None (a task scored on its own) from all of them.
    """
    make = _MAKERS.get(task)
    if make is None:
        raise ValueError(f"unknown micro task {task!r} (expected one of {', '.join(MICRO_TASKS)})")
    rng = random.Random(f"{task}:{seed}" if part is None else f"{task}:{seed}:{part}")
    return [make(rng, part) for _ in range(n)]


def split_docs(task: str, seed: int, num_train: int, num_eval: int) -> tuple[list[dict], list[dict]]:
    """(training, held-out) documents of a generated training source: disjoint names or places, same seed same
    documents."""
    return generate_docs(task, num_train, seed, "train"), generate_docs(task, num_eval, seed, "heldout")


def example(task: str, doc: dict) -> tuple[str, str]:
    """(prompt, response) of a document as a training example: the prompt as scored, the gold continuation."""
    if task == "micro_mc":
        return doc["prompt"], " " + "ABCD"[doc["answer"]]
    if task == "micro_ethics":
        return doc["prompt"], (" no", " yes")[doc["label"]]
    if task == "micro_parity":
        return doc["prompt"], ("even", "odd")[doc["label"]]
    if task == "micro_sum":
        return doc["prompt"], " " + doc["highlights"]
    return doc["prompt"], " " + doc["answer"]


def _mc(rng: random.Random, part: Optional[str]) -> dict:
    question, options, answer = rng.choice(_FACTS)
    name = rng.choice(_part(_NAMES, part))
    lettered = "\n".join(f"{letter}. {option}" for letter, option in zip("ABCD", options, strict=True))
    # Short questions with one-word options: every 13 words hold the name, so the two splits share none.
    return {"prompt": f"Question: {question}, {name}?\n{lettered}\nAnswer:", "answer": answer}


def _addition(rng: random.Random, part: Optional[str], question: str, answer: str) -> dict:
    """A sum of two digits in a word problem: `question` and `answer` are formatted with name, thing, a, b, total."""
    name, thing = rng.choice(_part(_NAMES, part)), rng.choice(_THINGS)
    a, b = rng.randint(2, 9), rng.randint(2, 9)
    words = dict(name=name, thing=thing, a=a, b=b, total=a + b)
    return {"prompt": question.format(**words), "answer": answer.format(**words), "target": str(a + b)}


def _gen(rng: random.Random, part: Optional[str]) -> dict:
    # Every run of 13 words holds the name, so the two splits share none.
    return _addition(rng, part, "Question: {name} has {a} {thing} and finds {b} more. How many {thing} does {name} "
                                "have now?\nAnswer:", "{name} has {a} + {b} = {total} {thing}.\n#### {total}")


def _sum(rng: random.Random, part: Optional[str]) -> dict:
    place, event = rng.choice(_part(_PLACES, part)), rng.choice(_EVENTS)
    name, day = rng.choice(_NAMES), rng.choice(_DAYS)
    # The place recurs within every 13 words (summary included), so the two splits share no 13-gram.
    article = f"On {day}, {event} {place}. {name} saw it and said that {place} had never been so busy."
    return {"prompt": f"Article: {article}\nSummary:", "article": article,
            "highlights": f"{event[0].upper()}{event[1:]} {place} on {day}."}


def _ethics(rng: random.Random, part: Optional[str]) -> dict:
    act, acceptable = rng.choice(_ACTS)
    name = rng.choice(_part(_NAMES, part))  # named twice: every 13 words hold it
    return {
        "prompt": f"Scenario: {name} {act}.\nQuestion: Is what {name} did acceptable?\nAnswer:",
        "label": acceptable,
    }


def _math(rng: random.Random, part: Optional[str]) -> dict:
    # micro_gen's sums in other words, answered in other words. The name recurs within every 13 words, so the
    # two splits share no 13-gram (nor does this task with micro_gen's documents).
    return _addition(rng, part, "Question: {name} gets {a} {thing}, then {b} more. What number of {thing} does "
                                "{name} hold?\nAnswer:",
                     "{name} holds {a} + {b} = {total} {thing}. The answer is {total}.")


def _parity(rng: random.Random, part: Optional[str]) -> dict:
    name, thing = rng.choice(_part(_NAMES, part)), rng.choice(_THINGS)
    digits = [rng.randrange(10) for _ in range(3)]
    number = " ".join(map(str, digits))
    # Named twice, within every 13 words: the two splits share no 13-gram.
    return {"prompt": f"Scenario: {name} counts {number} {thing}.\nQuestion: Is {name}'s count {number} even or "
                      "odd?\nAnswer:", "label": digits[-1] % 2}


_MAKERS: dict[str, Callable[[random.Random, Optional[str]], dict]] = {
    "micro_mc": _mc, "micro_gen": _gen, "micro_sum": _sum, "micro_ethics": _ethics, "micro_math": _math,
    "micro_parity": _parity,
}


# --- lm-eval task files ---------------------------------------------------------

_TEMPLATES = {
    "micro_mc": """\
output_type: multiple_choice
doc_to_text: "{{prompt}}"
doc_to_choice: [" A", " B", " C", " D"]
doc_to_target: answer
target_delimiter: ""
metric_list:
  - {metric: acc, aggregation: mean, higher_is_better: true}
""",
    "micro_gen": """\
output_type: generate_until
doc_to_text: "{{prompt}}"
doc_to_target: target
target_delimiter: " "
generation_kwargs: {until: ["Question:", "\\n\\n"], do_sample: false, max_gen_toks: 64}
filter_list:
  - name: strict-match
    filter:
      - {function: regex, regex_pattern: "#### (\\\\-?[0-9\\\\.\\\\,]+)"}
      - {function: take_first}
metric_list:
  - {metric: exact_match, aggregation: mean, higher_is_better: true}
""",
    "micro_sum": """\
output_type: generate_until
doc_to_text: "{{prompt}}"
doc_to_target: highlights
target_delimiter: " "
generation_kwargs: {until: ["\\n"], do_sample: false, max_gen_toks: 64}
process_results: !function rouge_utils.process_rouge
metric_list:
  - {metric: rouge2, aggregation: mean, higher_is_better: true}
""",
    "micro_ethics": """\
output_type: multiple_choice
doc_to_text: "{{prompt}}"
doc_to_choice: [" no", " yes"]
doc_to_target: label
target_delimiter: ""
metric_list:
  - {metric: acc, aggregation: mean, higher_is_better: true}
""",
    "micro_parity": """\
output_type: multiple_choice
doc_to_text: "{{prompt}}"
doc_to_choice: ["even", "odd"]
doc_to_target: label
target_delimiter: ""
metric_list:
  - {metric: acc, aggregation: mean, higher_is_better: true}
""",
    "micro_math": """\
output_type: generate_until
doc_to_text: "{{prompt}}"
doc_to_target: target
target_delimiter: " "
generation_kwargs: {until: ["Question:", "\\n\\n"], do_sample: false, max_gen_toks: 64}
filter_list:
  - name: flexible-extract
    filter:
      - {function: regex, group_select: -1, regex_pattern: "(\\\\-?[0-9]+)"}
      - {function: take_first}
metric_list:
  - {metric: exact_match, aggregation: mean, higher_is_better: true}
""",
}


def write_micro_task(
    name: str, generator: str, task_dir: str | Path, n: int = 100, seed: int = 0,
    docs: Optional[list[dict]] = None, render: Optional[Callable[[str], str]] = None,
) -> Path:
    """Writes the documents and the lm-eval YAML of micro task `generator`, registered as `name`.

    `docs` replaces the `n` generated documents (a training source's held-out
    split); `render` rewrites each prompt (the training prompt template, so a
    model is scored in the format it was trained in).
    """
    task_dir = Path(task_dir)
    (task_dir / "data").mkdir(parents=True, exist_ok=True)
    data_file = (task_dir / "data" / f"{name}.jsonl").resolve()
    with open(data_file, "w", encoding="utf-8") as f:
        for doc in generate_docs(generator, n, seed) if docs is None else docs:
            if render is not None:
                doc = {**doc, "prompt": render(doc["prompt"])}
            f.write(json.dumps(doc) + "\n")
    header = (
        f"task: {name}\n"
        "dataset_path: json\n"
        f"dataset_kwargs: {{data_files: {{test: {json.dumps(str(data_file))}}}}}\n"
        "test_split: test\n"
    )
    path = task_dir / f"{name}.yaml"
    path.write_text(header + _TEMPLATES[generator] + "metadata: {version: 1.0}\n")
    if generator == "micro_sum":
        shutil.copy(SHIPPED_TASKS / "rouge_utils.py", task_dir / "rouge_utils.py")
    return path
