"""Creating and loading the Optuna study, with the sampler and the pruner rebuilt from the config."""

from __future__ import annotations

import logging

from sweep.config import SweepConfig, coerce_value

log = logging.getLogger("sweep")


class StudyError(RuntimeError):
    """The study in the storage does not fit the config, or does not exist."""


def make_storage(url: str, heartbeat_seconds: int | None = None, max_retries: int = 2, *, read_only: bool = False):
    """Optuna's RDB storage on `url` (SQLite: with a busy timeout, so readers don't break writes).

    With `heartbeat_seconds` (the driver's storage), a RUNNING trial whose
    heartbeat is older than 3 intervals is stale: `optuna.storages.fail_stale_trials`
    fails it and enqueues its parameters again, at most `max_retries` times.

    With `read_only` (the reading commands), Optuna creates no tables and a SQLite file is opened
    read-only (`sweep.store.engine_kwargs`): nothing is written, and a study on read-only media
    reads. (On a study database Optuna's open only reads: its version row and alembic stamp are
    there already.)
    """
    import warnings

    import optuna

    from sweep.store import engine_kwargs

    if read_only:
        return optuna.storages.RDBStorage(url, engine_kwargs=engine_kwargs(url, read_only=True),
                                          skip_table_creation=True)
    kwargs = engine_kwargs(url)
    if heartbeat_seconds is None:
        return optuna.storages.RDBStorage(url, engine_kwargs=kwargs)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        return optuna.storages.RDBStorage(
            url, engine_kwargs=kwargs, heartbeat_interval=heartbeat_seconds, grace_period=3 * heartbeat_seconds,
            heartbeat_stale_trial_callback=optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry=max_retries),
        )


def derived_seed(study_seed: int, index: int) -> int:
    """A seed for the `index`-th thing of a study (a sampler start, a trial's training).

    Within [0, 2**32), the range NumPy's and Optuna's samplers accept: any `study.seed` works (below 4295 the
    value is `study_seed * 1_000_003 + index`, as before).
    """
    return (study_seed * 1_000_003 + index) % 2**32


def make_sampler(config: SweepConfig, n_existing: int):
    """The sampler of the config, seeded by (study seed, trials so far).

    Seeding with the number of existing trials keeps a resumed study from
    replaying the proposals of its first run.
    """
    import optuna

    seed = derived_seed(config.study.seed, n_existing)
    if config.study.sampler == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    return optuna.samplers.TPESampler(seed=seed, n_startup_trials=config.study.sampler_startup_trials)


def make_pruner(config: SweepConfig):
    """The pruner of the config. Optuna does not store pruners: every start builds it again.

    Rungs are reported at training steps; with `trainer.max_steps` set, the
    first rung's step is the pruners' smallest resource (else Optuna's `auto`).
    """
    import optuna

    study = config.study
    max_steps = config.trainer.max_steps
    first = max(1, round(min(study.rungs) * max_steps)) if max_steps and study.rungs else "auto"
    if study.pruner == "successive_halving":
        return optuna.pruners.SuccessiveHalvingPruner(min_resource=first, reduction_factor=study.reduction_factor)
    if study.pruner == "hyperband":
        return optuna.pruners.HyperbandPruner(
            min_resource=1 if first == "auto" else first, max_resource=max_steps or "auto",
            reduction_factor=study.reduction_factor,
        )
    if study.pruner == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=study.pruner_startup_trials, n_warmup_steps=0)
    return optuna.pruners.NopPruner()


def create_or_load_study(config: SweepConfig, storage, study_name: str):
    """The study named `study_name`: loaded if it exists (direction checked), else created."""
    import optuna

    try:
        existing = optuna.load_study(study_name=study_name, storage=storage)
    except KeyError:
        existing = None
    if existing is not None:
        direction = existing.direction.name.lower()
        if direction != config.study.direction:
            raise StudyError(
                f"study {study_name!r} exists with direction {direction}; the config says {config.study.direction}"
            )
        n_existing = len(existing.trials)
        return optuna.load_study(
            study_name=study_name, storage=storage, sampler=make_sampler(config, n_existing),
            pruner=make_pruner(config),
        )
    study = optuna.create_study(
        study_name=study_name,
        storage=storage,
        direction=config.study.direction,
        sampler=make_sampler(config, 0),
        pruner=make_pruner(config),
    )
    study.set_user_attr("model", config.model.name_or_path)
    return study


def load_existing_study(storage, study_name: str | None):
    """A study for reading; with no name, the only study in the storage."""
    import optuna

    if study_name == "":
        raise StudyError("--study '': must be a non-empty name (or leave --study out for the only study)")
    if study_name is None:
        names = optuna.get_all_study_names(storage)
        if len(names) != 1:
            found = ", ".join(names) if names else "none"
            raise StudyError(f"name a study with --study (studies in the storage: {found})")
        study_name = names[0]
    try:
        return optuna.load_study(study_name=study_name, storage=storage)
    except KeyError:
        found = ", ".join(optuna.get_all_study_names(storage)) or "none"
        raise StudyError(f"no study named {study_name!r} in the storage (studies in it: {found})") from None


def best_trial(study):
    """The best COMPLETE trial, or None when there is none yet."""
    try:
        return study.best_trial
    except ValueError:
        return None


def best_params(storage_url: str, study_name: str, top: int, search_space: dict) -> list[dict]:
    """The parameters of the `top` best feasible COMPLETE trials of a study, best first, for another study of
    `search_space` to run first (a warm start).

    Every parameter must be a key of `search_space` with a value inside its range (the same space, or one
    that contains it); keys of `search_space` a trial lacks are sampled.

    Raises:
        StudyError: no such study, no COMPLETE feasible trial, or a parameter the space cannot take (named).
    """
    import optuna

    from sweep.config import enqueue_problem

    storage = make_storage(storage_url, read_only=True)
    study = load_existing_study(storage, study_name)
    maximize = study.direction == optuna.study.StudyDirection.MAXIMIZE
    done = [t for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
            if t.value is not None and t.user_attrs.get("feasible") is not False
            and all(c <= 0 for c in t.constraints.values())]
    if not done:
        raise StudyError(f"study {study_name!r} has no feasible COMPLETE trial to start from")
    done.sort(key=lambda t: (-t.value if maximize else t.value, t.number))
    chosen = []
    for t in done[:top]:
        problem = enqueue_problem(dict(t.params), search_space)
        if problem:
            raise StudyError(f"trial {t.number} does not fit this config's search space: {problem}")
        chosen.append(dict(t.params))
    return chosen


def enqueue_trials(study, config: SweepConfig) -> int:
    """Puts the config's `enqueue` parameter sets in the study's queue, in order: the next trials run them.

    A set the study already holds (run, running or waiting) is not added again, so a resumed study does not
    repeat its recipes. Returns how many were added.
    """
    before = len(study.get_trials(deepcopy=False))
    for params in config.enqueue:
        study.enqueue_trial({k: coerce_value(v, config.search_space[k]) for k, v in params.items()},
                            skip_if_exists=True)
    added = len(study.get_trials(deepcopy=False)) - before
    if added:
        log.info("Enqueued %d trial(s) to run first (of %d parameter set(s))", added, len(config.enqueue))
    return added
