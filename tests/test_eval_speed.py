"""Scoring with a dense copy of the 4-bit base: the same outputs, the 4-bit layers back afterwards."""

from __future__ import annotations

import contextlib

import pytest
import torch

from evaluator.config import GenerationConfig, TaskConfig
from evaluator.fast import GenerationPlan, dense_base, dense_bytes, generation_plan, quantized_linears, use_dense
from trainer.config import LoraConfig, ModelConfig


@pytest.fixture
def adapted(demo_base_dir):
    """The demo base in 4-bit with a LoRA adapter whose B matrices are non-zero (a trained adapter's shape)."""
    from trainer.model import attach_lora, load_base_model, load_tokenizer

    config = ModelConfig(name_or_path="sweep-demo/tiny-llama")
    model = attach_lora(load_base_model(config, "cpu"), LoraConfig(r=8, alpha=16, dropout=0.0))
    torch.manual_seed(0)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.05)
    model.eval()
    return model, load_tokenizer(config)


@contextlib.contextmanager
def _dequantize_then_matmul(model):
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


def _logits(model, ids):
    with _dequantize_then_matmul(model):
        return model(input_ids=ids).logits.float()


def test_dense_copy_gives_the_4bit_models_logits_and_restores_it(adapted):
    model, _ = adapted
    ids = torch.randint(3, model.config.vocab_size, (3, 24), generator=torch.Generator().manual_seed(1))
    layers = [layer for _, _, layer in quantized_linears(model)]
    assert layers, "the demo base has 4-bit layers"
    reference = _logits(model, ids)
    with model.disable_adapter():
        base_only = _logits(model, ids)
    assert not torch.allclose(reference, base_only, atol=1e-3), "the adapter must change the outputs"

    for merge in (False, True):
        with dense_base(model, merge=merge) as swapped:
            assert swapped == len(layers) and not quantized_linears(model)
            dense = _logits(model, ids)
        torch.testing.assert_close(dense, reference, atol=2e-3, rtol=2e-3)
        assert (dense.argmax(-1) == reference.argmax(-1)).float().mean() > 0.99

    # The 4-bit layers are back, the same objects, and peft no longer thinks the adapter is merged.
    assert [layer for _, _, layer in quantized_linears(model)] == layers
    assert not any(getattr(m, "merged", False) for m in model.modules())
    torch.testing.assert_close(_logits(model, ids), reference)


def test_fused_projections_give_the_separate_layers_logits(adapted):
    from evaluator.fast import PROJECTION_GROUPS

    model, tok = adapted
    ids = torch.randint(3, model.config.vocab_size, (3, 24), generator=torch.Generator().manual_seed(2))
    # More rows than SHARED_PROJECTION_ROWS: the members' own matmuls.
    long_ids = torch.randint(3, model.config.vocab_size, (2, 600), generator=torch.Generator().manual_seed(3))
    with dense_base(model, fuse_projections=False):
        separate, long_separate = _logits(model, ids), _logits(model, long_ids)
        assert not any(type(m).__name__ == "SharedProjection" for m in model.modules())
    with dense_base(model) as swapped:
        dense = [m for m in model.modules() if type(m).__name__ in ("DenseLinear", "SharedProjection")]
        assert swapped == len(dense) and not quantized_linears(model)
        shared = [m for m in model.modules() if type(m).__name__ == "SharedProjection"]
        # Every layer's q, k, v and gate, up: 5 of its 7 linear layers.
        names = {n for group in PROJECTION_GROUPS for n in group}
        assert len(shared) == len(names) * model.config.num_hidden_layers
        attention = next(m for m in model.modules() if hasattr(m, "q_proj") and type(m.q_proj).__name__ != "Linear")
        assert attention.q_proj.shared is attention.v_proj.shared
        assert attention.q_proj.weight.data_ptr() == attention.q_proj.shared.weight.data_ptr()
        fused, long_fused = _logits(model, ids), _logits(model, long_ids)
        # Nothing is held between forward passes.
        assert all(m.shared.parts is None for m in shared)
        batch = tok(["The quick brown fox", "12 plus 7 is"], return_tensors="pt", padding=True)
        with torch.no_grad():
            generated = model.generate(**batch, max_new_tokens=8, do_sample=False, pad_token_id=tok.pad_token_id)
    torch.testing.assert_close(fused, separate, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(long_fused, long_separate, atol=1e-4, rtol=1e-4)
    with dense_base(model, fuse_projections=False), torch.no_grad():
        reference = model.generate(**batch, max_new_tokens=8, do_sample=False, pad_token_id=tok.pad_token_id)
    assert torch.equal(generated, reference)
    assert not any(type(m).__name__ == "SharedProjection" for m in model.modules())


def test_dense_copy_is_restored_when_scoring_fails(adapted):
    model, _ = adapted
    layers = [layer for _, _, layer in quantized_linears(model)]
    with pytest.raises(RuntimeError, match="boom"), dense_base(model):
        raise RuntimeError("boom")
    assert [layer for _, _, layer in quantized_linears(model)] == layers
    assert not any(getattr(m, "merged", False) for m in model.modules())


def test_auto_keeps_the_4bit_base_off_the_gpu(adapted):
    model, _ = adapted
    assert dense_bytes(model) > 0
    assert use_dense(model, "auto", "cpu", None) is False
    assert use_dense(model, True, "cpu", None) is True


def test_scoring_with_the_dense_copy_gives_the_same_scores(adapted, tmp_path):
    from evaluator.harness import evaluate
    from evaluator.micro import write_micro_task

    model, tok = adapted
    tasks = []
    for generator, metric in (("micro_mc", "acc"), ("micro_sum", "rouge2")):
        write_micro_task(f"t_{generator}", generator, tmp_path / "tasks", n=12)
        tasks.append(TaskConfig(name=f"t_{generator}", generator=generator, num_docs=12, metric=metric))
    generation = GenerationConfig(max_new_tokens=12, batch_size=5)
    quantized = evaluate(model, tok, tasks, tmp_path / "tasks", 8, generation, dequantize=False)
    dense = evaluate(model, tok, tasks, tmp_path / "tasks", 8, generation, dequantize=True)
    assert not quantized.dense and dense.dense
    assert dense.scores == pytest.approx(quantized.scores, abs=1 / 12)
    assert quantized_linears(model) and not model.training


def test_greedy_generation_is_the_same_with_the_dense_copy(adapted):
    model, tok = adapted
    prompts = ["Summarize: the river city market report", "Question: 12 plus 7 is", "The quick brown fox"]
    tok.padding_side = "left"
    batch = tok(prompts, return_tensors="pt", padding=True)

    def generate():
        with _dequantize_then_matmul(model):
            return model.generate(**batch, max_new_tokens=16, do_sample=False, use_cache=True,
                                  pad_token_id=tok.pad_token_id)

    reference = generate()
    with dense_base(model):
        dense = generate()
    assert torch.equal(dense, reference)


def test_generation_plan_fits_the_kv_cache_and_a_prefill_chunk_in_free_memory():
    from transformers import MistralConfig

    config = MistralConfig(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                           num_attention_heads=32, num_key_value_heads=8, vocab_size=32000)
    # Mistral-7B: 128 KiB of KV cache a token; 800 + 192 tokens a sequence. A prefill chunk holds 8192 // 800
    # = 10 prompts: their MLP activations and their own KV cache before it is copied in.
    per_row = 131072 * 992 + 4 * 32000
    chunk = 10 * 800 * ((6 * 14336 + 8 * 4096) * 2 + 131072)
    free = 20 * 2**30
    plan = generation_plan(config, free, 800, 192, 1000, 16)
    assert plan == GenerationPlan(int((0.8 * free - chunk) // per_row), 10)
    assert plan.rows * per_row + chunk <= 0.8 * free
    # Fewer requests than fit: all of them, prefilled at once when their activations fit too.
    assert generation_plan(config, free, 800, 192, 10, 16) == GenerationPlan(10, 10)
    assert generation_plan(config, 1, 800, 192, 100, 16) == GenerationPlan(1, 1)
    assert generation_plan(config, None, 800, 192, 100, 16) == GenerationPlan(16, 16)  # off the GPU: as configured


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
    with _dequantize_then_matmul(model):
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

    from evaluator.harness import _language_model
    from evaluator.prefix import shared_prefix_loglikelihoods

    model, tok = adapted
    lm = _language_model(model, tok, 4, None, None)
    questions = ["Question: which is even?\nAnswer:", "The river city market report says", "Q: 12 plus 7 is\nA:"]
    choices = [" one", " two apples and pears", " 19", " nineteen of them", " A"]
    requests = []
    for q in questions:
        context = tok(q, add_special_tokens=False)["input_ids"]
        for c in choices:
            requests.append(((q, c), context, tok(c, add_special_tokens=False)["input_ids"]))
    with _dequantize_then_matmul(model):
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


def test_decoder_reuses_its_cache_for_smaller_batches(adapted):
    from evaluator.decode import GreedyDecoder, greedy_generate

    model, tok = adapted
    tok.padding_side = "left"
    first = tok(["Summarize: the river city market report", "Question: 12 plus 7 is", "The quick brown fox"],
                return_tensors="pt", padding=True)
    second = tok(["A short one", "Question: 3 plus 4 is"], return_tensors="pt", padding=True)
    decoder = GreedyDecoder(model)
    with _dequantize_then_matmul(model):
        a = decoder.generate(first["input_ids"], first["attention_mask"], 12)
        session = decoder.session
        b = decoder.generate(second["input_ids"], second["attention_mask"], 12)
        assert decoder.session is session  # fewer rows, fewer slots: the same cache
        assert torch.equal(b, greedy_generate(model, second["input_ids"], second["attention_mask"], 12))
        assert torch.equal(a, greedy_generate(model, first["input_ids"], first["attention_mask"], 12))
        decoder.generate(first["input_ids"], first["attention_mask"], 200)
        assert decoder.session is not session  # more slots: a new cache


def test_prefill_in_chunks_of_rows_decodes_the_same(adapted):
    from evaluator.decode import GreedyDecoder, greedy_generate

    model, tok = adapted
    tok.padding_side = "left"
    batch = tok(["Summarize: the river city market report", "Question: 12 plus 7 is", "The quick brown fox",
                 "One more prompt of a middling length"], return_tensors="pt", padding=True)
    ids, mask = batch["input_ids"], batch["attention_mask"]
    with _dequantize_then_matmul(model):
        whole = greedy_generate(model, ids, mask, 16)
        for rows in (1, 3):  # chunks that divide the batch, and one that leaves a remainder
            assert torch.equal(greedy_generate(model, ids, mask, 16, prefill_rows=rows), whole)
        decoder = GreedyDecoder(model)
        decoder.generate(ids, mask, 16, prefill_rows=2)
    config = model.config
    slots = -(-(ids.shape[1] + 16) // 64) * 64
    head_dim = config.hidden_size // config.num_attention_heads
    assert decoder.cache_bytes() == 2 * config.num_hidden_layers * 4 * config.num_key_value_heads * slots * head_dim * 4


def test_batched_tokenization_equals_lm_evals_encode_pair(adapted):
    from evaluator.harness import _language_model, encode_pairs

    model, tok = adapted
    lm = _language_model(model, tok, 4, None, None)
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
    from evaluator.harness import _language_model, encode_pairs, token_cache

    model, tok = adapted
    lm = _language_model(model, tok, 4, None, None)
    pairs = [("Question: which is odd?\nAnswer:", " three"), ("Cached  ", "text")]
    expected = [lm._encode_pair(c, k) for c, k in pairs]
    prompt = "Question: 3 plus 4 is\nAnswer:"
    first_prompt = lm.tok_encode(prompt)
    assert encode_pairs(lm, pairs) == expected
    cache = token_cache(tok)
    assert cache.get(("pair", lm.add_bos_token, False, pairs[0][0])) is not None
    # A second trial's scoring (a new wrapper, the same tokenizer) reads the cache: the tokenizer is not called.
    again = _language_model(model, tok, 4, None, None)
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
        assert encode_pairs(again, pairs) == expected
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
    reference = _logits(model, ids)
    rotary = llama.apply_rotary_pos_emb
    # The same formulas run uncompiled: the logits are bit for bit the model's own.
    with fused_elementwise(model, backend="eager") as fused:
        assert fused and llama.apply_rotary_pos_emb is not rotary
        assert "forward" in vars(core.model.norm) and "forward" in vars(core.model.layers[0].mlp)
        assert torch.equal(_logits(model, ids), reference)
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

    from evaluator.harness import _language_model
    from evaluator.prefix import shared_prefix_loglikelihoods
    from trainer.model import load_base_model, load_tokenizer

    config = ModelConfig(name_or_path="sweep-demo/tiny-llama")
    model, tok = load_base_model(config, "cuda", attn_implementation="sdpa"), load_tokenizer(config)
    model.eval()
    lm = _language_model(model, tok, 4, None, None)
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


def test_scoring_runs_sdpa_and_gives_the_model_its_attention_back(adapted, tmp_path):
    from evaluator.harness import evaluate
    from evaluator.micro import write_micro_task

    model, tok = adapted
    core = model.get_base_model()
    write_micro_task("t_mc", "micro_mc", tmp_path / "tasks", n=12)
    tasks = [TaskConfig(name="t_mc", generator="micro_mc", num_docs=12, metric="acc")]
    reference = evaluate(model, tok, tasks, tmp_path / "tasks", 8, None, dequantize=False)
    core.set_attn_implementation("flex_attention")  # what trials train with on a GPU
    try:
        scored = evaluate(model, tok, tasks, tmp_path / "tasks", 8, None, dequantize=False)
        assert core.config._attn_implementation == "flex_attention"
    finally:
        core.set_attn_implementation("sdpa")
    assert scored.scores == reference.scores


def test_one_call_scores_each_task_with_its_own_settings_as_simple_evaluate_would(adapted, tmp_path):
    """All tasks go to lm-eval in one call: the same requests (few-shot contexts, limits, generation settings)
    and the same scores as one `simple_evaluate` call per task."""
    import dataclasses
    import json

    from lm_eval import simple_evaluate

    from evaluator.harness import (
        _gen_kwargs,
        _language_model,
        _lean_lm_eval,
        _metric,
        _score,
        standard_error,
        task_manager,
    )
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
    lm = _language_model(model, tok, 8, generation, None)
    calls = []

    def recording(kind, method):
        def call(requests, disable_tqdm=False):
            calls.append((kind, sorted(json.dumps(r.args, sort_keys=True) for r in requests)))
            return method(requests, disable_tqdm)

        return call

    lm.loglikelihood = recording("loglikelihood", lm.loglikelihood)
    lm.generate_until = recording("generate_until", lm.generate_until)
    with torch.no_grad():
        merged, per_doc = _score(lm, tasks, manager, generation)
        merged_calls, calls[:] = list(calls), []
        reference, reference_stderr = {}, {}
        with _lean_lm_eval():
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


def test_standard_errors_are_binomial_for_0_1_values_else_the_sample_deviation_over_root_n():
    import statistics

    from evaluator.harness import standard_error

    assert standard_error([1.0, 0.0, 1.0, 1.0]) == pytest.approx((0.75 * 0.25 / 4) ** 0.5)
    assert standard_error([0.5, 0.25, 1.0]) == pytest.approx(statistics.stdev([0.5, 0.25, 1.0]) / 3 ** 0.5)
    assert standard_error([1.0, 1.0]) == 0.0
    assert standard_error([0.3]) is None and standard_error([]) is None


def test_a_second_scoring_reuses_the_task_index_and_the_built_requests(adapted, tmp_path):
    """A worker scores the same tasks trial after trial: the index and the requests are built once, the scores
    stay those of a fresh build, and changed task files are read again."""
    from evaluator import harness
    from evaluator.harness import evaluate, task_manager
    from evaluator.micro import write_micro_task

    model, tok = adapted
    tasks = [TaskConfig(name="t_mc", generator="micro_mc", num_docs=12, metric="acc", limit=8),
             TaskConfig(name="t_sum", generator="micro_sum", num_docs=4, metric="rouge2", max_new_tokens=5)]
    for t in tasks:
        write_micro_task(t.name, t.generator, tmp_path / "tasks", n=t.num_docs)
    manager = task_manager(tasks, tmp_path / "tasks")
    assert task_manager(tasks, tmp_path / "tasks") is manager
    generation = GenerationConfig(max_new_tokens=12, batch_size=4)
    first = evaluate(model, tok, tasks, tmp_path / "tasks", 8, generation, dequantize=False)
    [(prepared, _)] = [v for k, v in harness._PREPARED.items() if k[0] == manager.sweep_key]
    instances = list(prepared["tasks"]["t_mc"].instances)
    assert len(instances) == 8 * 4
    second = evaluate(model, tok, tasks, tmp_path / "tasks", 8, generation, dequantize=False)
    assert second.scores == first.scores
    # The per-document values behind the standard errors are this call's alone.
    assert second.num_docs == first.num_docs == {"t_mc": 8, "t_sum": 4} and second.stderrs == first.stderrs
    assert prepared["tasks"]["t_mc"].instances == instances  # the same request objects, answered again
    assert all(len(i.resps) == 1 for i in instances)  # the first call's answers were cleared, not kept
    # Rewritten task files (other documents) are a new index and new requests.
    write_micro_task("t_mc", "micro_mc", tmp_path / "tasks", n=12, seed=5)
    assert task_manager(tasks, tmp_path / "tasks") is not manager
    evaluate(model, tok, tasks, tmp_path / "tasks", 8, generation, dequantize=False)
    rebuilt = [v for k, (v, _) in harness._PREPARED.items() if k[0] != manager.sweep_key and "t_mc" in v["tasks"]]
    assert rebuilt and rebuilt[-1]["tasks"]["t_mc"].instances[0] is not instances[0]
    assert rebuilt[-1]["tasks"]["t_mc"].instances[0].doc != instances[0].doc
