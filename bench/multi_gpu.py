"""Several GPUs, one host: one sweep with a trial per GPU through Ray, a slot killed mid-trial, and what it shows.

Runs `sweep start`'s own driver (`sweep.driver.run_sweep`) through a local Ray
with every GPU of the host, `orchestration.concurrency` equal to the GPU count
(on the cpu profile, `--slots N` slots that split the cores), successive
halving at the config's rungs and `--budget-hours`. A thread kills one slot's
actor process (SIGKILL, by the PID its trial printed in its worker log) after
the first training step of that slot's `--kill-nth` trial. Then it reads what
`sweep status --format json` shows of every trial and writes:

- per trial: state, slot, PID, `CUDA_VISIBLE_DEVICES` as Ray set it, the
  GPU's UUID, the worker's times (`started`, `first_step`, `finished`, in
  seconds from the first trial's start), the training peak and the card's
  memory in use at the trial's end, the rung waits and any FAIL reason;
- one device per slot and never two trials on one device at once (on the
  cpu profile: on one slot), the card's memory outside the trial's process,
  and, from `nvidia-smi` every second, each GPU's memory and utilisation;
- the busy fraction per slot (time inside trials / the slot's span from its
  first trial's start to its last one's end) and overall (time inside
  trials / (the sweep's span x slots)); goal >= 95% per slot;
- the GPU-hours the start's budget counted (`SweepOutcome.hours_used`) against
  the trials' own wall-hours, and `--budget-hours`;
- rung waits (a rung's report to the driver's answer, measured in the worker):
  p50, p95 (goal under 2 s) and max;
- the kill: the trial's state and reason, the replacement slot's later
  trials, the trials the other slots finished after it, whether its
  parameters ran again;
- that NCCL_NVLS_ENABLE=0, TORCH_SYMM_MEM_DISABLE_MULTICAST=1 and
  NVSHMEM_DISABLE_NVLS=1 were in the environment of every process Ray
  started (read from /proc while the sweep runs).

    python bench/multi_gpu.py --slots 2 --trials 6 --steps 20 --kill-slot 1     # CPU, the demo model
    python bench/multi_gpu.py --gpu h200 --shape mistral-7b --steps 30 --kill-slot 1 \\
        --set trainer.pack_length=8192 --set data.num_examples=12000 --budget-hours 2 --timeout 240

`--trials` defaults to 3 per slot, so that the killed slot's replacement still
runs trials. `--shape mistral-7b` is bench/trial_overhead.py's random-weight
Mistral-7B (14 GB written once to --model-dir) with the demo tokenizer and
micro-suite.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import logging
import math
import os
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(1, str(Path(__file__).resolve().parents[1]))

from trial_overhead import build_mistral_shape  # noqa: E402

from sweep.cluster import NVLINK_MULTICAST_OFF  # noqa: E402

# NVLink multicast off in this process too (the child that builds the base, Ray's own processes): the start passes
# them to its workers through runtime_env.
for _name, _value in NVLINK_MULTICAST_OFF.items():
    os.environ.setdefault(_name, _value)

STUDY = "multi_gpu"
BUSY_GOAL = 0.95
RUNG_WAIT_GOAL_S = 2.0
RETRY_RULE = ("orchestration.max_retries re-runs the parameters of trials a dead driver left RUNNING (stale); "
              "a trial whose slot died is stored FAIL and not re-run")


class DriverEvents(logging.Handler):
    """The driver's log lines this bench acts on: trial starts and ends, slot replacements, budget stops."""

    STARTED = re.compile(r"^Trial (\d+) started on slot (\d+)")
    ENDED = re.compile(r"^Trial (\d+) (COMPLETE|PRUNED|FAIL)")

    def __init__(self):
        super().__init__(logging.INFO)
        self.started: list[tuple[int, int, float]] = []
        """(trial, slot, Unix time) in the order the driver started them."""
        self.ended: dict[int, tuple[str, float]] = {}
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        message = record.getMessage()
        if m := self.STARTED.match(message):
            self.started.append((int(m[1]), int(m[2]), time.time()))
        elif m := self.ENDED.match(message):
            self.ended.setdefault(int(m[1]), (m[2], time.time()))
        if message.startswith(("Replacing slot", "Starting no more trials")):
            self.lines.append(message)

    def slot_of(self, trial: int) -> int | None:
        return next((s for t, s, _ in self.started if t == trial), None)


class SlotKiller(threading.Thread):
    """Kills slot `slot`'s actor process (SIGKILL) `delay_s` after the first training step of its `nth` trial.

    The PID comes from the identity line each trial prints at its start in its worker log
    (`trial N on slot K: pid P, ...`); the first step from the line it prints after that step. A trial that
    ended before the kill moves the target to the slot's next trial.
    """

    IDENTITY = re.compile(r"^trial (\d+) on slot (\d+): pid (\d+), CUDA_VISIBLE_DEVICES=([^,]*), .*?(?:, uuid (\S+))?$",
                          re.M)

    def __init__(self, events: DriverEvents, trials_dir: Path, slot: int, nth: int, delay_s: float):
        super().__init__(name="slot-killer", daemon=True)
        self.events, self.trials_dir, self.slot, self.nth, self.delay_s = events, trials_dir, slot, nth, delay_s
        self.stop = threading.Event()
        self.killed: dict | None = None
        self.skipped: list[int] = []
        """Target trials that ended before they could be killed."""

    def run(self) -> None:
        nth = self.nth
        while not self.stop.is_set() and self.killed is None:
            mine = [t for t, s, _ in self.events.started if s == self.slot]
            if len(mine) < nth:
                self.stop.wait(0.1)
                continue
            if not self._kill(mine[nth - 1]):
                self.skipped.append(mine[nth - 1])
                nth += 1

    def _kill(self, trial: int) -> bool:
        log_file = self.trials_dir / f"{trial:04d}" / "worker.log"
        pid = first_step_seen = identity = None
        while not self.stop.is_set() and trial not in self.events.ended:
            text = log_file.read_text(errors="replace") if log_file.exists() else ""
            if pid is None and (identity := self.IDENTITY.search(text)):
                pid = int(identity[3])
            if pid is not None and "first training step done" in text:
                first_step_seen = first_step_seen or time.time()
                if time.time() - first_step_seen >= self.delay_s:
                    break
            self.stop.wait(0.05)
        if pid is None or first_step_seen is None or trial in self.events.ended or not _is_ray_worker(pid):
            return False
        os.kill(pid, signal.SIGKILL)
        visible = None if identity[4] == "None" else identity[4]
        self.killed = {"trial": trial, "slot": self.slot, "pid": pid, "cuda_visible_devices": visible,
                       "device_uuid": identity[5], "killed_at": time.time(),
                       "seconds_after_first_step": round(time.time() - first_step_seen, 3)}
        print(f"killed slot {self.slot} (pid {pid}) in trial {trial}", flush=True)
        return True


def _is_ray_worker(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().startswith(b"ray::")
    except OSError:
        return False


class Monitor(threading.Thread):
    """Every `every_s`: the environment of every process under this one (Ray's), and each GPU's memory and use."""

    def __init__(self, gpus: bool, every_s: float = 1.0):
        super().__init__(name="monitor", daemon=True)
        self.gpus, self.every_s = gpus, every_s
        self.stop = threading.Event()
        self.env: dict[int, dict] = {}
        """PID -> what it is (its command line's start) and the NVLink variables missing or wrong in it."""
        self.gpu: dict[str, dict] = {}
        """GPU UUID -> samples, peak memory used (MiB), utilisation sum, most compute processes seen at once."""

    def run(self) -> None:
        while not self.stop.is_set():
            self._check_env()
            if self.gpus:
                self._sample_gpus()
            self.stop.wait(self.every_s)

    def _check_env(self) -> None:
        for pid in _descendants(os.getpid()):
            try:
                cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
                if pid in self.env:  # a Ray worker renames itself (ray::IDLE, ray::TrialSlot) once it runs
                    self.env[pid]["process"] = cmdline.strip()[:60]
                    continue
                environ = dict(item.split(b"=", 1) for item in Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
                               if b"=" in item)
            except OSError:
                continue
            wrong = [k for k, v in NVLINK_MULTICAST_OFF.items() if environ.get(k.encode()) != v.encode()]
            self.env[pid] = {"process": cmdline.strip()[:60], "kind": _process_kind(cmdline), "missing": wrong}

    def _sample_gpus(self) -> None:
        gpus = _nvidia_smi("--query-gpu=uuid,memory.used,utilization.gpu")
        apps = _nvidia_smi("--query-compute-apps=gpu_uuid,pid")
        for uuid, used, util in (row for row in gpus if len(row) == 3):
            seen = self.gpu.setdefault(_bare_uuid(uuid), {"samples": 0, "peak_used_mib": 0.0, "util_sum": 0.0,
                                                          "most_processes": 0})
            seen["samples"] += 1
            seen["peak_used_mib"] = max(seen["peak_used_mib"], _float(used))
            seen["util_sum"] += _float(util)
            here = sum(1 for row in apps if row and _bare_uuid(row[0]) == _bare_uuid(uuid))
            seen["most_processes"] = max(seen["most_processes"], here)

    def summary(self) -> dict:
        ray_workers = {p: e for p, e in self.env.items() if e["process"].startswith("ray::")}
        kinds: dict[str, int] = {}
        for e in self.env.values():
            kind = e["process"].split(" ")[0] if e["process"].startswith("ray::") else e["kind"]
            kinds[kind] = kinds.get(kind, 0) + 1
        return {
            "nvlink_multicast_env": {
                "variables": NVLINK_MULTICAST_OFF,
                "processes_checked": len(self.env),
                "ray_workers_checked": len(ray_workers),
                "process_kinds": dict(sorted(kinds.items())),
                "processes_missing_them": [{"pid": p, **e} for p, e in self.env.items() if e["missing"]],
                "in_every_process": bool(ray_workers) and not any(e["missing"] for e in self.env.values()),
            },
            "gpus_seen_by_nvidia_smi": {
                uuid: {"samples": g["samples"], "peak_memory_used_gib": round(g["peak_used_mib"] / 1024, 2),
                       "mean_utilization_pct": round(g["util_sum"] / max(g["samples"], 1), 1),
                       "most_compute_processes_at_once": g["most_processes"]}
                for uuid, g in sorted(self.gpu.items())
            } if self.gpus else None,
        }


def _process_kind(cmdline: str) -> str:
    """A process's program: its executable's name, or for Python the script or module it runs."""
    words = cmdline.split()
    if not words:
        return "?"
    name = words[0].rsplit("/", 1)[-1]
    if name.startswith("python"):
        script = next((w for w in words[1:] if w.endswith(".py") or w.startswith("-m")), None)
        if script == "-m" and len(words) > 2:
            script = words[words.index("-m") + 1]
        return f"{name} {script.rsplit('/', 1)[-1]}" if script else name
    return name


def _descendants(root: int) -> list[int]:
    parents = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
                parents[int(entry.name)] = int(stat.rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
    found, frontier = [], [root]
    while frontier:
        children = [p for p, parent in parents.items() if parent in frontier]
        found += children
        frontier = children
    return found


def _nvidia_smi(query: str) -> list[list[str]]:
    try:
        out = subprocess.run(["nvidia-smi", query, "--format=csv,noheader,nounits"], capture_output=True,
                             text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        return []
    return [[cell.strip() for cell in line.split(",")] for line in out.splitlines() if line.strip()]


def _bare_uuid(uuid: str | None) -> str | None:
    """A GPU's UUID without nvidia-smi's `GPU-` prefix (torch's `uuid` has none)."""
    return uuid[4:] if uuid and uuid.startswith("GPU-") else uuid


def _float(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        return 0.0


def percentile(values: list[float], q: float) -> float | None:
    """The nearest-rank percentile (the smallest value with at least q% of the values at or below it)."""
    if not values:
        return None
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q / 100 * len(ordered)) - 1)]


def _epoch(when: dt.datetime | None) -> float | None:
    """Unix time of a record's naive-UTC datetime."""
    return when.replace(tzinfo=dt.timezone.utc).timestamp() if when is not None else None


def trial_rows(status: dict, records: dict, events: DriverEvents, killed: dict | None) -> list[dict]:
    """One row per trial: where it ran, the worker's times (the driver's where the worker reported none: a
    trial whose slot died), its memory, its rung waits, its end."""
    rows = []
    for t in status["trials"]:
        number, tl, rec = t["number"], t.get("timeline") or {}, records.get(t["number"])
        was_killed = killed is not None and killed["trial"] == number
        worker_times = "started" in tl and "finished" in tl
        rows.append({
            "number": number,
            "state": t["state"],
            "slot": tl.get("slot", events.slot_of(number)),
            "pid": tl.get("pid", killed["pid"] if was_killed else None),
            "cuda_visible_devices": tl.get("cuda_visible_devices", killed["cuda_visible_devices"] if was_killed
                                           else None),
            "device_uuid": tl.get("device_uuid", killed["device_uuid"] if was_killed else None),
            "device": tl.get("device"),
            "times_from": "worker" if worker_times else "driver",
            "start": tl["started"] if worker_times else _epoch(rec.started_at if rec else None),
            "first_step": tl.get("first_step"),
            "end": tl["finished"] if worker_times else _epoch(rec.finished_at if rec else None),
            "train_steps": t.get("train_steps"),
            "peak_memory_gib": t.get("peak_memory_gib"),
            "device_memory_used_gib": tl.get("device_memory_used_gib"),
            "memory_reserved_gib": tl.get("memory_reserved_gib"),
            "rung_waits_s": tl.get("rung_waits_s", []),
            "base_load_seconds": t.get("base_load_seconds"),
            "fail_reason": t.get("fail_reason"),
            "params": t.get("params"),
        })
    by_pid = {r["pid"]: r for r in rows if r["device_uuid"] is not None}
    for r in rows:  # a killed trial ran on its process's card: the one its earlier trials report
        if r["device_uuid"] is None and r["pid"] in by_pid:
            r["device_uuid"] = by_pid[r["pid"]]["device_uuid"]
            r["cuda_visible_devices"] = by_pid[r["pid"]]["cuda_visible_devices"]
    return rows


def busy_fractions(rows: list[dict], slots: int) -> dict:
    """Per slot: time inside its trials / (its last trial's end - its first trial's start); overall: time
    inside all trials / ((the last end - the first start) x slots)."""
    timed = [r for r in rows if r["start"] is not None and r["end"] is not None]
    per_slot = {}
    for slot in sorted({r["slot"] for r in timed}):
        mine = [r for r in timed if r["slot"] == slot]
        busy = sum(r["end"] - r["start"] for r in mine)
        span = max(r["end"] for r in mine) - min(r["start"] for r in mine)
        ordered = sorted(mine, key=lambda r: r["start"])
        gaps = [b["start"] - a["end"] for a, b in zip(ordered, ordered[1:], strict=False)]
        per_slot[str(slot)] = {"trials": len(mine), "busy_s": round(busy, 2), "span_s": round(span, 2),
                               "busy_fraction": round(busy / span, 4) if span > 0 else None,
                               "gaps_s": [round(g, 3) for g in gaps]}
    span = max(r["end"] for r in timed) - min(r["start"] for r in timed)
    busy = sum(r["end"] - r["start"] for r in timed)
    return {"per_slot": per_slot, "overall": round(busy / (span * slots), 4), "span_s": round(span, 2)}


def placement(rows: list[dict], on_gpu: bool) -> dict:
    """Each slot's devices and processes, and any two trials that overlapped on one device (one slot on cpu)."""
    key = "device_uuid" if on_gpu else "slot"
    overlaps = []
    for device in {r[key] for r in rows if r[key] is not None}:
        mine = sorted((r for r in rows if r[key] == device and r["start"] is not None and r["end"] is not None),
                      key=lambda r: r["start"])
        overlaps += [{"device": device, "trials": [a["number"], b["number"]],
                      "overlap_s": round(a["end"] - b["start"], 3)}
                     for a, b in zip(mine, mine[1:], strict=False) if b["start"] < a["end"]]
    slots = sorted({r["slot"] for r in rows if r["slot"] is not None})
    devices = {str(s): sorted({r["device_uuid"] for r in rows if r["slot"] == s and r["device_uuid"]}) for s in slots}
    result = {
        "overlap_key": key,
        "overlaps": overlaps,
        "slot_devices": devices if on_gpu else None,
        "slot_pids": {str(s): sorted({r["pid"] for r in rows if r["slot"] == s and r["pid"]}) for s in slots},
        "each_slot_on_one_device": all(len(d) == 1 for d in devices.values()) if on_gpu else None,
        "slots_on_distinct_devices": len({d[0] for d in devices.values() if d}) == len(slots) if on_gpu else None,
    }
    others = [r["device_memory_used_gib"] - r["memory_reserved_gib"] for r in rows
              if r["device_memory_used_gib"] is not None and r["memory_reserved_gib"] is not None]
    # At a trial's end: the card's memory in use beyond its process's torch pool (its CUDA context included).
    result["max_card_memory_outside_trial_gib"] = round(max(others), 3) if others else None
    return result


def budget_check(rows: list[dict], records: dict, outcome, budget_hours: float | None, unit: str,
                 events: DriverEvents) -> dict:
    """The hours the start's budget counted against the trials' own wall time (driver's and worker's)."""
    driver_s = sum(_epoch(rec.finished_at) - _epoch(rec.started_at) for rec in records.values()
                   if rec.started_at and rec.finished_at)
    worker_s = sum(r["end"] - r["start"] for r in rows if r["times_from"] == "worker")
    counted = getattr(outcome, "hours_used", None)
    driver_h = driver_s / 3600
    return {
        "unit": unit,
        "budget_hours": budget_hours,
        "counted_hours": round(counted, 5) if counted is not None else None,
        "trials_driver_wall_hours": round(driver_h, 5),
        "trials_worker_wall_hours": round(worker_s / 3600, 5),
        "counted_minus_driver_wall_s": round((counted - driver_h) * 3600, 3) if counted is not None else None,
        "counted_matches_trials": counted is not None and abs(counted - driver_h) <= max(0.01 * driver_h, 2 / 3600),
        "within_budget": counted is not None and (budget_hours is None or counted <= budget_hours),
        "stopped_by_budget_or_timeout": [m for m in events.lines if m.startswith("Starting no more trials")],
        "baseline_counted": False,
    }


def rung_waits(rows: list[dict]) -> dict:
    waits = [w for r in rows for w in r["rung_waits_s"]]
    p95 = percentile(waits, 95)
    return {"rungs": len(waits), "p50_s": percentile(waits, 50), "p95_s": p95, "max_s": max(waits, default=None),
            "goal_p95_s": RUNG_WAIT_GOAL_S, "goal_met": p95 is not None and p95 < RUNG_WAIT_GOAL_S}


def kill_result(killer: SlotKiller, rows: list[dict], events: DriverEvents) -> dict:
    k = killer.killed
    if k is None:
        return {"killed": False, "skipped_trials": killer.skipped,
                "why": "no trial of the slot was seen past its first step before it ended"}
    by_number = {r["number"]: r for r in rows}
    trial = by_number.get(k["trial"], {})
    later_here = [r for r in rows if r["slot"] == k["slot"] and r["start"] and r["start"] > k["killed_at"]]
    others_after = [r for r in rows if r["slot"] != k["slot"] and r["state"] in ("COMPLETE", "PRUNED")
                    and r["end"] and r["end"] > k["killed_at"]]
    rerun = [r["number"] for r in rows if r["number"] != k["trial"] and r["params"] == trial.get("params")]
    first = min(later_here, key=lambda r: r["start"], default=None)
    return {
        "killed": True, **k, "skipped_trials": killer.skipped,
        "state": trial.get("state"), "fail_reason": trial.get("fail_reason"),
        "stored_fail_with_reason": trial.get("state") == "FAIL" and bool(trial.get("fail_reason")),
        "replacement_logged": [m for m in events.lines if m.startswith(f"Replacing slot {k['slot']}")],
        "replacement_trials": [r["number"] for r in later_here],
        "replacement_pids": sorted({r["pid"] for r in later_here if r["pid"]}),
        "replaced": any(r["pid"] and r["pid"] != k["pid"] for r in later_here),
        # A fresh actor: its process starts, then its first trial imports the libraries and loads the base.
        "replacement_started_after_kill_s": round(first["start"] - k["killed_at"], 3) if first else None,
        "replacement_first_step_after_kill_s": round(first["first_step"] - k["killed_at"], 3)
        if first and first["first_step"] else None,
        "other_slots_trials_finished_after_kill": [r["number"] for r in others_after],
        "others_went_on": bool(others_after),
        "rerun_as_trials": rerun,
        "retry_rule": RETRY_RULE,
    }


def _relative(rows: list[dict]) -> tuple[float, list[dict]]:
    """Rows for the JSON: times in seconds from the first trial's start, parameters left out."""
    t0 = min(r["start"] for r in rows if r["start"] is not None)
    out = []
    for r in rows:
        r = {k: v for k, v in r.items() if k != "params"}
        for name in ("start", "first_step", "end"):
            r[f"{name}_s"] = round(r.pop(name) - t0, 3) if r.get(name) is not None else None
        out.append(r)
    return t0, out


def _build_in_child(model_dir: Path) -> str:
    """The random Mistral-7B shape, built in a child process: this one (the driver) never opens a CUDA context,
    which would sit on the first GPU beside its slot."""
    import multiprocessing

    child = multiprocessing.get_context("spawn").Process(target=build_mistral_shape, args=(model_dir,))
    child.start()
    child.join()
    if child.exitcode != 0:
        raise SystemExit(f"building {model_dir} failed (exit {child.exitcode})")
    return str(model_dir)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--gpu", default="cpu", help="GPU profile (cpu, a100, 4090, h100, h200, ...)")
    parser.add_argument("--shape", choices=["demo", "mistral-7b"], default="demo")
    parser.add_argument("--model-dir", default=str(Path(tempfile.gettempdir()) / "sweep-mistral-7b-random"))
    parser.add_argument("--slots", type=int, help="slots (default: every GPU; 2 on the cpu profile)")
    parser.add_argument("--trials", type=int, help="trials (default: 3 per slot)")
    parser.add_argument("--steps", type=int, default=30, help="trainer.max_steps of every trial")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--budget-hours", type=float, default=2.0, help="as sweep start --budget-hours")
    parser.add_argument("--timeout", type=float, help="as sweep start --timeout (seconds; no trial starts after)")
    parser.add_argument("--kill-slot", type=int, default=1, help="the slot whose actor is killed (-1: none)")
    parser.add_argument("--kill-nth", type=int, default=1, help="during that slot's Nth trial")
    parser.add_argument("--kill-delay-s", type=float, default=0.5, help="this long after its first training step")
    parser.add_argument("--slot-memory-gib", type=float,
                        help="orchestration.cpu_memory_limit_gib (default 48 on a GPU profile: a fresh VM's "
                             "MemAvailable can read far below its memory; the slots' share on cpu)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="config override for every trial (as `sweep start --set`)")
    parser.add_argument("--work-dir", help="keep the study and runs here (default: a temporary directory)")
    parser.add_argument("--out", help="JSON file (default: bench/results/multi_gpu-<gpu>.json)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    from sweep.gpus import resolve_profile
    from trainer.demo_base import DEMO_MODEL_ID

    profile = resolve_profile(args.gpu, local_check=True)
    if profile.uses_gpu:
        import torch  # device_count opens no CUDA context

        slots = args.slots or torch.cuda.device_count()
    else:
        slots = args.slots or 2
    trials = args.trials or 3 * slots
    model_path = DEMO_MODEL_ID if args.shape == "demo" else _build_in_child(Path(args.model_dir))
    with tempfile.TemporaryDirectory(prefix="multi-gpu-") as tmp:
        work = Path(args.work_dir or tmp)
        report = measure(args, profile, slots, trials, model_path, work)
    out = Path(args.out or Path(__file__).parent / "results" / f"multi_gpu-{profile.name}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report["checks"], indent=2))
    print(f"wrote {out}")
    return 0


def measure(args, profile, slots: int, trials: int, model_path: str, work: Path) -> dict:
    import optuna

    from sweep.config import load_config
    from sweep.driver import run_sweep
    from sweep.export import study_status
    from sweep.store import Store

    memory_gib = args.slot_memory_gib or (48.0 if profile.uses_gpu else None)
    overrides = [
        f"trainer.max_steps={args.steps}", "study.pruner=successive_halving", f"study.seed={args.seed}",
        f"orchestration.concurrency={slots}", f"orchestration.budget_hours={args.budget_hours}",
        f"orchestration.artifacts_dir={work / 'runs'}", f"model.name_or_path={model_path}",
        *([f"orchestration.timeout_seconds={args.timeout}"] if args.timeout else []),
        *([f"orchestration.cpu_memory_limit_gib={memory_gib}"] if memory_gib else []),
        *args.set,
    ]
    config = load_config(None, overrides)
    work.mkdir(parents=True, exist_ok=True)
    storage = f"sqlite:///{work / 'studies.db'}"
    events = DriverEvents()
    logging.getLogger("sweep").addHandler(events)
    logging.getLogger("sweep").setLevel(logging.INFO)
    monitor = Monitor(gpus=profile.uses_gpu)
    killer = SlotKiller(events, work / "runs" / STUDY / "trials", args.kill_slot, args.kill_nth, args.kill_delay_s)
    monitor.start()
    if args.kill_slot >= 0:
        killer.start()
    started = time.perf_counter()
    try:
        outcome = run_sweep(config, storage_url=storage, study_name=STUDY, n_trials=trials, profile=profile)
    finally:
        killer.stop.set()
        monitor.stop.set()
        logging.getLogger("sweep").removeHandler(events)
    sweep_s = time.perf_counter() - started
    monitor.join(timeout=15)
    store = Store(storage)
    records = store.trials(STUDY)
    status = study_status(optuna.load_study(study_name=STUDY, storage=storage), store)
    rows = trial_rows(status, records, events, killer.killed)
    busy = busy_fractions(rows, slots)
    where = placement(rows, profile.uses_gpu)
    budget = budget_check(rows, records, outcome, args.budget_hours,
                          "GPU-hours" if profile.uses_gpu else "slot-hours", events)
    waits = rung_waits(rows)
    kill = kill_result(killer, rows, events) if args.kill_slot >= 0 else None
    seen = monitor.summary()
    t0, table = _relative(rows)
    kill_fields = {} if kill is None else {"kill": {**kill, "killed_at_s": round(kill["killed_at"] - t0, 3)}
                                           if kill.get("killed") else kill}
    unkilled = [s["busy_fraction"] for slot, s in busy["per_slot"].items()
                if s["busy_fraction"] is not None and (kill is None or not kill.get("killed")
                                                       or slot != str(kill["slot"]))]
    checks = {
        "one_trial_per_device_at_a_time": not where["overlaps"],
        "each_slot_on_one_device": where["each_slot_on_one_device"],
        "slots_on_distinct_devices": where["slots_on_distinct_devices"],
        "min_busy_fraction": min((s["busy_fraction"] for s in busy["per_slot"].values()
                                  if s["busy_fraction"] is not None), default=None),
        "min_busy_fraction_unkilled_slots": min(unkilled, default=None),
        "busy_goal_met_unkilled_slots": bool(unkilled) and min(unkilled) >= BUSY_GOAL,
        "hours_counted_match_trials": budget["counted_matches_trials"],
        "within_budget": budget["within_budget"],
        "rung_wait_p95_s": waits["p95_s"],
        "rung_wait_goal_met": waits["goal_met"],
        "killed_trial_stored_fail_with_reason": (kill or {}).get("stored_fail_with_reason"),
        "killed_slot_replaced": (kill or {}).get("replaced"),
        "others_went_on": (kill or {}).get("others_went_on"),
        "nvlink_multicast_env_in_every_ray_process": seen["nvlink_multicast_env"]["in_every_process"],
    }
    devices = sorted({r["device"] for r in rows if r["device"]})
    return {
        "benchmark": "multi_gpu",
        "command": " ".join(["python bench/multi_gpu.py", *sys.argv[1:]]) if sys.argv[1:] else
                   "python bench/multi_gpu.py",
        "profile": profile.name,
        "devices": devices,
        "shape": args.shape,
        "slots": slots,
        "trials_asked": trials,
        "trials_run": len(rows),
        "steps_per_trial": args.steps,
        # The run's own temporary directories are no part of the result: named, not spelled out.
        "overrides": [o.replace(str(work), "<run dir>").replace(tempfile.gettempdir(), "<tmp>") for o in overrides],
        "sweep_seconds": round(sweep_s, 1),
        "outcome": {"complete": sum(r["state"] == "COMPLETE" for r in rows),
                    "pruned": sum(r["state"] == "PRUNED" for r in rows),
                    "failed": sum(r["state"] == "FAIL" for r in rows), "best": outcome.best_number},
        "definitions": {
            "times": "seconds from the first trial's start; the worker's Unix times (timeline), the driver's record "
                     "for a trial whose worker reported none (times_from: driver)",
            "busy_fraction_per_slot": "time inside the slot's trials / (its last trial's end - its first trial's "
                                      "start)",
            "busy_fraction_overall": "time inside all trials / ((the last end - the first start) x slots)",
            "rung_wait": "in the worker: from posting a rung's value to the mailbox to the driver's decision",
            "budget": "counted_hours: what the start's budget counted (SweepOutcome.hours_used, the driver's clock "
                      "from each trial's start to its end); trials_driver_wall_hours: the same from the trials' "
                      "records; trials_worker_wall_hours: the workers' own times (trials whose worker reported "
                      "them: not a killed one)",
            "max_card_memory_outside_trial_gib": "at each trial's end, the card's memory in use (all processes) "
                                                 "minus the trial process's torch pool: its CUDA context, plus any "
                                                 "other process on the card",
        },
        "checks": checks,
        "busy": busy,
        "placement": where,
        "budget": budget,
        "rung_waits": waits,
        **kill_fields,
        **seen,
        "t0_unix": round(t0, 3),
        "trials": table,
    }


if __name__ == "__main__":
    sys.exit(main())
