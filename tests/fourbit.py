"""Running a 4-bit model the way a GPU runs batched inputs, for comparisons of logits (shared by the evaluator's
tests)."""

from __future__ import annotations

import contextlib

import torch


@contextlib.contextmanager
def dequantize_then_matmul(model):
    """Runs the block with bitsandbytes on its dequantize-then-matmul path, the one GPUs take for batched inputs.

    Train mode (dropout is 0) keeps it there; in eval mode on CPUs with AVX512-BF16 it switches to a
    repacked kernel that rounds differently. No gradients either way.
    """
    model.train()
    try:
        with torch.no_grad():
            yield
    finally:
        model.eval()


def logits(model, ids):
    with dequantize_then_matmul(model):
        return model(input_ids=ids).logits.float()
