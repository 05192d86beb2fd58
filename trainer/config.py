"""Typed settings of the trainer library: the base model, the data and the training run.

Each field carries its documentation in `metadata["doc"]`; the README's config
reference is generated from it. `validate()` methods raise `ValueError` whose
message starts with the offending field name, so callers can prefix the path.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Optional


def doc(text: str, **kwargs):
    """A dataclass field with documentation (kept in metadata for the README reference)."""
    return field(metadata={"doc": text}, **kwargs)


# Upper bounds of the settings whose size is what a trial allocates: far above any real run, far below what
# would take a machine's memory at once, so that a typo (pack_length: 1000000000000) is an error, not a run.
MAX_ROW_TOKENS = 2**20
"""Tokens of a packed row, of an example (max_seq_length) and of a padded micro-batch: 32x the 32768 of
long-context runs; the attention and activations of one such row already exceed any one machine's memory."""
MAX_STEP_TOKENS = 2**24
"""Tokens of an optimizer step's micro-batches, which are all collated before the step (24 bytes a token)."""
MAX_MICRO_BATCH_SIZE = 65536
MAX_ACCUMULATION_STEPS = 65536
MAX_EXAMPLES = 100_000_000
"""The mix's example budget: about 30x the largest instruction mixes (a few million), 100x what one GPU can
train in a day; each selected example costs about 600 bytes of row handles before a step runs."""
MAX_SYNTHETIC_EXAMPLES = 1_000_000
"""The synthetic digit task has 1180 distinct questions: a million draws repeats each about 850 times."""
MAX_LORA_RANK = 16384
"""The widest hidden size of open models (Llama-3.1-405B); a rank above a layer's width adds nothing, and the
adapter's weights and optimizer state grow with it (about 42 MB per unit of rank on a 7B model)."""


def check_at_most(name: str, value: int, limit: int, unit: str = "") -> None:
    """Raises `ValueError` naming `name`, the limit and the value when `value` is above `limit`."""
    if value > limit:
        raise ValueError(f"{name}: must be <= {limit}{f' {unit}' if unit else ''}, got {value}")


@dataclass(frozen=True)
class ModelConfig:
    """The base model and how it is quantized."""

    name_or_path: str = doc(
        "Hub id (e.g. mistralai/Mistral-7B-v0.1), local directory, or `sweep-demo/tiny-llama`, "
        "the offline demo base built locally on first use."
    )
    revision: Optional[str] = doc("Hub revision (branch, tag or commit) of the base model.", default=None)
    quant_type: Literal["nf4", "fp4", "int8"] = doc(
        "How `trainer.mode: qlora` quantizes the base's linear layers (bitsandbytes): `nf4` or `fp4` (4 bits), "
        "or `int8` (LLM.int8(), 8 bits). Searchable as `model.quant_type`; `trainer.mode: lora` ignores it.",
        default="nf4",
    )
    double_quant: bool = doc(
        "4-bit: quantize the quantization constants too (QLoRA double quantization). Searchable.", default=True
    )
    compute_dtype: Literal["auto", "bfloat16", "float16", "float32"] = doc(
        "dtype of the 4-bit matmuls; `auto` is bfloat16 on GPU and float32 on CPU.", default="auto"
    )
    trust_remote_code: bool = doc("Allow model code from the hub.", default=False)
    attn_implementation: Literal["auto", "sdpa", "flex_attention", "flash_attention_2", "eager"] = doc(
        "Attention kernel. `auto`: flash_attention_2 when installed, else flex_attention on GPU "
        "(packed rows keep example boundaries without a dense mask), sdpa on CPU.",
        default="auto",
    )

    def validate(self) -> None:
        if not self.name_or_path or not str(self.name_or_path).strip():
            raise ValueError("name_or_path: a base model is required (hub id, local path or sweep-demo/tiny-llama)")


# Row formats of the named sources; `fields` maps any JSON/JSONL file's own field names.
SOURCE_FORMATS = (
    "fields", "dolly", "oasst1", "lima", "alpaca", "platypus", "mmlu", "cnn_dailymail", "gsm8k", "bbq", "sciq"
)

# Hub datasets with a known row format: id -> (format, default subset).
HUB_DATASETS: dict[str, tuple[str, Optional[str]]] = {
    "databricks/databricks-dolly-15k": ("dolly", None),
    "OpenAssistant/oasst1": ("oasst1", None),
    "GAIR/lima": ("lima", None),
    "tatsu-lab/alpaca": ("alpaca", None),
    "garage-bAInd/Open-Platypus": ("platypus", None),
    "cais/mmlu": ("mmlu", "auxiliary_train"),
    "cnn_dailymail": ("cnn_dailymail", "3.0.0"),
    "abisee/cnn_dailymail": ("cnn_dailymail", "3.0.0"),
    "gsm8k": ("gsm8k", "main"),
    "openai/gsm8k": ("gsm8k", "main"),
    # As lm-eval's bbq and sciq tasks read them. BBQ has one split, `test`: the one lm-eval scores.
    "oskarvanderwal/bbq": ("bbq", "All"),
    "allenai/sciq": ("sciq", None),
}


@dataclass(frozen=True)
class SourceConfig:
    """One training data source."""

    name: str = doc("Name of the source, used in the data mix, in records and by evaluator tasks.")
    kind: Literal["hub", "file", "synthetic", "jsonl"] = doc(
        "`hub`: a dataset loaded with `datasets.load_dataset` (a hub id, or a local dataset directory); "
        "`file`: a local JSON or JSON Lines file (`jsonl` is the same); "
        "`synthetic`: generated data with train and held-out splits (see `generator`)."
    )
    dataset: Optional[str] = doc("For hub: the dataset id (e.g. databricks/databricks-dolly-15k).", default=None)
    subset: Optional[str] = doc(
        "For hub: the dataset's config name (e.g. 3.0.0 for cnn_dailymail); null: the known default.", default=None
    )
    split: str = doc("For hub: the split to train on.", default="train")
    revision: Optional[str] = doc("For hub: the dataset revision (branch, tag or commit).", default=None)
    path: Optional[str] = doc("For file: path of the JSON/JSONL file, relative to the config file.", default=None)
    format: Literal[("auto",) + SOURCE_FORMATS] = doc(  # type: ignore[valid-type]
        "Row format: `auto` (the known format of a hub id, else `fields`), `fields` (the `fields` mapping), "
        "or a named source's own rows: dolly, oasst1 (English, top-ranked reply per turn), lima, alpaca, "
        "platypus, mmlu (auxiliary_train), cnn_dailymail, gsm8k, bbq (oskarvanderwal/bbq, config All: its one "
        "split is `test`, the split lm-eval's bbq scores), sciq (allenai/sciq).",
        default="auto",
    )
    fields: dict[str, str] = doc(
        "For format `fields`: maps `instruction`, `input` (optional) and `response` to the rows' field names.",
        default_factory=lambda: {"instruction": "instruction", "input": "input", "response": "response"},
    )
    max_rows: Optional[int] = doc("Read at most this many rows of the source; null: all.", default=None)
    generator: str = doc(
        "For synthetic: what is generated. `digits`: two-choice questions about digits (parity, the larger, "
        "the smaller); or a micro task's shape (micro_mc, micro_gen, micro_sum, micro_ethics, micro_math, "
        "micro_parity: evaluator/micro.py), whose held-out split (other names and places) an evaluator task with "
        "`source:` scores in that shape.",
        default="digits",
    )
    num_train: int = doc("For synthetic: number of training examples.", default=2000)
    num_eval: int = doc("For synthetic: number of held-out examples (the eval split).", default=200)
    seed: int = doc("For synthetic: generator seed (same seed, same data).", default=0)

    @property
    def row_format(self) -> str:
        """The format rows are read with (`auto` resolved)."""
        if self.format != "auto":
            return self.format
        if self.kind == "hub" and self.dataset in HUB_DATASETS:
            return HUB_DATASETS[self.dataset][0]
        return "fields"

    @property
    def dataset_subset(self) -> Optional[str]:
        """The hub config name (`subset`, else the known default of the dataset)."""
        if self.subset is not None:
            return self.subset
        return HUB_DATASETS.get(self.dataset or "", (None, None))[1]

    def validate(self) -> None:
        if not self.name:
            raise ValueError("name: must be a non-empty string")
        if self.kind == "hub" and not self.dataset:
            raise ValueError("dataset: required for a hub source (a dataset id)")
        if self.kind in ("file", "jsonl") and not self.path:
            raise ValueError(f"path: required for a {self.kind} source")
        if self.kind == "synthetic" and self.format != "auto":
            raise ValueError("format: the synthetic source has its own rows")
        if self.kind != "synthetic" and self.generator != "digits":
            raise ValueError(f"generator: only a synthetic source is generated (this one is {self.kind})")
        if self.kind == "synthetic" and self.generator != "digits":
            from evaluator.micro import MICRO_TASKS  # the shapes a synthetic source can take besides the digits

            if self.generator not in MICRO_TASKS:
                raise ValueError(
                    f"generator: expected one of {', '.join(('digits', *MICRO_TASKS))}, got {self.generator!r}"
                )
        if self.row_format == "fields" and self.kind != "synthetic":
            unknown = set(self.fields) - {"instruction", "input", "response"}
            if unknown:
                raise ValueError(
                    f"fields: unknown target {sorted(unknown)[0]!r}; expected instruction, input, response"
                )
            if "instruction" not in self.fields or "response" not in self.fields:
                raise ValueError("fields: must map instruction and response")
        if self.max_rows is not None and self.max_rows < 1:
            raise ValueError(f"max_rows: must be >= 1, got {self.max_rows}")
        if self.num_train < 1:
            raise ValueError(f"num_train: must be >= 1, got {self.num_train}")
        check_at_most("num_train", self.num_train, MAX_SYNTHETIC_EXAMPLES, "examples")
        # The digit task has 1180 distinct questions; held-out ones never appear in training.
        if not 0 <= self.num_eval <= 1000:
            raise ValueError(f"num_eval: must be between 0 and 1000, got {self.num_eval}")


@dataclass(frozen=True)
class DataConfig:
    """Training data: the sources, their mix, and how examples become token sequences."""

    sources: list[SourceConfig] = doc("Training data sources (at least one).", default_factory=list)
    mix: dict[str, float] = doc(
        "Weight of each source in the mix, by source name (normalised over the sources; unlisted sources "
        "weigh 1). Searchable as `data.mix.<name>`. Empty with no `num_examples`: every row of every source once.",
        default_factory=dict,
    )
    num_examples: Optional[int] = doc(
        "Examples in the mix (the full run's budget, drawn by weight; a source smaller than its share is "
        "repeated). Searchable. null: as many as the sources have.",
        default=None,
    )
    seed: int = doc("Seed of the example selection: same seed and weights, same mix.", default=0)
    template: Literal["auto", "alpaca", "chatml", "llama2", "plain"] = doc(
        "Prompt format: `auto` uses the base tokenizer's chat template when it has one, else alpaca. `llama2`: "
        "Llama-2-chat's `[INST] {instruction} [/INST] ` written out, for a base without a chat template.",
        default="auto",
    )
    max_seq_length: int = doc("Longest example in tokens (prompt and response).", default=2048)
    overlong: Literal["skip", "truncate"] = doc(
        "What to do with an example longer than max_seq_length: skip it (counted) or cut it.", default="skip"
    )
    drop_contaminated: bool = doc(
        "Drop training examples that share a 13-gram with any evaluation task's documents (counted as "
        "`contaminated`; `sweep contamination` shows the overlaps).",
        default=False,
    )

    def validate(self) -> None:
        if not self.sources:
            raise ValueError("sources: at least one data source is required")
        names = [s.name for s in self.sources]
        if len(set(names)) != len(names):
            raise ValueError(f"sources: names must be unique, got {names}")
        for name, weight in self.mix.items():
            if name not in names:
                raise ValueError(f"mix.{name}: no data source named {name!r} (sources: {', '.join(names)})")
            if weight < 0:
                raise ValueError(f"mix.{name}: weight must be >= 0, got {weight}")
        if self.mix and len(self.mix) == len(names) and sum(self.mix.values()) <= 0:
            raise ValueError("mix: at least one source needs a weight > 0")
        if self.num_examples is not None and self.num_examples < 1:
            raise ValueError(f"num_examples: must be >= 1, got {self.num_examples}")
        if self.num_examples is not None:
            check_at_most("num_examples", self.num_examples, MAX_EXAMPLES, "examples")
        if self.max_seq_length < 8:
            raise ValueError(f"max_seq_length: must be >= 8, got {self.max_seq_length}")
        check_at_most("max_seq_length", self.max_seq_length, MAX_ROW_TOKENS, "tokens")

    def weights(self) -> dict[str, float]:
        """Normalised mix weights of every source (unlisted sources weigh 1)."""
        raw = {s.name: float(self.mix.get(s.name, 1.0)) for s in self.sources}
        total = sum(raw.values())
        if total <= 0:
            raise ValueError("mix: at least one source needs a weight > 0")
        return {name: w / total for name, w in raw.items()}


@dataclass(frozen=True)
class LoraConfig:
    """The LoRA adapter attached to the 4-bit base."""

    r: int = doc("LoRA rank.", default=8)
    alpha: float = doc("LoRA scaling numerator (scale = alpha / r).", default=16)
    dropout: float = doc("Dropout on the LoRA input.", default=0.05)
    target_modules: str | list[str] = doc(
        "Modules to adapt: `all-linear` or a list of module names (q_proj, v_proj, ...).",
        default="all-linear",
    )
    use_rslora: bool = doc("Rank-stabilised LoRA: scale by alpha / sqrt(r) instead of alpha / r.", default=False)
    use_dora: bool = doc("DoRA: weight-decomposed LoRA (slower per step).", default=False)

    def validate(self) -> None:
        if self.r < 1:
            raise ValueError(f"r: must be >= 1, got {self.r}")
        check_at_most("r", self.r, MAX_LORA_RANK)
        if self.alpha <= 0:
            raise ValueError(f"alpha: must be > 0, got {self.alpha}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout: must be in [0, 1), got {self.dropout}")


def check_step_tokens(name: str, accumulation: int, micro_batch_tokens: int, micro_batch: str) -> None:
    """An optimizer step's micro-batches (`accumulation` of `micro_batch_tokens`) hold at most MAX_STEP_TOKENS."""
    if accumulation * micro_batch_tokens > MAX_STEP_TOKENS:
        raise ValueError(
            f"{name}: must be <= {MAX_STEP_TOKENS // micro_batch_tokens} with {micro_batch} (an optimizer step "
            f"of at most {MAX_STEP_TOKENS} tokens), got {accumulation}"
        )


@dataclass(frozen=True)
class TrainConfig:
    """The training run of one trial."""

    learning_rate: float = doc("Peak learning rate of AdamW.", default=2e-4)
    epochs: float = doc(
        "Passes over the mix in the full training run (what the 24-hour projection times).", default=1.0
    )
    max_steps: Optional[int] = doc(
        "Optimizer steps a trial trains: a short proxy of the full run; null trains the full run (all epochs).",
        default=None,
    )
    packing: bool = doc(
        "Pack examples into rows of `pack_length` tokens without padding; attention never crosses "
        "example boundaries. false: pad batches of `micro_batch_size` examples.",
        default=True,
    )
    pack_length: int = doc("Tokens per packed row (one row per micro-batch).", default=8192)
    micro_batch_size: int = doc("Examples per forward pass when packing is off.", default=8)
    group_by_length: bool = doc("Padding mode: batch examples of similar length (less padding).", default=False)
    gradient_accumulation_steps: int = doc("Micro-batches per optimizer step.", default=1)
    warmup_fraction: float = doc("Fraction of the steps spent in linear warmup.", default=0.05)
    warmup_steps: Optional[int] = doc(
        "Linear warmup steps of the full run, instead of `warmup_fraction` (a recipe's \"100 warmup steps\"); a "
        "trial's shorter proxy (`max_steps`) warms up for the same share of its steps. null: warmup_fraction.",
        default=None,
    )
    lr_scheduler: Literal["cosine", "linear", "constant"] = doc(
        "Learning-rate schedule after warmup.", default="cosine"
    )
    weight_decay: float = doc("AdamW weight decay.", default=0.0)
    max_grad_norm: float = doc("Gradient clipping norm.", default=1.0)
    neftune_alpha: Optional[float] = doc(
        "NEFTune: uniform noise of scale alpha / sqrt(length x hidden) on the input embeddings; null: off.",
        default=None,
    )
    gradient_checkpointing: bool | Literal["auto"] = doc(
        "Recompute activations in the backward pass to save memory. `auto`: checkpoint only as many layers "
        "as the GPU profile's memory cap requires (none on CPU).",
        default="auto",
    )
    lora: LoraConfig = doc("The LoRA adapter.", default_factory=LoraConfig)
    mode: Literal["qlora", "lora"] = doc(
        "`qlora`: the adapter trains on a quantized base (`model.quant_type`: 4 or 8 bits); `lora`: on the base "
        "in 16 bits (bfloat16 on GPU, float32 on CPU), about 2 bytes a parameter. Searchable as `trainer.mode`; "
        "the memory cap and the full-run projection decide per GPU profile whether a mode fits.",
        default="qlora",
    )

    def validate(self) -> None:
        if not self.learning_rate > 0:
            raise ValueError(f"learning_rate: must be > 0, got {self.learning_rate}")
        if not self.epochs > 0:
            raise ValueError(f"epochs: must be > 0, got {self.epochs}")
        if self.max_steps is not None and self.max_steps < 1:
            raise ValueError(f"max_steps: must be >= 1, got {self.max_steps}")
        for name in ("micro_batch_size", "gradient_accumulation_steps"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}: must be >= 1, got {getattr(self, name)}")
        check_at_most("micro_batch_size", self.micro_batch_size, MAX_MICRO_BATCH_SIZE, "examples")
        check_at_most("gradient_accumulation_steps", self.gradient_accumulation_steps, MAX_ACCUMULATION_STEPS)
        if self.pack_length < 8:
            raise ValueError(f"pack_length: must be >= 8, got {self.pack_length}")
        check_at_most("pack_length", self.pack_length, MAX_ROW_TOKENS, "tokens")
        if self.packing:
            check_step_tokens("gradient_accumulation_steps", self.gradient_accumulation_steps, self.pack_length,
                              f"pack_length {self.pack_length}")
        if self.warmup_steps is not None and self.warmup_steps < 0:
            raise ValueError(f"warmup_steps: must be >= 0, got {self.warmup_steps}")
        if not 0.0 <= self.warmup_fraction < 1.0:
            raise ValueError(f"warmup_fraction: must be in [0, 1), got {self.warmup_fraction}")
        if self.weight_decay < 0:
            raise ValueError(f"weight_decay: must be >= 0, got {self.weight_decay}")
        if self.max_grad_norm <= 0:
            raise ValueError(f"max_grad_norm: must be > 0, got {self.max_grad_norm}")
        if self.neftune_alpha is not None and self.neftune_alpha < 0:
            raise ValueError(f"neftune_alpha: must be >= 0, got {self.neftune_alpha}")
