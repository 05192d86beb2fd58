"""Every reach of the trainer into a third party's private internals, each checked against the versions it was
written for.

A hook names the library it reaches into and the releases it was checked against (the same range as
pyproject's bound). Outside that range a hook with a stock path warns once and the caller takes the stock
path; a hook without one raises `CompatError` (one line), which `sweep start` checks before any trial runs
(`problems`). The evaluator's and the orchestrator's hooks are in `evaluator/compat.py` and `sweep/compat.py`;
the version checking here is shared by all three.

Tests (and a user trying a newer release on purpose) can treat a library as out of range with the environment
variable `SWEEP_COMPAT_UNCHECKED` (a comma-separated list of distribution names, e.g. `lm-eval`): it reaches
Ray workers, which inherit the driver's environment.
"""

from __future__ import annotations

import functools
import importlib.metadata
import logging
import os
from dataclasses import dataclass

from packaging.specifiers import SpecifierSet
from packaging.version import Version

log = logging.getLogger(__name__)

UNCHECKED_ENV = "SWEEP_COMPAT_UNCHECKED"


class CompatError(RuntimeError):
    """A hook with no stock path found its library outside the versions it was checked against."""


@dataclass(frozen=True)
class Hook:
    """One reach into a library's internals."""

    name: str
    """What the hook does, as a warning or an error names it."""
    library: str
    """The distribution it reaches into (as pip names it)."""
    checked: str
    """The releases it was checked against: a version specifier, pyproject's bound for the library."""
    stock: str | None
    """What runs instead outside that range; None: nothing can, and the hook raises `CompatError`."""

    def active(self) -> bool:
        """Whether the hook may run: its library is installed at a checked version. Outside that range, a hook
        with a stock path warns (once a process) and returns False; one without raises `CompatError`."""
        if in_range(self.library, self.checked):
            return True
        message = self.problem()
        if self.stock is None:
            raise CompatError(message)
        _warn_once(message)
        return False

    def require(self) -> None:
        """Raises `CompatError` unless the hook may run (for hooks without a stock path)."""
        if not self.active():
            raise CompatError(self.problem())

    def problem(self) -> str:
        """The one line said of this hook outside its range (whether or not it is)."""
        found = installed_version(self.library) or "not installed"
        then = f"using {self.stock} instead" if self.stock else "it has no stock path, so nothing can run"
        return (f"{self.name} reaches into {self.library}'s internals and was checked against {self.library}"
                f"{self.checked}, but {found} is installed: {then} (install a checked release)")


@functools.lru_cache(maxsize=None)
def installed_version(library: str) -> str | None:
    try:
        return importlib.metadata.version(library)
    except importlib.metadata.PackageNotFoundError:
        return None


def in_range(library: str, checked: str) -> bool:
    """Whether `library` is installed at a version in `checked`, and not listed in `SWEEP_COMPAT_UNCHECKED`.

    Hooks ask on hot paths (every 4-bit layer a dense copy dequantizes, every generation batch): the answer is
    kept per library, range and value of the environment variable.
    """
    return _in_range(library, checked, os.environ.get(UNCHECKED_ENV, ""))


@functools.lru_cache(maxsize=None)
def _in_range(library: str, checked: str, unchecked: str) -> bool:
    if library.lower() in {name.strip().lower() for name in unchecked.split(",")}:
        return False
    found = installed_version(library)
    return found is not None and SpecifierSet(checked).contains(Version(found), prereleases=True)


@functools.lru_cache(maxsize=None)
def _warn_once(message: str) -> None:
    log.warning(message)


def problems(hooks: list[Hook]) -> tuple[list[str], list[str]]:
    """(warnings, errors) of `hooks` at the installed versions: a hook out of range with a stock path warns;
    one without is an error."""
    warnings, errors = [], []
    for hook in hooks:
        if not in_range(hook.library, hook.checked):
            (errors if hook.stock is None else warnings).append(hook.problem())
    return warnings, errors


TRANSFORMERS = ">=5.0,<5.25"
BITSANDBYTES = ">=0.49,<0.51"
DATASETS = ">=3.0,<5.3"
"""The checked ranges: pyproject's bounds (a test keeps them equal)."""

BNB_CPU_LAYOUT = Hook(
    "restoring bitsandbytes' standard 4-bit layout after its CPU inference repacking",
    "bitsandbytes", BITSANDBYTES, stock=None,
)


def unpack_cpu_4bit(data, quant_state):
    """A 4-bit weight bitsandbytes repacked for CPU inference (`packing_format_for_cpu`) back in its standard
    layout: (data, quant_state). bitsandbytes does the same before it moves or saves a layer, through a
    private function; no public one exists."""
    BNB_CPU_LAYOUT.require()
    from bitsandbytes.functional import _convert_weight_packed_for_cpu_inverse

    return _convert_weight_packed_for_cpu_inverse(data, quant_state)


LAYER_CHECKPOINTING = Hook(
    "checkpointing only the decoder layers the memory planner picks (GradientCheckpointingLayer's per-layer flag)",
    "transformers", TRANSFORMERS,
    stock="checkpointing every decoder layer (gradient_checkpointing_enable): the planner's partial checkpointing "
          "is off, which recomputes more and keeps less",
)


def checkpoint_layers(causal_lm, layers: list, count: int) -> int:
    """Gradient checkpointing of the first `count` of `layers` (the decoder layers of the transformers model
    `causal_lm`), off with 0; returns how many are checkpointed.

    transformers' public switch checkpoints every layer; checkpointing only some (the planner's choice: as few as
    the memory cap allows) sets the per-layer flag it leaves for its own use. Where that flag is out of reach
    every layer is checkpointed: a peak below the plan's, so the run still fits the cap.
    """
    if count <= 0:
        if _any_checkpointed(layers):
            causal_lm.gradient_checkpointing_disable()
        return 0
    causal_lm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if count >= len(layers) or not LAYER_CHECKPOINTING.active():
        return len(layers)
    for i, layer in enumerate(layers):
        layer.gradient_checkpointing = i < count
    return count


def _any_checkpointed(layers: list) -> bool:
    """Whether a layer is checkpointed (reading the same flag); outside the checked range, assumed: turning off
    what is off is harmless, leaving checkpointing on is not."""
    if not in_range(LAYER_CHECKPOINTING.library, LAYER_CHECKPOINTING.checked):
        return True
    return any(getattr(layer, "gradient_checkpointing", False) for layer in layers)


ATTENTION_NAME = Hook(
    "reading a model's attention kernel (config._attn_implementation)",
    "transformers", TRANSFORMERS,
    stock="an unknown kernel: packed rows are padded to pack_length as flex-attention needs, and a kernel is set "
          "again at each switch",
)


def attention_of(causal_lm) -> str | None:
    """The attention kernel a transformers model runs (`sdpa`, `flex_attention`, ...), as it was loaded or last
    set; None where it cannot be read. transformers has a public setter (`set_attn_implementation`) but keeps the
    current choice in a private config attribute."""
    if not ATTENTION_NAME.active():
        return None
    return getattr(causal_lm.config, "_attn_implementation", None)


ADAPTER_FLAG = Hook(
    "clearing transformers' adapter flag (_hf_peft_config_loaded) from a base whose adapter was removed",
    "transformers", TRANSFORMERS,
    stock="leaving the flag, which only transformers' own adapter loading sets (sweep attaches adapters with peft)",
)


def clear_adapter_flag(base) -> None:
    """Removes the flag transformers sets on a model it loaded an adapter into, so that a base kept across
    trials reads as bare; a flag on the class (its default) stays."""
    flag = "_hf_peft_config_loaded"
    if flag in vars(base) and ADAPTER_FLAG.active():
        delattr(base, flag)


DATASET_FINGERPRINT = Hook(
    "reading a dataset's content hash (Dataset._fingerprint)",
    "datasets", DATASETS,
    stock="a hash of the dataset's cache files (names, sizes, modification times), row count and features",
)


def dataset_fingerprint(dataset) -> str:
    """What identifies the content of a `datasets.Dataset` (as `load_dataset` returns it), for cache keys.

    datasets' own content hash is a private attribute; the stock path (`stock_dataset_fingerprint`) may miss
    where it would hit, never the reverse.
    """
    if DATASET_FINGERPRINT.active():
        return dataset._fingerprint
    return stock_dataset_fingerprint(dataset)


def stock_dataset_fingerprint(dataset) -> str:
    """A hash of public facts that change whenever the content does: the Arrow files the dataset maps (their
    names, sizes and modification times; a new download rewrites them), its row count and features. A dataset held
    in memory, with no files, is hashed row by row."""
    import hashlib
    import json

    digest = hashlib.sha256(json.dumps(
        {"rows": dataset.num_rows, "features": dataset.features.to_dict()}, sort_keys=True, default=str
    ).encode())
    files = [entry["filename"] for entry in dataset.cache_files]
    for name in files:
        stat = os.stat(name)
        digest.update(f"\n{name}:{stat.st_size}:{stat.st_mtime_ns}".encode())
    if not files:
        for row in dataset:
            digest.update(json.dumps(row, sort_keys=True, default=str).encode())
    return digest.hexdigest()


HOOKS: list[Hook] = [BNB_CPU_LAYOUT, LAYER_CHECKPOINTING, ATTENTION_NAME, ADAPTER_FLAG, DATASET_FINGERPRINT]
"""Every hook of the trainer."""
