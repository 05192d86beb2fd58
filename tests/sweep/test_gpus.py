"""GPU profiles: detection from device names, and a fast failure when no GPU is there."""

from __future__ import annotations

import subprocess
import sys
import time

import pytest

from sweep.cluster import remote_options
from sweep.gpus import PROFILES, GpuError, detect_profile, resolve_profile, visible_gpus


@pytest.mark.parametrize("gpus,expected", [
    ([], "cpu"),
    ([("NVIDIA A100-SXM4-40GB", 40.0)], "a100"),
    ([("NVIDIA A100-SXM4-80GB", 80.0)], "a100-80gb"),
    ([("NVIDIA GeForce RTX 4090", 24.0)], "4090"),
    ([("NVIDIA H100 80GB HBM3", 79.6)], "h100"),
    ([("NVIDIA H200", 140.0)], "h200"),
])
def test_detect_profile_from_device_names(gpus, expected):
    assert detect_profile(gpus).name == expected


def test_a100_profile_caps_at_what_the_card_offers():
    assert PROFILES["a100"].memory_cap_gib == pytest.approx(39.35)


def test_cpu_profile_requests_no_gpu():
    assert remote_options(PROFILES["cpu"], 2)["num_gpus"] == 0
    assert remote_options(PROFILES["h100"], 4)["num_gpus"] == 1


@pytest.mark.skipif(bool(visible_gpus()), reason="a GPU is visible")
def test_gpu_profile_without_gpu_fails_at_once(tmp_path):
    with pytest.raises(GpuError, match="no NVIDIA GPU"):
        resolve_profile("a100")
    start = time.perf_counter()
    result = subprocess.run([sys.executable, "-m", "sweep.cli", "start", "--gpu", "a100"],
                            capture_output=True, text=True, cwd=tmp_path, timeout=60)
    assert time.perf_counter() - start < 30
    assert result.returncode == 2 and "no NVIDIA GPU" in result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "studies.db").exists()
