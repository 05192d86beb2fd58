"""Log-likelihoods of a context's continuations, the context run once.

lm-eval scores a multiple-choice document as one request per choice, each a
full forward pass over context and choice: TruthfulQA's 280-token prompt is
run six to thirteen times for a dozen tokens of answer each. Here a context
and all its continuations share one packed row: the continuations follow the
context, each attends to the context and to itself only (a block mask), and
each restarts its position ids where the context ends, so every continuation
sees exactly what it would see alone. The logits are computed only where a
continuation token is predicted.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass

from trainer.model import unwrap_peft


@dataclass
class _Row:
    context: list[int]
    requests: list[int]  # indices into the request list, one per continuation in this row
    length: int


def shared_prefix_loglikelihoods(
    model, requests: list[tuple[list[int], list[int]]], max_length: int, token_budget: int
) -> list[tuple[float, bool]]:
    """(sum of log-probabilities, whether each token is the argmax) of every (context, continuation) pair.

    Args:
        model: a causal LM (or a peft model around one).
        requests: token ids of each context and continuation (both non-empty).
        max_length: the most tokens one row may hold (the model's context).
        token_budget: padded tokens per forward pass.
    """

    core = unwrap_peft(model)
    device = next(core.parameters()).device
    keeps_logits = "logits_to_keep" in inspect.signature(core.forward).parameters
    rows = _rows(requests, max_length)
    results: list[tuple[float, bool] | None] = [None] * len(requests)
    rows.sort(key=lambda r: -r.length)
    start = 0
    pending = None
    while start < len(rows):
        width = rows[start].length  # the longest row of the batch (rows are sorted)
        count = max(1, min(len(rows) - start, token_budget // width))
        batch = rows[start : start + count]
        start += count
        # The next batch goes to the GPU before this one's results are read back: the GPU never waits for
        # the CPU to build a batch.
        launched = _launch_batch(core, batch, requests, width, device, keeps_logits)
        if pending is not None:
            _collect(*pending, results)
        pending = launched
    if pending is not None:
        _collect(*pending, results)
    return results  # type: ignore[return-value]


def _rows(requests, max_length: int) -> list[_Row]:
    """Groups continuations by context into rows of at most `max_length` tokens."""
    by_context: dict[tuple[int, ...], list[int]] = {}
    for i, (context, _) in enumerate(requests):
        by_context.setdefault(tuple(context), []).append(i)
    rows = []
    for context, indices in by_context.items():
        row = None
        for i in indices:
            continuation = requests[i][1]
            if row is None or row.length + len(continuation) > max_length:
                row = _Row(list(context), [], len(context))
                rows.append(row)
            row.requests.append(i)
            row.length += len(continuation)
    return rows


def _launch_batch(core, batch: list[_Row], requests, width: int, device, keeps_logits: bool):
    """Queues one batch's forward pass; returns what `_collect` needs to read its results."""
    import numpy as np
    import torch

    n = len(batch)
    ids = np.zeros((n, width), dtype=np.int64)
    positions = np.zeros((n, width), dtype=np.int64)
    segment = np.full((n, width), -1, dtype=np.int64)  # -1 padding, 0 context, j + 1 continuation j
    # Per request: (row, the row indices whose logits predict its tokens, its tokens).
    targets: list[tuple[int, int, list[int], list[int]]] = []
    for b, row in enumerate(batch):
        c = len(row.context)
        ids[b, :c] = row.context
        positions[b, :c] = np.arange(c)
        segment[b, :c] = 0
        at = c
        for j, i in enumerate(row.requests):
            continuation = requests[i][1]
            k = len(continuation)
            ids[b, at : at + k] = continuation
            positions[b, at : at + k] = np.arange(c, c + k)
            segment[b, at : at + k] = j + 1
            # Token 0 is predicted by the context's last token, token t by the continuation's token t - 1.
            targets.append((i, b, [c - 1] + list(range(at, at + k - 1)), continuation))
            at += k
    needed = sorted({p for _, _, where, _ in targets for p in where})
    column = {p: j for j, p in enumerate(needed)}
    rows_index, cols_index, tokens = [], [], []
    for _, b, where, continuation in targets:
        rows_index += [b] * len(where)
        cols_index += [column[p] for p in where]
        tokens += continuation
    ids, positions, segment, needed, rows_index, cols_index, tokens = (
        _to_device(torch.from_numpy(a) if isinstance(a, np.ndarray) else torch.tensor(a), device)
        for a in (ids, positions, segment, needed, rows_index, cols_index, tokens)
    )
    with torch.no_grad():
        seg_q, seg_k = segment[:, :, None], segment[:, None, :]
        causal = torch.ones((width, width), dtype=torch.bool, device=device).tril()
        # Rows are only as long as the batch's longest (rounding them up to a multiple of 16 padded the default
        # suites' tokens by 8%), but the mask's rows are laid out 16 elements apart: attention kernels need an
        # aligned mask, or copy it into one.
        mask = torch.empty((len(batch), width, -(-width // 16) * 16), dtype=torch.bool, device=device)[..., :width]
        torch.logical_and(causal & (seg_k >= 0), (seg_k == 0) | (seg_k == seg_q), out=mask)
        mask |= torch.eye(width, dtype=torch.bool, device=device)  # padding rows see themselves: no NaN in sdpa
        kwargs = {"logits_to_keep": needed} if keeps_logits else {}
        logits = core(input_ids=ids, position_ids=positions, attention_mask=mask[:, None], use_cache=False,
                      **kwargs).logits
        if not keeps_logits:
            logits = logits[:, needed]
        logprobs = torch.log_softmax(logits[rows_index, cols_index].float(), dim=-1)
        chosen = logprobs.gather(-1, tokens[:, None])[:, 0]
        greedy = logprobs.argmax(-1) == tokens
    return targets, _from_device(chosen), _from_device(greedy)


def _to_device(tensor, device):
    """A host tensor on `device`, copied without blocking the host (pinned memory) when that is a GPU."""
    import torch

    if torch.device(device).type != "cuda":
        return tensor.to(device)
    return tensor.pin_memory().to(device, non_blocking=True)


def _from_device(tensor):
    """A copy of `tensor` on the host, started now; read it after `torch.cuda` has finished (see `_collect`)."""
    import torch

    if tensor.device.type != "cuda":
        return tensor, None
    host = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True)
    host.copy_(tensor, non_blocking=True)
    done = torch.cuda.Event()
    done.record()
    return host, done


def _collect(targets, chosen, greedy, results) -> None:
    """Sums each request's log-probabilities once its batch has finished."""
    for _, done in (chosen, greedy):
        if done is not None:
            done.synchronize()
    # Each request's tokens are consecutive, in `targets` order: sum and check them per run.
    at = 0
    chosen, greedy = chosen[0].tolist(), greedy[0].tolist()
    for i, _, where, _ in targets:
        end = at + len(where)
        results[i] = (float(sum(chosen[at:end])), all(greedy[at:end]))
        at = end
