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

from evaluator import compat
from trainer.units import GIB


def _linear(x, weight, bias):
    """`x @ weight.T + bias` in the weight's dtype, returned in the input's dtype (as bitsandbytes' Linear4bit)."""
    import torch

    bias = None if bias is None else bias.to(weight.dtype)
    return torch.nn.functional.linear(x.to(weight.dtype), weight, bias).to(x.dtype)


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
            return _linear(x, self.weight, self.bias)

    return DenseLinear


def quantized_linears(model, bits: int = 4) -> list[tuple[object, str, object]]:
    """(parent module, attribute name, layer) for every bitsandbytes 4-bit (`bits` 8: 8-bit) linear layer of
    `model`."""
    try:
        from bitsandbytes.nn import Linear4bit, Linear8bitLt
    except ImportError:
        return []
    kind = Linear8bitLt if bits == 8 else Linear4bit
    found = []
    for parent in model.modules():
        for name, child in parent.named_children():
            if isinstance(child, kind):
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
    half the free memory. Never with a bitsandbytes outside its checked versions (`evaluator.compat`)."""
    if mode is False or not quantized_linears(model) or not compat.dense_copy_allowed():
        return False
    if mode is True:
        return True
    size = dense_bytes(model)
    free = free_bytes(device, memory_budget_gib)
    return size > 0 and free is not None and size <= free / 2


PROJECTION_GROUPS = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))
"""Sibling linear layers that always read the same input: in a dense copy, each group is one matmul."""
SHARED_PROJECTION_ROWS = 1024
"""Inputs of at most this many rows (tokens) run a group as one matmul: decode steps, bound by reading weights.
Longer ones run each member's own (on an H100, one fused matmul over 16k tokens was slower, and its sliced
outputs slowed the kernels after it)."""


def _shared_projection_class():
    import torch

    class _Shared:
        """A group's fused weight, and its last output until every member has taken its part."""

        def __init__(self, weight, bias, sizes: list[int]):
            self.weight, self.bias, self.sizes = weight, bias, sizes
            self.input = self.parts = None
            self.pending: set[int] = set()

    class SharedProjection(torch.nn.Module):
        """One linear layer of a group that runs as a single matmul over the group's concatenated weights.

        For inputs of up to `SHARED_PROJECTION_ROWS` rows, the first member
        called with an input computes every member's output; the others,
        called with that same input object, take their slice. A decode step on
        a 7B model then runs 4 matmuls a layer instead of 7, each reading a
        larger weight, with fewer launches. Longer inputs run the member's own
        rows of the fused weight.
        """

        def __init__(self, shared: _Shared, index: int, weight, bias):
            super().__init__()
            self.shared, self.index = shared, index
            self.weight = torch.nn.Parameter(weight, requires_grad=False)  # a view into the fused weight
            self.bias = bias
            self.in_features, self.out_features = weight.shape[1], weight.shape[0]

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            shared = self.shared
            if x.numel() > SHARED_PROJECTION_ROWS * x.shape[-1]:
                # A long pass is bound by arithmetic: the members' own matmuls, whose outputs need no slicing.
                return _linear(x, self.weight, self.bias)
            if shared.input is not x or self.index not in shared.pending:
                out = _linear(x, shared.weight, shared.bias)
                shared.input, shared.parts = x, out.split(shared.sizes, dim=-1)
                shared.pending = set(range(len(shared.sizes)))
            part = shared.parts[self.index]
            shared.pending.discard(self.index)
            if not shared.pending:  # every member has its part: hold no tensor past the layer
                shared.input = shared.parts = None
            return part

    return _Shared, SharedProjection


@contextlib.contextmanager
def dense_base(model, merge: bool = True, fuse_projections: bool = True):
    """Swaps every 4-bit linear layer of `model` for a dense copy while the block runs.

    With `merge`, each LoRA layer's delta (B·A·scale) is added into its dense
    copy, and the whole LoRA layer (peft's wrapper included) is swapped for
    that one dense layer, so a forward pass runs one matmul per layer and no
    adapter bookkeeping. DoRA layers, and adapters switched off, keep their
    LoRA wrapper around a dense base. With `fuse_projections`, the layers of
    each `PROJECTION_GROUPS` group (query, key and value; gate and up) are
    dequantized into one weight and run as one matmul (`SharedProjection`).
    On exit the original layers come back untouched; the dense copies are
    dropped. The model must not be trained inside the block.
    """
    import torch

    dense_cls = _dense_linear_class()
    owners = {id(child): (parent, name) for parent in model.modules() for name, child in parent.named_children()}
    # (module holding the layer, its attribute name, what is there now, the 4-bit layer, the LoRA layer to merge)
    units = []
    for parent, name, layer in quantized_linears(model):
        lora = parent if merge and name == "base_layer" and _mergeable(parent) and id(parent) in owners else None
        if lora is not None:
            parent, name = owners[id(parent)]
        units.append((parent, name, lora if lora is not None else layer, layer, lora))
    groups = _projection_groups(units) if fuse_projections else {}
    swapped = []
    try:
        with torch.no_grad():
            done = set()
            for parent, name, original, layer, lora in units:
                if (id(parent), name) in done:
                    continue
                members = groups.get((id(parent), name))
                if members is None:
                    setattr(parent, name, dense_cls(_dense_weight(layer, lora), layer.bias))
                    swapped.append((parent, name, original))
                    done.add((id(parent), name))
                    continue
                for member, module in _shared_projections(members):
                    setattr(member[0], member[1], module)
                    swapped.append((member[0], member[1], member[2]))
                    done.add((id(member[0]), member[1]))
        yield len(swapped)
    finally:
        for parent, name, layer in reversed(swapped):
            setattr(parent, name, layer)


def _dense_weight(layer, lora):
    """The 4-bit layer's weight in its compute dtype, with the LoRA layer's delta added when one is given."""
    import torch

    dtype = layer.compute_dtype or torch.bfloat16
    return with_lora_delta(_dequantized(layer).to(dtype), lora)


def with_lora_delta(weight, lora):
    """`weight` (a layer's dense weight) with the active adapters' deltas of the LoRA layer `lora` added in
    place (in float32, then the weight's dtype); unchanged when `lora` is None."""
    import torch

    if lora is not None:
        for adapter in lora.active_adapters:
            if adapter in lora.lora_A:
                weight += lora.get_delta_weight(adapter).to(weight.device, torch.float32).to(weight.dtype)
    return weight


def _projection_groups(units) -> dict:
    """(id of the holding module, name) -> the units of its `PROJECTION_GROUPS` group, for groups that can fuse:
    every member swapped here, with one input size, one compute dtype, and biases on all or none."""
    by_key = {(id(unit[0]), unit[1]): unit for unit in units}
    groups = {}
    for parent in {id(unit[0]): unit[0] for unit in units}.values():
        for names in PROJECTION_GROUPS:
            members = [by_key.get((id(parent), n)) for n in names]
            if any(m is None for m in members):
                continue
            layers = [m[3] for m in members]
            if (
                len({(layer.in_features, layer.compute_dtype) for layer in layers}) == 1
                and len({layer.bias is None for layer in layers}) == 1
            ):
                for n in names:
                    groups[(id(parent), n)] = members
    return groups


def _shared_projections(members):
    """(unit, its `SharedProjection`) for each member of a group, the dense weights written into one tensor.

    Each member is dequantized straight into its rows of the fused weight, so
    making the copy never holds more than one layer's weight twice.
    """
    import torch

    shared_cls, projection_cls = _shared_projection_class()
    layers = [m[3] for m in members]
    sizes = [layer.out_features for layer in layers]
    fused = torch.empty((sum(sizes), layers[0].in_features), dtype=layers[0].compute_dtype or torch.bfloat16,
                        device=layers[0].weight.device)
    for (_, _, _, layer, lora), rows in zip(members, fused.split(sizes), strict=True):
        rows.copy_(_dense_weight(layer, lora))
    bias = None
    if layers[0].bias is not None:
        bias = torch.cat([layer.bias.to(fused.dtype) for layer in layers])
    shared = shared_cls(fused, bias, sizes)
    weights, biases = fused.split(sizes), (bias.split(sizes) if bias is not None else [None] * len(sizes))
    return [
        (m, projection_cls(shared, i, w, b)) for i, (m, w, b) in enumerate(zip(members, weights, biases, strict=True))
    ]


def _dequantized(layer):
    """The 4-bit layer's weight as bitsandbytes computes it in its forward pass.

    On CPUs with AVX512-BF16, bitsandbytes repacks a layer's weights into an
    inference-only layout the first time it runs in eval mode; that layout is
    turned back into the standard one here (as bitsandbytes does before moving
    or saving a layer), which also makes the layer trainable again.
    """
    import bitsandbytes.functional as bnbf

    param = layer.weight
    compat.standard_4bit_layout(param)
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
