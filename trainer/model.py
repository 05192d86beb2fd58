"""Loading the 4-bit base model and attaching, saving and loading LoRA adapters."""

from __future__ import annotations

import json
from pathlib import Path

import yaml

from trainer.config import LoraConfig, ModelConfig
from trainer.demo_base import resolve_model_path


def default_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def compute_dtype(config: ModelConfig, device: str):
    """The dtype of the 4-bit matmuls; on GPU never float32 (bitsandbytes' slow path)."""
    import torch

    if config.compute_dtype == "auto":
        return torch.bfloat16 if device.startswith("cuda") else torch.float32
    return getattr(torch, config.compute_dtype)


def load_tokenizer(config: ModelConfig):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(
        resolve_model_path(config.name_or_path),
        revision=config.revision,
        trust_remote_code=config.trust_remote_code,
    )
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def attention_implementation(config: ModelConfig, device: str) -> str:
    """The attention kernel to train with: `auto` picks one that keeps packed examples apart cheaply.

    flash-attention's varlen kernels when the package is installed, else
    flex-attention on GPU (block-sparse, compiled once), else sdpa.
    """
    import importlib.util

    if config.attn_implementation != "auto":
        return config.attn_implementation
    if not device.startswith("cuda"):
        return "sdpa"
    return "flash_attention_2" if importlib.util.find_spec("flash_attn") else "flex_attention"


def use_attention(model, implementation: str) -> None:
    """Switches the attention kernel of a loaded model (e.g. to sdpa for scoring padded batches)."""
    target = model.get_base_model() if hasattr(model, "get_base_model") else model
    if getattr(target.config, "_attn_implementation", None) != implementation:
        target.set_attn_implementation(implementation)


def load_base_model(config: ModelConfig, device: str | None = None, attn_implementation: str | None = None):
    """The base model with its linear layers quantized to 4 bits (NF4 by default) on `device`.

    Args:
        config: the base model and its quantization.
        device: `cuda`, `cuda:N` or `cpu`; default: a GPU when there is one.
        attn_implementation: overrides `config.attn_implementation` (resolved
            by `attention_implementation`); scoring uses sdpa.
    """
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    device = device or default_device()
    dtype = compute_dtype(config, device)
    quantization = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=config.quant_type,
        bnb_4bit_use_double_quant=config.double_quant,
        bnb_4bit_compute_dtype=dtype,
    )
    attention = attn_implementation or attention_implementation(config, device)

    def load(attention: str):
        return AutoModelForCausalLM.from_pretrained(
            resolve_model_path(config.name_or_path),
            revision=config.revision,
            quantization_config=quantization,
            dtype=dtype,
            device_map={"": device},
            trust_remote_code=config.trust_remote_code,
            attn_implementation=attention,
        )

    try:
        model = load(attention)
    except (ValueError, ImportError):
        # An architecture without the kernel `auto` picked: sdpa keeps packed examples apart too, more slowly.
        if attn_implementation or config.attn_implementation != "auto" or attention == "sdpa":
            raise
        model = load("sdpa")
    model.config.use_cache = False
    return model


def attach_lora(model, config: LoraConfig):
    """Wraps the 4-bit base in a trainable `PeftModel` with a fresh LoRA adapter.

    The base stays frozen in its compute dtype (no float32 copies of the
    embeddings and norms, unlike `prepare_model_for_kbit_training`); the
    adapter's weights are float32 and run under bf16 autocast on GPU.
    Gradient checkpointing is set per run by the trainer.
    """
    import peft

    for param in model.parameters():
        param.requires_grad_(False)
    lora = peft.LoraConfig(
        r=config.r,
        lora_alpha=config.alpha,
        lora_dropout=config.dropout,
        target_modules=config.target_modules,
        use_rslora=config.use_rslora,
        use_dora=config.use_dora,
        task_type="CAUSAL_LM",
    )
    return peft.get_peft_model(model, lora)


def save_adapter(model, out_dir: str | Path, model_config: ModelConfig, hyperparameters: dict) -> Path:
    """Saves the adapter and, beside it, the hyperparameters that produced it.

    `base_model_name_or_path` records the name the user gave (a hub id or the
    demo id), not the local cache path it resolved to, so the adapter loads on
    another machine.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    for peft_config in model.peft_config.values():
        peft_config.base_model_name_or_path = model_config.name_or_path
        peft_config.revision = model_config.revision
    model.save_pretrained(out_dir, save_embedding_layers=False)
    with open(out_dir / "hyperparameters.yaml", "w") as f:
        yaml.safe_dump(hyperparameters, f, sort_keys=False)
    return out_dir


def load_adapter(adapter_dir: str | Path, device: str | None = None, quantized: bool = True):
    """Loads an adapter onto the base it records; returns `(peft_model, tokenizer)`.

    With `quantized=False` the base is loaded in 16 bits (bfloat16 on GPU,
    float32 on CPU), the form to merge an adapter into.
    """
    import peft
    import torch
    from transformers import AutoModelForCausalLM

    adapter_dir = Path(adapter_dir)
    recorded = json.loads((adapter_dir / "adapter_config.json").read_text())
    base = ModelConfig(name_or_path=recorded["base_model_name_or_path"], revision=recorded.get("revision"))
    device = device or default_device()
    if quantized:
        model = load_base_model(base, device, attn_implementation="sdpa")  # inference: padded batches
    else:
        dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
        model = AutoModelForCausalLM.from_pretrained(
            resolve_model_path(base.name_or_path), revision=base.revision, dtype=dtype, device_map={"": device}
        )
    return peft.PeftModel.from_pretrained(model, str(adapter_dir)), load_tokenizer(base)
