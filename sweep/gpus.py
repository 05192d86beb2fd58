"""GPU profiles: the card a sweep targets, and detection of the card that is there."""

from __future__ import annotations

import shutil
import subprocess
from dataclasses import dataclass
from typing import Optional


@dataclass(frozen=True)
class GpuProfile:
    """A target card: its usable memory and its dense bf16 peak."""

    name: str
    memory_cap_gib: Optional[float]
    """Memory a trial may use (what the card really offers); None for the CPU."""
    bf16_tflops: Optional[float]
    """Dense bf16 peak, for MFU."""
    match: tuple[str, ...] = ()
    """Substrings of the device name that identify the card."""
    min_memory_gib: float = 0.0

    @property
    def uses_gpu(self) -> bool:
        return self.name != "cpu"


PROFILES: dict[str, GpuProfile] = {
    p.name: p
    for p in (
        GpuProfile("cpu", None, None),
        GpuProfile("a100", 39.35, 312.0, ("A100",)),
        GpuProfile("a100-80gb", 79.15, 312.0, ("A100",), min_memory_gib=60.0),
        GpuProfile("4090", 23.55, 165.2, ("4090",)),
        GpuProfile("h100", 79.1, 989.0, ("H100",)),
        GpuProfile("h200", 139.8, 989.0, ("H200",)),
    )
}


class GpuError(RuntimeError):
    """A GPU profile that cannot run here."""


def visible_gpus() -> list[tuple[str, float]]:
    """(name, memory GiB) of each visible NVIDIA GPU, without importing torch."""
    if not shutil.which("nvidia-smi"):
        return []
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=name,memory.total", "--format=csv,noheader,nounits"],
            capture_output=True, text=True, timeout=10, check=True,
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return []
    gpus = []
    for line in out.strip().splitlines():
        name, _, mem = line.rpartition(",")
        try:
            gpus.append((name.strip(), float(mem) / 1024))
        except ValueError:
            continue
    return gpus


def detect_profile(gpus: list[tuple[str, float]] | None = None) -> GpuProfile:
    """The profile of the first visible card, or `cpu` when there is none."""
    gpus = visible_gpus() if gpus is None else gpus
    if not gpus:
        return PROFILES["cpu"]
    name, memory_gib = gpus[0]
    candidates = [p for p in PROFILES.values() if any(m in name for m in p.match) and memory_gib >= p.min_memory_gib]
    if candidates:
        return max(candidates, key=lambda p: p.min_memory_gib)
    # An unknown card: no cap beyond its own memory, no known peak.
    return GpuProfile(name=name, memory_cap_gib=memory_gib, bf16_tflops=None)


def resolve_profile(requested: str | None, local_check: bool = True) -> GpuProfile:
    """The profile for `--gpu`; fails at once when a GPU profile is asked for and no GPU is here.

    Args:
        requested: a profile name, or None to detect the visible card.
        local_check: check this machine for a GPU (off when joining a cluster,
            whose GPUs are checked once connected).
    """
    if requested is None:
        return detect_profile()
    profile = PROFILES.get(requested)
    if profile is None:
        raise GpuError(f"--gpu {requested}: unknown profile (expected one of {', '.join(PROFILES)})")
    if profile.uses_gpu and local_check and not visible_gpus():
        raise GpuError(
            f"--gpu {requested}: no NVIDIA GPU is visible on this machine; "
            "use --gpu cpu, or --address to run on a Ray cluster with GPUs"
        )
    return profile
