"""Greedy decoding for scoring: a static KV cache, one CUDA graph per decode step, stop checks in strides.

`transformers`' `generate` spends most of a decode step in Python on a
7B model: logits processors, stopping criteria that decode every sequence and
synchronise with the GPU at every token, and several hundred kernel launches
for the forward pass itself. Scoring needs none of the flexibility, so this
loop does the minimum: one prefill, then per token an argmax fed back in.
On a GPU the decode step (forward pass, argmax, cache write) is captured once
as a CUDA graph and replayed, so a step costs its GPU time, not its launches.
Stop sequences are checked every `check_every` tokens on the CPU; rows that
finish keep decoding (the graph has a fixed batch) until all have finished.

The result matches `generate(do_sample=False)` token for token (tests check
it on CPU); lm-eval cuts each continuation at its first stop sequence either way.
"""

from __future__ import annotations

import contextlib
import inspect
import logging
import time

from evaluator import compat
from trainer.model import unwrap_peft

log = logging.getLogger(__name__)


ATTENTION = "sweep_grouped"


def _register_attention() -> None:
    """Registers `ATTENTION`: sdpa that reads each key/value head once for all the query heads sharing it.

    With an attention mask (left padding and shared-prefix blocks need one),
    transformers' sdpa path copies every key/value head once per query head
    sharing it (4x the key/value traffic on Mistral, and two copies of a
    layer's keys and values per forward pass) before attending. Here the query
    heads of a group become more queries of their shared key/value head
    instead: for a one-token decode step there is no causal mask to repeat;
    for a longer pass the mask is repeated once per group, once per forward
    pass (every layer gets the same mask), not per layer.
    """
    import torch
    from transformers import AttentionInterface
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    def attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
        batch, heads, length, dim = query.shape
        kv_heads, keys = key.shape[1], key.shape[2]
        if (kwargs.get("softcap") is not None or kwargs.get("s_aux") is not None or dropout
                or (attention_mask is not None and (attention_mask.dim() != 4 or attention_mask.shape[1] != 1))
                or (length > 1 and (attention_mask is None or attention_mask.dtype != torch.bool))):
            return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout,
                                          scaling=scaling, **kwargs)
        group = heads // kv_heads
        # The query heads sharing a key/value head become that head's queries, group-major: a free view when the
        # query is laid out [batch, heads, length, dim].
        q = query.reshape(batch, kv_heads, group * length, dim)
        mask = None
        if attention_mask is not None:
            mask = attention_mask[..., :keys]
            mask = mask if mask.dtype == torch.bool else mask >= 0
            if length > 1:
                if _REPEATED.get("source") is not attention_mask:
                    _REPEATED.clear()
                    _REPEATED.update(source=attention_mask, mask=_repeat_mask(mask, group))
                mask = _REPEATED["mask"]
            else:
                mask = mask.reshape(batch, 1, 1, keys)
        out = torch.nn.functional.scaled_dot_product_attention(q, key, value, attn_mask=mask, scale=scaling)
        # [batch, kv_heads, group * length, dim] -> [batch, length, heads, dim]
        return out.reshape(batch, heads, length, dim).transpose(1, 2), None

    AttentionInterface.register(ATTENTION, attention)
    # Masks that transformers builds itself (from a 2D padding mask, or none) are made as for sdpa.
    AttentionMaskInterface.register(ATTENTION, sdpa_mask)


_REPEATED: dict = {}
"""The last mask `ATTENTION` was given (every layer of a pass gets the same one) and its repetition per group."""


def _repeat_mask(mask, group: int):
    """[rows, 1, length, keys] -> [rows, 1, group * length, keys]: the mask once per query head of a group.

    Its rows are laid out 16 elements apart whatever `keys` is: attention
    kernels need an aligned mask, and would otherwise copy it into one at
    every layer.
    """
    import torch

    rows, _, length, keys = mask.shape
    aligned = -(-keys // 16) * 16
    repeated = torch.zeros((rows, 1, group * length, aligned), dtype=torch.bool, device=mask.device)
    target = repeated.view(rows, 1, group, length, aligned)[..., :keys]
    target.copy_(mask[:, :, None].expand_as(target))
    return repeated[..., :keys]


@contextlib.contextmanager
def grouped_attention(core):
    """Runs the block with `ATTENTION` as the model's attention, then restores the one it had (the model's own
    throughout where transformers cannot say which that is: `evaluator.compat.attn_implementation`)."""
    before = compat.attn_implementation(core)
    if before is None:
        yield
        return
    _register_attention()
    try:
        core.set_attn_implementation(ATTENTION)
    except (ValueError, ImportError) as e:  # an architecture that only runs its own attention
        log.info("scoring with the model's own attention (%s): %s", before, e)
        yield
        return
    try:
        yield
    finally:
        core.set_attn_implementation(before)
        _REPEATED.clear()  # no mask held past scoring


class _Step:
    """One decode step over static buffers, run eagerly or replayed from a CUDA graph."""

    def __init__(self, model, cache, valid, position, slot, pass_cache_position: bool):
        import torch

        self.model, self.cache, self.valid = model, cache, valid
        self.position, self.slot, self.pass_cache_position = position, slot, pass_cache_position
        self.ids = torch.zeros((valid.shape[0], 1), dtype=torch.long, device=valid.device)
        self.next = None
        self.graph = None

    def _forward(self):
        kwargs = {"cache_position": self.slot} if self.pass_cache_position else {}
        self.valid.index_fill_(1, self.slot, True)  # the slot this step writes becomes visible to every row
        out = self.model(
            input_ids=self.ids, position_ids=self.position, attention_mask=self.valid[:, None, None, :],
            past_key_values=self.cache, use_cache=True, logits_to_keep=1, **kwargs,
        )
        return out.logits[:, -1].argmax(-1)

    def run(self):
        if self.graph is not None:
            self.graph.replay()
            return self.next
        return self._forward()

    def capture(self) -> bool:
        """Records the step as a CUDA graph (the recording does not run it); False if the model can't be captured."""
        import torch

        graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(graph):
                self.next = self._forward()
        except Exception as e:  # an op that syncs or reallocates: stay eager
            log.info("decoding without a CUDA graph: %s", " ".join(str(e).split())[:200])
            torch.cuda.synchronize()
            return False
        self.graph = graph
        return True


class GreedyDecoder:
    """Greedy decoding of one model, batch after batch, reusing its static cache and CUDA graph.

    Allocating a KV cache and capturing a decode step cost seconds each on a 7B
    model, so both are kept for the next batch when it fits: as many rows or
    fewer (padded with copies of the first row) and as many cache slots or fewer.
    """

    def __init__(self, model, cuda_graph: bool = True):
        self.core = unwrap_peft(model)  # its forward takes the cache arguments directly
        self.cuda_graph = cuda_graph
        self.session: _Session | None = None

    def generate(
        self,
        input_ids,
        attention_mask,
        max_new_tokens: int,
        stop_check=None,
        eos_token_id: int | None = None,
        pad_token_id: int = 0,
        check_every: int = 16,
        prefill_rows: int | None = None,
    ):
        """Greedy continuation of a left-padded batch; returns prompt and new tokens, as `generate` does.

        Args:
            input_ids, attention_mask: [batch, prompt] left-padded prompts.
            max_new_tokens: most tokens generated per row.
            stop_check: called with the rows' new tokens (lists) every
                `check_every` steps; returns which rows are finished.
            eos_token_id: a row that emits it is finished and padded after it.
            pad_token_id: what follows a row's end of sequence.
            prefill_rows: rows prefilled at once (`evaluator.fast.generation_plan`); None: all.
        """
        import torch

        rows, prompt = input_ids.shape
        # Cache slots rounded up to a multiple of 64: attention kernels with a mask need its rows aligned, or
        # fall back to a far slower path. The extra slots are never valid, so never attended.
        slots = -(-(prompt + max_new_tokens) // 64) * 64
        session = self.session
        if session is None or rows > session.batch or slots > session.slots or session.device != input_ids.device:
            self.session = session = None  # free the old cache before allocating the new one
            session = self.session = _Session(self.core, rows, slots, input_ids.device, self.cuda_graph)
        if rows < session.batch:  # pad with copies of the first row, finished from the start; dropped below
            fill = session.batch - rows
            input_ids = torch.cat([input_ids, input_ids[:1].expand(fill, -1)])
            attention_mask = torch.cat([attention_mask, attention_mask[:1].expand(fill, -1)])
        with grouped_attention(self.core):
            out = session.generate(input_ids, attention_mask, rows, max_new_tokens, stop_check, eos_token_id,
                                   pad_token_id, check_every, prefill_rows or session.batch)
        return out[:rows]

    def cache_bytes(self) -> int:
        """Bytes the kept static cache holds (freed when a batch needs a bigger one)."""
        return 0 if self.session is None else compat.static_cache_bytes(self.session.cache)


def greedy_generate(model, input_ids, attention_mask, max_new_tokens: int, cuda_graph: bool = True, **kwargs):
    """One batch through a `GreedyDecoder` (see `GreedyDecoder.generate` for the arguments)."""
    return GreedyDecoder(model, cuda_graph).generate(input_ids, attention_mask, max_new_tokens, **kwargs)


class _Session:
    """A static KV cache for `batch` rows of `slots` tokens, its step buffers, and the step's CUDA graph."""

    def __init__(self, core, batch: int, slots: int, device, cuda_graph: bool):
        import torch
        from transformers import StaticCache

        self.core, self.batch, self.slots, self.device = core, batch, slots, device
        self.cache = StaticCache(config=core.config, max_cache_len=slots)
        self.takes_cache_position = "cache_position" in inspect.signature(core.forward).parameters
        # Which cache slots each row may attend to: its real prompt tokens, then everything it generates.
        self.valid = torch.zeros((batch, slots), dtype=torch.bool, device=device)
        self.position = torch.zeros((batch, 1), dtype=torch.long, device=device)
        self.slot = torch.zeros(1, dtype=torch.long, device=device)  # the slot the next step writes (all rows)
        self.step = _Step(core, self.cache, self.valid, self.position, self.slot, self.takes_cache_position)
        self.use_graph = cuda_graph and torch.device(device).type == "cuda"

    def _prefill(self, input_ids, positions, width: int):
        """Runs the prompts through the model into the static cache; returns each row's next token."""
        import torch

        prompt = input_ids.shape[1]
        kwargs = {"cache_position": torch.arange(prompt, device=input_ids.device)} if self.takes_cache_position else {}
        out = self.core(input_ids=input_ids, attention_mask=_prefill_mask(self.valid, prompt, width)[:, None],
                        position_ids=positions, past_key_values=self.cache, use_cache=True, logits_to_keep=1, **kwargs)
        return out.logits[:, -1].argmax(-1)

    def _prefill_rows(self, input_ids, positions, start: int, end: int):
        """The prefill of rows `start:end` alone, into a cache of their own that is then copied into the static one.

        The static cache's batch is fixed, so a chunk of rows cannot write into it
        directly. Chunks bound the prefill's activations, which would otherwise
        decide how many rows can decode at once.
        """
        import torch.nn.functional as F
        from transformers import DynamicCache

        prompt = input_ids.shape[1]
        # Keys of an aligned length (see `slots`): masked padding on the left, dropped when copied.
        pad = -prompt % 64
        valid = F.pad(self.valid[start:end, :prompt], (pad, 0), value=False)
        own = DynamicCache()
        out = self.core(input_ids=F.pad(input_ids[start:end], (pad, 0)),
                        attention_mask=_prefill_mask(valid, prompt + pad, prompt + pad)[:, None],
                        position_ids=F.pad(positions[start:end], (pad, 0)), past_key_values=own, use_cache=True,
                        logits_to_keep=1)
        compat.copy_into_static_cache(self.cache, own, start, end, pad, (self.batch, self.slots))
        return out.logits[:, -1].argmax(-1)

    def generate(self, input_ids, attention_mask, rows, max_new_tokens, stop_check, eos_token_id, pad_token_id,
                 check_every, prefill_rows):
        import torch

        batch, prompt = input_ids.shape
        device = input_ids.device
        slots = self.slots
        started = time.perf_counter()
        self.cache.reset()  # zeroes the buffers in place: a captured graph stays valid
        self.valid.zero_()
        self.valid[:, :prompt] = attention_mask.bool()
        # Prefill: causal over the prompt, never onto padding (`_prefill_mask`), in chunks of `prefill_rows`.
        # Padding rows' cache stays zero: their attention is finite and their tokens are dropped.
        positions = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
        with torch.no_grad():
            if (prefill_rows >= batch and rows == batch) or not compat.prefill_in_chunks():
                token = self._prefill(input_ids, positions, slots)
            else:  # in chunks; the padding rows, finished from the start, are not prefilled at all
                # Chunks of even size: 100 rows at 9 a chunk go as 12 chunks of 8 or 9, not 11 of 9 and one of 1.
                chunks = -(-rows // min(prefill_rows, rows))
                bounds = [rows * i // chunks for i in range(chunks + 1)]
                token = torch.cat([self._prefill_rows(input_ids, positions, start, end)
                                   for start, end in zip(bounds[:-1], bounds[1:], strict=True)]
                                  + [torch.zeros(batch - rows, dtype=torch.long, device=device)])
                compat.set_static_cache_length(self.cache, prompt)
        prefilled = _synced(device)
        capture = 0.0

        new = torch.full((batch, max_new_tokens), pad_token_id, dtype=torch.long, device=device)
        self.position.copy_(positions[:, -1:])
        self.slot.fill_(prompt)
        finished = torch.zeros(batch, dtype=torch.bool)
        finished[rows:] = True  # padding rows
        done = 0
        with torch.no_grad():
            for i in range(max_new_tokens):
                new[:, i] = token
                done = i + 1
                if i + 1 == max_new_tokens:
                    break
                # At a check, the tokens so far come back to the host (one sync), and the next step is queued
                # before the stop sequences are looked for, so the GPU is not idle meanwhile; if every row has
                # finished, that step's token is simply not kept.
                so_far = new[:, : i + 1].tolist() if (i + 1) % check_every == 0 else None
                self.position.add_(1)
                self.step.ids.copy_(token[:, None])
                if i == 2 and self.use_graph and self.step.graph is None:
                    # A couple of eager steps first: lazy allocations happen outside the graph.
                    capture = -_synced(device)
                    self.use_graph = self.step.capture()
                    capture += _synced(device)
                token = self.step.run()
                self.slot.add_(1)
                if so_far is not None and _all_finished(so_far, finished, stop_check, eos_token_id):
                    break
        new = new[:, :done]
        log.debug("decoded %d rows: prefill of %d tokens %.2fs, %d steps %.2fs (graph capture %.2fs)",
                  rows, prompt, prefilled - started, done, _synced(device) - prefilled - capture, capture)
        if eos_token_id is not None:
            # After a row's first end-of-sequence token: padding, as generate leaves it.
            is_eos = new == eos_token_id
            seen = is_eos.long().cumsum(-1)
            new = new.masked_fill((seen > 0) & ~(is_eos & (seen == 1)), pad_token_id)
        return torch.cat([input_ids, new], dim=1)


def _prefill_mask(valid, prompt: int, width: int):
    """[rows, prompt, width] attention of the prompt's tokens: causal, never onto padding.

    Each query may always see itself, so a padding row never has every key
    masked (sdpa would return NaN there and the cache would carry it).
    """
    import torch

    causal = torch.ones((prompt, width), dtype=torch.bool, device=valid.device).tril()
    mask = causal[None] & valid[:, None, :width]
    diagonal = torch.arange(prompt, device=valid.device)  # indices on the device: no wait for the GPU here
    mask[:, diagonal, diagonal] = True
    return mask


def _synced(device) -> float:
    """The time once the device has finished its queued work."""
    import torch

    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


def _all_finished(rows: list[list[int]], finished, stop_check, eos_token_id) -> bool:
    """Updates `finished` from each row's new tokens so far; True when every row has finished."""
    for i, row in enumerate(rows):
        if not finished[i] and eos_token_id is not None and eos_token_id in row:
            finished[i] = True
    if stop_check is not None:
        pending = [i for i in range(len(rows)) if not finished[i]]
        if pending:
            for i, stop in zip(pending, stop_check([rows[i] for i in pending]), strict=True):
                finished[i] = finished[i] or stop
    return bool(finished.all())
