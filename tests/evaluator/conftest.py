"""Fixtures shared by the evaluator's tests in this folder."""

from __future__ import annotations

from pathlib import Path

import pytest
from test_eval_speed import adapted  # noqa: F401  (the 4-bit demo base with a non-zero LoRA adapter)

FINGERPRINT = """\
def process(doc, results):
    import hashlib

    return {"fingerprint": int(hashlib.sha256(results[0].encode()).hexdigest()[:8], 16) / 16**8}
"""


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
