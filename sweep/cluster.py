"""The Ray side of a start, as the driver sees it: joining or starting Ray, and what each slot gets (cores,
GPUs, memory caps, environment)."""

from __future__ import annotations

import logging
import os
from typing import Optional

from sweep.config import SweepConfig
from sweep.faults import reclaim_stop_signals
from sweep.gpus import GpuError, GpuProfile
from trainer.demo_base import DEMO_MODEL_ID

log = logging.getLogger("sweep")

# Passed to every worker through Ray's runtime_env when set in the driver's environment.
PASSED_ENV = (
    "HF_HOME", "HF_HUB_CACHE", "HF_DATASETS_CACHE", "HF_TOKEN", "HF_HUB_OFFLINE",
    "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE", "SWEEP_CACHE_DIR",
)

NVLINK_MULTICAST_OFF = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}
"""NVLink multicast off in NCCL, PyTorch's symmetric memory and NVSHMEM, in every process a start's Ray runs: on a
host whose GPUs others share, a program that uses it can put them out of service. A value in the driver's
environment wins."""


def start_ray(address: Optional[str], profile: GpuProfile, env_vars: dict[str, str]) -> None:
    """Joins `address`, or starts a local Ray; checks that a GPU profile has GPUs to run on."""
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    # Ray runs its workers at niceness 15, so that they yield to its own services: on a machine with
    # any other load, a trial (the sweep's whole work) then gets a sliver of the CPU and runs many
    # times slower. A local Ray of ours runs them at the driver's priority (a cluster keeps its own).
    os.environ.setdefault("RAY_worker_niceness", "0")
    for name, value in NVLINK_MULTICAST_OFF.items():  # a local Ray's own processes inherit them; workers get env_vars
        os.environ.setdefault(name, value)
    import ray

    from sweep import raynet

    if not ray.is_initialized():
        kwargs = dict(
            runtime_env={"env_vars": env_vars},
            include_dashboard=False,
            logging_level=logging.WARNING,
            log_to_driver=True,
        )
        try:
            if address and address != "local":
                # Probed first, Ray's waits bounded: an address that cannot be joined is one line within ~25 s.
                raynet.join(address, **kwargs)
            else:
                # On loopback, with a token of this process (sweep.raynet). A local Ray only offers GPUs a
                # GPU profile asked for: with the cpu profile, trials must not wait for a GPU slot.
                raynet.start_local(num_cpus=os.cpu_count(), num_gpus=None if profile.uses_gpu else 0, **kwargs)
        finally:
            reclaim_stop_signals()  # ray.init took SIGTERM over
    if profile.uses_gpu and ray.cluster_resources().get("GPU", 0) < 1:
        raise GpuError(f"--gpu {profile.name}: the Ray cluster has no GPU; use --gpu cpu")


def memory_cap(profile: GpuProfile, override: Optional[float]) -> Optional[float]:
    """The GPU memory a trial may use: the profile's cap, lowered by the config's."""
    if override is None:
        return profile.memory_cap_gib
    return override if profile.memory_cap_gib is None else min(override, profile.memory_cap_gib)


def remote_options(profile: GpuProfile, cpus_per_trial: int) -> dict:
    return {"num_cpus": cpus_per_trial, "num_gpus": 1 if profile.uses_gpu else 0}


def concurrency(config: SweepConfig, profile: GpuProfile, cpus_per_trial: int) -> int:
    """Slots: `orchestration.concurrency`, else every GPU of the Ray cluster (1 on the cpu profile).

    Never more than the cluster holds: a slot Ray cannot place would take trials and never run them.
    """
    import ray

    resources = ray.cluster_resources()
    if profile.uses_gpu:
        room = int(resources.get("GPU", 0))
    else:
        room = int(resources.get("CPU", 1) // cpus_per_trial)
    wanted = config.orchestration.concurrency or (room if profile.uses_gpu else 1)
    if wanted > room:
        log.warning("Concurrency %d: the Ray cluster holds %d slot(s) of %s; running %d", wanted, room,
                    "1 GPU" if profile.uses_gpu else f"{cpus_per_trial} CPU(s)", max(room, 1))
    return max(1, min(wanted, room))


def cpus_per_trial(config: SweepConfig, profile: GpuProfile) -> int:
    """Cores per trial: the configured number, else 4 on a GPU; on cpu the cores split between the slots."""
    if config.orchestration.cpus_per_trial:
        return config.orchestration.cpus_per_trial
    cores = os.cpu_count() or 1
    return max(1, cores // (config.orchestration.concurrency or 1)) if not profile.uses_gpu else min(4, cores)


def worker_env(config: SweepConfig, cpus_per_trial: int) -> dict[str, str]:
    """The environment every worker gets through Ray's runtime_env: the caches, thread counts, quiet libraries, the
    offline flags when the sweep needs no hub, and NVLink multicast off (`NVLINK_MULTICAST_OFF`)."""
    env = {k: os.environ[k] for k in PASSED_ENV if k in os.environ}
    env.update({name: os.environ.get(name, value) for name, value in NVLINK_MULTICAST_OFF.items()})
    env.update({
        "OMP_NUM_THREADS": str(cpus_per_trial),
        "MKL_NUM_THREADS": str(cpus_per_trial),
        "TOKENIZERS_PARALLELISM": "false",
        "TRANSFORMERS_VERBOSITY": "error",
        "HF_HUB_DISABLE_PROGRESS_BARS": "1",
        "TQDM_DISABLE": "1",
        "PYTHONWARNINGS": "ignore::FutureWarning,ignore::DeprecationWarning",
    })
    if is_offline(config):
        env.update({"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"})
    return env


def is_offline(config: SweepConfig) -> bool:
    """A sweep that needs nothing from the hub runs with the offline flags on."""
    return (
        config.model.name_or_path == DEMO_MODEL_ID
        and all(t.is_local for t in config.evaluator.all_tasks())
        and all(s.kind != "hub" for s in config.data.sources)
    )

