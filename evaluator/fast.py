"""Scoring speed: a dense copy of the 4-bit base with the adapter merged in, and batches sized to memory.

Scoring a 4-bit model decodes one token at a time, and every linear layer of
every step pays for it twice: bitsandbytes dequantizes the whole weight for any
input of more than one row, and the unmerged LoRA adds half a dozen small
kernels (casts, two thin matmuls, a scale, a clone, an add). At decode sizes
those launches, not the arithmetic, set the pace.

`dense_base` removes both for the time of scoring: each 4-bit linear layer is
swapped for a plain one holding its dequantized weight (the same values
bitsandbytes computes in its forward pass), the LoRA delta is added into that
copy once, and the 4-bit layers come back afterwards, untouched. It costs the
base's size in the compute dtype (about 14.5 GB for a 7B model), so `auto`
uses it only when that fits in half the memory free under the cap.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

GIB = 2**30


def core_model(model):
    """The transformers model under a peft wrapper (or the model itself)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def _dense_linear_class():
    import torch

    class DenseLinear(torch.nn.Module):
        """A linear layer with a dense weight that casts like bitsandbytes' Linear4bit.

        The input is cast to the compute dtype and the output back to the
        input's dtype, so callers see the same dtypes as with the 4-bit layer.
        """

        def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None):
            super().__init__()
            self.weight = torch.nn.Parameter(weight, requires_grad=False)
            self.bias = bias
            self.in_features = weight.shape[1]
            self.out_features = weight.shape[0]

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            bias = None if self.bias is None else self.bias.to(self.weight.dtype)
            return torch.nn.functional.linear(x.to(self.weight.dtype), self.weight, bias).to(x.dtype)

    return DenseLinear


def quantized_linears(model) -> list[tuple[object, str, object]]:
    """(parent module, attribute name, layer) for every bitsandbytes 4-bit linear layer of `model`."""
    try:
        from bitsandbytes.nn import Linear4bit
    except ImportError:
        return []
    found = []
    for parent in model.modules():
        for name, child in parent.named_children():
            if isinstance(child, Linear4bit):
                found.append((parent, name, child))
    return found


def dense_bytes(model) -> int:
    """Bytes a dense copy of the model's 4-bit layers takes in their compute dtype."""
    import torch

    total = 0
    for _, _, layer in quantized_linears(model):
        dtype = layer.compute_dtype or torch.bfloat16
        total += layer.in_features * layer.out_features * torch.tensor([], dtype=dtype).element_size()
    return total


def free_bytes(device, memory_budget_gib: float | None) -> int | None:
    """Bytes the allocator can still hand out on `device` under the budget; None off the GPU."""
    import torch

    device = torch.device(device)
    if device.type != "cuda":
        return None
    index = device.index if device.index is not None else torch.cuda.current_device()
    total = torch.cuda.get_device_properties(index).total_memory
    limit = min(total, int(memory_budget_gib * GIB)) if memory_budget_gib else total
    device_free, _ = torch.cuda.mem_get_info(index)
    used = torch.cuda.memory_allocated(index)
    # Other processes on the card count against what is physically free, the cap against what we hold.
    return max(0, min(limit - used, device_free + torch.cuda.memory_reserved(index) - used))


def use_dense(model, mode: bool | str, device, memory_budget_gib: float | None) -> bool:
    """Whether scoring uses `dense_base`: `mode` true or false, or `auto`: on a GPU, when the copy fits in
    half the free memory."""
    if mode is True or mode is False:
        return mode and bool(quantized_linears(model))
    size = dense_bytes(model)
    free = free_bytes(device, memory_budget_gib)
    return size > 0 and free is not None and size <= free / 2


@contextlib.contextmanager
def dense_base(model, merge: bool = True):
    """Swaps every 4-bit linear layer of `model` for a dense copy while the block runs.

    With `merge`, each LoRA layer's delta (B·A·scale) is added into its dense
    copy, and the whole LoRA layer (peft's wrapper included) is swapped for
    that one dense layer, so a forward pass runs one matmul per layer and no
    adapter bookkeeping. DoRA layers, and adapters switched off, keep their
    LoRA wrapper around a dense base. On exit the original layers come back
    untouched; the dense copies are dropped. The model must not be trained
    inside the block.
    """
    import torch

    dense_cls = _dense_linear_class()
    owners = {id(child): (parent, name) for parent in model.modules() for name, child in parent.named_children()}
    swapped = []
    try:
        with torch.no_grad():
            for parent, name, layer in quantized_linears(model):
                dtype = layer.compute_dtype or torch.bfloat16
                weight, bias = _dequantized(layer).to(dtype), layer.bias
                if merge and name == "base_layer" and _mergeable(parent) and id(parent) in owners:
                    for adapter in parent.active_adapters:
                        if adapter in parent.lora_A:
                            weight += parent.get_delta_weight(adapter).to(weight.device, torch.float32).to(dtype)
                    parent, name, layer = *owners[id(parent)], parent
                setattr(parent, name, dense_cls(weight, bias))
                swapped.append((parent, name, layer))
        yield len(swapped)
    finally:
        for parent, name, layer in reversed(swapped):
            setattr(parent, name, layer)


def _dequantized(layer):
    """The 4-bit layer's weight as bitsandbytes computes it in its forward pass.

    On CPUs with AVX512-BF16, bitsandbytes repacks a layer's weights into an
    inference-only layout the first time it runs in eval mode; that layout is
    turned back into the standard one here (as bitsandbytes does before moving
    or saving a layer), which also makes the layer trainable again.
    """
    import bitsandbytes.functional as bnbf

    param = layer.weight
    if getattr(param.quant_state, "packing_format_for_cpu", False):
        param.data, param.quant_state = bnbf._convert_weight_packed_for_cpu_inverse(param.data, param.quant_state)
    return bnbf.dequantize_4bit(param.data, param.quant_state)


def _mergeable(layer) -> bool:
    lora_a = getattr(layer, "lora_A", None)
    if lora_a is None or getattr(layer, "merged_adapters", None) or getattr(layer, "disable_adapters", False):
        return False
    variants = getattr(layer, "lora_variant", {}) or {}
    return not any(a in variants for a in layer.active_adapters) and not any(
        getattr(layer, "use_dora", {}).get(a, False) for a in layer.active_adapters
    )


def kv_bytes_per_token(config, dtype_bytes: int = 2) -> int:
    """KV-cache bytes one token takes across all layers."""
    heads = getattr(config, "num_attention_heads", 1)
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    return 2 * config.num_hidden_layers * kv_heads * head_dim * dtype_bytes


def prefill_bytes_per_token(config, dtype_bytes: int = 2) -> int:
    """Transient bytes per prompt token while one layer runs the prefill.

    The MLP's activations dominate: gate, up, their product and activation
    (4 x intermediate), plus an unmerged LoRA's float32 copy of the down
    projection's input (2 x intermediate in 2-byte units), plus a few hidden-sized buffers.
    """
    intermediate = getattr(config, "intermediate_size", None) or 4 * config.hidden_size
    return (6 * intermediate + 8 * config.hidden_size) * dtype_bytes


PREFILL_TOKENS = 8192
"""Prompt tokens prefilled at once when a generation batch is prefilled in chunks."""


@dataclass(frozen=True)
class GenerationPlan:
    rows: int
    """Sequences decoded at once."""
    prefill_rows: int
    """Sequences prefilled at once (a chunk of `rows`): the prefill's activations need not fit for all rows."""


def generation_plan(
    config, free: int | None, context_tokens: int, new_tokens: int, requests: int, fallback: int, limit: int = 256
) -> GenerationPlan:
    """How many sequences to decode at once, and to prefill at once, in 80% of `free` bytes.

    Decoding keeps each sequence's KV cache; the prefill also needs its
    activations and, when it runs in chunks, the chunk's own KV cache before it
    is copied in. So the prefill runs in chunks of about `PREFILL_TOKENS`
    tokens and the rest of the memory goes to decoding rows. Off the GPU
    (`free` None) both are `fallback`. Never more than `requests` or `limit`.
    """
    if free is None:
        rows = max(1, min(fallback, requests))
        return GenerationPlan(rows, rows)
    budget = 0.8 * free
    kv_token, activations = kv_bytes_per_token(config), prefill_bytes_per_token(config)
    per_row = kv_token * (context_tokens + new_tokens) + 4 * getattr(config, "vocab_size", 32000)
    whole = int(budget // (per_row + activations * context_tokens))  # prefilled all at once
    chunk_rows = max(1, PREFILL_TOKENS // max(1, context_tokens))
    chunked = int((budget - chunk_rows * context_tokens * (activations + kv_token)) // per_row)
    rows = max(1, min(limit, requests, max(whole, chunked)))
    prefill_rows = rows if whole >= rows else min(rows, chunk_rows)
    return GenerationPlan(rows, prefill_rows)
