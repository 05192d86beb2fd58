"""Nothing exhausts the machine: sizes that would take all memory are config errors, and a slot past its
host-memory limit ends its trial FAIL "out of memory" (its watchdog kills the slot; the driver says why)."""

from __future__ import annotations

import re
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from sweep_processes import LIGHT, kill_session, rows, start_driver

from sweep.config import ConfigError, load_config

ROOT = Path(__file__).resolve().parents[2]
MISTRAL = ROOT / "configs" / "mistral-7b-a100.yaml"
REASON = re.compile(r"out of memory: the (trial|baseline)'s process used (\d+\.\d+) GiB, over its limit of "
                    r"(\d+\.\d+) GiB \(orchestration\.cpu_memory_limit_gib")


# --- bounds at validation --------------------------------------------------------------------------------


@pytest.mark.parametrize("overrides,message", [
    (["trainer.pack_length=1000000000000"], "trainer.pack_length: must be <= 1048576 tokens, got 1000000000000"),
    (["data.max_seq_length=2000000"], "data.max_seq_length: must be <= 1048576 tokens, got 2000000"),
    (["trainer.micro_batch_size=100000"], "trainer.micro_batch_size: must be <= 65536 examples, got 100000"),
    (["trainer.packing=false", "data.max_seq_length=2048", "trainer.micro_batch_size=1024"],
     "trainer.micro_batch_size: must be <= 512 with data.max_seq_length 2048 (a padded micro-batch of at most "
     "1048576 tokens), got 1024"),
    (["trainer.pack_length=8192", "trainer.gradient_accumulation_steps=4096"],
     "trainer.gradient_accumulation_steps: must be <= 2048 with pack_length 8192 (an optimizer step of at most "
     "16777216 tokens), got 4096"),
    (["trainer.gradient_accumulation_steps=100000"],
     "trainer.gradient_accumulation_steps: must be <= 65536, got 100000"),
    (["trainer.lora.r=100000"], "trainer.lora.r: must be <= 16384, got 100000"),
    (["data.num_examples=1000000000"], "data.num_examples: must be <= 100000000 examples, got 1000000000"),
    (["data.sources.0.num_train=1000000000"],
     "data.sources.0.num_train: must be <= 1000000 examples, got 1000000000"),
    (["evaluator.batch_size=100000"], "evaluator.batch_size: must be <= 1024, got 100000"),
    (["evaluator.generation.max_new_tokens=10000000"],
     "evaluator.generation.max_new_tokens: must be <= 131072 tokens, got 10000000"),
    (["evaluator.generation.batch_size=100000"],
     "evaluator.generation.batch_size: must be <= 4096 sequences, got 100000"),
    (["evaluator.suites.heldout.tasks.0.num_docs=1000000000"],
     "evaluator.suites.heldout.tasks.0.num_docs: must be <= 100000 documents, got 1000000000"),
    (["evaluator.suites.open.tasks.2.max_new_tokens=10000000"],
     "evaluator.suites.open.tasks.2.max_new_tokens: must be <= 131072 tokens, got 10000000"),
    # Searched values: each extreme alone, then the largest ones together.
    (["search_space.trainer.pack_length={type: int, low: 320, high: 1000000000000}"],
     "search_space.trainer.pack_length: value 1000000000000.0 is invalid for trainer.pack_length (pack_length: "
     "must be <= 1048576 tokens, got 1000000000000)"),
    (["search_space.data.num_examples={type: int, low: 1000, high: 1000000000, log: true}"],
     "search_space.data.num_examples: value 1000000000.0 is invalid for data.num_examples (num_examples: must "
     "be <= 100000000 examples, got 1000000000)"),
    (["trainer.packing=false", "search_space.trainer.micro_batch_size={type: int, low: 8, high: 60000}"],
     "search_space.trainer.micro_batch_size: must be <= 10922 with data.max_seq_length 96 (a padded "
     "micro-batch of at most 1048576 tokens), got 60000"),
    (["search_space.trainer.pack_length={type: categorical, choices: [320, 1048576]}",
      "search_space.trainer.gradient_accumulation_steps={type: int, low: 1, high: 64}"],
     "search_space.trainer.gradient_accumulation_steps: must be <= 16 with search_space.trainer.pack_length "
     "1048576 (an optimizer step of at most 16777216 tokens), got 64"),
    (["orchestration.cpu_memory_limit_gib=0"], "orchestration.cpu_memory_limit_gib: must be > 0, got 0.0"),
])
def test_a_size_that_would_exhaust_memory_is_a_config_error_naming_the_key_the_limit_and_the_value(
        overrides, message):
    with pytest.raises(ConfigError) as error:
        load_config(None, overrides)
    assert str(error.value).endswith(f"demo.yaml: {message}"), str(error.value)


def test_the_bounds_leave_real_configs_alone():
    """The shipped A100 sweep (num_examples searched up to 120000) and what real users go to."""
    assert load_config(MISTRAL).search_space["data.num_examples"].high == 120000
    config = load_config(MISTRAL, [
        "trainer.pack_length=32768", "data.max_seq_length=32768", "data.num_examples=5000000",
        "trainer.gradient_accumulation_steps=256", "trainer.lora.r=1024", "evaluator.batch_size=256",
        "evaluator.generation.max_new_tokens=32768", "evaluator.generation.batch_size=512",
        "orchestration.cpu_memory_limit_gib=64",
        "search_space.trainer.pack_length={type: categorical, choices: [8192, 16384, 65536]}",
        "search_space.data.num_examples={type: int, low: 100000, high: 8000000, log: true}",
    ])
    assert config.trainer.pack_length == 32768 and config.orchestration.cpu_memory_limit_gib == 64.0
    padded = load_config(MISTRAL, ["trainer.packing=false", "trainer.micro_batch_size=16",
                                   "data.max_seq_length=32768", "trainer.gradient_accumulation_steps=32"])
    assert padded.trainer.micro_batch_size * padded.data.max_seq_length == 524288


def test_sweep_validate_rejects_it_in_one_line():
    done = subprocess.run([sys.executable, "-m", "sweep.cli", "validate", str(ROOT / "configs" / "demo.yaml"),
                           "--set", "trainer.pack_length=1000000000000"], capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [
        f"sweep validate: error: {ROOT / 'configs' / 'demo.yaml'}: trainer.pack_length: must be <= 1048576 "
        "tokens, got 1000000000000"
    ] and "Traceback" not in done.stdout + done.stderr


# --- the watchdog --------------------------------------------------------------------------------------------

_ALLOCATE = """
import sys, time
from sweep.worker import MemoryWatchdog, private_resident_bytes
held = []
with MemoryWatchdog(float(sys.argv[1]), sys.argv[2], "trial"):
    print("started", private_resident_bytes(), flush=True)
    while True:  # 16 MiB at a time, every page touched, about 0.5 GiB/s (a pause lets the watchdog run)
        held.append(bytearray(16 << 20))
        held[-1][::4096] = b"\\1" * (len(held[-1]) // 4096)
        print(time.monotonic(), private_resident_bytes(), flush=True)
        time.sleep(0.03)
"""


def test_the_watchdog_kills_its_process_past_the_limit_and_leaves_the_reason_beside_the_log(tmp_path):
    log = tmp_path / "trial" / "worker.log"
    stale = log.with_suffix(".oom")
    stale.parent.mkdir()
    stale.write_text("out of memory: an earlier run's reason\n")  # removed when the run starts
    started = time.monotonic()
    done = subprocess.run([sys.executable, "-c", textwrap.dedent(_ALLOCATE), "0.25", str(log)],
                          capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert done.returncode == -signal.SIGKILL, done.stderr
    lines = done.stdout.split("\n")
    assert lines[0].startswith("started")
    reason = stale.read_text().strip()
    match = REASON.match(reason)
    assert match and match.group(1) == "trial" and match.group(3) == "0.25", reason
    assert 0.25 < float(match.group(2)) < 0.25 + 0.5, reason  # caught within a poll or two
    assert reason in done.stderr  # also in the run's log
    # The last sizes the process printed: it ended soon after passing the limit.
    # (The kill may cut the last line short: only whole "time size" lines count.)
    sizes = [int(parts[1]) for parts in (line.split() for line in lines[1:]) if len(parts) == 2 and parts[1].isdigit()]
    assert sizes and max(sizes) < (0.25 + 0.5) * 2**30
    assert time.monotonic() - started < 60


def test_the_watchdog_under_its_limit_only_measures(tmp_path, capfd):
    from sweep.worker import MemoryWatchdog, out_of_memory_reason

    log = tmp_path / "worker.log"
    log.with_suffix(".oom").write_text("out of memory: an earlier run's reason\n")
    with MemoryWatchdog(1000.0, str(log), "baseline", poll_s=0.02) as watchdog:
        time.sleep(0.1)
    assert watchdog.peak_bytes > 0 and not watchdog._thread.is_alive()
    assert out_of_memory_reason(str(log)) is None  # the stale reason went when the run started
    assert "resident memory: peak" in capfd.readouterr().out
    with MemoryWatchdog(None, str(log)) as unguarded:  # no limit: no thread
        pass
    assert unguarded._thread is None


# --- a real sweep ----------------------------------------------------------------------------------------


def _wait_exit(driver: subprocess.Popen, seconds: float = 180) -> int:
    try:
        return driver.wait(timeout=seconds)
    except subprocess.TimeoutExpired:
        raise AssertionError("the driver did not exit") from None


@pytest.mark.integration
def test_a_trial_over_its_host_memory_limit_ends_fail_out_of_memory_and_the_start_ends(tmp_path):
    """`sweep start` with a limit below what any slot needs: the slot kills itself at once, the trial is FAIL
    with the watchdog's reason (not Ray's "actor died"), and the driver exits."""
    from sweep.store import Store

    db = tmp_path / "studies.db"
    # The base was scored by an earlier start (the baseline runs under the same limit: see the next test).
    Store(f"sqlite:///{db}").record_baseline("oom", "sweep-demo/tiny-llama", 0.0, {"demo_digits": 0.5}, 1.0,
                                             {"open": 0.0})
    driver = start_driver(tmp_path, "oom", *LIGHT, "--set", "orchestration.cpu_memory_limit_gib=0.05", trials=1)
    try:
        _wait_exit(driver)
        failed = rows(db, "select state, fail_reason from sweep_trial_records where study_name = 'oom'")
        assert len(failed) == 1 and failed[0][0] == "FAIL", failed
        match = REASON.match(failed[0][1])
        assert match and match.group(1) == "trial" and match.group(3) == "0.05", failed
        assert rows(db, "select state from trials") == [("FAIL",)]
        log = (tmp_path / "oom.log").read_text()
        assert "Replacing slot 0: its actor is gone" in log
        assert (tmp_path / "runs" / "oom" / "trials" / "0000" / "worker.oom").read_text().strip() == failed[0][1]
    finally:
        kill_session(driver.pid)


@pytest.mark.integration
@pytest.mark.slow
def test_the_baseline_runs_under_the_limit_too(tmp_path):
    """A fresh study under the same limit: the baseline's slot ends the same way, and the start says why."""
    driver = start_driver(tmp_path, "oom", *LIGHT, "--set", "orchestration.cpu_memory_limit_gib=0.05", trials=1)
    try:
        assert _wait_exit(driver) != 0
        log = (tmp_path / "oom.log").read_text()
        assert "scoring the base model failed: out of memory: the baseline's process used" in log, log
        assert "Traceback" not in log
    finally:
        kill_session(driver.pid)


@pytest.mark.integration
def test_the_default_limit_is_the_slots_share_of_the_available_memory(ray_session):
    import ray

    from sweep.slots import available_memory_gib, slot_share_gib

    if not ray.is_initialized():
        ray.init(num_cpus=1, num_gpus=0, include_dashboard=False, logging_level="WARNING")
    available = available_memory_gib()
    share = slot_share_gib(2)
    assert available is not None and share is not None
    assert 0.8 * 0.45 * available < share < 1.1 * 0.45 * available
