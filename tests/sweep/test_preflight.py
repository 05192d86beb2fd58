"""A start that cannot succeed stops before any trial, in one line, with the database unchanged; one whose
trials keep failing stops starting them and exits non-zero."""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

import pytest
from sweep_processes import FAST, LIGHT

from sweep.cli import main
from sweep.config import load_config


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _existing_study(db: Path, name: str = "demo", params: dict | None = None, value: float = 0.5) -> None:
    """A study with one COMPLETE trial searched over the demo's space (as an earlier start would leave)."""
    import optuna

    from sweep.space import distribution

    space = load_config(None).search_space
    params = params or {"trainer.learning_rate": 1e-3, "trainer.lora.r": 8, "trainer.lora.alpha": 16,
                        "trainer.lora.dropout": 0.1}
    study = optuna.create_study(study_name=name, storage=f"sqlite:///{db}", direction="maximize")
    study.add_trial(optuna.trial.create_trial(
        params=params, distributions={k: distribution(space[k]) for k in params}, value=value,
    ))


def _start(capsys, tmp_path: Path, *extra: str) -> tuple[int, list[str]]:
    capsys.readouterr()
    code = main(["start", "--storage", f"sqlite:///{tmp_path / 'studies.db'}", "--trials", "2",
                 "--set", f"orchestration.artifacts_dir={tmp_path / 'runs'}", *FAST, *extra])
    return code, capsys.readouterr().err.strip().splitlines()


def _bad_rows(tmp_path: Path) -> str:
    path = tmp_path / "bad.jsonl"
    path.write_text('{"instruction": "no response"}\nnot json at all\n{"response": "no instruction"}\n')
    return str(path)


CANNOT_SUCCEED = {
    "unknown lm-eval task": (
        ["--set", "evaluator.suites.heldout.tasks.1={name: gsm8kk, metric: exact_match}"],
        "error: evaluator.suites.heldout.tasks.1.name: no lm-eval task named 'gsm8kk' (did you mean gsm8k",
    ),
    "data file with no usable rows": (
        ["--set", "data.sources.3={name: news, kind: file, path: BAD}", "--set",
         "evaluator.suites.open.tasks.3.source=null", "--set", "evaluator.suites.open.tasks.3.generator=micro_sum"],
        "error: data.sources.3 (news): no usable example in BAD (skipped: 2 missing_field, 1 not_json)",
    ),
    "missing model path": (
        ["--set", "model.name_or_path=./models/not-there"],
        "error: model.name_or_path: no model directory at models/not-there",
    ),
    "hub model not in the cache, offline": (
        ["--set", "model.name_or_path=nobody/no-such-model"],
        "error: model.name_or_path: nobody/no-such-model is not in the local Hugging Face cache",
    ),
    "study name with ..": (["--study", "../../etc/x"], "error: --study '../../etc/x': must not contain a path"),
    "incompatible search-space change": (
        ["--set", "search_space.trainer.lora.r.choices=[8,16]"],
        "error: search_space.trainer.lora.r: study 'demo' searched it as choices [4, 8, 16]; the config says "
        "choices [8, 16], which Optuna cannot change within a study: start a new study (--study NAME) or keep "
        "choices [4, 8, 16]",
    ),
}


@pytest.mark.parametrize("case", list(CANNOT_SUCCEED))
def test_a_start_that_cannot_succeed_fails_in_one_line_before_anything_is_written(case, tmp_path, capsys,
                                                                                   monkeypatch):
    monkeypatch.chdir(tmp_path)
    db = tmp_path / "studies.db"
    _existing_study(db)
    before = _digest(db)
    extra, expected = CANNOT_SUCCEED[case]
    extra = [a.replace("BAD", _bad_rows(tmp_path)) for a in extra]
    code, err = _start(capsys, tmp_path, *extra)
    assert code == 2
    assert err[-1].startswith("sweep start: error: ") and expected.replace("BAD", _bad_rows(tmp_path)) in err[-1]
    assert not any("Traceback" in line for line in err)
    assert _digest(db) == before and not (tmp_path / "runs").exists()


def test_nothing_is_created_when_the_database_is_new(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code, err = _start(capsys, tmp_path, "--set", "model.name_or_path=/no/such/dir")
    assert code == 2 and err[-1] == "sweep start: error: model.name_or_path: no model directory at /no/such/dir"
    assert not (tmp_path / "studies.db").exists()


def test_validate_checks_what_a_start_checks(tmp_path, capsys):
    from sweep.config import demo_config_path

    code = main(["validate", str(demo_config_path()), "--set", f"data.sources.0={{name: digits, kind: file, "
                 f"path: {_bad_rows(tmp_path)}}}", "--set", "evaluator.suites.open.tasks.0.source=null",
                 "--set", "evaluator.suites.open.tasks.0.generator=micro_mc"])
    assert code == 2 and "data.sources.0 (digits): no usable example" in capsys.readouterr().err
    assert main(["validate", str(demo_config_path()), "--file-only", "--set", "model.name_or_path=/no/dir"]) == 0
    db = tmp_path / "studies.db"
    _existing_study(db)
    code = main(["validate", str(demo_config_path()), "--storage", str(db), "--file-only",
                 "--set", "search_space.trainer.lora.alpha={type: int, low: 8, high: 32}"])
    assert code == 2 and "search_space.trainer.lora.alpha: study 'demo' searched it as choices [8, 16, 32]; the " \
        "config says int in [8, 32]" in capsys.readouterr().err


def test_a_changed_float_range_is_compatible(tmp_path):
    from sweep.preflight import check_study

    db = tmp_path / "studies.db"
    _existing_study(db)
    config = load_config(None, ["search_space.trainer.learning_rate.low=1e-5",
                                "search_space.trainer.lora.r.choices=[4, 8, 16]"])
    check_study(config, f"sqlite:///{db}", "demo")


def test_a_jsonl_line_that_is_not_json_is_a_skipped_row_not_a_failed_trial(tmp_path):
    from sweep.preflight import check_data

    good = tmp_path / "mixed.jsonl"
    good.write_text('{"instruction": "Say hi.", "response": "hi"}\n{broken\n')
    config = load_config(None, [f"data.sources.0={{name: digits, kind: file, path: {good}}}",
                                "evaluator.suites.open.tasks.0.source=null",
                                "evaluator.suites.open.tasks.0.generator=micro_mc"])
    check_data(config)  # one usable example: the start may go on


@pytest.mark.integration
def test_trials_failing_for_the_same_reason_stop_the_start(tmp_path, capsys, caplog, monkeypatch, ray_session):
    """Three trials in a row failing the same way stop a start of five; it exits 1 and says why; a resumed
    study shows its best from the start."""
    monkeypatch.chdir(tmp_path)
    db = tmp_path / "studies.db"
    _existing_study(db, "streak", value=0.25)
    caplog.set_level(logging.INFO, logger="sweep")
    code, err = _start(capsys, tmp_path, "--study", "streak", "--trials", "5", *LIGHT,
                       "--set", "orchestration.max_consecutive_failures=2",
                       "--set", "trainer.lora.target_modules=[no_such_module]")
    assert code == 1
    assert err[-1].startswith("sweep start: error: study 'streak': 2 trials in a row failed with: ")
    assert "no_such_module" in err[-1] and err[-1].endswith("(the study's best is still trial 0, 0.2500)")
    status = json.loads(_status(capsys, db, "streak"))
    assert [t["state"] for t in status["trials"]] == ["COMPLETE", "FAIL", "FAIL"]
    progress = [r.getMessage() for r in caplog.records if r.getMessage().startswith("Progress:")]
    assert progress and all("best trial 0 (0.2500)" in line for line in progress)


@pytest.mark.integration
def test_a_baseline_that_cannot_be_scored_starts_no_trial(tmp_path, capsys, monkeypatch, ray_session):
    monkeypatch.chdir(tmp_path)
    broken = tmp_path / "broken_task.jsonl"
    broken.write_text(json.dumps({"prompt": "Is 3 odd?"}) + "\n")  # no choices, no answer: lm-eval cannot score it
    code, err = _start(capsys, tmp_path, "--study", "nobase", *LIGHT,
                       "--set", f"evaluator.suites.open.tasks.0={{name: broken_task, data_file: {broken}}}")
    assert code == 1
    assert err[-1].startswith("sweep start: error: study 'nobase': scoring the base model failed: ")
    assert json.loads(_status(capsys, tmp_path / "studies.db", "nobase"))["trials"] == []


def _status(capsys, db: Path, study: str) -> str:
    capsys.readouterr()
    assert main(["status", "--storage", str(db), "--study", study, "--format", "json"]) == 0
    return capsys.readouterr().out


def test_a_model_far_too_large_for_the_profile_is_one_warning(caplog):
    from transformers import LlamaConfig

    from sweep.gpus import PROFILES
    from sweep.preflight import parameter_count, warn_model_size

    seven_b = LlamaConfig(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                          vocab_size=32000)
    assert 6.6e9 < parameter_count(seven_b) < 6.8e9
    config = load_config(None, ["model.name_or_path=meta-llama/Llama-2-7b-hf"])
    with caplog.at_level(logging.WARNING, logger="sweep"):
        warn_model_size(config, PROFILES["cpu"], seven_b)
        warn_model_size(config, PROFILES["a100"], seven_b)  # about 3.5 GiB of 4-bit weights: fits
    assert [r.getMessage() for r in caplog.records] == [
        "Model meta-llama/Llama-2-7b-hf has 6.7B parameters: on the cpu profile a trial takes hours to days; "
        "run on a GPU with --gpu (a100, h100, ...)"
    ]
