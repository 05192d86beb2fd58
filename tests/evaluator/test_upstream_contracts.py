"""Upstream contracts: where the evaluator re-implements or bends lm-eval, transformers or bitsandbytes, its
results against theirs (requests, token ids, logits, generated tokens, scores).

Run this file first when trying a newer release of any of them (`evaluator.compat` says which versions each
hook was checked against): a failure here is a hook whose library changed under it.
"""

from __future__ import annotations

import contextlib

import pytest
import torch
from fourbit import dequantize_then_matmul, logits

from evaluator.config import GenerationConfig, TaskConfig
from evaluator.fast import dense_base, quantized_linears, use_dense
from trainer.config import LoraConfig, ModelConfig


def test_dense_copy_gives_the_4bit_models_logits_and_restores_it(adapted):
    model, _ = adapted
    ids = torch.randint(3, model.config.vocab_size, (3, 24), generator=torch.Generator().manual_seed(1))
    layers = [layer for _, _, layer in quantized_linears(model)]
    assert layers, "the demo base has 4-bit layers"
    reference = logits(model, ids)
    with model.disable_adapter():
        base_only = logits(model, ids)
    assert not torch.allclose(reference, base_only, atol=1e-3), "the adapter must change the outputs"

    for merge in (False, True):
        with dense_base(model, merge=merge) as swapped:
            assert swapped == len(layers) and not quantized_linears(model)
            dense = logits(model, ids)
        torch.testing.assert_close(dense, reference, atol=2e-3, rtol=2e-3)
        assert (dense.argmax(-1) == reference.argmax(-1)).float().mean() > 0.99

    # The 4-bit layers are back, the same objects, and peft no longer thinks the adapter is merged.
    assert [layer for _, _, layer in quantized_linears(model)] == layers
    assert not any(getattr(m, "merged", False) for m in model.modules())
    torch.testing.assert_close(logits(model, ids), reference)


def test_greedy_generation_is_the_same_with_the_dense_copy(adapted):
    model, tok = adapted
    prompts = ["Summarize: the river city market report", "Question: 12 plus 7 is", "The quick brown fox"]
    tok.padding_side = "left"
    batch = tok(prompts, return_tensors="pt", padding=True)

    def generate():
        with dequantize_then_matmul(model):
            return model.generate(**batch, max_new_tokens=16, do_sample=False, use_cache=True,
                                  pad_token_id=tok.pad_token_id)

    reference = generate()
    with dense_base(model):
        dense = generate()
    assert torch.equal(dense, reference)


@pytest.mark.gpu
def test_dense_copy_on_gpu_matches_the_4bit_model_and_scoring_uses_it(demo_base_dir, tmp_path):
    from evaluator.harness import evaluate
    from evaluator.micro import write_micro_task
    from trainer.model import attach_lora, load_base_model, load_tokenizer

    config = ModelConfig(name_or_path="sweep-demo/tiny-llama")
    model = attach_lora(load_base_model(config, "cuda"), LoraConfig(r=8, alpha=16, dropout=0.0))
    tok = load_tokenizer(config)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.05)
    model.eval()
    ids = torch.randint(3, model.config.vocab_size, (4, 32), generator=torch.Generator().manual_seed(2)).cuda()
    with torch.no_grad():
        reference = model(input_ids=ids).logits.float()
        with dense_base(model):
            dense = model(input_ids=ids).logits.float()
    # bf16 compute: the merged delta is rounded into the weight once instead of added to each output, so
    # single logits differ by bf16 rounding (a tenth, measured on an H100); on average they agree closely.
    assert (dense - reference).abs().mean() < 0.01 * reference.abs().mean()
    assert (dense.argmax(-1) == reference.argmax(-1)).float().mean() > 0.95
    assert use_dense(model, "auto", "cuda", None)

    write_micro_task("t_sum", "micro_sum", tmp_path / "tasks", n=20)
    task = TaskConfig(name="t_sum", generator="micro_sum", num_docs=20, metric="rouge2")
    result = evaluate(model, tok, [task], tmp_path / "tasks", 8, GenerationConfig(max_new_tokens=16))
    assert result.dense and quantized_linears(model)


def test_greedy_decode_loop_matches_generate_and_stops_early(adapted):
    from evaluator.decode import greedy_generate

    model, tok = adapted
    tok.padding_side = "left"
    batch = tok(["Summarize: the river city market report", "Question: 12 plus 7 is",
                 "The quick brown fox jumps over the lazy dog and more words"], return_tensors="pt", padding=True)
    prompt = batch["input_ids"].shape[1]
    with dequantize_then_matmul(model):
        reference = model.generate(**batch, max_new_tokens=20, do_sample=False, pad_token_id=tok.pad_token_id)
        ours = greedy_generate(model, batch["input_ids"], batch["attention_mask"], 20,
                               pad_token_id=tok.pad_token_id)
        assert torch.equal(ours, reference)

        # An end-of-sequence token: the row is padded after its first one, as generate does.
        eos = int(reference[0, prompt + 5])
        stopped = greedy_generate(model, batch["input_ids"], batch["attention_mask"], 20, eos_token_id=eos,
                                  pad_token_id=tok.pad_token_id)
        expected = model.generate(**batch, max_new_tokens=20, do_sample=False, eos_token_id=eos,
                                  pad_token_id=tok.pad_token_id)
        assert torch.equal(stopped[:, : expected.shape[1]], expected)
        assert (stopped[:, expected.shape[1]:] == tok.pad_token_id).all()

        # Every row finished by the first check: decoding ends there, not at max_new_tokens.
        calls = []

        def stop_check(rows):
            calls.append(len(rows[0]))
            return [True] * len(rows)

        early = greedy_generate(model, batch["input_ids"], batch["attention_mask"], 40, stop_check=stop_check,
                                pad_token_id=tok.pad_token_id, check_every=4)
        assert calls == [4] and early.shape[1] == prompt + 4
        assert torch.equal(early, reference[:, : prompt + 4])


def test_shared_prefix_loglikelihoods_match_lm_evals_one_pass_per_choice(adapted):
    from lm_eval.models.huggingface import HFLM

    from evaluator.lm import SweepLM
    from evaluator.prefix import shared_prefix_loglikelihoods

    model, tok = adapted
    lm = SweepLM(pretrained=model, tokenizer=tok, batch_size=4)
    questions = ["Question: which is even?\nAnswer:", "The river city market report says", "Q: 12 plus 7 is\nA:"]
    choices = [" one", " two apples and pears", " 19", " nineteen of them", " A"]
    requests = []
    for q in questions:
        context = tok(q, add_special_tokens=False)["input_ids"]
        for c in choices:
            requests.append(((q, c), context, tok(c, add_special_tokens=False)["input_ids"]))
    with dequantize_then_matmul(model):
        ours = lm._loglikelihood_tokens(requests)
        theirs = HFLM._loglikelihood_tokens(lm, requests)
        # Rows split when a context's continuations do not fit, and one row per forward pass.
        longest = max(len(c) for _, c, _ in requests)
        split = shared_prefix_loglikelihoods(model, [(c, k) for _, c, k in requests], longest + 6, token_budget=1)
    assert len(ours) == len(theirs) == 15
    assert len({round(v, 3) for v, _ in theirs}) > 10  # the choices do differ
    assert [v for v, _ in split] == pytest.approx([v for v, _ in ours], abs=1e-3)
    for (a, greedy_a), (b, greedy_b) in zip(ours, theirs, strict=True):
        assert a == pytest.approx(b, abs=1e-3)
        assert greedy_a == greedy_b


@pytest.mark.gpu
def test_cuda_graph_decode_matches_eager_decode_on_gpu(demo_base_dir, caplog):
    import logging

    from evaluator.decode import greedy_generate
    from trainer.model import attach_lora, load_base_model, load_tokenizer

    config = ModelConfig(name_or_path="sweep-demo/tiny-llama")
    model = attach_lora(load_base_model(config, "cuda"), LoraConfig(r=8, alpha=16, dropout=0.0))
    model.eval()
    tok = load_tokenizer(config)
    tok.padding_side = "left"
    batch = tok(["Summarize: the river city market report", "Question: 12 plus 7 is", "The quick brown fox"],
                return_tensors="pt", padding=True).to("cuda")
    caplog.set_level(logging.INFO, logger="evaluator.decode")
    for dense in (False, True):
        with dense_base(model) if dense else contextlib.nullcontext():
            eager = greedy_generate(model, batch["input_ids"], batch["attention_mask"], 24, cuda_graph=False)
            graphed = greedy_generate(model, batch["input_ids"], batch["attention_mask"], 24)
            reference = model.generate(**batch, max_new_tokens=24, do_sample=False, pad_token_id=0)
        assert torch.equal(graphed, eager)
        # The first new token comes from the prefill alone; later ones can part ways on bf16 near-ties
        # of a random tiny model (different attention kernels), so only the start is compared.
        prompt = batch["input_ids"].shape[1]
        assert torch.equal(graphed[:, : prompt + 1], reference[:, : prompt + 1])
    assert "without a CUDA graph" not in caplog.text


def test_grouped_attention_equals_sdpa_with_repeated_heads():
    from transformers import AttentionInterface
    from transformers.integrations.sdpa_attention import repeat_kv

    from evaluator.decode import ATTENTION, _register_attention

    _register_attention()
    attention = AttentionInterface()[ATTENTION]
    g = torch.Generator().manual_seed(0)
    query = torch.randn(3, 8, 1, 16, generator=g)
    key, value = torch.randn(3, 2, 10, 16, generator=g), torch.randn(3, 2, 10, 16, generator=g)
    mask = torch.rand(3, 1, 1, 10, generator=g) > 0.3
    mask[..., -1] = True

    class Layer(torch.nn.Module):
        num_key_value_groups = 4
        is_causal = True

    out, _ = attention(Layer(), query, key, value, mask, scaling=0.25)
    expected = torch.nn.functional.scaled_dot_product_attention(
        query, repeat_kv(key, 4), repeat_kv(value, 4), attn_mask=mask, scale=0.25
    ).transpose(1, 2)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)

    # A longer pass (prefill, log-likelihoods) with a block mask over 10 keys, not a multiple of 16: the mask
    # is repeated once per group, once for every layer given the same mask, in rows 16 elements apart.
    from evaluator.decode import _REPEATED

    query = torch.randn(3, 8, 10, 16, generator=g)
    block = torch.rand(3, 1, 10, 10, generator=g) > 0.5
    block |= torch.eye(10, dtype=torch.bool)
    expected = torch.nn.functional.scaled_dot_product_attention(
        query, repeat_kv(key, 4), repeat_kv(value, 4), attn_mask=block, scale=0.25
    ).transpose(1, 2)
    for _ in range(2):
        out, _ = attention(Layer(), query, key, value, block, scaling=0.25)
        torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
    repeated = _REPEATED["mask"]
    assert _REPEATED["source"] is block and repeated.shape == (3, 1, 40, 10) and repeated.stride(-2) == 16
    _REPEATED.clear()


def test_batched_tokenization_equals_lm_evals_encode_pair(adapted):
    from evaluator.compat import encode_pairs
    from evaluator.lm import SweepLM

    model, tok = adapted
    lm = SweepLM(pretrained=model, tokenizer=tok, batch_size=4)
    bos = tok.decode(lm.prefix_token_id)
    pairs = [
        ("Question: which is even?\nAnswer:", " two"),
        ("Question: which is even?\nAnswer:", " one"),  # a context repeated once per choice
        ("Trailing spaces move to the continuation:  ", "yes"),
        ("Q: 12 plus 7 is\nA:", " 19 and more words"),
        (bos + "A context that starts with the BOS string", " B"),
        ("Joined words", "together"),  # a continuation that merges with the context's last word
    ]
    expected = [lm._encode_pair(c, k) for c, k in pairs]
    assert encode_pairs(lm, pairs) == expected


def test_tokenization_is_cached_per_tokenizer_and_gives_the_same_ids(adapted):
    from evaluator.compat import encode_pairs
    from evaluator.lm import SweepLM, token_cache

    model, tok = adapted
    lm = SweepLM(pretrained=model, tokenizer=tok, batch_size=4)
    pairs = [("Question: which is odd?\nAnswer:", " three"), ("Cached  ", "text")]
    expected = [lm._encode_pair(c, k) for c, k in pairs]
    prompt = "Question: 3 plus 4 is\nAnswer:"
    first_prompt = lm.tok_encode(prompt)
    assert encode_pairs(lm, pairs, token_cache(tok)) == expected
    cache = token_cache(tok)
    assert cache.get(("pair", lm.add_bos_token, False, pairs[0][0])) is not None
    # A second trial's scoring (a new wrapper, the same tokenizer) reads the cache: the tokenizer is not called.
    again = SweepLM(pretrained=model, tokenizer=tok, batch_size=4)
    calls = []
    originals = {name: getattr(type(tok), name) for name in ("__call__", "encode")}

    def counting(name):
        def call(self, *args, **kwargs):
            calls.append(name)
            return originals[name](self, *args, **kwargs)

        return call

    for name in originals:
        setattr(type(tok), name, counting(name))
    try:
        assert encode_pairs(again, pairs, token_cache(tok)) == expected
        assert again.tok_encode(prompt) == first_prompt
        assert again.tok_encode(prompt, left_truncate_len=3) == first_prompt[-3:]
        assert not calls
        again.tok_encode("A text not seen before")
        assert calls == ["encode"]
    finally:
        for name, original in originals.items():
            setattr(type(tok), name, original)
    # Another tokenizer has a cache of its own.
    from trainer.demo_base import build_tokenizer

    assert token_cache(build_tokenizer()).get(("pair", lm.add_bos_token, False, pairs[0][0])) is None


def test_fused_elementwise_runs_the_models_own_formulas_and_restores_them(adapted):
    import transformers.models.llama.modeling_llama as llama

    from evaluator.fuse import can_fuse, fused_elementwise

    model, _ = adapted
    core = model.get_base_model()
    ids = torch.randint(3, model.config.vocab_size, (3, 24), generator=torch.Generator().manual_seed(1))
    reference = logits(model, ids)
    rotary = llama.apply_rotary_pos_emb
    # The same formulas run uncompiled: the logits are bit for bit the model's own.
    with fused_elementwise(model, backend="eager") as fused:
        assert fused and llama.apply_rotary_pos_emb is not rotary
        assert "forward" in vars(core.model.norm) and "forward" in vars(core.model.layers[0].mlp)
        assert torch.equal(logits(model, ids), reference)
    assert llama.apply_rotary_pos_emb is rotary
    assert not any("forward" in vars(m) for m in core.modules())
    # An architecture whose code is not known to match is left alone.
    from transformers import GPT2Config, GPT2LMHeadModel

    other = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=50))
    assert not can_fuse(other)
    with fused_elementwise(other) as fused:
        assert not fused


@pytest.mark.gpu
def test_fused_kernels_on_gpu_keep_the_logits_and_greedy_tokens(demo_base_dir):
    from evaluator.decode import greedy_generate
    from evaluator.fuse import fused_elementwise
    from trainer.model import load_base_model

    model = load_base_model(ModelConfig(name_or_path="sweep-demo/tiny-llama"), "cuda")
    model.eval()
    ids = torch.randint(3, model.config.vocab_size, (4, 40), generator=torch.Generator().manual_seed(3)).cuda()
    mask = torch.ones_like(ids)
    with torch.no_grad():
        reference = model(input_ids=ids).logits.float()
        tokens = greedy_generate(model, ids, mask, 24)
        with fused_elementwise(model) as fused:
            compiled = model(input_ids=ids).logits.float()
            compiled_tokens = greedy_generate(model, ids, mask, 24)  # decode steps in a CUDA graph
    assert fused
    # bf16: the compiled kernels may round a float32 intermediate differently, no more.
    assert (compiled - reference).abs().max() < 0.05 * reference.abs().max()
    assert (compiled.argmax(-1) == reference.argmax(-1)).float().mean() > 0.95
    assert (compiled_tokens == tokens).float().mean() > 0.9


@pytest.mark.gpu
def test_shared_prefix_loglikelihoods_on_gpu_read_back_every_batch(demo_base_dir):
    from lm_eval.models.huggingface import HFLM

    from evaluator.lm import SweepLM
    from evaluator.prefix import shared_prefix_loglikelihoods
    from trainer.model import load_base_model, load_tokenizer

    config = ModelConfig(name_or_path="sweep-demo/tiny-llama")
    model, tok = load_base_model(config, "cuda", attn_implementation="sdpa"), load_tokenizer(config)
    model.eval()
    lm = SweepLM(pretrained=model, tokenizer=tok, batch_size=4)
    requests = []
    for q in ("Question: which is even?\nAnswer:", "The river city market report says", "Q: 12 plus 7 is\nA:"):
        context = tok(q, add_special_tokens=False)["input_ids"]
        for c in (" one", " two apples and pears", " 19", " nineteen of them"):
            requests.append(((q, c), context, tok(c, add_special_tokens=False)["input_ids"]))
    pairs = [(c, k) for _, c, k in requests]
    with torch.no_grad():
        one_batch = shared_prefix_loglikelihoods(model, pairs, 512, token_budget=4096)
        # One row per batch: each batch's results are read back while the next one runs.
        pipelined = shared_prefix_loglikelihoods(model, pairs, 512, token_budget=1)
        theirs = HFLM._loglikelihood_tokens(lm, requests)
    values = [v for v, _ in pipelined]
    assert len({round(v, 1) for v in values}) > 6  # the requests do differ
    # bf16 on a GPU: batches of other shapes round differently, by a few hundredths of a sum of log-probs.
    assert values == pytest.approx([v for v, _ in one_batch], rel=0.02, abs=0.1)
    assert values == pytest.approx([v for v, _ in theirs], rel=0.02, abs=0.1)


def test_one_call_scores_each_task_with_its_own_settings_as_simple_evaluate_would(adapted, tmp_path):
    """All tasks go to lm-eval in one call: the same requests (few-shot contexts, limits, generation settings)
    and the same scores as one `simple_evaluate` call per task."""
    import dataclasses
    import json

    from lm_eval import simple_evaluate

    from evaluator.compat import template_cache
    from evaluator.harness import _gen_kwargs, _metric, score_tasks, standard_error, task_manager
    from evaluator.lm import SweepLM
    from evaluator.micro import write_micro_task

    model, tok = adapted
    tasks = [
        TaskConfig(name="t_mc", generator="micro_mc", num_docs=14, metric="acc", limit=9, num_fewshot=2),
        TaskConfig(name="t_ethics", generator="micro_ethics", num_docs=10, metric="acc"),
        TaskConfig(name="t_gen", generator="micro_gen", num_docs=8, metric="exact_match,strict-match", limit=5,
                   num_fewshot=1, max_new_tokens=6),
        TaskConfig(name="t_sum", generator="micro_sum", num_docs=6, metric="rouge2", max_new_tokens=9),
    ]
    for t in tasks:
        write_micro_task(t.name, t.generator, tmp_path / "tasks", n=t.num_docs)
    generation = GenerationConfig(max_new_tokens=12, batch_size=4)
    manager = task_manager(tasks, tmp_path / "tasks")
    lm = SweepLM(pretrained=model, tokenizer=tok, batch_size=8, generation_batch_size=generation.batch_size)
    calls = []

    def recording(kind, method):
        def call(requests, disable_tqdm=False):
            calls.append((kind, sorted(json.dumps(r.args, sort_keys=True) for r in requests)))
            return method(requests, disable_tqdm)

        return call

    lm.loglikelihood = recording("loglikelihood", lm.loglikelihood)
    lm.generate_until = recording("generate_until", lm.generate_until)
    with torch.no_grad():
        merged, per_doc = score_tasks(lm, tasks, manager, generation)
        merged_calls, calls[:] = list(calls), []
        reference, reference_stderr = {}, {}
        with template_cache():
            for t in tasks:
                settings = dataclasses.replace(generation, max_new_tokens=t.max_new_tokens or 12)
                # bootstrap_iters > 0: lm-eval's own standard error (for a mean: sample std / sqrt(n), no bootstrap)
                results = simple_evaluate(model=lm, tasks=[t.name], num_fewshot=t.num_fewshot, limit=t.limit,
                                          task_manager=manager, log_samples=False, bootstrap_iters=10,
                                          gen_kwargs=_gen_kwargs(settings))
                reference[t.name] = _metric(results["results"], t)
                name, _, filter_key = t.metric.partition(",")
                reference_stderr[t.name] = results["results"][t.name][f"{name}_stderr,{filter_key or 'none'}"]
    assert merged == reference
    # The per-document values behind each score: their mean is the score, and their standard error lm-eval's
    # (binomial for 0/1 values: lm-eval's sample deviation differs from it by sqrt(n / (n - 1)) exactly).
    assert {name: len(v) for name, v in per_doc.items()} == {"t_mc": 9, "t_ethics": 10, "t_gen": 5, "t_sum": 6}
    for t in tasks:
        values = per_doc[t.name]
        assert sum(values) / len(values) == pytest.approx(reference[t.name])
        n, binary = len(values), all(v in (0, 1) for v in values)
        expected = reference_stderr[t.name] * ((n - 1) / n) ** 0.5 if binary else reference_stderr[t.name]
        assert standard_error(values) == pytest.approx(expected)

    # One log-likelihood call, and one generation call split by settings into one decode per task.
    assert [kind for kind, _ in merged_calls] == ["loglikelihood", "generate_until", "generate_until", "generate_until"]
    for kind in ("loglikelihood", "generate_until"):
        separate = sorted(args for k, requests in calls if k == kind for args in requests)
        together = next(requests for k, requests in merged_calls if k == kind)
        assert together == separate
    loglikelihood = next(requests for k, requests in merged_calls if k == "loglikelihood")
    assert len(loglikelihood) == 9 * 4 + 10 * 2  # t_mc's limit of 9 documents, 4 choices; ethics' 10, 2 choices
    generated = next(requests for k, requests in merged_calls if k == "generate_until")
    assert sorted(json.loads(a)[1]["max_gen_toks"] for a in generated) == [6] * 5 + [9] * 6
