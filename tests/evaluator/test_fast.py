"""Scoring with a dense copy of the 4-bit base: the same outputs, the 4-bit layers back afterwards."""

from __future__ import annotations

import pytest
import torch
from fourbit import dequantize_then_matmul, logits

from evaluator.config import GenerationConfig, TaskConfig
from evaluator.fast import GenerationPlan, dense_base, dense_bytes, generation_plan, quantized_linears, use_dense


def test_fused_projections_give_the_separate_layerslogits(adapted):
    from evaluator.fast import PROJECTION_GROUPS

    model, tok = adapted
    ids = torch.randint(3, model.config.vocab_size, (3, 24), generator=torch.Generator().manual_seed(2))
    # More rows than SHARED_PROJECTION_ROWS: the members' own matmuls.
    long_ids = torch.randint(3, model.config.vocab_size, (2, 600), generator=torch.Generator().manual_seed(3))
    with dense_base(model, fuse_projections=False):
        separate, long_separate = logits(model, ids), logits(model, long_ids)
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
        fused, long_fused = logits(model, ids), logits(model, long_ids)
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


def test_decoder_reuses_its_cache_for_smaller_batches(adapted):
    from evaluator.decode import GreedyDecoder, greedy_generate

    model, tok = adapted
    tok.padding_side = "left"
    first = tok(["Summarize: the river city market report", "Question: 12 plus 7 is", "The quick brown fox"],
                return_tensors="pt", padding=True)
    second = tok(["A short one", "Question: 3 plus 4 is"], return_tensors="pt", padding=True)
    decoder = GreedyDecoder(model)
    with dequantize_then_matmul(model):
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
    with dequantize_then_matmul(model):
        whole = greedy_generate(model, ids, mask, 16)
        for rows in (1, 3):  # chunks that divide the batch, and one that leaves a remainder
            assert torch.equal(greedy_generate(model, ids, mask, 16, prefill_rows=rows), whole)
        decoder = GreedyDecoder(model)
        decoder.generate(ids, mask, 16, prefill_rows=2)
    config = model.config
    slots = -(-(ids.shape[1] + 16) // 64) * 64
    head_dim = config.hidden_size // config.num_attention_heads
    assert decoder.cache_bytes() == 2 * config.num_hidden_layers * 4 * config.num_key_value_heads * slots * head_dim * 4


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
    index_key = harness._MANAGER_KEYS[manager]
    [(prepared, _)] = [v for k, v in harness._PREPARED.items() if k[0] == index_key]
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
    rebuilt = [v for k, (v, _) in harness._PREPARED.items() if k[0] != index_key and "t_mc" in v["tasks"]]
    assert rebuilt and rebuilt[-1]["tasks"]["t_mc"].instances[0] is not instances[0]
    assert rebuilt[-1]["tasks"]["t_mc"].instances[0].doc != instances[0].doc
