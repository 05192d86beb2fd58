"""The deterministic demo base: same bytes on every build, a working BPE tokenizer."""

from __future__ import annotations

import json

from trainer.demo_base import DEMO_MODEL_ID, build_demo_base, build_tokenizer, resolve_model_path


def test_two_builds_are_identical(tmp_path):
    first = build_demo_base(tmp_path / "a")
    second = build_demo_base(tmp_path / "b")
    assert first == second
    assert (tmp_path / "a" / "model.safetensors").read_bytes() == (tmp_path / "b" / "model.safetensors").read_bytes()


def test_resolve_builds_once_into_the_cache(demo_base_dir):
    path = resolve_model_path(DEMO_MODEL_ID)
    assert path == str(demo_base_dir)
    manifest = json.loads((demo_base_dir / "sweep_demo_base.json").read_text())
    assert manifest["model_id"] == DEMO_MODEL_ID
    assert resolve_model_path("mistralai/Mistral-7B-v0.1") == "mistralai/Mistral-7B-v0.1"


def test_tokenizer_is_bpe_with_bos_and_roundtrips():
    tok = build_tokenizer()
    assert type(tok.backend_tokenizer.model).__name__ == "BPE"
    text = "### Instruction:\nIs 4 7 3 even or odd?\n\n### Response:\nodd"
    ids = tok(text)["input_ids"]
    assert ids[0] == tok.bos_token_id
    assert tok.decode(ids, skip_special_tokens=True) == text
    # Merges make the demo's words single tokens.
    assert len(tok.tokenize(" even")) == 1


def test_demo_id_loads_with_plain_transformers_offline(demo_base_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(DEMO_MODEL_ID)
    tok = AutoTokenizer.from_pretrained(DEMO_MODEL_ID)
    assert model.config.hidden_size == 128 and tok.bos_token == "<s>"
