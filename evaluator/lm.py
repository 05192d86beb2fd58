"""`SweepLM`: lm-eval's HF backend with the evaluator's speed layer, registered with lm-eval as `sweep`.

It is HFLM with four things of ours:

- log-likelihoods of a context's continuations with the context run once
  (`evaluator.prefix.shared_prefix_loglikelihoods`), its requests tokenized
  in batches and cached per tokenizer;
- greedy decoding with a static KV cache (and a CUDA graph on a GPU) instead
  of `generate` (`evaluator.decode.GreedyDecoder`);
- generation batches of their own size: decoding is bound by per-step
  overhead, not arithmetic, so it wants far larger batches than log-likelihood
  scoring (whose logits grow with batch x length x vocabulary); `auto` fits as
  many sequences as the KV cache and the prefill leave room for;
- a generation call that holds requests of several settings (tasks with their
  own `max_gen_toks`) plans and decodes each set on its own.

It is built on a loaded model (`evaluator.harness.evaluate`), or by lm-eval
from `--model sweep --model_args pretrained=PATH,...` like `hf`
(`evaluator.cli`). Where it reaches into HFLM's internals it goes through
`evaluator.compat`; out of the checked lm-eval releases it is plain HFLM.
"""

from __future__ import annotations

import json
import logging
import time
import weakref

from lm_eval.api.registry import register_model
from lm_eval.models.huggingface import HFLM

from evaluator.compat import ENCODE_PAIR, HFLMRoutes, encode_pairs
from evaluator.fast import free_bytes, generation_plan

log = logging.getLogger(__name__)

GREEDY_IGNORED = {"top_p", "top_k", "min_p"}
"""Generation settings that do not change a greedy decode."""
ROW_TOKENS = 512
"""Tokens per batch row: a log-likelihood pass holds `batch_size` x this many (packed rows)."""


@register_model("sweep")
class SweepLM(HFLMRoutes, HFLM):
    """HFLM scoring with the evaluator's speed layer (see the module docstring).

    Args:
        generation_batch_size: sequences decoded at once, or `auto`: on a GPU, as
            many as fit in the memory left under `memory_budget_gib`; on CPU, the
            scoring batch size.
        memory_budget_gib: the memory cap (GiB) that sizes `auto` generation
            batches; None: the whole card.
        token_budget: padded tokens per log-likelihood forward pass; None:
            `batch_size` x `ROW_TOKENS`.
        device: as HFLM's; None: a GPU when there is one (HFLM's own default is `cuda`).
        **kwargs: HFLM's (`pretrained`, a path or a loaded model; `tokenizer`; `batch_size`; `dtype` ...).
    """

    def __init__(self, generation_batch_size: int | str = "auto", memory_budget_gib: float | None = None,
                 token_budget: int | None = None, device: str | None = None, **kwargs):
        super().__init__(device=device, **kwargs)
        self.generation_batch_size = generation_batch_size
        self.memory_budget_gib = memory_budget_gib
        scoring_batch = self.batch_size if isinstance(self.batch_size, int) else 16  # `auto`: the evaluator's default
        self.token_budget = token_budget or scoring_batch * ROW_TOKENS
        self.decoder = None  # a GreedyDecoder, made at the first generation request and kept for the next ones
        self.prefill_rows = None  # rows prefilled at once (the memory plan of the current requests); None: all

    # --- log-likelihoods ---

    def loglikelihood(self, requests, disable_tqdm: bool = False):
        pairs = [req.args for req in requests]
        if self.enable_thinking or any(context == "" for context, _ in pairs) or not ENCODE_PAIR.active():
            return super().loglikelihood(requests, disable_tqdm)
        encoded = encode_pairs(self, pairs, token_cache(self.tokenizer))
        tokens = [(pair, *enc) for pair, enc in zip(pairs, encoded, strict=True)]
        results = self.score_tokens(tokens)
        return results if results is not None else super().loglikelihood(requests, disable_tqdm)

    def score_tokens(self, requests):
        """Shared-prefix log-likelihoods of causal models' requests that fit in the context; None otherwise."""
        from evaluator.prefix import shared_prefix_loglikelihoods

        if self.backend != "causal" or any(len(c) + len(k) > self.max_length for _, c, k in requests):
            return None
        started = time.perf_counter()
        results = shared_prefix_loglikelihoods(self.model, [(c, k) for _, c, k in requests], self.max_length,
                                               token_budget=self.token_budget)
        log.debug("scored %d continuations in %.2fs", len(requests), time.perf_counter() - started)
        for (request, _, _), answer in zip(requests, results, strict=True):
            if request is not None:  # rolling windows have no key of their own (as in HFLM)
                self.cache_hook.add_partial("loglikelihood", request, answer)
        return results

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, left_truncate_len=None, **kwargs):
        if kwargs:
            return super().tok_encode(string, add_special_tokens, left_truncate_len, **kwargs)
        cache = token_cache(self.tokenizer)
        key = ("text", self.add_bos_token, add_special_tokens, string)
        ids = cache.get(key)
        if ids is None:
            ids = super().tok_encode(string, add_special_tokens)
            cache.put(key, ids)
        ids = list(ids)
        return ids[-left_truncate_len:] if left_truncate_len else ids

    # --- generation ---

    def generate_until(self, requests, disable_tqdm: bool = False):
        if not requests:
            return []
        # Tasks with their own settings (max_gen_toks above all) come in one call: each set is planned and
        # decoded on its own, and the answers go back in the requests' order.
        by_settings: dict[str, list[int]] = {}
        for i, request in enumerate(requests):
            by_settings.setdefault(json.dumps(request.args[1], sort_keys=True, default=str), []).append(i)
        if len(by_settings) > 1:
            answers = [""] * len(requests)
            for indices in by_settings.values():
                part = self.generate_until([requests[i] for i in indices], disable_tqdm)
                for i, answer in zip(indices, part, strict=True):
                    answers[i] = answer
            return answers
        size = self.plan_generation(requests)
        with self.generation_batch(size):
            return super().generate_until(requests, disable_tqdm)

    def plan_generation(self, requests) -> int:
        """Sequences decoded at once for one set of requests; sets `prefill_rows` to match."""
        self.prefill_rows = None
        if self.generation_batch_size != "auto":
            return int(self.generation_batch_size)
        contexts = max(len(self.tok_encode(r.args[0])) for r in requests)
        new = max(int(r.args[1].get("max_gen_toks", self.max_gen_toks)) for r in requests)
        free = free_bytes(self.device, self.memory_budget_gib)
        if free is not None and self.decoder is not None:  # the kept cache goes if the plan needs more
            free += self.decoder.cache_bytes()
        fallback = self.batch_size if isinstance(self.batch_size, int) else 16
        plan = generation_plan(self.model.config, free, contexts, new, len(requests), fallback)
        # Even batches: a short last batch would decode as slowly as a full one (its cache is as wide).
        size = -(-len(requests) // -(-len(requests) // plan.rows))
        self.prefill_rows = min(size, plan.prefill_rows)
        log.info("decoding %d requests %d at a time, prefilled %d at a time (prompts up to %d tokens, up to %d new)",
                 len(requests), size, self.prefill_rows, contexts, new)
        return size

    def greedy_tokens(self, context, max_length: int, stop: list[str], generation_kwargs: dict):
        """Greedy decoding by `GreedyDecoder`; None (transformers' `generate`) for sampling, beams or penalties."""
        import torch

        from evaluator.decode import GreedyDecoder

        kwargs = dict(generation_kwargs)
        attention_mask = kwargs.pop("attention_mask", None)
        sampling = kwargs.pop("do_sample", False) or (kwargs.pop("temperature", 0.0) or 0.0) > 0
        if sampling or set(kwargs) - GREEDY_IGNORED:
            return None
        stops = [s for s in stop if s]

        def finished(rows: list[list[int]]) -> list[bool]:
            texts = self.tokenizer.batch_decode(rows, skip_special_tokens=False)
            return [any(s in text for s in stops) for text in texts]

        if self.decoder is None:
            self.decoder = GreedyDecoder(self.model)
        return self.decoder.generate(
            context, attention_mask if attention_mask is not None else torch.ones_like(context),
            max_length - context.shape[1], stop_check=finished, eos_token_id=self.eot_token_id,
            pad_token_id=self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0,
            prefill_rows=self.prefill_rows,
        )


class _TokenCache:
    """Token ids by text (and encoding settings), at most `limit` entries; the oldest go first."""

    def __init__(self, limit: int = 500_000):
        self.limit = limit
        self.entries: dict[tuple, tuple[int, ...]] = {}

    def get(self, key: tuple) -> tuple[int, ...] | None:
        return self.entries.get(key)

    def put(self, key: tuple, ids: list[int]) -> None:
        if len(self.entries) >= self.limit:
            for old in list(self.entries)[: self.limit // 4]:
                del self.entries[old]
        self.entries[key] = tuple(ids)


_TOKEN_CACHES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def token_cache(tokenizer) -> _TokenCache:
    """The token ids this tokenizer has produced for scoring, by text.

    A trial scores the same documents with the same prompts (lm-eval seeds
    its few-shot sampling) as the trials before it, and a worker that keeps its
    base keeps its tokenizer: from the second trial on, a worker tokenizes
    nothing it has scored before (on an H100 host, tokenizing the default
    suites' log-likelihood requests took about 0.7 s of a trial's scoring).
    """
    cache = _TOKEN_CACHES.get(tokenizer)
    if cache is None:
        cache = _TOKEN_CACHES[tokenizer] = _TokenCache()
    return cache
