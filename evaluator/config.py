"""Typed settings of the evaluator library: which lm-eval tasks score a model, and how."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Optional


def doc(text: str, **kwargs):
    """A dataclass field with documentation (kept in metadata for the README reference)."""
    return field(metadata={"doc": text}, **kwargs)


# Upper bounds of the settings whose size is what scoring allocates: far above any real run, so that a typo
# is an error at validation rather than a worker that takes the machine's memory.
MAX_GENERATED_DOCS = 100_000
"""Documents of a generated micro task: 7x MMLU's 14,042 test questions; lm-eval builds every request at once."""
MAX_NEW_TOKENS = 2**17
"""Tokens generated per request: the longest context windows of open models (128k); each decoded row keeps a
KV cache of its prompt plus this many tokens."""
MAX_SCORING_BATCH = 1024
"""evaluator.batch_size: a log-likelihood pass of 1024 x 512 = 524,288 tokens, 32x the shipped A100 config's."""
MAX_DECODE_BATCH = 4096
"""Sequences decoded at once (16x the most `auto` plans); each keeps its KV cache."""


def _check_at_most(name: str, value: int, limit: int, unit: str = "") -> None:
    if value > limit:
        raise ValueError(f"{name}: must be <= {limit}{f' {unit}' if unit else ''}, got {value}")


@dataclass(frozen=True)
class TaskConfig:
    """One lm-eval task and the metric taken from it."""

    name: str = doc(
        "lm-eval task name (e.g. mmlu, gsm8k) or, for a local task, the name it is registered under."
    )
    metric: str = doc("Metric read from the task's results (acc, acc_norm, exact_match, ...).", default="acc")
    source: Optional[str] = doc(
        "Build a local multiple-choice task from the held-out split of this data source.", default=None
    )
    data_file: Optional[str] = doc(
        "Build a local multiple-choice task from this JSONL file (fields prompt, choices, answer); "
        "relative to the config file.",
        default=None,
    )
    generator: Optional[str] = doc(
        "Build this offline micro task (generated documents in a real task's shape): micro_mc (lettered "
        "multiple choice), micro_gen (exact match, GSM8K-like), micro_sum (ROUGE-2), micro_ethics, micro_math, "
        "micro_parity.",
        default=None,
    )
    num_docs: int = doc("For a generator task: documents generated.", default=100)
    num_fewshot: int = doc("Few-shot examples per prompt.", default=0)
    max_new_tokens: Optional[int] = doc(
        "For a generation task: most tokens generated, overriding evaluator.generation.max_new_tokens "
        "(fit it to the task's answers: generation dominates scoring time).",
        default=None,
    )
    limit: Optional[int] = doc("Score only the first N documents (None: all).", default=None)
    rung_limit: Optional[int] = doc(
        "Documents in a rung's quick eval (per subtask for a group such as mmlu's 57 subjects: lm-eval limits "
        "each); null: study.rung_eval_docs, at most `limit`.",
        default=None,
    )
    weight: float = doc("Weight of this task in its suite's aggregate.", default=1.0)
    chance: float = doc(
        "Score of a blind guess (e.g. 0.25 for four choices): with `normalize: chance` the aggregate counts "
        "(score - chance) / (1 - chance).",
        default=0.0,
    )

    @property
    def is_local(self) -> bool:
        return self.source is not None or self.data_file is not None or self.generator is not None

    def validate(self) -> None:
        if not self.name:
            raise ValueError("name: must be a non-empty string")
        if sum(x is not None for x in (self.source, self.data_file, self.generator)) > 1:
            raise ValueError("source: give at most one of source, data_file and generator")
        if self.generator is not None:
            from evaluator.micro import MICRO_TASKS

            if self.generator not in MICRO_TASKS:
                raise ValueError(f"generator: expected one of {', '.join(MICRO_TASKS)}, got {self.generator!r}")
            if self.num_docs < 1:
                raise ValueError(f"num_docs: must be >= 1, got {self.num_docs}")
            _check_at_most("num_docs", self.num_docs, MAX_GENERATED_DOCS, "documents")
        if self.num_fewshot < 0:
            raise ValueError(f"num_fewshot: must be >= 0, got {self.num_fewshot}")
        if self.max_new_tokens is not None and self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens: must be >= 1, got {self.max_new_tokens}")
        if self.max_new_tokens is not None:
            _check_at_most("max_new_tokens", self.max_new_tokens, MAX_NEW_TOKENS, "tokens")
        if self.limit is not None and self.limit < 1:
            raise ValueError(f"limit: must be >= 1 or null, got {self.limit}")
        if self.rung_limit is not None and self.rung_limit < 1:
            raise ValueError(f"rung_limit: must be >= 1 or null, got {self.rung_limit}")
        if not self.weight > 0:
            raise ValueError(f"weight: must be > 0, got {self.weight}")
        if not 0.0 <= self.chance < 1.0:
            raise ValueError(f"chance: must be in [0, 1), got {self.chance}")


@dataclass(frozen=True)
class SuiteConfig:
    """A named group of tasks whose scores combine into one value."""

    file: Optional[str] = doc(
        "YAML file listing the suite's tasks (a `tasks:` list); a bare name (open, heldout, micro_open, "
        "micro_heldout) is a suite shipped in configs/suites/. Read when the config is loaded.",
        default=None,
    )
    tasks: list[TaskConfig] = doc("The suite's tasks (given inline, or read from `file`).", default_factory=list)

    def validate(self) -> None:
        if self.file is None and not self.tasks:
            raise ValueError("tasks: a suite needs tasks (inline) or a file")


@dataclass(frozen=True)
class GenerationConfig:
    """Decoding settings of generation tasks (greedy); recorded with every trial."""

    max_new_tokens: int = doc("Most tokens generated per request.", default=256)
    until: list[str] = doc(
        "Stop sequences (generation ends at the first); empty: the tasks' own.", default_factory=list
    )
    batch_size: int | Literal["auto"] = doc(
        "Sequences decoded at once. `auto`: on a GPU, as many as the KV cache and the prefill fit in the "
        "memory left under the cap (decoding is bound by per-step overhead, so bigger is faster); on CPU, "
        "evaluator.batch_size.",
        default="auto",
    )

    def validate(self) -> None:
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens: must be >= 1, got {self.max_new_tokens}")
        _check_at_most("max_new_tokens", self.max_new_tokens, MAX_NEW_TOKENS, "tokens")
        if self.batch_size != "auto" and self.batch_size < 1:
            raise ValueError(f"batch_size: must be >= 1 or auto, got {self.batch_size}")
        if self.batch_size != "auto":
            _check_at_most("batch_size", self.batch_size, MAX_DECODE_BATCH, "sequences")


@dataclass(frozen=True)
class EvalConfig:
    """How trained adapters (and the untuned base) are scored, and how the submission is picked."""

    tasks: list[TaskConfig] = doc(
        "Shorthand for a single suite named `main` (when `suites` is empty).", default_factory=list
    )
    suites: dict[str, SuiteConfig] = doc(
        "Named suites (e.g. open and heldout); every task of every suite is scored for each trial.",
        default_factory=dict,
    )
    optimize: Optional[str] = doc(
        "The suite whose aggregate is the study's objective; null: `open`, or the only suite.", default=None
    )
    pick_by: Optional[str] = doc(
        "The suite that picks the submission among the `top_k` trials on `optimize` (tasks the study was not "
        "tuned on); null: the best trial on `optimize`.",
        default=None,
    )
    top_k: int = doc("How many of the best trials on `optimize` the pick is made from.", default=3)
    normalize: Literal["chance", "baseline", "none"] = doc(
        "Per-task normalisation before aggregating: `chance` maps [chance, 1] to [0, 1]; `baseline` divides "
        "by the untuned base model's score; `none` keeps raw scores.",
        default="chance",
    )
    aggregate: Literal["geometric", "mean"] = doc(
        "How a suite's normalised task scores combine: weighted geometric mean (as the challenge's HELM "
        "score) or weighted arithmetic mean.",
        default="geometric",
    )
    floor: float = doc(
        "Normalised scores below this count as this in the geometric mean, so one zero does not erase a trial.",
        default=0.01,
    )
    batch_size: int = doc(
        "Size of a log-likelihood forward pass, as batch_size x 512 tokens of packed rows (a context and "
        "all its choices share a row).",
        default=16,
    )
    dequantize: bool | Literal["auto"] = doc(
        "Score with a dense copy of the 4-bit base and the adapter merged in (the same weights bitsandbytes "
        "dequantizes in every forward pass, computed once): several times faster decoding, for the base's "
        "size in bf16 while scoring. `auto`: on a GPU, when that copy fits in half the memory free under the "
        "cap.",
        default="auto",
    )
    fuse_kernels: bool | Literal["auto"] = doc(
        "Run RMSNorm, rotary embeddings and the MLP's SiLU gate as compiled, fused kernels while scoring "
        "(Llama, Mistral and Qwen2 models; the same formulas): about a fifth off scoring's GPU time, for a "
        "compilation of about 20 s once per process (torch's compile cache shortens it in later processes). "
        "`auto`: on a GPU.",
        default="auto",
    )
    generation: GenerationConfig = doc("Decoding of generation tasks.", default_factory=GenerationConfig)
    fast_path: bool = doc(
        "false: score with plain lm-eval (HFLM on the same in-memory model, the same tasks and settings): the "
        "reference the fast path is checked against; also taken when an lm-eval hook is outside its checked "
        "versions.",
        default=True,
    )

    def validate(self) -> None:
        if self.tasks and self.suites:
            raise ValueError("tasks: give either tasks (one suite) or suites, not both")
        if not self.tasks and not self.suites:
            raise ValueError("tasks: at least one evaluation task (or a suite) is required")
        names = [t.name for tasks in self.suite_tasks().values() for t in tasks]
        if len(set(names)) != len(names):
            raise ValueError(f"tasks: task names must be unique across suites, got {names}")
        suites = ", ".join(self.suite_tasks())
        if self.objective_suite not in self.suite_tasks():
            raise ValueError(f"optimize: no suite named {self.objective_suite!r} (suites: {suites})")
        if self.pick_by is not None and self.pick_by not in self.suite_tasks():
            raise ValueError(f"pick_by: no suite named {self.pick_by!r} (suites: {suites})")
        if self.top_k < 1:
            raise ValueError(f"top_k: must be >= 1, got {self.top_k}")
        if not 0.0 < self.floor < 1.0:
            raise ValueError(f"floor: must be in (0, 1), got {self.floor}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size: must be >= 1, got {self.batch_size}")
        _check_at_most("batch_size", self.batch_size, MAX_SCORING_BATCH)

    def suite_tasks(self) -> dict[str, list[TaskConfig]]:
        """Each suite's tasks (`tasks` alone is the suite `main`)."""
        if self.suites:
            return {name: list(suite.tasks) for name, suite in self.suites.items()}
        return {"main": list(self.tasks)}

    def all_tasks(self) -> list[TaskConfig]:
        """Every task of every suite, each once."""
        return [t for tasks in self.suite_tasks().values() for t in tasks]

    @property
    def objective_suite(self) -> str:
        """The suite the study optimises."""
        if self.optimize is not None:
            return self.optimize
        suites = list(self.suite_tasks())
        return "open" if "open" in suites or len(suites) != 1 else suites[0]
