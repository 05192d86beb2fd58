"""sweep/compat.py: Optuna's internals behind version-checked hooks, and the start-up check of every hook."""

from __future__ import annotations

import logging
import os
import subprocess
import sys

import pytest

from sweep import compat
from trainer.compat import UNCHECKED_ENV, CompatError


def test_trial_ids_need_a_checked_optuna(monkeypatch):
    import optuna

    study = optuna.create_study()
    trial = study.ask()
    assert compat.trial_id(trial) == compat.trial_id(study.trials[0])
    assert compat.trial_state(study, study.trials[0]) == "RUNNING"
    monkeypatch.setenv(UNCHECKED_ENV, "optuna")
    with pytest.raises(CompatError) as error:
        compat.trial_id(trial)
    assert "\n" not in str(error.value) and "optuna" in str(error.value)
    assert compat.optuna_tables() is None  # out of range: the stock path (Optuna's own update) instead


def test_a_start_stops_in_one_line_before_writing_when_a_hook_has_no_stock_path(tmp_path):
    """An Optuna outside the checked range: the trial ids have no stock path, so nothing can run."""
    env = {**os.environ, UNCHECKED_ENV: "optuna", "HF_HUB_OFFLINE": "1"}
    run = subprocess.run([sys.executable, "-m", "sweep.cli", "start", "--trials", "1"], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 2, run.stderr
    lines = run.stderr.strip().splitlines()
    assert lines[-1].startswith("sweep start: error: reading a trial's storage id"), lines
    assert "Traceback" not in run.stderr
    assert not (tmp_path / "studies.db").exists()


def test_a_hook_with_a_stock_path_warns_at_start(monkeypatch, caplog):
    from sweep.preflight import check_compat

    monkeypatch.setenv(UNCHECKED_ENV, "lm-eval")
    logging.getLogger("sweep").setLevel(logging.INFO)
    with caplog.at_level(logging.WARNING):
        check_compat()
    assert any("lm-eval" in r.getMessage() and "instead" in r.getMessage() for r in caplog.records)
