"""The specs a start sends to its workers: `trial_spec` of a start, and `spec_for_trial` from plain values."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

from sweep.config import load_config
from sweep.context import spec_for_trial, trial_spec
from sweep.gpus import PROFILES
from sweep.study import derived_seed

PARAMS = {"trainer.learning_rate": 0.002, "trainer.lora.r": 8, "data.num_examples": 1500}


def test_spec_for_trial_runs_the_trial_the_driver_would(tmp_path):
    config = load_config(None, ["study.seed=7"])
    spec = spec_for_trial(config, "demo", 3, PARAMS, work_dir=tmp_path, task_dir="/tasks", cpus_per_trial=1,
                          device="cpu", profile=PROFILES["cpu"], host_memory_limit_gib=2.0)
    assert spec.seed == derived_seed(7, 3)
    assert spec.train.learning_rate == 0.002 and spec.train.lora.r == 8 and spec.data.num_examples == 1500
    assert spec.adapter_dir == str(tmp_path / "trials" / "0003" / "adapter")
    assert spec.log_file == str(tmp_path / "trials" / "0003" / "worker.log")
    assert spec.rungs == tuple(config.study.rungs) and spec.rung_eval_docs == config.study.rung_eval_docs
    assert spec.num_threads == 1 and spec.host_memory_limit_gib == 2.0 and spec.baseline_scores is None
    assert spec.hyperparameters["trial"] == {"study": "demo", "number": 3, "seed": derived_seed(7, 3),
                                             "params": PARAMS}
    no_pruner = spec_for_trial(load_config(None, ["study.pruner=none"]), "demo", 3, PARAMS, work_dir=tmp_path,
                               task_dir="/tasks", cpus_per_trial=1, device="cpu", profile=PROFILES["cpu"])
    assert no_pruner.rungs == ()


def test_trial_spec_of_a_start_is_spec_for_trial_of_its_values(tmp_path):
    config = load_config(None, ["orchestration.cpu_memory_limit_gib=3"])
    baseline = {"scores": {"demo_digits": 0.5}}
    run = SimpleNamespace(
        config=config, study=SimpleNamespace(study_name="demo"), work_dir=Path(tmp_path), task_dir="/tasks",
        cpus_per_trial=2, device="cpu", profile=PROFILES["cpu"], exclude_ngrams_file="/ngrams.npy",
        store=SimpleNamespace(baseline=lambda name: baseline if name == "demo" else None),
        pool=SimpleNamespace(share_gib=9.0),
    )
    expected = spec_for_trial(config, "demo", 5, PARAMS, work_dir=tmp_path, task_dir="/tasks", cpus_per_trial=2,
                              device="cpu", profile=PROFILES["cpu"], host_memory_limit_gib=3.0,
                              exclude_ngrams_file="/ngrams.npy", baseline_scores={"demo_digits": 0.5})
    assert trial_spec(run, 5, PARAMS) == expected
