"""What a start can know before any trial runs, checked before anything is written.

A start where no trial can succeed must not burn trials: `check_config`
resolves the base model (offline: from the local cache), every lm-eval task
name, and every data source down to its usable examples (read, filtered and
tokenized as a trial would, into the same cache, so the first trial pays
nothing for it); `check_study` compares the search space with the one the
existing study was searched with. Each failure is a `PreflightError` naming
the config key and the remedy, in one line.
"""

from __future__ import annotations

import dataclasses
import difflib
import logging
from pathlib import Path
from typing import Any, Optional

from sweep.config import SweepConfig, task_keys
from sweep.faults import SweepError
from sweep.gpus import GpuProfile
from trainer.units import GIB

log = logging.getLogger("sweep")

CPU_PARAMS_WARN = 1.5e9
"""Parameters above which the cpu profile is far too slow for a trial (hours per hundred steps)."""


class PreflightError(SweepError):
    """A start that cannot succeed: the message names the config key, what is wrong and what to do."""


def check_config(config: SweepConfig, profile: Optional[GpuProfile] = None) -> None:
    """The model, the tasks and the data of `config`, checked as the trials would use them.

    Raises:
        PreflightError: the first check that fails.
    """
    check_compat()
    check_tasks(config)  # names only: no hub needed
    offline_if_hub_unreachable(config)
    model_config = check_model(config)
    if profile is not None and model_config is not None:
        warn_model_size(config, profile, model_config)
    check_data(config)


def check_compat() -> None:
    """The hooks into third-party internals (`trainer.compat`, `evaluator.compat`, `sweep.compat`) at the
    installed versions: one outside its checked range warns (the stock path runs instead), or, where there is no
    stock path, stops the start before anything is written."""
    from evaluator import compat as evaluator_compat
    from sweep import compat as sweep_compat
    from trainer import compat as trainer_compat

    hooks = [*trainer_compat.HOOKS, *evaluator_compat.HOOKS, *sweep_compat.HOOKS]
    warnings, errors = trainer_compat.problems(hooks)
    for warning in dict.fromkeys(warnings):
        log.warning("%s", warning)
    if errors:
        raise PreflightError(errors[0])


# --- the hub ----------------------------------------------------------------


def offline_if_hub_unreachable(config: SweepConfig, timeout_s: float = 3.0) -> bool:
    """Turns this start offline (the cache only, for the driver and its workers) when the hub is out of reach.

    Without it each model and dataset load retries the hub for about 25 s
    before falling back to the cache. Returns whether the start is offline.
    """
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        return True
    if not needs_hub(config) or _proxied():
        return False
    import socket
    from urllib.parse import urlparse

    endpoint = urlparse(constants.ENDPOINT)
    port = endpoint.port or (443 if endpoint.scheme == "https" else 80)
    try:
        socket.create_connection((endpoint.hostname, port), timeout=timeout_s).close()
        return False
    except OSError as e:
        log.warning("The hub (%s) is out of reach (%s): this start runs from the local cache only",
                    endpoint.hostname, e.strerror or type(e).__name__)
    set_offline()
    return True


def needs_hub(config: SweepConfig) -> bool:
    """Whether anything of `config` may come from the hub: the model, a dataset or an lm-eval task's data."""
    from trainer.demo_base import DEMO_MODEL_ID

    name = config.model.name_or_path
    return (
        (name != DEMO_MODEL_ID and not _looks_like_path(name))
        or any(s.kind == "hub" for s in config.data.sources)
        or any(not t.is_local for t in config.evaluator.all_tasks())
    )


def _proxied() -> bool:
    import os

    return any(os.environ.get(k) for k in ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "ALL_PROXY"))


def set_offline() -> None:
    """The hub's offline mode for this process (already imported libraries included) and the workers it starts."""
    import os
    import sys

    from huggingface_hub import constants

    for name in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
        os.environ[name] = "1"
    constants.HF_HUB_OFFLINE = True
    if "datasets" in sys.modules:
        import datasets

        datasets.config.HF_HUB_OFFLINE = datasets.config.HF_DATASETS_OFFLINE = True


# --- the base model ---------------------------------------------------------


def check_model(config: SweepConfig):
    """The base model's transformers config; None for the demo base (built locally, on first use, by a worker).

    A hub id resolves from the local cache when offline (HF_HUB_OFFLINE=1) or
    the hub is out of reach, else from the hub; a local path must be a model
    directory.
    """
    from trainer.demo_base import DEMO_MODEL_ID, resolve_model_path

    model = config.model
    name = model.name_or_path
    key = "model.name_or_path"
    if name == DEMO_MODEL_ID:
        return None  # built locally from fixed seeds on first use: always there
    if _looks_like_path(name):
        path = Path(name).expanduser()
        if not path.exists():
            raise PreflightError(f"{key}: no model directory at {path}")
        if not path.is_dir() or not (path / "config.json").is_file():
            raise PreflightError(f"{key}: {path} is not a model directory (it has no config.json)")
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(
            resolve_model_path(name), revision=model.revision, trust_remote_code=model.trust_remote_code
        )
    except Exception as e:  # noqa: BLE001 - every way a model can be out of reach ends the start the same way
        raise PreflightError(f"{key}: {_model_problem(name, model.revision, e)}") from None


def _looks_like_path(name: str) -> bool:
    return name.startswith(("/", ".", "~")) or name.count("/") > 1 or Path(name).expanduser().exists()


def _model_problem(name: str, revision: Optional[str], error: Exception) -> str:
    from huggingface_hub import constants
    from huggingface_hub.errors import GatedRepoError, HFValidationError, RepositoryNotFoundError, RevisionNotFoundError

    chain = [error, error.__cause__, error.__context__]
    text = " ".join(str(error).split())
    if any(isinstance(e, GatedRepoError) for e in chain):
        return f"{name} is gated on the hub: accept its licence there and log in (`hf auth login`)"
    if any(isinstance(e, RevisionNotFoundError) for e in chain):
        return f"{name} has no revision {revision!r} on the hub"
    if any(isinstance(e, RepositoryNotFoundError) for e in chain):
        return f"no model {name} on the hub (or it is private: log in with `hf auth login`)"
    if any(isinstance(e, HFValidationError) for e in chain):
        return f"{name} is neither a model directory nor a hub model id"
    if constants.HF_HUB_OFFLINE or "offline" in text.lower() or "couldn't connect" in text.lower():
        return (f"{name} is not in the local Hugging Face cache and the hub cannot be reached"
                ": download it first "
                f"(`hf download {name}`) or give a local model directory")
    if "trust_remote_code" in text:
        return f"{name} needs its own code from the hub: set model.trust_remote_code: true if you trust it"
    return f"cannot load {name}'s config ({text[:300]})"


def parameter_count(model_config) -> Optional[int]:
    """Parameters of the model `model_config` describes, counted on the meta device (no memory used)."""
    import torch
    from transformers import AutoModelForCausalLM

    try:
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(model_config)
    except Exception:  # noqa: BLE001 - an architecture we cannot build here: no estimate, no warning
        return None
    return sum(p.numel() for p in model.parameters())


def warn_model_size(config: SweepConfig, profile: GpuProfile, model_config) -> None:
    """One warning line when the model is far too large for the profile chosen."""
    from trainer.demo_base import DEMO_MODEL_ID

    name = config.model.name_or_path
    if name == DEMO_MODEL_ID:
        return  # tiny, and built for the cpu profile
    count = parameter_count(model_config)
    if count is None:
        return
    if not profile.uses_gpu and count > CPU_PARAMS_WARN:
        log.warning("Model %s has %.1fB parameters: on the cpu profile a trial takes hours to days; "
                    "run on a GPU with --gpu (a100, h100, ...)", name, count / 1e9)
    elif profile.memory_cap_gib is not None:
        form = min(base_formats(config), key=BYTES_PER_PARAMETER.__getitem__)  # the smallest the space allows
        weights_gib = count * BYTES_PER_PARAMETER[form] / GIB
        if weights_gib > profile.memory_cap_gib:
            log.warning("Model %s has %.1fB parameters: its %s weights alone (about %.0f GiB) exceed the "
                        "%s profile's %.0f GiB", name, count / 1e9, form, weights_gib, profile.name,
                        profile.memory_cap_gib)


BYTES_PER_PARAMETER = {"nf4": 0.56, "fp4": 0.56, "int8": 1.06, "16-bit": 2.0}
"""A base's weights in memory, per parameter: the quantized linear layers with their quantization constants,
and the rest (embeddings, norms) in 16 bits."""


def base_formats(config: SweepConfig) -> set[str]:
    """Every base format (`trainer.model.base_format`) a trial of the config may train on: the config's, and
    those its search space's `trainer.mode` and `model.quant_type` choices give."""
    from trainer.model import base_format

    space = config.search_space
    modes = space["trainer.mode"].choices if "trainer.mode" in space else [config.trainer.mode]
    quants = space["model.quant_type"].choices if "model.quant_type" in space else [config.model.quant_type]
    return {base_format(dataclasses.replace(config.model, quant_type=q), m) for m in modes for q in quants}


# --- the tasks --------------------------------------------------------------


def check_tasks(config: SweepConfig) -> None:
    """Every lm-eval task name that is not a local task resolves in lm-eval's index (or the shipped tasks)."""
    from evaluator.harness import task_manager

    named = [(key, t) for key, t in task_keys(config.evaluator) if not t.is_local]
    if not named:
        return
    manager = task_manager([t for _, t in named], None)
    known = set(manager.all_tasks)
    for key, task in named:
        if task.name not in known:
            close = difflib.get_close_matches(task.name, sorted(known), n=3)
            hint = f" (did you mean {', '.join(close)}?)" if close else " (`lm-eval ls tasks` lists them)"
            raise PreflightError(f"evaluator.{key}.name: no lm-eval task named {task.name!r}{hint}")


# --- the data ---------------------------------------------------------------


def check_data(config: SweepConfig) -> None:
    """Every source a trial may draw from that is read (a file, a hub dataset) reads, and leaves usable examples
    after filtering."""
    from trainer.data import tokenize_sources
    from trainer.model import load_tokenizer

    # The generated sources (the demo's digit task) always have rows; what is read from files or the hub
    # may have none that a trial can use.
    read = [(i, s) for i, s in enumerate(config.data.sources) if s.kind != "synthetic"]
    if not read:
        return
    data = dataclasses.replace(config.data, sources=[s for _, s in read])
    tokenizer = load_tokenizer(config.model)
    sources = iter(tokenize_sources(tokenizer, data))
    for i, source in read:
        key = f"data.sources.{i} ({source.name})"
        try:
            tokenized, _ = next(sources)
        except StopIteration:
            break
        except Exception as e:  # noqa: BLE001 - a file that does not parse, a dataset out of reach
            raise PreflightError(f"{key}: {_source_problem(source, e)}") from None
        if len(tokenized) == 0 and _may_weigh(config, source.name):
            skipped = ", ".join(f"{n} {reason}" for reason, n in sorted(tokenized.skipped.items()))
            where = source.path or source.dataset or "the generated task"
            raise PreflightError(
                f"{key}: no usable example in {where}"
                + (f" (skipped: {skipped})" if skipped else " (no rows)")
                + ("; raise data.max_seq_length or set data.overlong: truncate"
                   if "overlong" in tokenized.skipped else "")
            )


def _may_weigh(config: SweepConfig, name: str) -> bool:
    """Whether some trial may draw examples from source `name` (a weight above 0, fixed or searched)."""
    space = config.search_space.get(f"data.mix.{name}")
    if space is not None:
        values = space.choices if space.type == "categorical" else [space.high]
        return any(float(v) > 0 for v in values)
    return config.data.mix.get(name, 1.0) > 0


def _source_problem(source, error: Exception) -> str:
    text = " ".join(str(error).split())
    if source.kind == "hub":
        return f"cannot load dataset {source.dataset} ({type(error).__name__}: {text[:300]})"
    if isinstance(error, OSError):
        return f"cannot read {source.path} ({error.strerror or text})"
    return text[:400]


# --- the study --------------------------------------------------------------


def check_study(config: SweepConfig, storage_url: str, study_name: str) -> None:
    """No live start runs the study, and its direction and searched distributions fit the config.

    Read only: nothing is created or written.

    Optuna cannot change a searched parameter's kind, log scale or categorical
    choices within a study: every trial would fail with "CategoricalDistribution
    does not support dynamic value space".
    """
    import optuna
    from sqlalchemy import inspect

    from sweep.lease import DriverLease
    from sweep.space import distribution
    from sweep.store import Store, sqlite_file
    from sweep.study import make_storage

    path = sqlite_file(storage_url)
    if path is not None and (not Path(path).is_file() or Path(path).stat().st_size == 0):
        return  # a new database: no study yet
    store = Store(storage_url, create=False, read_only=True)
    try:
        DriverLease.check_free(store, study_name)  # a study another start runs is refused at once
        if not inspect(store.engine).has_table("studies"):
            return  # a database without Optuna's tables yet
    finally:
        store.engine.dispose()
    storage = make_storage(storage_url, read_only=True)
    try:
        study = optuna.load_study(study_name=study_name, storage=storage)
    except KeyError:
        return
    direction = study.direction.name.lower()
    if direction != config.study.direction:
        raise PreflightError(
            f"study.direction: study {study_name!r} exists with direction {direction}; the config says "
            f"{config.study.direction} (start a new study with --study NAME)"
        )
    searched: dict[str, Any] = {}
    for trial in study.get_trials(deepcopy=False):
        searched.update(trial.distributions)  # the latest trial's distribution of each parameter
    for name, space in config.search_space.items():
        old = searched.get(name)
        if old is None:
            continue
        new = distribution(space)
        try:
            optuna.distributions.check_distribution_compatibility(old, new)
        except ValueError:
            raise PreflightError(
                f"search_space.{name}: study {study_name!r} searched it as {_describe(old)}; the config says "
                f"{_describe(new)}, which Optuna cannot change within a study: start a new study "
                f"(--study NAME) or keep {_describe(old)}"
            ) from None


def _describe(dist) -> str:
    import optuna

    if isinstance(dist, optuna.distributions.CategoricalDistribution):
        return f"choices {list(dist.choices)}"
    kind = "int" if isinstance(dist, optuna.distributions.IntDistribution) else "float"
    scale = ", log scale" if dist.log else ""
    step = f", step {dist.step:g}" if dist.step not in (None, 1) else ""
    return f"{kind} in [{dist.low:g}, {dist.high:g}]{scale}{step}"
