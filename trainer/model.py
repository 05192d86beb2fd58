"""Loading the 4-bit base model and attaching, saving and loading LoRA adapters."""

from __future__ import annotations

import json
from pathlib import Path

import yaml

from trainer import compat
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


def unwrap_peft(model):
    """The transformers model inside a `PeftModel`, or `model` itself when it is not one: what the attention
    kernel, the decoder layers and the config belong to."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def use_attention(model, implementation: str) -> None:
    """Switches the attention kernel of a loaded model (e.g. to sdpa for scoring padded batches)."""
    target = unwrap_peft(model)
    if compat.attention_of(target) != implementation:
        target.set_attn_implementation(implementation)


MODES = ("qlora", "lora")


def base_format(config: ModelConfig, mode: str = "qlora") -> str:
    """How a trial's base is held, in a word: `nf4`, `fp4` (4 bits), `int8` (8 bits) or `16-bit` (mode lora).

    One slot keeps one resident base per format (and model): a trial that needs another swaps it.
    """
    if mode not in MODES:
        raise ValueError(f"mode: expected one of {', '.join(MODES)}, got {mode!r}")
    return "16-bit" if mode == "lora" else config.quant_type


def describe_base(config: ModelConfig, mode: str, device: str) -> dict:
    """The base a trial trains on, for its record: mode, quantization, double quantization and compute dtype."""
    form = base_format(config, mode)
    dtype = str(compute_dtype(config, device)).removeprefix("torch.")
    return {
        "mode": mode,
        "quantization": form,
        "double_quant": bool(config.double_quant) if form in ("nf4", "fp4") else None,
        "dtype": dtype,
    }


def base_label(described: dict) -> str:
    """`nf4 4-bit, double quant`, `int8 8-bit`, `16-bit (float32)`: one base's format in words."""
    form = described.get("quantization")
    if form == "16-bit":
        return f"16-bit ({described.get('dtype')})"
    if form == "int8":
        return "int8 8-bit"
    return f"{form} 4-bit" + (", double quant" if described.get("double_quant") else "")


def load_base_model(config: ModelConfig, device: str | None = None, attn_implementation: str | None = None,
                    mode: str = "qlora"):
    """The base model on `device`: with `mode` qlora its linear layers quantized by bitsandbytes (NF4 by
    default: `config.quant_type`), with `lora` in 16 bits (bfloat16 on GPU; float32 on CPU, which has no
    fast 16-bit matmul).

    Args:
        config: the base model and its quantization.
        device: `cuda`, `cuda:N` or `cpu`; default: a GPU when there is one.
        attn_implementation: overrides `config.attn_implementation` (resolved
            by `attention_implementation`); scoring uses sdpa.
        mode: `qlora` or `lora` (`trainer.mode`).
    """
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    device = device or default_device()
    dtype = compute_dtype(config, device)
    form = base_format(config, mode)
    if form == "16-bit":
        quantization = None
    elif form == "int8":
        quantization = BitsAndBytesConfig(load_in_8bit=True)
    else:
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
    if form == "int8":
        import warnings

        # bitsandbytes' int8 matmul casts its float32 inputs to float16 on every call (CPU), warning each time.
        warnings.filterwarnings("ignore", message="MatMul8bitLt: inputs will be cast")
    keep_training_layout(model)
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


def detach_lora(model):
    """Removes the LoRA adapter from a `PeftModel` and returns the bare base, as it was before `attach_lora`.

    What a base kept loaded across trials needs: the 4-bit layers come back
    unchanged (the adapter is dropped, never merged), in their training layout,
    and no adapter module, config or hook survives into the next trial.
    """
    restore_training_layout(model)
    base = model.unload() if hasattr(model, "unload") else model
    if "peft_config" in vars(base):  # set on the instance by peft; the class may have its own default
        delattr(base, "peft_config")
    compat.clear_adapter_flag(base)
    base.eval()
    return base


_TRAINING_LAYOUT = "_sweep_training_layout"


def keep_training_layout(model) -> None:
    """Remembers each 4-bit weight and its quantization state as loaded, for `restore_training_layout`.

    Only where bitsandbytes may repack them (CPUs with AVX512-BF16). The
    weight tensor is shared, not copied, until a repack replaces it.
    """
    import copy

    import bitsandbytes as bnb

    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit) and getattr(module, "support_avx512bf16_for_cpu", False):
            weight = module.weight
            if weight.device.type == "cpu" and not getattr(weight.quant_state, "packing_format_for_cpu", False):
                setattr(module, _TRAINING_LAYOUT, (weight.data, copy.deepcopy(weight.quant_state)))


def restore_training_layout(model) -> None:
    """Puts 4-bit weights that bitsandbytes repacked for CPU inference back into the layout training needs.

    On CPUs with AVX512-BF16, the first forward of a Linear4bit in eval mode
    without grad repacks its weight for a faster inference kernel, and that
    layout has no backward. Scoring a model and then training it again (a
    rung's quick eval, the next trial on a resident base) needs the original
    layout back. The repack rounds the quantization constants to bfloat16, so
    the weights are restored from what `keep_training_layout` kept (exact);
    bitsandbytes' own inverse (close, not exact) is the fallback.
    """
    import copy

    import bitsandbytes as bnb

    for module in model.modules():
        weight = getattr(module, "weight", None)
        state = getattr(weight, "quant_state", None)
        if not isinstance(module, bnb.nn.Linear4bit) or not getattr(state, "packing_format_for_cpu", False):
            continue
        kept = getattr(module, _TRAINING_LAYOUT, None)
        if kept is not None:
            weight.data, weight.quant_state = kept[0], copy.deepcopy(kept[1])  # the repack mutates its state
        else:
            weight.data, weight.quant_state = compat.unpack_cpu_4bit(weight.data, state)
        if getattr(module, "quant_state", None) is not None:
            module.quant_state = weight.quant_state


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

    The base is loaded as the trial trained on it (its hyperparameters.yaml: the quantization and
    `trainer.mode`), else in 4-bit NF4. With `quantized=False` the base is loaded in 16 bits (bfloat16 on
    GPU, float32 on CPU), the form to merge an adapter into.
    """
    import peft

    adapter_dir = Path(adapter_dir)
    recorded = json.loads((adapter_dir / "adapter_config.json").read_text())
    base, mode = trained_base(adapter_dir / "hyperparameters.yaml")
    if base is None or base.name_or_path != recorded["base_model_name_or_path"]:
        base = ModelConfig(name_or_path=recorded["base_model_name_or_path"], revision=recorded.get("revision"))
    device = device or default_device()
    # Inference: padded batches (sdpa).
    model = load_base_model(base, device, attn_implementation="sdpa", mode=mode if quantized else "lora")
    return peft.PeftModel.from_pretrained(model, str(adapter_dir)), load_tokenizer(base)


def trained_base(hyperparameters_file: str | Path) -> tuple[ModelConfig | None, str]:
    """The `ModelConfig` and `trainer.mode` a trial's hyperparameters.yaml records; (None, qlora) without one."""
    import dataclasses

    try:
        hyperparameters = yaml.safe_load(Path(hyperparameters_file).read_text())
    except (OSError, yaml.YAMLError):
        return None, "qlora"
    if not isinstance(hyperparameters, dict):
        return None, "qlora"
    mode = trained_mode(hyperparameters)
    model = hyperparameters.get("model")
    if not isinstance(model, dict):
        return None, mode
    known = {f.name for f in dataclasses.fields(ModelConfig)}
    try:
        return ModelConfig(**{k: v for k, v in model.items() if k in known}), mode
    except TypeError:
        return None, mode


def trained_mode(hyperparameters: dict) -> str:
    """The `trainer.mode` (qlora or lora) a trial's resolved config records; qlora where it records none."""
    mode = (hyperparameters.get("trainer") or {}).get("mode", "qlora")
    return mode if mode in MODES else "qlora"
