"""Every reach of the orchestrator into Optuna's internals, each checked against the versions it was written for
(the machinery is `trainer.compat`'s, shared with the trainer's and the evaluator's hooks).

Optuna's ask/tell API hands out live trials, but a driver that heartbeats its own trials, and recovers them
after a crash, needs their storage ids, and the failing of a stale trial in one transaction with our own record
needs Optuna's tables. Nothing else of the orchestrator names a private part of Optuna.
"""

from __future__ import annotations

from typing import Any, Optional

from trainer.compat import Hook

OPTUNA = ">=5.0,<5.1"
"""pyproject's bound (a test keeps them equal)."""

TRIAL_IDS = Hook("reading a trial's storage id and its study's storage (heartbeats, crash recovery)", "optuna",
                 OPTUNA, stock=None)
OPTUNA_TABLES = Hook("failing a stale trial and writing its record in one transaction on Optuna's tables",
                     "optuna", OPTUNA, stock="Optuna's own state update, then our record")

HOOKS = [TRIAL_IDS, OPTUNA_TABLES]


def trial_id(trial) -> int:
    """The storage id of a live `Trial` or a `FrozenTrial`: what heartbeats and state updates are keyed by."""
    TRIAL_IDS.require()
    return trial._trial_id


def study_storage(study):
    """The storage a study reads and writes (the one it was created with, heartbeats included)."""
    TRIAL_IDS.require()
    return study._storage


def live_trial(study, frozen):
    """A live `Trial` of a RUNNING trial read back from storage, to tell Optuna how it ended."""
    import optuna

    return optuna.trial.Trial(study, trial_id(frozen))


def stored_trial(study, frozen):
    """The trial as Optuna's storage holds it now (a `FrozenTrial`)."""
    return study_storage(study).get_trial(trial_id(frozen))


def trial_state(study, frozen) -> str:
    """The state Optuna's storage holds for the trial now ("RUNNING", "COMPLETE", ...)."""
    return stored_trial(study, frozen).state.name


def fail_in_storage(study, frozen) -> bool:
    """Sets a RUNNING trial FAIL through Optuna's storage; False if it had already finished."""
    import optuna

    try:
        return bool(study_storage(study).set_trial_state_values(trial_id(frozen),
                                                                state=optuna.trial.TrialState.FAIL))
    except optuna.exceptions.UpdateFinishedTrialError:
        return False


def optuna_tables() -> Optional[tuple[Any, Any]]:
    """Optuna's `trials` and `trial_heartbeats` tables, if they have the columns our recovery writes and reads;
    None outside the checked versions or where the schema differs (the caller then takes the stock path).

    Checked on Optuna 5.0 (its RDB schema "v3.2.0.a").
    """
    if not OPTUNA_TABLES.active():
        return None
    try:
        from optuna.storages._rdb import models
    except ImportError:
        return None
    trials, beats = models.TrialModel.__table__, models.TrialHeartbeatModel.__table__
    if not ({"trial_id", "state", "datetime_start", "datetime_complete"} <= set(trials.c.keys())
            and {"trial_id", "heartbeat"} <= set(beats.c.keys())):
        return None
    return trials, beats
