"""Driver helpers: failure reasons, worker environment, thread split."""

from __future__ import annotations

from sweep.cluster import NVLINK_MULTICAST_OFF, cpus_per_trial, worker_env
from sweep.config import load_config
from sweep.gpus import PROFILES
from sweep.worker import failure_reason


class _RayTaskErrorLike(Exception):
    """Ray wraps a worker's exception and keeps the original as `cause`."""

    def __init__(self, cause):
        super().__init__("Traceback (most recent call last): ... long worker traceback ...")
        self.cause = cause


def test_reason_is_one_line_from_the_original_exception():
    error = _RayTaskErrorLike(ValueError("Target modules {'x'} not found\nin the base model"))
    assert failure_reason(error) == "ValueError: Target modules {'x'} not found in the base model"


def test_reason_names_out_of_memory():
    assert failure_reason(RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB")).startswith("out of memory:")


def test_reason_is_bounded():
    assert len(failure_reason(ValueError("x" * 5000))) <= 500


def test_demo_workers_run_offline_with_their_share_of_threads(monkeypatch):
    for name in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"):
        monkeypatch.delenv(name, raising=False)
    env = worker_env(load_config(None), cpus_per_trial=2)
    assert env["HF_HUB_OFFLINE"] == "1" and env["HF_DATASETS_OFFLINE"] == "1"
    assert env["OMP_NUM_THREADS"] == "2"
    # A hub model may need the network: no offline flag unless the user set one.
    hub = load_config(None, ["model.name_or_path=mistralai/Mistral-7B-v0.1"])
    assert "HF_HUB_OFFLINE" not in worker_env(hub, 2)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert worker_env(hub, 2)["HF_HUB_OFFLINE"] == "1"


def test_workers_run_with_nvlink_multicast_off_unless_the_driver_says_otherwise(monkeypatch):
    for name in NVLINK_MULTICAST_OFF:
        monkeypatch.delenv(name, raising=False)
    env = worker_env(load_config(None), cpus_per_trial=2)
    assert {name: env.get(name) for name in NVLINK_MULTICAST_OFF} == {
        "NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}
    monkeypatch.setenv("NCCL_NVLS_ENABLE", "1")  # the user's own value is the one passed on
    assert worker_env(load_config(None), cpus_per_trial=2)["NCCL_NVLS_ENABLE"] == "1"


def test_cpus_per_trial():
    config = load_config(None)
    assert cpus_per_trial(config, PROFILES["h100"]) <= 4
    assert cpus_per_trial(load_config(None, ["orchestration.cpus_per_trial=1"]), PROFILES["cpu"]) == 1
