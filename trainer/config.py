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


@dataclass(frozen=True)
class ModelConfig:
    """The base model and how it is quantized."""

    name_or_path: str = doc(
        "Hub id (e.g. mistralai/Mistral-7B-v0.1), local directory, or `sweep-demo/tiny-llama`, "
        "the offline demo base built locally on first use."
    )
    revision: Optional[str] = doc("Hub revision (branch, tag or commit) of the base model.", default=None)
    quant_type: Literal["nf4", "fp4"] = doc("4-bit quantization type of the base weights.", default="nf4")
    double_quant: bool = doc("Quantize the quantization constants too (QLoRA double quantization).", default=True)
    compute_dtype: Literal["auto", "bfloat16", "float16", "float32"] = doc(
        "dtype of the 4-bit matmuls; `auto` is bfloat16 on GPU and float32 on CPU.", default="auto"
    )
    trust_remote_code: bool = doc("Allow model code from the hub.", default=False)

    def validate(self) -> None:
        if not self.name_or_path or not str(self.name_or_path).strip():
            raise ValueError("name_or_path: a base model is required (hub id, local path or sweep-demo/tiny-llama)")


@dataclass(frozen=True)
class SourceConfig:
    """One training data source."""

    name: str = doc("Name of the source, used in records and by evaluator tasks.")
    kind: Literal["synthetic", "jsonl"] = doc(
        "`synthetic`: the demo's generated digit task (train and held-out splits); "
        "`jsonl`: a local JSON Lines file."
    )
    path: Optional[str] = doc("Path of the JSONL file (kind jsonl); relative to the config file.", default=None)
    fields: dict[str, str] = doc(
        "For jsonl: maps `instruction`, `input` (optional) and `response` to the file's field names.",
        default_factory=lambda: {"instruction": "instruction", "input": "input", "response": "response"},
    )
    num_train: int = doc("For synthetic: number of training examples.", default=2000)
    num_eval: int = doc("For synthetic: number of held-out examples (the eval split).", default=200)
    seed: int = doc("For synthetic: generator seed (same seed, same data).", default=0)

    def validate(self) -> None:
        if not self.name:
            raise ValueError("name: must be a non-empty string")
        if self.kind == "jsonl":
            if not self.path:
                raise ValueError("path: required for a jsonl source")
            unknown = set(self.fields) - {"instruction", "input", "response"}
            if unknown:
                raise ValueError(
                    f"fields: unknown target {sorted(unknown)[0]!r}; expected instruction, input, response"
                )
            if "instruction" not in self.fields or "response" not in self.fields:
                raise ValueError("fields: must map instruction and response")
        if self.num_train < 1:
            raise ValueError(f"num_train: must be >= 1, got {self.num_train}")
        # The synthetic task has 1180 distinct questions; held-out ones never appear in training.
        if not 0 <= self.num_eval <= 1000:
            raise ValueError(f"num_eval: must be between 0 and 1000, got {self.num_eval}")


@dataclass(frozen=True)
class DataConfig:
    """Training data: the sources and how examples become token sequences."""

    sources: list[SourceConfig] = doc("Training data sources (at least one).", default_factory=list)
    template: Literal["alpaca", "chatml", "plain"] = doc(
        "Prompt template wrapped around each instruction.", default="alpaca"
    )
    max_seq_length: int = doc("Examples longer than this many tokens are truncated.", default=512)

    def validate(self) -> None:
        if not self.sources:
            raise ValueError("sources: at least one data source is required")
        names = [s.name for s in self.sources]
        if len(set(names)) != len(names):
            raise ValueError(f"sources: names must be unique, got {names}")
        if self.max_seq_length < 8:
            raise ValueError(f"max_seq_length: must be >= 8, got {self.max_seq_length}")


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

    def validate(self) -> None:
        if self.r < 1:
            raise ValueError(f"r: must be >= 1, got {self.r}")
        if self.alpha <= 0:
            raise ValueError(f"alpha: must be > 0, got {self.alpha}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout: must be in [0, 1), got {self.dropout}")


@dataclass(frozen=True)
class TrainConfig:
    """The training run of one trial."""

    learning_rate: float = doc("Peak learning rate of AdamW.", default=2e-4)
    max_steps: int = doc("Optimizer steps per trial.", default=100)
    micro_batch_size: int = doc("Examples per forward pass.", default=8)
    gradient_accumulation_steps: int = doc("Micro-batches per optimizer step.", default=1)
    warmup_fraction: float = doc("Fraction of the steps spent in linear warmup.", default=0.05)
    lr_scheduler: Literal["cosine", "linear", "constant"] = doc(
        "Learning-rate schedule after warmup.", default="cosine"
    )
    weight_decay: float = doc("AdamW weight decay.", default=0.0)
    max_grad_norm: float = doc("Gradient clipping norm.", default=1.0)
    gradient_checkpointing: bool = doc("Recompute activations in the backward pass to save memory.", default=False)
    lora: LoraConfig = doc("The LoRA adapter.", default_factory=LoraConfig)

    def validate(self) -> None:
        if not self.learning_rate > 0:
            raise ValueError(f"learning_rate: must be > 0, got {self.learning_rate}")
        for name in ("max_steps", "micro_batch_size", "gradient_accumulation_steps"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}: must be >= 1, got {getattr(self, name)}")
        if not 0.0 <= self.warmup_fraction < 1.0:
            raise ValueError(f"warmup_fraction: must be in [0, 1), got {self.warmup_fraction}")
        if self.weight_decay < 0:
            raise ValueError(f"weight_decay: must be >= 0, got {self.weight_decay}")
        if self.max_grad_norm <= 0:
            raise ValueError(f"max_grad_norm: must be > 0, got {self.max_grad_norm}")
