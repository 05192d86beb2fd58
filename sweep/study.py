"""Creating and loading the Optuna study, with the sampler rebuilt from the config."""

from __future__ import annotations

from sweep.config import SweepConfig


class StudyError(RuntimeError):
    """The study in the storage does not fit the config, or does not exist."""


def make_storage(url: str):
    """Optuna's RDB storage on `url` (SQLite: with a busy timeout, so readers don't break writes)."""
    import optuna

    kwargs = {"connect_args": {"timeout": 30}} if url.startswith("sqlite") else {}
    return optuna.storages.RDBStorage(url, engine_kwargs=kwargs)


def derived_seed(study_seed: int, index: int) -> int:
    """A seed for the `index`-th thing of a study (a sampler start, a trial's training)."""
    return study_seed * 1_000_003 + index


def make_sampler(config: SweepConfig, n_existing: int):
    """The sampler of the config, seeded by (study seed, trials so far).

    Seeding with the number of existing trials keeps a resumed study from
    replaying the proposals of its first run.
    """
    import optuna

    seed = derived_seed(config.study.seed, n_existing)
    if config.study.sampler == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    return optuna.samplers.TPESampler(seed=seed)


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
            study_name=study_name, storage=storage, sampler=make_sampler(config, n_existing)
        )
    study = optuna.create_study(
        study_name=study_name,
        storage=storage,
        direction=config.study.direction,
        sampler=make_sampler(config, 0),
    )
    study.set_user_attr("model", config.model.name_or_path)
    return study


def load_existing_study(storage, study_name: str | None):
    """A study for reading; with no name, the only study in the storage."""
    import optuna

    if study_name is None:
        names = optuna.get_all_study_names(storage)
        if len(names) != 1:
            found = ", ".join(names) if names else "none"
            raise StudyError(f"name a study with --study (studies in the storage: {found})")
        study_name = names[0]
    try:
        return optuna.load_study(study_name=study_name, storage=storage)
    except KeyError:
        raise StudyError(f"no study named {study_name!r} in the storage") from None


def best_trial(study):
    """The best COMPLETE trial, or None when there is none yet."""
    try:
        return study.best_trial
    except ValueError:
        return None
