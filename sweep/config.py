"""The sweep's configuration: YAML files loaded into typed dataclasses, with dotted overrides.

A config file has the sections `study`, `model`, `data`, `trainer`,
`evaluator`, `search_space` and `orchestration`. Loading checks every key
against the dataclasses (unknown keys at any depth are errors), converts and
checks types, and runs each section's `validate()`. Every error is a
`ConfigError` naming the file and the dotted key.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any, Literal, Optional, Union

import yaml

from evaluator.config import EvalConfig, SuiteConfig, TaskConfig
from trainer.config import (
    MAX_ROW_TOKENS,
    DataConfig,
    LoraConfig,
    ModelConfig,
    SourceConfig,
    TrainConfig,
    check_step_tokens,
    doc,
)

DEMO_CONFIG_NAME = "demo.yaml"


class ConfigError(ValueError):
    """An invalid config; the message names the file and the key."""


STUDY_NAME_MAX_CHARS = 128


def study_name_problem(name: str) -> Optional[str]:
    """Why `name` cannot name a study, or None.

    A study name is data, never a path: it names the study's directory under
    `orchestration.artifacts_dir`, so it may not hold a path separator, be `..`,
    start with a dot or hold control characters.
    """
    if not name or not name.strip():
        return "must be a non-empty name"
    if name != name.strip():
        return f"must not start or end with white space, got {name!r}"
    if len(name) > STUDY_NAME_MAX_CHARS:
        return f"must be at most {STUDY_NAME_MAX_CHARS} characters, got {len(name)}"
    if "/" in name or "\\" in name:
        return f"must not contain a path separator (a study name is not a path), got {name!r}"
    if name.startswith("."):
        return f"must not start with a dot, got {name!r}"
    if any(ord(c) < 32 or ord(c) == 127 for c in name):
        return f"must not contain control characters, got {name!r}"
    return None


@dataclass(frozen=True)
class StudyConfig:
    """The Optuna study that holds the trials."""

    name: str = doc("Study name in the storage; `sweep start` on an existing name adds trials to it.")
    direction: Literal["maximize", "minimize"] = doc("Whether a higher objective is better.", default="maximize")
    n_trials: int = doc("Trials to run per `sweep start` (overridden by --trials).", default=10)
    seed: int = doc("Seeds the sampler and, with the trial number, each trial's training.", default=0)
    trial_seed: Optional[int] = doc(
        "Seeds every trial's training with this value instead (the `config.yaml` of an export sets it, to train "
        "the exported trial again); null: derived from `seed` and the trial number.",
        default=None,
    )
    sampler: Literal["tpe", "random"] = doc("Optuna sampler.", default="tpe")
    sampler_startup_trials: int = doc(
        "tpe: trials sampled at random before TPE models the space (Optuna's default, 10); a study of a few "
        "dozen trials leaves TPE more of them with fewer.",
        default=10,
    )
    full_run_hours_limit: float = doc(
        "A trial whose full run (the whole mix, all epochs) is projected to take longer on the target GPU "
        "is infeasible (an Optuna constraint); the challenge allows 24 hours.",
        default=24.0,
    )
    pruner: Literal["successive_halving", "hyperband", "median", "none"] = doc(
        "Optuna pruner that stops weak trials at their rungs (rebuilt from the config at every start: "
        "Optuna does not store it).",
        default="successive_halving",
    )
    rungs: list[float] = doc(
        "Fractions of a trial's planned steps at which it runs a quick eval, reports (step, value) and may be "
        "pruned.",
        default_factory=lambda: [0.25, 0.5],
    )
    rung_eval_docs: int = doc(
        "A rung's quick eval: the objective suite with each task limited to its first N documents.", default=32
    )
    reduction_factor: int = doc(
        "successive_halving and hyperband: 1 in this many trials goes on at each rung; rungs at the same "
        "ratio (e.g. 0.25, 0.5 with 2) line the pruner's rungs up with the reports.",
        default=2,
    )
    pruner_startup_trials: int = doc("median: trials that run to the end before any is pruned.", default=2)

    def validate(self) -> None:
        problem = study_name_problem(self.name)
        if problem:
            raise ValueError(f"name: {problem}")
        for i, f in enumerate(self.rungs):
            if not 0 < f < 1:
                raise ValueError(f"rungs.{i}: must be a fraction in (0, 1), got {f}")
        if self.rung_eval_docs < 1:
            raise ValueError(f"rung_eval_docs: must be >= 1, got {self.rung_eval_docs}")
        if self.reduction_factor < 2:
            raise ValueError(f"reduction_factor: must be >= 2, got {self.reduction_factor}")
        if self.pruner_startup_trials < 0:
            raise ValueError(f"pruner_startup_trials: must be >= 0, got {self.pruner_startup_trials}")
        if self.sampler_startup_trials < 0:
            raise ValueError(f"sampler_startup_trials: must be >= 0, got {self.sampler_startup_trials}")
        if self.n_trials < 1:
            raise ValueError(f"n_trials: must be >= 1, got {self.n_trials}")
        if not self.full_run_hours_limit > 0:
            raise ValueError(f"full_run_hours_limit: must be > 0, got {self.full_run_hours_limit}")


@dataclass(frozen=True)
class ParamSpace:
    """The range of one searched parameter."""

    type: Literal["float", "int", "categorical"] = doc("Kind of parameter.")
    low: Optional[float] = doc("Lower bound (float, int).", default=None)
    high: Optional[float] = doc("Upper bound (float, int).", default=None)
    log: bool = doc("Sample on a log scale (float, int).", default=False)
    step: Optional[float] = doc("Step between values (float, int); null for continuous floats.", default=None)
    choices: Optional[list[Any]] = doc("Values to choose from (categorical).", default=None)

    def validate(self) -> None:
        if self.type == "categorical":
            if not self.choices:
                raise ValueError("choices: a categorical parameter needs a non-empty list of choices")
            return
        if self.low is None or self.high is None:
            raise ValueError(f"low: a {self.type} parameter needs low and high")
        if self.low > self.high:
            raise ValueError(f"low: must be <= high, got low={self.low} high={self.high}")
        if self.log and self.low <= 0:
            raise ValueError(f"low: must be > 0 on a log scale, got {self.low}")


@dataclass(frozen=True)
class OrchestrationConfig:
    """Where and how trials run."""

    artifacts_dir: str = doc(
        "Directory for adapters, generated eval data and task files; relative to the working directory.",
        default="sweep-runs",
    )
    ray_address: Optional[str] = doc(
        "Ray cluster to join (`auto`, `ray://host:10001`); null starts a local Ray.", default=None
    )
    cpus_per_trial: Optional[int] = doc(
        "CPU cores (and torch threads) per trial; null: the cores split between the slots on the cpu profile, "
        "4 on a GPU.",
        default=None,
    )
    concurrency: Optional[int] = doc(
        "Trials in flight at once (slots; --concurrency); null: every GPU of the Ray cluster on a GPU profile, "
        "1 on cpu.",
        default=None,
    )
    resident_base: bool = doc(
        "Each slot keeps the 4-bit base loaded across trials and swaps only the adapter; false: a fresh load "
        "per trial.",
        default=True,
    )
    memory_growth_margin_gib: float = doc(
        "A slot whose memory (GPU: torch's allocation; CPU: the process's resident set) grew more than this "
        "since its first trial is replaced by a fresh one.",
        default=1.0,
    )
    heartbeat_seconds: int = doc(
        "The driver records a heartbeat for each running trial this often; a RUNNING trial without one for "
        "3 intervals is stale (its driver died) and fails on the next start.",
        default=10,
    )
    max_retries: int = doc("Times the parameters of a stale trial are run again.", default=2)
    max_consecutive_failures: int = doc(
        "A start stops starting trials (and exits non-zero) once this many trials in a row failed for the "
        "same reason; 0: never.",
        default=3,
    )
    budget_hours: Optional[float] = doc(
        "Slot-hours (GPU-hours on a GPU profile) a `sweep start` may use (--budget-hours): no trial starts "
        "that would not fit, from the durations of finished ones; null: no budget.",
        default=None,
    )
    timeout_seconds: Optional[float] = doc(
        "Wall-clock seconds a `sweep start` may run (--timeout), trials started within it finishing; "
        "null: no limit.",
        default=None,
    )
    trial_timeout_minutes: Optional[float] = doc(
        "A trial running longer than this is cancelled and stored FAIL; null: no limit.", default=None
    )
    gpu_memory_cap_gib: Optional[float] = doc(
        "GPU memory a trial may use, below the profile's cap (e.g. a card shared with a server); "
        "null: the profile's cap.",
        default=None,
    )
    cpu_memory_limit_gib: Optional[float] = doc(
        "Host memory (the resident set a slot's process holds on its own) a trial or the baseline may use, on "
        "every profile: past it the slot is ended and the trial stored FAIL with reason `out of memory: ...`; "
        "null: the slot's share, 90% of the memory available when the start begins (MemAvailable) divided by the "
        "slots (on a Ray cluster of several hosts, no limit unless set).",
        default=None,
    )

    tracking: list[str] = doc(
        "Experiment trackers each trial is logged to, as a run grouped by study: `wandb` (offline without "
        "credentials or network; files under the artifacts directory) and/or `tensorboard`; [] : none.",
        default_factory=list,
    )

    def validate(self) -> None:
        unknown = [t for t in self.tracking if t not in ("wandb", "tensorboard")]
        if unknown:
            raise ValueError(f"tracking: unknown tracker {unknown[0]!r} (expected wandb or tensorboard)")
        if len(set(self.tracking)) != len(self.tracking):
            raise ValueError(f"tracking: a tracker is named twice in {self.tracking}")
        for name in ("concurrency", "budget_hours", "timeout_seconds", "heartbeat_seconds"):
            value = getattr(self, name)
            if value is not None and value <= 0:
                raise ValueError(f"{name}: must be > 0, got {value}")
        if self.memory_growth_margin_gib <= 0:
            raise ValueError(f"memory_growth_margin_gib: must be > 0, got {self.memory_growth_margin_gib}")
        if self.max_retries < 0:
            raise ValueError(f"max_retries: must be >= 0, got {self.max_retries}")
        if self.max_consecutive_failures < 0:
            raise ValueError(f"max_consecutive_failures: must be >= 0, got {self.max_consecutive_failures}")
        if self.cpus_per_trial is not None and self.cpus_per_trial < 1:
            raise ValueError(f"cpus_per_trial: must be >= 1, got {self.cpus_per_trial}")
        if self.trial_timeout_minutes is not None and self.trial_timeout_minutes <= 0:
            raise ValueError(f"trial_timeout_minutes: must be > 0, got {self.trial_timeout_minutes}")
        if self.gpu_memory_cap_gib is not None and self.gpu_memory_cap_gib <= 0:
            raise ValueError(f"gpu_memory_cap_gib: must be > 0, got {self.gpu_memory_cap_gib}")
        if self.cpu_memory_limit_gib is not None and not self.cpu_memory_limit_gib > 0:
            raise ValueError(f"cpu_memory_limit_gib: must be > 0, got {self.cpu_memory_limit_gib}")


@dataclass(frozen=True)
class SweepConfig:
    """A whole sweep: the study, the model and data, training, scoring and the search space."""

    study: StudyConfig = doc("The Optuna study.")
    model: ModelConfig = doc("The base model.")
    data: DataConfig = doc("Training data.")
    evaluator: EvalConfig = doc("Scoring.")
    trainer: TrainConfig = doc(
        "Training settings (the searched ones are overridden per trial).", default_factory=TrainConfig
    )
    search_space: dict[str, ParamSpace] = doc(
        "Searched parameters, keyed by the dotted path of the setting they replace "
        "(e.g. trainer.learning_rate, trainer.lora.r, data.mix.dolly, data.num_examples).",
        default_factory=dict,
    )
    orchestration: OrchestrationConfig = doc("Where and how trials run.", default_factory=OrchestrationConfig)
    enqueue: list[dict[str, Any]] = doc(
        "Parameter sets the study runs first, in order (Optuna's `enqueue_trial`): each maps search-space keys "
        "to values within their ranges; keys left out are sampled. A known recipe's settings, say. Enqueued "
        "once: a set the study already ran or holds waiting is not added again.",
        default_factory=list,
    )

    def validate(self) -> None:
        sources = {s.name: s for s in self.data.sources}
        for key, task in task_keys(self.evaluator):
            if task.source is not None:
                src = sources.get(task.source)
                if src is None:
                    raise ValueError(f"evaluator.{key}.source: no data source named {task.source!r}")
                if src.kind != "synthetic":
                    raise ValueError(
                        f"evaluator.{key}.source: source {task.source!r} ({src.kind}) has no held-out split"
                    )
                if src.num_eval < 1:
                    raise ValueError(f"evaluator.{key}.source: source {task.source!r} has num_eval 0 (no held-out "
                                     "documents to score)")
            shape = sources[task.source].generator if task.source is not None else task.generator
            if shape is not None:
                from evaluator.micro import METRICS

                reported = METRICS.get(shape, "acc")  # the digit task is two-choice: acc
                if task.metric != reported:
                    raise ValueError(
                        f"evaluator.{key}.metric: a {shape} task reports {reported!r}, got {task.metric!r}"
                    )
        if self.trainer.packing and self.trainer.pack_length < self.data.max_seq_length:
            raise ValueError(
                f"trainer.pack_length: must be >= data.max_seq_length ({self.data.max_seq_length}) when packing, "
                f"got {self.trainer.pack_length}"
            )
        for path, space in self.search_space.items():
            _check_searchable(self, path, space)
        _check_batch_tokens(self)
        for i, params in enumerate(self.enqueue):
            problem = enqueue_problem(params, self.search_space)
            if problem:
                raise ValueError(f"enqueue.{i}.{problem}")


def _check_batch_tokens(config: SweepConfig) -> None:
    """A padded micro-batch (micro_batch_size x max_seq_length) and an optimizer step stay within the token bounds,
    at the largest values the config and its search space allow (`_check_searchable` checks each searched value
    on its own; this checks them together)."""

    def largest(path: str) -> tuple[int, str]:
        space = config.search_space.get(path)
        if space is None:
            return int(get_path(config, path)), path
        return int(max(space.choices if space.type == "categorical" else [space.high])), f"search_space.{path}"

    packing = config.search_space.get("trainer.packing")
    packings = set(packing.choices) if packing is not None and packing.choices else {config.trainer.packing}
    accumulation, accumulation_key = largest("trainer.gradient_accumulation_steps")
    if False in packings:
        batch, batch_key = largest("trainer.micro_batch_size")
        length, length_key = largest("data.max_seq_length")
        if batch * length > MAX_ROW_TOKENS:
            raise ValueError(f"{batch_key}: must be <= {MAX_ROW_TOKENS // length} with {length_key} {length} "
                             f"(a padded micro-batch of at most {MAX_ROW_TOKENS} tokens), got {batch}")
        check_step_tokens(accumulation_key, accumulation, batch * length,
                          f"{batch_key} {batch} x {length_key} {length}")
    if True in packings:
        pack_length, pack_key = largest("trainer.pack_length")
        check_step_tokens(accumulation_key, accumulation, pack_length, f"{pack_key} {pack_length}")


def task_keys(config: EvalConfig):
    """(dotted key, task) of every task, as the user wrote it (tasks.N or suites.NAME.tasks.N)."""
    for i, task in enumerate(config.tasks):
        yield f"tasks.{i}", task
    for name, suite in config.suites.items():
        for i, task in enumerate(suite.tasks):
            yield f"suites.{name}.tasks.{i}", task


SEARCHABLE_SECTIONS = ("trainer", "data", "model")
SEARCHABLE_MODEL_KEYS = ("quant_type", "double_quant")
"""Of the model section, only how the base is quantized can be searched (one study, one base model)."""


def _check_searchable(config: SweepConfig, path: str, space: ParamSpace) -> None:
    key = f"search_space.{path}"
    section, _, rest = path.partition(".")
    if section not in SEARCHABLE_SECTIONS or not rest:
        raise ValueError(f"{key}: only trainer.*, data.* and model.quant_type / model.double_quant settings can "
                         "be searched")
    if section == "model" and rest not in SEARCHABLE_MODEL_KEYS:
        raise ValueError(f"{key}: of the model section only {', '.join(SEARCHABLE_MODEL_KEYS)} can be searched "
                         "(a study has one base model)")
    mix_source = rest.removeprefix("mix.") if rest.startswith("mix.") and section == "data" else None
    if mix_source is not None:
        if mix_source not in {s.name for s in config.data.sources}:
            raise ValueError(f"{key}: no data source named {mix_source!r}")
    else:
        try:
            current = get_path(config, path)
        except KeyError:
            raise ValueError(f"{key}: {path} is not a setting") from None
        if dataclasses.is_dataclass(current) or isinstance(current, (list, dict)):
            raise ValueError(f"{key}: {path} is a section, not a single setting")
    # Each sampled value must be a valid value of the setting it replaces.
    values = space.choices if space.type == "categorical" else [space.low, space.high]
    for value in values:
        try:
            override(getattr(config, section), {rest: value}, source="")
        except ConfigError as e:
            raise ValueError(f"{key}: value {value!r} is invalid for {path} ({e})") from None


def coerce_value(value: Any, space: ParamSpace) -> Any:
    """`value` as `space` holds it: a number written as a string (YAML 1.1 reads 5e-5 as one) as a float, an
    integral float of an int space as an int."""
    if space.type == "categorical":
        return value
    if isinstance(value, str):
        try:
            value = float(value)
        except ValueError:
            return value
    if space.type == "int" and isinstance(value, float) and value.is_integer():
        return int(value)
    return value


def value_problem(value: Any, space: ParamSpace) -> Optional[str]:
    """Why `value` is not one `space` can take (a choice, an integer or a number within its bounds), or None."""
    value = coerce_value(value, space)
    if space.type == "categorical":
        # 1 is the choice 1.0, but not True, nor "1"
        same_kind = (lambda c: type(value) is type(c) or (_is_number(value) and _is_number(c)))
        if not any(value == c and same_kind(c) for c in space.choices):
            return f"{value!r} is not one of the choices {space.choices}"
        return None
    if not _is_number(value):
        return f"{value!r} is not a number"
    if space.type == "int" and not float(value).is_integer():
        return f"{value!r} is not an integer"
    if not space.low <= value <= space.high:
        return f"{value!r} is outside [{space.low:g}, {space.high:g}]"
    return None


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def enqueue_problem(params: dict[str, Any], search_space: dict[str, ParamSpace]) -> Optional[str]:
    """Why a parameter set cannot be enqueued in a study of `search_space`, as `<key>: <why>`, or None."""
    for key, value in params.items():
        space = search_space.get(key)
        if space is None:
            return f"{key}: not a key of search_space (enqueued parameters are searched ones)"
        problem = value_problem(value, space)
        if problem:
            return f"{key}: {problem} of search_space.{key}"
    return None


def with_params(config: SweepConfig, params: dict[str, Any]) -> SweepConfig:
    """The config of one trial: the sampled values (dotted paths under trainer., data. and model.) in place."""
    sections: dict[str, dict[str, Any]] = {}
    for path, value in params.items():
        section, _, rest = path.partition(".")
        sections.setdefault(section, {})[rest] = value
    replaced = {
        name: override(getattr(config, name), values, source="trial params") for name, values in sections.items()
    }
    return dataclasses.replace(config, **replaced)


# --- loading ---------------------------------------------------------------


def demo_config_path() -> Path:
    """Path of the demo config shipped inside the package."""
    return Path(str(resources.files("sweep.configs").joinpath(DEMO_CONFIG_NAME)))


def suite_path(file: str, base: Path) -> Path:
    """A suite file: a bare name (`open`) is a suite shipped in configs/suites/, else a path from `base`."""
    if "/" not in file and not file.endswith((".yaml", ".yml")):
        return Path(str(resources.files("sweep.configs").joinpath("suites", f"{file}.yaml")))
    return (base / Path(file).expanduser()).resolve()


def _load_suites(config: SweepConfig, base: Path, source: str) -> SweepConfig:
    """Reads each suite given by `file` into its tasks (paths in a suite file are relative to it)."""
    suites = {}
    for name, suite in config.evaluator.suites.items():
        if suite.file is None:
            suites[name] = suite
            continue
        key = f"evaluator.suites.{name}.file"
        path = suite_path(suite.file, base)
        try:
            raw = yaml.safe_load(path.read_text())
        except OSError:
            raise ConfigError(f"{source}: {key}: no suite file {path}") from None
        except yaml.YAMLError as e:
            raise ConfigError(f"{path}: not valid YAML ({e})") from None
        if not isinstance(raw, dict) or not isinstance(raw.get("tasks"), list):
            raise ConfigError(f"{path}: expected a mapping with a `tasks` list")
        tasks = [from_dict(TaskConfig, t, source=str(path), prefix=f"tasks.{i}") for i, t in enumerate(raw["tasks"])]
        tasks = [dataclasses.replace(t, data_file=_absolute(t.data_file, path.parent)) for t in tasks]
        suites[name] = SuiteConfig(file=str(path), tasks=tasks)
    evaluator = dataclasses.replace(config.evaluator, suites=suites)
    resolved = dataclasses.replace(config, evaluator=evaluator)
    for section, obj in (("evaluator", evaluator), ("", resolved)):
        try:
            obj.validate()
        except ValueError as e:
            raise ConfigError(f"{source}: {_join(section, str(e))}") from None
    return resolved


def _absolute(p: Optional[str], base: Path) -> Optional[str]:
    return None if p is None else str((base / Path(p).expanduser()).resolve())


def _one_line(error: Exception) -> str:
    """A YAML error in one line: its problem and where (line and column, from 1)."""
    mark = getattr(error, "problem_mark", None)
    problem = getattr(error, "problem", None) or str(error)
    where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
    return " ".join(f"{problem}{where}".split())


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> SweepConfig:
    """Loads, overrides and validates a config; `path=None` loads the embedded demo config.

    Raises:
        ConfigError: the file is unreadable or invalid, or an override is.
    """
    path = Path(path) if path is not None else demo_config_path()
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except OSError as e:
        raise ConfigError(f"{path}: cannot read config ({e.strerror})") from None
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: not a text file (not UTF-8 at byte {e.start})") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML ({_one_line(e)})") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping of sections, got {type(raw).__name__}")
    for item in overrides or []:
        key, value = parse_override(item)
        _set_raw(raw, key, value, item)
    config = _resolve_paths(from_dict(SweepConfig, raw, source=str(path)), path.parent)
    config = _load_suites(config, path.parent, str(path))
    _check_files_exist(config, str(path))
    return config


def parse_override(item: str) -> tuple[str, Any]:
    """`key.path=value` -> (key.path, YAML-parsed value)."""
    key, sep, text = item.partition("=")
    key = key.strip()
    if not sep or not key or any(not part for part in key.split(".")):
        raise ConfigError(f"--set {item}: expected key.path=value")
    try:
        value = yaml.safe_load(text) if text.strip() else None
    except yaml.YAMLError:
        value = text
    return key, value


def _set_raw(raw: dict, key: str, value: Any, item: str) -> None:
    parts = _split_key(raw, key)
    node = raw
    for i, part in enumerate(parts[:-1]):
        if isinstance(node, list):
            if not part.isdigit() or int(part) >= len(node):
                raise ConfigError(f"--set {item}: {'.'.join(parts[: i + 1])}: no such list item")
            node = node[int(part)]
            continue
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        elif not isinstance(child, (dict, list)):
            raise ConfigError(f"--set {item}: {'.'.join(parts[: i + 1])} is a value, not a section")
        node = child
    last = parts[-1]
    if isinstance(node, list):
        if not last.isdigit() or int(last) >= len(node):
            raise ConfigError(f"--set {item}: {key}: no such list item")
        node[int(last)] = value
    else:
        node[last] = value


def _split_key(raw: dict, key: str) -> list[str]:
    """Splits a dotted key; search-space entries keep their dotted names whole.

    `search_space.trainer.lora.r.high` -> [search_space, trainer.lora.r, high].
    """
    parts = key.split(".")
    if parts[0] != "search_space" or len(parts) < 2:
        return parts
    space_fields = {f.name for f in dataclasses.fields(ParamSpace)}
    if len(parts) > 2 and parts[-1] in space_fields:
        return [parts[0], ".".join(parts[1:-1]), parts[-1]]
    return [parts[0], ".".join(parts[1:])]


def override(config, values: dict[str, Any], source: str = "override"):
    """A copy of `config` (a dataclass) with dotted-path settings replaced and re-validated."""
    raw = to_dict(config)
    for key, value in values.items():
        _set_raw(raw, key, value, f"{key}={value}")
    return from_dict(type(config), raw, source=source)


def get_path(obj, path: str):
    for part in path.split("."):
        if dataclasses.is_dataclass(obj) and part in {f.name for f in dataclasses.fields(obj)}:
            obj = getattr(obj, part)
        elif isinstance(obj, dict) and part in obj:
            obj = obj[part]
        else:
            raise KeyError(path)
    return obj


def to_dict(obj) -> Any:
    """Plain YAML-safe data of a config dataclass."""
    if dataclasses.is_dataclass(obj):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, dict):
        return {k: to_dict(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    return obj


def from_dict(cls, data: Any, source: str, prefix: str = ""):
    """Builds dataclass `cls` from plain data, checking keys, types and each `validate()`."""
    where = f"{source}: " if source else ""
    if not isinstance(data, dict):
        raise ConfigError(f"{where}{prefix or 'config'}: expected a mapping, got {_describe(data)}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = [k for k in data if k not in fields]
    if unknown:
        name = _join(prefix, str(unknown[0]))
        raise ConfigError(f"{where}{name}: unknown key (expected one of {', '.join(fields)})")
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for name, f in fields.items():
        key = _join(prefix, name)
        if name not in data:
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                raise ConfigError(f"{where}{key}: required key is missing")
            continue
        kwargs[name] = _convert(hints[name], data[name], source, key)
    obj = cls(**kwargs)
    try:
        obj.validate()
    except ValueError as e:
        if isinstance(e, ConfigError):
            raise
        raise ConfigError(f"{where}{_join(prefix, str(e))}") from None
    return obj


def _convert(tp, value, source: str, key: str):
    where = f"{source}: " if source else ""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in (a for a in args if a is not type(None)):
            try:
                return _convert(arg, value, source, key)
            except ConfigError as e:
                errors.append(e)
        raise errors[0]
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, value, source, key)
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"{where}{key}: expected one of {', '.join(map(str, args))}, got {value!r}")
        return value
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{where}{key}: expected a list, got {_describe(value)}")
        return [_convert(args[0], v, source, f"{key}.{i}") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}{key}: expected a mapping, got {_describe(value)}")
        return {str(k): _convert(args[1], v, source, f"{key}.{k}") for k, v in value.items()}
    if tp is Any:
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where}{key}: expected true or false, got {_describe(value)}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            if isinstance(value, float) and value.is_integer():
                return int(value)
            raise ConfigError(f"{where}{key}: expected an integer, got {_describe(value)}")
        return value
    if tp is float:
        if isinstance(value, str):
            try:  # YAML 1.1 reads 1e-4 (no dot) as a string
                return float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where}{key}: expected a number, got {_describe(value)}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where}{key}: expected a string, got {_describe(value)}")
        return value
    raise TypeError(f"unsupported config type {tp!r} at {key}")


def _resolve_paths(config: SweepConfig, base: Path) -> SweepConfig:
    """Makes file paths in the config absolute, relative to the config file's directory."""
    sources = [dataclasses.replace(s, path=_absolute(s.path, base)) for s in config.data.sources]
    tasks = [dataclasses.replace(t, data_file=_absolute(t.data_file, base)) for t in config.evaluator.tasks]
    suites = {
        name: dataclasses.replace(
            suite, tasks=[dataclasses.replace(t, data_file=_absolute(t.data_file, base)) for t in suite.tasks]
        )
        for name, suite in config.evaluator.suites.items()
    }
    return dataclasses.replace(
        config,
        data=dataclasses.replace(config.data, sources=sources),
        evaluator=dataclasses.replace(config.evaluator, tasks=tasks, suites=suites),
    )


def _check_files_exist(config: SweepConfig, source: str) -> None:
    for i, s in enumerate(config.data.sources):
        if s.path is not None and not Path(s.path).is_file():
            raise ConfigError(f"{source}: data.sources.{i}.path: no such file {s.path}")
    for key, t in task_keys(config.evaluator):
        if t.data_file is not None and not Path(t.data_file).is_file():
            raise ConfigError(f"{source}: evaluator.{key}.data_file: no such file {t.data_file}")


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def _describe(value) -> str:
    if value is None:
        return "null"
    return f"{value!r} ({type(value).__name__})"


__all__ = [
    "ConfigError",
    "DataConfig",
    "EvalConfig",
    "LoraConfig",
    "ModelConfig",
    "OrchestrationConfig",
    "ParamSpace",
    "SourceConfig",
    "StudyConfig",
    "SweepConfig",
    "TaskConfig",
    "TrainConfig",
    "load_config",
]


def reference_rows(cls=SweepConfig, prefix: str = "") -> list[tuple[str, str, str, str]]:
    """(key, type, default, meaning) of every config key, depth first, for the README."""
    rows = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        key = _join(prefix, f.name)
        tp = hints[f.name]
        inner = _dataclass_in(tp)
        if f.default is not dataclasses.MISSING:
            default = "null" if f.default is None else yaml.safe_dump(f.default, default_flow_style=True).strip()
            default = default.removesuffix("\n...").strip()
        elif f.default_factory is not dataclasses.MISSING and not dataclasses.is_dataclass(tp):
            value = f.default_factory()
            default = yaml.safe_dump(value, default_flow_style=True).strip() if value else "(empty)"
        elif dataclasses.is_dataclass(tp):
            default = "(section)"
        else:
            default = "required"
        rows.append((key, _type_name(tp), default, f.metadata.get("doc", "")))
        if inner is not None:
            suffix = {list: "[]", dict: ".<name>"}.get(typing.get_origin(tp), "")
            child_prefix = key + suffix
            rows.extend(reference_rows(inner, child_prefix))
    return rows


def reference_markdown() -> str:
    lines = ["| key | type | default | meaning |", "| --- | --- | --- | --- |"]
    for key, tp, default, meaning in reference_rows():
        lines.append(f"| `{key}` | {tp} | `{default}` | {meaning} |".replace("``", "`"))
    return "\n".join(lines)


def _dataclass_in(tp):
    if dataclasses.is_dataclass(tp):
        return tp
    for arg in typing.get_args(tp):
        if dataclasses.is_dataclass(arg):
            return arg
    return None


def _type_name(tp) -> str:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin is Literal:
        return " \\| ".join(map(str, args))
    if origin in (Union, types.UnionType):
        names = [_type_name(a) for a in args if a is not type(None)]
        return " \\| ".join(names) + (" \\| null" if type(None) in args else "")
    if origin is list:
        return f"list of {_type_name(args[0])}"
    if origin is dict:
        return f"map of {_type_name(args[1])}"
    if dataclasses.is_dataclass(tp):
        return "section"
    return getattr(tp, "__name__", str(tp))
