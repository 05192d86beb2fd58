"""Fixtures shared by the evaluator's tests in this folder."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from trainer.config import LoraConfig, ModelConfig

FINGERPRINT = """\
def process(doc, results):
    import hashlib

    return {"fingerprint": int(hashlib.sha256(results[0].encode()).hexdigest()[:8], 16) / 16**8}
"""


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


@pytest.fixture
def fingerprint_task():
    """Writes `fingerprint`, a generation task over a JSONL file of `prompt`s scored by a hash of each generated
    text (in [0, 1)): any generation that differs between two scorings changes its score and standard error.
    Returns its `TaskConfig`."""
    from evaluator.config import TaskConfig

    def write(task_dir: Path, data_file: Path) -> TaskConfig:
        docs = Path(data_file).resolve()
        (task_dir / "fingerprint.py").write_text(FINGERPRINT)
        (task_dir / "fingerprint.yaml").write_text(
            f"task: fingerprint\ndataset_path: json\ndataset_kwargs: {{data_files: {{test: {str(docs)!r}}}}}\n"
            "test_split: test\noutput_type: generate_until\ndoc_to_text: '{{prompt}}'\ndoc_to_target: prompt\n"
            'generation_kwargs: {until: ["\\n\\n"], do_sample: false, max_gen_toks: 24}\n'
            "process_results: !function fingerprint.process\n"
            "metric_list:\n  - {metric: fingerprint, aggregation: mean, higher_is_better: true}\n"
            "metadata: {version: 1.0}\n"
        )
        return TaskConfig(name="fingerprint", metric="fingerprint", data_file=str(docs))

    return write
