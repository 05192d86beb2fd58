"""The worker side of a trial: a plain `TrialSpec` in, a plain `TrialResult` out.

A `TrialSlot` runs trials one after another in its process (a Ray actor per
GPU slot; any process in tests). With `resident=True` it loads the 4-bit base
once and keeps it: each trial attaches a fresh adapter and removes it
afterwards. Nothing here touches the study database: the driver records what
the slot returns, and intermediate values travel through a `reporter` the
driver hands in (see sweep.slots).
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import signal
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Protocol

from evaluator.config import EvalConfig
from trainer.config import DataConfig, ModelConfig, TrainConfig
from trainer.units import GIB

MAX_REASON_CHARS = 500


@dataclass(frozen=True)
class TrialSpec:
    """Everything a worker needs to run one trial (picklable, no live handles)."""

    study_name: str
    trial_number: int
    seed: int
    params: dict
    model: ModelConfig
    data: DataConfig
    train: TrainConfig
    eval: EvalConfig
    task_dir: str
    """Directory of the local lm-eval task files (absolute)."""
    adapter_dir: str
    """Where the adapter is saved (absolute, readable by the driver)."""
    hyperparameters: dict = field(default_factory=dict)
    """The resolved config, saved as hyperparameters.yaml beside the adapter."""
    num_threads: Optional[int] = None
    log_file: Optional[str] = None
    """Where the worker's stdout and stderr go (library logs, progress bars); None: inherited."""
    device: str = "cpu"
    """`cuda` for GPU profiles; `cpu` keeps a trial off the GPU even where one is visible."""
    memory_cap_gib: Optional[float] = None
    """The GPU profile's memory cap, enforced on a bigger card; None: the card's own memory."""
    target_tflops: Optional[float] = None
    """Dense bf16 peak of the profile's card: the full-run projection is scaled to it."""
    exclude_ngrams_file: Optional[str] = None
    """Evaluation n-grams (a .npy of uint64) that training examples must not share; None: keep all."""
    rungs: tuple[float, ...] = ()
    """Fractions of the planned steps at which the trial reports a quick eval and may be pruned."""
    rung_eval_docs: int = 32
    """Documents per task of the objective suite in a rung's quick eval."""
    baseline_scores: Optional[dict] = None
    """The untuned base's per-task scores, for suites normalised against it."""
    host_memory_limit_gib: Optional[float] = None
    """Resident memory the slot's process may hold while the trial runs (`MemoryWatchdog`); None: no limit."""


class Reporter(Protocol):
    """Where a running trial sends its progress and its rungs' values (the driver's mailbox)."""

    def progress(self, trial_number: int, step: int, total_steps: int, loss: float) -> None: ...

    def rung(self, trial_number: int, step: int, value: float) -> bool:
        """Reports a rung's value; returns True when the trial is to stop (pruned)."""
        ...


@dataclass(frozen=True)
class TrialResult:
    """What a finished trial reports back (plain values)."""

    trial_number: int
    scores: dict[str, float]
    adapter_dir: str
    train_seconds: float
    eval_seconds: float
    wall_seconds: float
    """The whole trial in its worker: loading, data, training, scoring, saving."""
    tokens_per_second: float
    peak_memory_gib: Optional[float]
    memory_cap_gib: Optional[float]
    mfu: Optional[float]
    """Model FLOPs utilisation against the dense bf16 peak of the card the trial ran on; None on CPU."""
    train_tokens: int
    train_steps: int
    final_loss: Optional[float]
    checkpointed_layers: int
    full_run_tokens: int
    projected_full_run_hours: Optional[float]
    """Hours of the full run (the whole mix, all epochs) on the profile's card, from the measured speed."""
    data: dict
    pruned: bool = False
    """Stopped at a rung by the pruner: not scored, no adapter saved (`train_steps` is where it stopped)."""
    intermediate: tuple[tuple[int, float], ...] = ()
    """(step, value) of each rung's quick eval."""
    base_load_seconds: Optional[float] = None
    """Seconds this trial spent loading the 4-bit base; None: the slot's resident base was reused."""
    timeline: Optional[dict] = None
    """Unix times in the worker: `started`, `first_step` (end of the first optimizer step), `finished`; where it ran:
    `slot`, `device`, `pid`, `cuda_visible_devices` (as Ray set it; None when unset) and on a GPU `device_uuid`;
    on a GPU at the trial's end `device_memory_used_gib` (the card's, every process on it) and
    `memory_reserved_gib` (this process's torch pool); `rung_waits_s`, the seconds each rung waited for the
    driver's decision."""
    losses: tuple[tuple[int, float], ...] = ()
    """(step, training loss), at most `MAX_LOSS_POINTS` of them spread over the run (the last step kept)."""
    learning_rates: tuple[tuple[int, float], ...] = ()
    """(step, learning rate), thinned as `losses` is."""
    stderrs: Optional[dict] = None
    """Each task's standard error, from its per-document values (`evaluator.harness.standard_error`)."""
    num_docs: Optional[dict] = None
    """Documents each task was scored on."""
    base: Optional[dict] = None
    """The base it trained on (`trainer.model.describe_base`: mode, quantization, double_quant, dtype) and, when
    the slot's resident base was of another format, `swapped_from` (its label) and `swap_seconds`."""


MAX_LOSS_POINTS = 1000


def loss_curve(losses, max_points: int = MAX_LOSS_POINTS) -> tuple[tuple[int, float], ...]:
    """(step, value) pairs thinned to at most `max_points` evenly spread steps, the last one always kept."""
    losses = tuple((int(step), float(loss)) for step, loss in losses)
    if len(losses) <= max_points:
        return losses
    every = -(-len(losses) // max_points)
    kept = losses[::every]
    return kept if kept[-1] == losses[-1] else (*kept[: max_points - 1], losses[-1])


@dataclass(frozen=True)
class BaselineSpec:
    """Scoring the untuned base model."""

    model: ModelConfig
    eval: EvalConfig
    task_dir: str
    num_threads: Optional[int] = None
    log_file: Optional[str] = None
    device: str = "cpu"
    memory_cap_gib: Optional[float] = None
    host_memory_limit_gib: Optional[float] = None
    """Resident memory the slot's process may hold while scoring (`MemoryWatchdog`); None: no limit."""
    mode: str = "qlora"
    """`trainer.mode` of the config: the base is scored as the trials hold it by default."""


@dataclass(frozen=True)
class BaselineResult:
    scores: dict[str, float]
    eval_seconds: float
    base_load_seconds: Optional[float] = None
    stderrs: Optional[dict] = None
    num_docs: Optional[dict] = None


def run_trial(spec: TrialSpec, reporter: Optional[Reporter] = None) -> TrialResult:
    """Loads the 4-bit base, trains a fresh LoRA adapter, scores it, saves it (one trial in this process)."""
    return TrialSlot(resident=False).run(spec, reporter)


class TrialSlot:
    """Runs trials one at a time in this process, keeping the 4-bit base loaded between them when `resident`.

    The driver wraps it as a Ray actor (one per GPU slot). The base is loaded
    by the first trial (or baseline) that needs it and, when resident, kept:
    each trial attaches a fresh adapter and `detach_lora` removes it, leaving
    the base bit-identical. `memory_growth_gib` tells the driver whether the
    process has grown since its first trial (then it replaces the slot).
    """

    def __init__(self, resident: bool = True, slot: int = 0):
        from sweep.faults import ignore_file_size_signal

        try:
            ignore_file_size_signal()  # past a file-size limit a write fails with EFBIG: the driver stops the start
        except ValueError:  # not the process's main thread
            pass
        self.resident = resident
        self.slot = slot
        self._base = None
        self._base_key = None
        self._base_label: Optional[str] = None
        self._tokenizer = None
        self._reference_gib: Optional[float] = None
        self._device = "cpu"

    def run(self, spec: TrialSpec, reporter: Optional[Reporter] = None) -> TrialResult:
        with output_to(spec.log_file), MemoryWatchdog(spec.host_memory_limit_gib, spec.log_file, "trial"):
            try:
                return self._run(spec, reporter)
            finally:
                if not self.resident:
                    self._drop_base()
                self._note_memory()

    def baseline(self, spec: "BaselineSpec") -> "BaselineResult":
        """Scores the untuned base (the resident one when there is one)."""
        with output_to(spec.log_file), MemoryWatchdog(spec.host_memory_limit_gib, spec.log_file, "baseline"):
            _setup_process(spec.num_threads)
            _setup_gpu(spec.device, spec.memory_cap_gib)
            from trainer.model import restore_training_layout, use_attention

            tokenizer = self._tokenizer_for(spec.model)
            base, load_seconds, _ = self._base_for(spec.model, spec.device, spec.mode)
            use_attention(base, "sdpa")
            try:
                evaluated = _score(base, tokenizer, spec.eval.all_tasks(), spec.eval, spec.task_dir,
                                   spec.memory_cap_gib)
            finally:
                restore_training_layout(base)
                if not self.resident:
                    self._drop_base()
            return BaselineResult(scores=evaluated.scores, eval_seconds=evaluated.eval_seconds,
                                  base_load_seconds=load_seconds, stderrs=evaluated.stderrs,
                                  num_docs=evaluated.num_docs)

    def memory_growth_gib(self) -> Optional[float]:
        """How much this process's memory (GPU: torch's allocation; CPU: resident set) grew since its first trial."""
        if self._reference_gib is None:
            return None
        return _memory_gib(self._device) - self._reference_gib

    def _note_memory(self) -> None:
        _release_cached_memory(self._device)
        if self._reference_gib is None:  # after the first trial: base loaded, libraries imported, caches warm
            self._reference_gib = _memory_gib(self._device)

    def _tokenizer_for(self, model):
        from trainer.model import load_tokenizer

        if self._tokenizer is None or self._tokenizer[0] != model:
            self._tokenizer = (model, load_tokenizer(model))
        return self._tokenizer[1]

    def _base_for(self, model, device: str, mode: str = "qlora"):
        """The base in the format `mode` and `model`'s quantization ask for, the seconds spent loading it (None
        when the resident one was it), and the label of the resident base it replaced (None if none did).

        A slot keeps one resident base: a trial that needs another model or format (mode lora's 16 bits, int8,
        nf4 without double quantization, ...) drops it and loads its own, which then stays.
        """
        from trainer.model import base_format, base_label, describe_base, load_base_model

        key = (model, base_format(model, mode), device)
        if self._base is not None and self._base_key == key:
            return self._base, None, None
        replaced = self._base_label if self._base is not None else None
        self._drop_base()
        started = time.perf_counter()
        self._base = load_base_model(model, device, mode=mode)
        self._base_key = key
        self._base_label = f"{model.name_or_path} {base_label(describe_base(model, mode, device))}"
        self._device = device
        seconds = time.perf_counter() - started
        if replaced is not None:
            print(f"swapped base {replaced} -> {self._base_label} in {seconds:.1f}s (slot {self.slot})", flush=True)
        else:
            print(f"loaded base {self._base_label} in {seconds:.1f}s (slot {self.slot})", flush=True)
        return self._base, seconds, replaced

    def _drop_base(self) -> None:
        if self._base is None:
            return
        self._base = self._base_key = None
        import gc

        gc.collect()
        _release_cached_memory(self._device)

    def _run(self, spec: TrialSpec, reporter: Optional[Reporter]) -> TrialResult:
        started = time.perf_counter()
        timeline = {"slot": self.slot, "started": time.time(), "pid": os.getpid(),
                    "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES")}
        _setup_process(spec.num_threads)
        card = _setup_gpu(spec.device, spec.memory_cap_gib)
        timeline["device"] = _device_name(spec.device)
        timeline.update(_device_identity(spec.device))
        # Which process and card run the trial, first in its log: what an operator (or a benchmark) acts on.
        print(f"trial {spec.trial_number} on slot {self.slot}: pid {timeline['pid']}, CUDA_VISIBLE_DEVICES="
              f"{timeline['cuda_visible_devices']}, {timeline['device']}"
              + (f", uuid {timeline['device_uuid']}" if "device_uuid" in timeline else ""), flush=True)
        from transformers import set_seed

        from trainer.data import prepare_data
        from trainer.model import (
            attach_lora,
            attention_implementation,
            describe_base,
            detach_lora,
            save_adapter,
            use_attention,
        )
        from trainer.train import train

        tokenizer = self._tokenizer_for(spec.model)
        exclude = None
        if spec.exclude_ngrams_file:
            from sweep.contamination import load_ngrams

            exclude = load_ngrams(spec.exclude_ngrams_file)
        data = prepare_data(tokenizer, spec.data, exclude=exclude)
        base, load_seconds, replaced = self._base_for(spec.model, spec.device, spec.train.mode)
        described = describe_base(spec.model, spec.train.mode, spec.device)
        if replaced is not None:
            described.update(swapped_from=replaced, swap_seconds=round(load_seconds, 3))
        use_attention(base, attention_implementation(spec.model, spec.device))  # scoring left it on sdpa
        set_seed(spec.seed)  # the adapter's initial weights: the same on a fresh or a resident base
        try:
            model = attach_lora(base, spec.train.lora)
        except BaseException:
            self._drop_base()  # an adapter that failed half-way may have left layers wrapped
            raise
        progress = _Progress(spec, reporter, timeline)
        try:
            trained = train(
                model, tokenizer, data.rows, spec.train, seed=spec.seed, memory_budget_gib=spec.memory_cap_gib,
                on_step=progress.step, on_start=progress.start, checkpoints=spec.rungs if reporter is not None else (),
                on_checkpoint=lambda step: progress.rung(step, _rung_value(model, tokenizer, spec, step)),
            )
            pruned = trained.steps < trained.planned_steps
            evaluated = None
            if not pruned:
                use_attention(model, "sdpa")  # scoring runs padded batches of varying shapes
                _release_cached_memory(spec.device)  # the optimizer's and activations' blocks: room for the dense copy
                evaluated = _score(model, tokenizer, spec.eval.all_tasks(), spec.eval, spec.task_dir,
                                   spec.memory_cap_gib)
                save_adapter(model, spec.adapter_dir, spec.model, spec.hyperparameters)
        finally:
            self._base = detach_lora(model)
        timeline.update(_card_memory(spec.device))
        timeline["finished"] = time.time()
        card_tflops = card.bf16_tflops if card is not None else None
        # The measured speed, scaled from this card to the profile's by their dense bf16 peaks.
        scale = card_tflops / spec.target_tflops if card_tflops and spec.target_tflops else 1.0
        hours = trained.projected_full_run_hours * scale
        return TrialResult(
            trial_number=spec.trial_number,
            scores=evaluated.scores if evaluated else {},
            adapter_dir=str(Path(spec.adapter_dir).resolve()) if evaluated else "",
            train_seconds=trained.train_seconds,
            eval_seconds=evaluated.eval_seconds if evaluated else 0.0,
            wall_seconds=time.perf_counter() - started,
            tokens_per_second=trained.tokens_per_second,
            peak_memory_gib=trained.peak_memory_gib,
            memory_cap_gib=spec.memory_cap_gib if spec.device != "cpu" else None,
            mfu=trained.tokens_per_second * trained.flops_per_token / (card_tflops * 1e12) if card_tflops else None,
            train_tokens=trained.train_tokens,
            train_steps=trained.steps,
            final_loss=trained.final_loss,
            checkpointed_layers=trained.checkpointed_layers,
            full_run_tokens=trained.full_run_tokens,
            projected_full_run_hours=hours if math.isfinite(hours) else None,
            data=data.stats.as_record(),
            pruned=pruned,
            intermediate=tuple(progress.intermediate),
            base_load_seconds=load_seconds,
            timeline=timeline,
            losses=loss_curve(trained.losses),
            learning_rates=loss_curve(trained.learning_rates),
            stderrs=evaluated.stderrs if evaluated else None,
            num_docs=evaluated.num_docs if evaluated else None,
            base=described,
        )


class _Progress:
    """Forwards a running trial's steps (at most one a second) and rungs to the reporter."""

    REPORT_EVERY_S = 1.0

    def __init__(self, spec: TrialSpec, reporter: Optional[Reporter], timeline: dict):
        self.spec = spec
        self.reporter = reporter
        self.timeline = timeline
        self.intermediate: list[tuple[int, float]] = []
        self._last = 0.0
        self._total = spec.train.max_steps or 0

    def start(self, planned_steps: int) -> None:
        self._total = planned_steps

    def step(self, step: int, loss: float) -> None:
        now = time.time()
        if step == 1:
            self.timeline["first_step"] = now
            print(f"first training step done {now - self.timeline['started']:.1f}s into the trial", flush=True)
        if self.reporter is not None and now - self._last >= self.REPORT_EVERY_S:
            self._last = now
            self.reporter.progress(self.spec.trial_number, step, self._total, loss)

    def rung(self, step: int, value: float) -> bool:
        self.intermediate.append((step, value))
        print(f"rung at step {step}: {value:.4g}", flush=True)
        asked = time.perf_counter()
        prune = self.reporter.rung(self.spec.trial_number, step, value)
        self.timeline.setdefault("rung_waits_s", []).append(round(time.perf_counter() - asked, 4))
        return prune


def rung_tasks(config: EvalConfig, docs: int) -> list:
    """A rung's quick eval: the objective suite's tasks, each on its first `docs` documents (or its `rung_limit`)."""
    import dataclasses

    tasks = config.suite_tasks()[config.objective_suite]
    return [dataclasses.replace(t, limit=t.rung_limit or min(t.limit or docs, docs)) for t in tasks]


def _rung_value(model, tokenizer, spec: TrialSpec, step: int) -> float:
    """The objective suite's aggregate on a few documents per task, mid-training; the model trains on after."""
    from evaluator.score import aggregate
    from trainer.model import attention_implementation, restore_training_layout, use_attention

    config = spec.eval
    tasks = rung_tasks(config, spec.rung_eval_docs)
    use_attention(model, "sdpa")
    _release_cached_memory(spec.device)  # the activations' blocks: room for the dense copy (`dequantize: auto`)
    try:
        # lm-eval seeds Python's, NumPy's and torch's generators: the training that follows must draw the dropout
        # masks it would have drawn without the rung, so a trial trains the same whatever its rungs.
        with _random_state_kept(spec.device):
            evaluated = _score(model, tokenizer, tasks, config, spec.task_dir, spec.memory_cap_gib)
    finally:
        use_attention(model, attention_implementation(spec.model, spec.device))
        restore_training_layout(model)
        model.train()
    normalize = "chance" if config.normalize == "baseline" and spec.baseline_scores is None else config.normalize
    return aggregate(evaluated.scores, tasks, config.aggregate, config.floor, normalize, spec.baseline_scores)


@contextlib.contextmanager
def _random_state_kept(device: str):
    """Restores the global random generators (Python, NumPy, torch CPU and CUDA) on exit."""
    import random

    import numpy as np
    import torch

    python_state, numpy_state = random.getstate(), np.random.get_state()
    with torch.random.fork_rng(devices=[torch.cuda.current_device()] if device == "cuda" else []):
        try:
            yield
        finally:
            random.setstate(python_state)
            np.random.set_state(numpy_state)


MEMORY_POLL_S = 0.2
OUT_OF_MEMORY_SUFFIX = ".oom"


def private_resident_bytes() -> int:
    """Resident memory this process holds on its own: /proc/self/statm's resident pages minus its shared ones.

    Left out are file-backed pages (libraries, a memory-mapped checkpoint: the kernel can drop them) and shared
    memory (Ray's object store, which has its own limit). What is left, anonymous memory, is what a runaway
    allocation grows and what takes a machine down.
    """
    with open("/proc/self/statm") as f:
        fields = f.read().split()
    return (int(fields[1]) - int(fields[2])) * os.sysconf("SC_PAGE_SIZE")


def out_of_memory_file(log_file: str) -> Path:
    """Where a slot's watchdog writes why it ended the run: beside its log (`worker.log` -> `worker.oom`)."""
    return Path(log_file).with_suffix(OUT_OF_MEMORY_SUFFIX)


def out_of_memory_reason(log_file: Optional[str]) -> Optional[str]:
    """The reason a run's watchdog left beside `log_file` when it ended the slot's process; None if it did not."""
    if log_file is None:
        return None
    try:
        reason = out_of_memory_file(log_file).read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError):
        return None
    return reason or None


class MemoryWatchdog:
    """Ends this process when its resident memory (`private_resident_bytes`) passes `limit_gib`.

    A thread reads /proc/self/statm every `poll_s` while the run lasts. A runaway allocation cannot be stopped
    by an exception (it may sit in one C call), so past the limit the watchdog writes the reason beside the
    run's log (`out_of_memory_file`), prints it to the log, and kills its own process (SIGKILL): the driver
    sees the slot's actor die, takes the reason from that file instead of Ray's, and replaces the slot.
    A stale reason file is removed when the run starts. With `limit_gib` None it does nothing.
    """

    def __init__(self, limit_gib: Optional[float], log_file: Optional[str] = None, what: str = "trial",
                 poll_s: float = MEMORY_POLL_S):
        self.limit_gib = limit_gib
        self.reason_file = out_of_memory_file(log_file) if log_file is not None else None
        self.what = what
        self.poll_s = poll_s
        self.peak_bytes = 0
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None

    def __enter__(self) -> "MemoryWatchdog":
        if self.limit_gib is None:
            return self
        if self.reason_file is not None:
            self.reason_file.unlink(missing_ok=True)
        self._thread = threading.Thread(target=self._watch, name="memory-watchdog", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        if self._thread is None:
            return
        self._stop.set()
        self._thread.join()
        print(f"resident memory: peak {self.peak_bytes / GIB:.2f} GiB of the {self.what}'s limit of "
              f"{self.limit_gib:.2f} GiB", flush=True)

    def _watch(self) -> None:
        limit = self.limit_gib * GIB
        while True:
            used = private_resident_bytes()
            self.peak_bytes = max(self.peak_bytes, used)
            if used > limit:
                self._end(used)
            if self._stop.wait(self.poll_s):
                return

    def _end(self, used: int) -> None:
        reason = (f"out of memory: the {self.what}'s process used {used / GIB:.2f} GiB, over its limit of "
                  f"{self.limit_gib:.2f} GiB (orchestration.cpu_memory_limit_gib; null: the slot's share of the "
                  "memory available when the start began)")
        with contextlib.suppress(OSError):  # no room to say why: the driver reports the death as Ray saw it
            if self.reason_file is not None:
                self.reason_file.parent.mkdir(parents=True, exist_ok=True)
                partial = self.reason_file.with_name(self.reason_file.name + ".tmp")
                partial.write_text(reason + "\n", encoding="utf-8")
                os.replace(partial, self.reason_file)  # the driver never reads half a reason
        with contextlib.suppress(OSError):  # to the run's log; no Python lock the stopped thread may hold
            os.write(2, (reason + "\n").encode())
        os.kill(os.getpid(), signal.SIGKILL)


def _memory_gib(device: str) -> float:
    if device != "cpu":
        import torch

        return torch.cuda.memory_allocated() / GIB
    with open("/proc/self/statm") as f:  # resident pages (Linux)
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / GIB


def _device_name(device: str) -> str:
    """What the trial ran on, for its record and model card: the GPU's name, or the CPU's cores."""
    import torch

    if device.startswith("cuda"):
        return torch.cuda.get_device_name(torch.device(device))
    threads = torch.get_num_threads()
    return f"cpu ({os.cpu_count()} cores, {threads} thread{'s' if threads != 1 else ''})"


def _device_identity(device: str) -> dict:
    """The card a GPU trial runs on (`cuda:0` of those Ray made visible to the slot): its `device_uuid`."""
    if device == "cpu":
        return {}
    import torch

    uuid = getattr(torch.cuda.get_device_properties(0), "uuid", None)  # a record field: never fail a trial on it
    return {"device_uuid": str(uuid)} if uuid is not None else {}


def _card_memory(device: str) -> dict:
    """GiB in use on the trial's card by every process on it, and this process's torch pool (empty on CPU)."""
    if device == "cpu":
        return {}
    import torch

    free, total = torch.cuda.mem_get_info(0)
    return {"device_memory_used_gib": round((total - free) / GIB, 3),
            "memory_reserved_gib": round(torch.cuda.memory_reserved(0) / GIB, 3)}


def _setup_gpu(device: str, memory_cap_gib: Optional[float]):
    """Enforces the profile's memory cap on a bigger card; returns the profile of the card (None on CPU)."""
    if device == "cpu":
        return None
    import torch

    from sweep.gpus import detect_profile

    props = torch.cuda.get_device_properties(0)
    total_gib = props.total_memory / GIB
    # Always set: a worker process that runs several trials must not keep an earlier trial's cap.
    cap = memory_cap_gib if memory_cap_gib is not None else total_gib
    torch.cuda.set_per_process_memory_fraction(min(1.0, cap / total_gib), 0)
    return detect_profile([(props.name, total_gib)])


def _score(model, tokenizer, tasks, config: EvalConfig, task_dir: str, memory_cap_gib: Optional[float],
           dequantize=None):
    from evaluator.harness import evaluate

    evaluated = evaluate(
        model, tokenizer, tasks, task_dir, config.batch_size, config.generation,
        dequantize=config.dequantize if dequantize is None else dequantize, memory_budget_gib=memory_cap_gib,
        fuse_kernels=config.fuse_kernels, fast_path=config.fast_path,
    )
    how = "plain lm-eval" if not evaluated.fast_path else "dense copy of the base" if evaluated.dense else "4-bit base"
    print(f"scored in {evaluated.eval_seconds:.1f}s ({how})", flush=True)
    return evaluated


def _release_cached_memory(device: str) -> None:
    if device == "cpu":
        return
    import gc

    import torch

    gc.collect()
    torch.cuda.empty_cache()


def failure_reason(error: BaseException) -> str:
    """One line saying why a trial failed, from the worker's original exception if any."""
    cause = getattr(error, "cause", None) or error
    message = " ".join(line.strip() for line in str(cause).splitlines() if line.strip())
    if message.lower().startswith("out of memory"):
        reason = message
    elif type(cause).__name__ == "OutOfMemoryError" or "out of memory" in message.lower():
        reason = f"out of memory: {message}"
    else:
        reason = f"{type(cause).__name__}: {message}" if message else type(cause).__name__
    return reason if len(reason) <= MAX_REASON_CHARS else reason[: MAX_REASON_CHARS - 3] + "..."


@contextlib.contextmanager
def output_to(log_file: Optional[str]):
    """Sends this process's stdout and stderr (file descriptors included) to `log_file`.

    Library output (progress bars, warnings, subprocesses) lands in the
    trial's log instead of the driver's terminal. Safe because each trial has
    a worker process of its own.
    """
    if log_file is None:
        yield
        return
    Path(log_file).parent.mkdir(parents=True, exist_ok=True)
    sys.stdout.flush()
    sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    with open(log_file, "a", buffering=1) as log:
        os.dup2(log.fileno(), 1)
        os.dup2(log.fileno(), 2)
        try:
            yield
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            os.close(saved[0])
            os.close(saved[1])


def _setup_process(num_threads: Optional[int]) -> None:
    """Thread count and quiet logs; the offline flags arrive through Ray's runtime_env."""
    import torch

    if num_threads:
        torch.set_num_threads(num_threads)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    for name in ("lm_eval", "bitsandbytes", "datasets", "peft"):
        logging.getLogger(name).setLevel(logging.ERROR)
    try:
        import datasets

        datasets.disable_progress_bars()
        datasets.logging.set_verbosity_error()
    except ImportError:
        pass
