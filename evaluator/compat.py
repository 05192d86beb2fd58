"""Every reach of the evaluator into a third party's private internals, each checked against the versions it was
written for (`trainer.compat.Hook`).

Scoring is fast because it bends lm-eval, transformers and bitsandbytes where they offer no public way: lm-eval
builds a task's requests once, scores every task in one `evaluate` call and hands its model's forward passes
and decoding to ours; transformers runs our attention and compiled kernels and takes prefilled rows into its
static cache; bitsandbytes gives its 4-bit weights back in their standard layout. Each of those reaches is here,
and only here. Outside its checked range a hook warns once and its stock path runs instead: where the lm-eval
hooks are out of range, scoring runs plain lm-eval (`evaluator.harness.evaluate(fast_path=False)`), HFLM's own
generation and log-likelihoods; where transformers' are, the model's own attention and kernels; where
bitsandbytes' is, the 4-bit layers as they are.

Importing this module imports no third-party library: `sweep start` checks `HOOKS` before any trial runs.
"""

from __future__ import annotations

import contextlib
import functools
import sys

from trainer.compat import BITSANDBYTES, TRANSFORMERS, Hook, unpack_cpu_4bit

LM_EVAL = ">=0.4.13,<0.5"
"""The lm-eval releases the hooks below were checked against: pyproject's bound."""

_PLAIN = "plain lm-eval scoring (simple_evaluate per task)"

# --- lm-eval: how `evaluator.harness` sets up and runs tasks -------------------------------------------------

TEMPLATE_CACHE = Hook("keeping compiled Jinja templates (lm_eval.utils.apply_template)", "lm-eval", LM_EVAL,
                      stock="lm-eval's own rendering, compiling each template again")
KEPT_REQUESTS = Hook("building each task's requests once (Task.build_all_requests, Task._instances)", "lm-eval",
                     LM_EVAL, stock=_PLAIN)
TASK_LIMITS = Hook("a document limit per task in one evaluate call (Task.doc_iterator)", "lm-eval", LM_EVAL,
                   stock=_PLAIN)
DOC_METRICS = Hook("keeping each document's metrics (Task.process_results)", "lm-eval", LM_EVAL, stock=_PLAIN)
SETUP_RULES = Hook("simple_evaluate's seeds and few-shot rules, applied to every task of one evaluate call",
                   "lm-eval", LM_EVAL, stock=_PLAIN)
HARNESS_HOOKS = [TEMPLATE_CACHE, KEPT_REQUESTS, TASK_LIMITS, DOC_METRICS, SETUP_RULES]

# --- lm-eval: what `evaluator.lm.SweepLM` routes through HFLM ------------------------------------------------

ENCODE_PAIR = Hook("lm-eval's _encode_pair rule, batched", "lm-eval", LM_EVAL, stock="HFLM's own tokenization")
HFLM_GENERATE = Hook("greedy decoding in place of HFLM._model_generate", "lm-eval", LM_EVAL,
                     stock="HFLM's own generate")
HFLM_LOGLIKELIHOOD = Hook("shared-prefix log-likelihoods in place of HFLM._loglikelihood_tokens", "lm-eval",
                          LM_EVAL, stock="HFLM's own log-likelihoods")
HFLM_BATCH = Hook("generation batches of their own size (HFLM.batch_size_per_gpu)", "lm-eval", LM_EVAL,
                  stock="generation in batches of the scoring batch size")

# --- transformers and bitsandbytes ---------------------------------------------------------------------------

FUSED_KERNELS = Hook("compiled RMSNorm, rotary and SiLU-gate kernels swapped into transformers' modeling code "
                     "(modeling_*.apply_rotary_pos_emb, RMSNorm and MLP forwards)", "transformers", TRANSFORMERS,
                     stock="the model's own kernels")
ATTENTION_SETTING = Hook("reading a model's attention implementation (config._attn_implementation) to put it "
                         "back after scoring", "transformers", TRANSFORMERS, stock="the model's own attention")
STATIC_CACHE_LAYERS = Hook("prefilling rows in chunks into a StaticCache's layers (lazy_initialization, keys, "
                           "values, cumulative_length)", "transformers", TRANSFORMERS,
                           stock="every row of a generation batch prefilled at once")
DENSE_COPY = Hook("a dense copy of the 4-bit layers (bitsandbytes' CPU inference layout undone)", "bitsandbytes",
                  BITSANDBYTES, stock="scoring the 4-bit layers as they are")

HOOKS: list[Hook] = HARNESS_HOOKS + [ENCODE_PAIR, HFLM_GENERATE, HFLM_LOGLIKELIHOOD, HFLM_BATCH, FUSED_KERNELS,
                                     ATTENTION_SETTING, STATIC_CACHE_LAYERS, DENSE_COPY]
"""Every hook of the evaluator, for the start-up check (`trainer.compat.problems`)."""


def fast_scoring() -> bool:
    """Whether `evaluator.harness` may score with its own task set-up: every harness hook in range (each one out
    of range warns)."""
    return all([hook.active() for hook in HARNESS_HOOKS])


# --- lm-eval tasks ---------------------------------------------------------------------------------------------


@contextlib.contextmanager
def template_cache():
    """Keeps Jinja from compiling each task template again for every document while the block runs (about a
    millisecond each, two or three per document): compiled templates are kept by their text."""
    if not TEMPLATE_CACHE.active():
        yield
        return
    import lm_eval.utils as lm_utils

    compiled = functools.lru_cache(maxsize=1024)(lm_utils.env.from_string)

    def apply_template(template: str, doc: dict) -> str:
        return compiled(template).render(**doc)

    saved = lm_utils.apply_template
    lm_utils.apply_template = apply_template
    try:
        yield
    finally:
        lm_utils.apply_template = saved


def seed_as_simple_evaluate() -> None:
    """The seeds `simple_evaluate` sets by default: the same few-shot draws, and the same draws for any sampled
    generation."""
    import random

    import numpy as np
    import torch

    SETUP_RULES.require()
    random.seed(0)
    np.random.seed(1234)
    torch.manual_seed(1234)


def set_up_task(task, num_fewshot: int | None, limit: int | None, gen_kwargs: dict | None) -> None:
    """Configures one lm-eval task as `simple_evaluate` would with these arguments, and gives it its own
    document limit (`evaluate` takes one for all tasks)."""
    SETUP_RULES.require()
    if task.get_config("output_type") == "generate_until" and gen_kwargs is not None:
        task.set_config(key="generation_kwargs", value=gen_kwargs, update=True)
    if num_fewshot is not None:
        if task.get_config("num_fewshot") != 0:  # a task whose config says 0 keeps it, as in simple_evaluate
            task.set_config(key="num_fewshot", value=num_fewshot)
    elif task.get_config("num_fewshot") is None:
        task.set_config(key="num_fewshot", value=0)
    task.set_fewshot_seed(seed=1234)
    _limit_documents(task, limit)


def _limit_documents(task, limit: int | None) -> None:
    """`evaluate` gives every task one limit, both when it builds the requests and when it reads the answers
    back: this task's own goes in instead (its first `limit` documents)."""
    TASK_LIMITS.require()
    documents = task.doc_iterator

    @functools.wraps(documents)
    def doc_iterator(*args, **kwargs):
        return documents(*args, **{**kwargs, "limit": limit or None})

    task.doc_iterator = doc_iterator


def keep_requests(task) -> None:
    """Makes the task build its requests once: later calls get the same ones back, their answers cleared."""
    KEPT_REQUESTS.require()
    build = task.build_all_requests
    kept: list = []

    @functools.wraps(build)
    def build_all_requests(*args, **kwargs):
        if not kept:
            build(*args, **kwargs)
            kept.extend(task.instances)
            return
        for instance in kept:
            instance.resps.clear()
            instance.filtered_resps.clear()
        task._instances = list(kept)

    task.build_all_requests = build_all_requests


def keep_doc_metrics(task, record) -> None:
    """Calls `record(task, metrics)` with what `process_results` returns for each document (lm-eval keeps it only
    inside `evaluate`)."""
    DOC_METRICS.require()
    process = task.process_results

    @functools.wraps(process)
    def process_results(doc, results):
        metrics = process(doc, results)
        record(task, metrics)
        return metrics

    task.process_results = process_results


# --- lm-eval's HFLM --------------------------------------------------------------------------------------------


def encode_pairs(lm, pairs: list[tuple[str, str]], cache=None) -> list[tuple[list[int], list[int]]]:
    """Token ids of each (context, continuation), as lm-eval's `_encode_pair` makes them, in a few batched calls.

    lm-eval tokenizes each request twice, one call at a time (the context, and
    context plus continuation); a multiple-choice document repeats its context
    once per choice. Here each distinct text is tokenized once, in batches.
    As in `_encode_pair`, a context's trailing spaces move to its continuation,
    and the continuation's tokens are what the whole has past the context's.
    `cache` (`get(key)`, `put(key, ids)`) keeps texts seen before.
    """
    ENCODE_PAIR.require()
    split = []
    for context, continuation in pairs:
        spaces = len(context) - len(context.rstrip())
        split.append((context[:-spaces], context[-spaces:] + continuation) if spaces else (context, continuation))
    texts = list(dict.fromkeys(t for context, continuation in split for t in (context, context + continuation)))
    tokens = dict(zip(texts, _encode_texts(lm, texts, cache), strict=True))
    out = []
    for context, continuation in split:
        context_ids = tokens[context]
        out.append((context_ids, tokens[context + continuation][len(context_ids):]))
    return out


def _encode_texts(lm, texts: list[str], cache) -> list[list[int]]:
    """`lm.tok_encode` of each text, batched: texts that start with the BOS string get no special tokens."""
    bos = lm.tokenizer.decode(lm.prefix_token_id)
    default = {} if lm.add_bos_token is None else {"add_special_tokens": lm.add_bos_token}
    groups: dict[bool, list[int]] = {}
    out: list[list[int]] = [[] for _ in texts]
    for i, text in enumerate(texts):
        has_bos = bool(bos) and text.startswith(bos)
        hit = cache.get(("pair", lm.add_bos_token, has_bos, text)) if cache is not None else None
        if hit is not None:
            out[i] = list(hit)
        else:
            groups.setdefault(has_bos, []).append(i)
    for has_bos, indices in groups.items():
        kwargs = {"add_special_tokens": False} if has_bos else default
        for i, ids in zip(indices, lm.tokenizer([texts[i] for i in indices], **kwargs)["input_ids"], strict=True):
            out[i] = list(ids)
            if cache is not None:
                cache.put(("pair", lm.add_bos_token, has_bos, texts[i]), out[i])
    return out


class HFLMRoutes:
    """HFLM's two private steps and its private batch size, routed to an HFLM subclass's public methods.

    Mixed in before HFLM (`class SweepLM(HFLMRoutes, HFLM)`). HFLM's own
    `generate_until` calls `_model_generate` for each batch of prompts, and its
    `loglikelihood` and `loglikelihood_rolling` call `_loglikelihood_tokens`
    with token ids: while their hooks are in range these go to the subclass's
    `greedy_tokens` and `score_tokens`, which may decline (None) for HFLM's own.
    """

    def greedy_tokens(self, context, max_length: int, stop: list[str], generation_kwargs: dict):
        """Prompt and generated tokens of `context`, as `HFLM._model_generate` returns them; None: HFLM's own."""
        return None

    def score_tokens(self, requests: list) -> list[tuple[float, bool]] | None:
        """(log-likelihood, greedy) of each ((context, continuation), context ids, continuation ids); None:
        HFLM's own."""
        return None

    def _model_generate(self, context, max_length, stop, **generation_kwargs):
        if HFLM_GENERATE.active():
            tokens = self.greedy_tokens(context, max_length, stop, dict(generation_kwargs))
            if tokens is not None:
                return tokens
        return super()._model_generate(context, max_length, stop, **generation_kwargs)

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, override_bs=None):
        if HFLM_LOGLIKELIHOOD.active():
            results = self.score_tokens(requests)
            if results is not None:
                return results
        return super()._loglikelihood_tokens(requests, disable_tqdm, override_bs)

    @contextlib.contextmanager
    def generation_batch(self, size: int):
        """HFLM's `generate_until` decodes in batches of its scoring batch size: `size` instead, while the block
        runs (out of range: the scoring batch size)."""
        if not HFLM_BATCH.active():
            yield
            return
        saved = self.batch_size_per_gpu
        self.batch_size_per_gpu = size
        try:
            yield
        finally:
            self.batch_size_per_gpu = saved


# --- transformers ----------------------------------------------------------------------------------------------


def attn_implementation(core) -> str | None:
    """The attention implementation the model runs now (transformers has no public getter); None out of range,
    where scoring keeps the model's own."""
    if not ATTENTION_SETTING.active():
        return None
    return core.config._attn_implementation


@contextlib.contextmanager
def swapped_elementwise(core, prefix: str, norm_forward, mlp_forward, rotary):
    """Runs the block with the model's `{prefix}RMSNorm` and `{prefix}MLP` modules (matched by class name) on
    `norm_forward` and `mlp_forward`, and its modeling module's `apply_rotary_pos_emb` as `rotary`; then puts the
    model's own back. Yields False (and swaps nothing) out of range."""
    import types

    if not FUSED_KERNELS.active():
        yield False
        return
    modeling = sys.modules[type(core).__module__]
    patched = []
    saved_rotary = modeling.apply_rotary_pos_emb
    try:
        for module in core.modules():
            name = type(module).__name__
            if name == f"{prefix}RMSNorm":
                module.forward = types.MethodType(norm_forward, module)
                patched.append(module)
            elif name == f"{prefix}MLP":
                module.forward = types.MethodType(mlp_forward, module)
                patched.append(module)
        modeling.apply_rotary_pos_emb = rotary
        yield True
    finally:
        modeling.apply_rotary_pos_emb = saved_rotary
        for module in patched:
            del module.forward  # the class's own forward again


def prefill_in_chunks() -> bool:
    """Whether rows may be prefilled apart and copied into a static cache (`copy_into_static_cache`)."""
    return STATIC_CACHE_LAYERS.active()


def copy_into_static_cache(cache, part, start: int, end: int, skip: int, shape: tuple[int, int]) -> None:
    """Copies the keys and values of rows `start:end`, prefilled into their own cache `part`, into the static
    `cache` of (batch, slots); the first `skip` positions of `part` (aligning padding) are left out."""
    STATIC_CACHE_LAYERS.require()
    batch, slots = shape
    for layer, own in zip(cache.layers, part.layers, strict=True):
        length = own.keys.shape[2] - skip
        if not layer.is_initialized:
            full = (batch, own.keys.shape[1], slots, own.keys.shape[3])
            layer.lazy_initialization(own.keys.new_empty(full), own.values.new_empty(full))
        layer.keys[start:end, :, :length].copy_(own.keys[:, :, skip:])
        layer.values[start:end, :, :length].copy_(own.values[:, :, skip:])


def set_static_cache_length(cache, length: int) -> None:
    """Tells a static cache filled by `copy_into_static_cache` where its next write goes."""
    import torch

    STATIC_CACHE_LAYERS.require()
    for layer in cache.layers:
        if isinstance(getattr(layer, "cumulative_length", None), torch.Tensor):
            layer.cumulative_length.fill_(length)


def static_cache_bytes(cache) -> int:
    """Bytes a static cache's keys and values hold (0 out of range: nothing is counted as freeable)."""
    if not STATIC_CACHE_LAYERS.active():
        return 0
    return sum(t.numel() * t.element_size() for layer in cache.layers
               for t in (getattr(layer, "keys", None), getattr(layer, "values", None)) if t is not None)


# --- bitsandbytes ----------------------------------------------------------------------------------------------


def dense_copy_allowed() -> bool:
    """Whether 4-bit layers may be dequantized into a dense copy (`evaluator.fast.dense_base`)."""
    return DENSE_COPY.active()


def standard_4bit_layout(param) -> None:
    """Puts a 4-bit weight that bitsandbytes repacked for CPU inference back in its standard layout, in place
    (as bitsandbytes does before it moves or saves a layer); also makes the layer trainable again."""
    if getattr(param.quant_state, "packing_format_for_cpu", False):
        param.data, param.quant_state = unpack_cpu_4bit(param.data, param.quant_state)
