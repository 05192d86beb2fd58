"""Fused elementwise kernels for scoring on a GPU: RMSNorm, rotary embeddings and the SiLU gate, compiled.

Between its matmuls, a Llama-style decoder layer runs about forty small
kernels: RMSNorm alone is six (a float32 upcast, square, mean, rsqrt,
multiply, downcast and scale), rotary embeddings a dozen with two
concatenations, the MLP gate two. In a decode step their launches and
float32 round trips cost about as much as the weights' reads; in a 16k-token
log-likelihood pass they are a fifth of the time. `fused_elementwise` swaps
those three functions, for the time of scoring, for `torch.compile`d versions
of the same formulas (each compiled a few times per process, for every
layer and every shape), then restores the model's own.

Only architectures whose code is known to match the formulas here are
fused (`FUSED_ARCHITECTURES`); others score unchanged. The swap itself
reaches into transformers' modeling code: it is `evaluator.compat`'s.
"""

from __future__ import annotations

import contextlib
import functools

from evaluator.compat import swapped_elementwise
from trainer.model import unwrap_peft

FUSED_ARCHITECTURES = {"LlamaForCausalLM": "Llama", "MistralForCausalLM": "Mistral", "Qwen2ForCausalLM": "Qwen2"}


@functools.cache
def _kernels(backend: str):
    """The three formulas as compiled functions (see `compile` below for their shapes)."""
    import torch

    def rms_norm(x, weight, eps: float):
        dtype = x.dtype
        h = x.to(torch.float32)
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
        return weight * h.to(dtype)

    def silu_gate(gate, up):
        return torch.nn.functional.silu(gate) * up

    def rotary(q, k, cos, sin, unsqueeze_dim: int = 1):
        cos, sin = cos.unsqueeze(unsqueeze_dim), sin.unsqueeze(unsqueeze_dim)
        half = q.shape[-1] // 2
        q_rotated = torch.cat((-q[..., half:], q[..., :half]), dim=-1)
        k_rotated = torch.cat((-k[..., half:], k[..., :half]), dim=-1)
        # Written out [batch, heads, length, dim] (the projections' views are [batch, length, heads, dim]
        # underneath): the grouped attention (`evaluator.decode`) then views the queries without a copy.
        return ((q * cos) + (q_rotated * sin)).contiguous(), ((k * cos) + (k_rotated * sin)).contiguous()

    # The batch and length dimensions are marked dynamic before each call, so one compilation serves every
    # batch; heads, head and hidden sizes stay static. Compiled with every dimension dynamic (`dynamic=True`),
    # the rotary kernel took 3x as long on an H100 (0.39 ms against 0.13 ms for the queries and keys of 16k
    # tokens); left to dynamo's automatic choice, each kernel compiled static first and again at the next shape.
    compile = functools.partial(torch.compile, backend=backend)
    norm_kernel, gate_kernel, rotary_kernel = compile(rms_norm), compile(silu_gate), compile(rotary)
    mark = torch._dynamo.maybe_mark_dynamic

    def dynamic(tensor, dims):
        for dim in dims:
            mark(tensor, dim)
        return tensor

    def leading(tensor):  # every dimension but the last: batch and length
        return dynamic(tensor, range(tensor.dim() - 1))

    def norm_call(x, weight, eps: float):
        return norm_kernel(leading(x), weight, eps)

    def gate_call(gate, up):
        return gate_kernel(leading(gate), leading(up))

    def rotary_call(q, k, cos, sin, unsqueeze_dim: int = 1):
        # q and k: batch, heads (at `unsqueeze_dim`), length, head size; cos and sin: batch, length, head size.
        dims = [d for d in range(q.dim() - 1) if d != unsqueeze_dim]
        return rotary_kernel(dynamic(q, dims), dynamic(k, dims), leading(cos), leading(sin), unsqueeze_dim)

    return norm_call, gate_call, rotary_call


def can_fuse(model) -> bool:
    core = unwrap_peft(model)
    config = getattr(core, "config", None)
    return type(core).__name__ in FUSED_ARCHITECTURES and getattr(config, "hidden_act", None) == "silu"


@contextlib.contextmanager
def fused_elementwise(model, backend: str = "inductor"):
    """Runs the block with RMSNorm, rotary embeddings and the MLP's SiLU gate as compiled kernels.

    Yields whether the model was fused (False for other architectures, and
    with a transformers outside the versions the swap was checked against).
    `backend="eager"` runs the same formulas uncompiled (tests).
    """
    if not can_fuse(model):
        yield False
        return
    core = unwrap_peft(model)
    rms_norm, silu_gate, rotary = _kernels(backend)

    def norm_forward(self, hidden_states):
        return rms_norm(hidden_states, self.weight, self.variance_epsilon)

    def mlp_forward(self, x):
        return self.down_proj(silu_gate(self.gate_proj(x), self.up_proj(x)))

    prefix = FUSED_ARCHITECTURES[type(core).__name__]
    with swapped_elementwise(core, prefix, norm_forward, mlp_forward, rotary) as swapped:
        yield swapped
