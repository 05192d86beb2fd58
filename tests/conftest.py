"""Shared fixtures: offline flags, a private model cache, one Ray cluster per session."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

# Set before anything imports transformers, datasets or lm-eval, and before
# Ray starts, so that workers inherit them through the runtime_env.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# One thread for torch in this process: on a busy 2-core machine a second thread mostly waits for its
# turn (the sweeps' trials get one through orchestration.cpus_per_trial).
os.environ.setdefault("OMP_NUM_THREADS", "1")


def pytest_configure(config):
    # A cache private to this test session: the demo base is built fresh, as on
    # a new machine, and nothing is left in the user's cache.
    if "SWEEP_CACHE_DIR" not in os.environ:
        import tempfile

        os.environ["SWEEP_CACHE_DIR"] = tempfile.mkdtemp(prefix="sweep-test-cache-")
        # The demo base registers itself in the hub cache: keep that private too.
        os.environ["HF_HUB_CACHE"] = os.path.join(os.environ["SWEEP_CACHE_DIR"], "hub")
    # Ray's sessions (in this process and in every `sweep start` a test runs) go under a directory of this test
    # session: another Ray on the machine is neither touched nor taken for one of ours (the integration guard
    # below counts the sessions there). Short: Ray's socket paths must fit in 107 bytes.
    if "RAY_TMPDIR" not in os.environ:
        import tempfile

        os.environ["RAY_TMPDIR"] = tempfile.mkdtemp(prefix="sr-", dir="/tmp")


def pytest_collection_modifyitems(config, items):
    try:
        import torch

        has_cuda = torch.cuda.is_available()
    except ImportError:
        has_cuda = False
    if has_cuda:
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


# --- the integration marker, kept honest ---------------------------------------------------------------------

_RAY_START = re.compile(r"\bray\b.*\bstart\b")
"""A command line that starts a Ray cluster (`ray start --head ...`)."""


def _ray_up() -> bool:
    ray = sys.modules.get("ray")
    return ray is not None and ray.is_initialized()


def _ray_sessions() -> set[str]:
    """The sessions under Ray's temporary directory (this test session's, `pytest_configure`): a Ray started by a
    test, in this process or in a `sweep start` subprocess, adds one."""
    root = os.path.join(os.environ.get("RAY_TMPDIR", "/tmp"), "ray")
    try:
        return {name for name in os.listdir(root) if name.startswith("session_") and name != "session_latest"}
    except OSError:
        return set()


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item, nextitem):
    """A test not marked `integration` that starts Ray (in this process, in a `sweep start` subprocess, or as
    `ray start`) fails: the marker is what `pytest -m "not integration"` trusts to leave out every test that
    starts Ray or runs a whole sweep. Its fixtures count too, session ones included (the first test that needs
    one starts it)."""
    if "integration" in item.keywords:
        yield
        return
    started: list[str] = []
    real_init = subprocess.Popen.__init__

    def init(self, args, *rest, **kwargs):
        text = args if isinstance(args, str) else " ".join(map(str, args))
        if _RAY_START.search(text):
            started.append(text)
        real_init(self, args, *rest, **kwargs)

    item.ray_started, item.ray_before = started, (_ray_up(), _ray_sessions())
    subprocess.Popen.__init__ = init
    try:
        yield
    finally:
        subprocess.Popen.__init__ = real_init


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    started = getattr(item, "ray_started", None)
    if report.when != "call" or not report.passed or started is None:
        return
    was_up, sessions = item.ray_before
    if not was_up and _ray_up():
        started.append("ray.init in the test process")
    if _ray_sessions() - sessions:
        started.append(f"a Ray session ({sorted(_ray_sessions() - sessions)[0]})")
    if started:
        report.outcome = "failed"
        report.longrepr = f"{item.nodeid} starts Ray ({started[0]}) but is not marked integration"


@pytest.fixture(scope="session")
def demo_base_dir():
    """The demo base, built once per session into the private cache."""
    from trainer.demo_base import ensure_demo_base

    return ensure_demo_base()


@pytest.fixture(scope="session")
def ray_session():
    """One local Ray for all tests that need it (start-up costs seconds)."""
    import ray

    yield
    if ray.is_initialized():
        ray.shutdown()


@pytest.fixture
def cli(capsys):
    """Runs the `sweep` command in this process; returns its stdout, failing the test on a non-zero exit."""
    from sweep.cli import main

    def run(*args) -> str:
        capsys.readouterr()
        code = main(list(args))
        out = capsys.readouterr().out
        assert code == 0, out
        return out

    return run


@pytest.fixture(scope="session")
def demo_study(tmp_path_factory, ray_session):
    """A finished demo study, run once per session by `sweep start --trials 4` as a user would (in this process,
    on the session's Ray): its directory (`studies.db`, `sweep-runs/`) and storage URL. Its trials include a
    COMPLETE and a PRUNED one. Shared by the dashboard's and the report's browser tests; read it, don't write it."""
    import types

    from sweep.cli import main

    directory = tmp_path_factory.mktemp("demo-study")
    cwd = os.getcwd()
    os.chdir(directory)
    try:
        assert main(["start", "--trials", "4"]) == 0
    finally:
        os.chdir(cwd)
    return types.SimpleNamespace(dir=directory, storage=f"sqlite:///{directory / 'studies.db'}", study="demo")


@pytest.fixture(scope="session")
def demo_export(demo_study, tmp_path_factory):
    """`sweep export --pick` of the finished demo study: the directory `sweep serve` and `sweep submission` take."""
    from sweep.cli import main

    out = tmp_path_factory.mktemp("demo-export") / "export"
    assert main(["export", "--storage", demo_study.storage, "--pick", "--out", str(out)]) == 0
    return out


@pytest.fixture(scope="session")
def demo_server(demo_export):
    """A real `sweep serve` of the demo export on a free loopback port (a subprocess, as a user starts it): its
    base URL. Shared by the API tests and the HELM-client test; it must still be up when they end."""
    from sweep_processes import serving_process

    with serving_process([sys.executable, "-m", "sweep.cli", "serve", str(demo_export), "--port", "0"]) as url:
        yield url
