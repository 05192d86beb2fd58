"""The local Ray listens on loopback only and asks for its token; an unjoinable `--address` is one line, fast.

Everything here is real Ray in processes of its own (a Ray started or joined in this process would stay for
the other tests), on loopback only: the processes run with Ray's cluster switch off
(`RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0`), so that Ray dials 127.0.0.1 as given instead of this host's
routable address. The "auto" cases run in a PID namespace of their own (`unshare`), where Ray's search for
running clusters sees no other test's Ray; the unresolvable host in a network namespace of its own, where the
lookup fails without leaving the machine. Where `unshare` is not permitted, those cases are skipped.
"""

from __future__ import annotations

import contextlib
import http.server
import ipaddress
import json
import os
import re
import secrets
import select
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pytest
from sweep_processes import common, kill_session

ROOT = Path(__file__).resolve().parents[2]
LIMIT_S = 30.0

# Joins each ADDRESS in turn through start_ray and prints what came of it (a joined cluster runs a task first).
JOIN = """
import json, sys, time
from sweep.faults import SweepError
from sweep.gpus import detect_profile
from sweep.cluster import start_ray
for address in sys.argv[1:]:
    began = time.monotonic()
    try:
        start_ray(address, detect_profile([]), {})
    except SweepError as e:
        print(json.dumps({"address": address, "error": str(e), "seconds": time.monotonic() - began}), flush=True)
    else:
        import ray
        @ray.remote(num_cpus=1)
        def one():
            return 1
        joined = ray.get(one.remote(), timeout=60)
        print(json.dumps({"address": address, "joined": joined, "seconds": time.monotonic() - began}), flush=True)
        ray.shutdown()
"""

# Starts the local Ray, runs a task and an actor (the runtime_env reaches them), reports, waits for stdin.
LOCAL = """
import json, os, sys
from sweep.gpus import detect_profile
from sweep.cluster import start_ray
start_ray(None, detect_profile([]), {"SWEEP_NETWORK_PROBE": "from-runtime-env"})
import ray
@ray.remote
def task():
    return os.environ.get("SWEEP_NETWORK_PROBE"), os.environ.get("RAY_AUTH_MODE"), ray.util.get_node_ip_address()
@ray.remote
class Actor:
    def pid(self):
        return os.getpid()
actor = Actor.remote()
print(json.dumps({"gcs": ray.get_runtime_context().gcs_address, "token": os.environ["RAY_AUTH_TOKEN"],
                  "task": ray.get(task.remote(), timeout=120), "actor": ray.get(actor.pid.remote(), timeout=120)}),
      flush=True)
sys.stdin.readline()
ray.shutdown()
"""


def ray_env(**extra: str) -> dict[str, str]:
    """This environment without Ray's auth and address settings, Ray dialling loopback as given."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_AUTH", "RAY_ADDRESS"))}
    env.update(RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0", RAY_USAGE_STATS_ENABLED="0", PYTHONPATH=str(ROOT))
    env.update(extra)
    return env


def free_port() -> int:
    """A loopback port nothing listens on (bound, then closed)."""
    with contextlib.closing(socket.socket()) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def unshare_prefix(*flags: str) -> list[str] | None:
    """`unshare FLAGS` (as root, else in a user namespace) if this machine permits it, else None."""
    for prefix in (["unshare", *flags], ["unshare", "--user", "--map-root-user", *flags]):
        try:
            if subprocess.run([*prefix, "true"], capture_output=True, timeout=10).returncode == 0:
                return prefix
        except (OSError, subprocess.TimeoutExpired):
            pass
    return None


def start_join(addresses: list[str], env: dict[str, str], prefix: list[str] | None = None) -> subprocess.Popen:
    return subprocess.Popen([*(prefix or []), sys.executable, "-c", JOIN, *addresses], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)


def finish(process: subprocess.Popen, timeout: float = 120) -> tuple[list[dict], str]:
    """The JSON lines a JOIN process printed (one per address), and its stderr."""
    try:
        out, err = process.communicate(timeout=timeout)
    finally:
        kill_session(process.pid)
    results = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    assert results, f"no result (exit {process.returncode}): {out}\n{err}"
    return results, err


def listening_sockets(sid: int) -> list[tuple[str, str, int, str]]:
    """(protocol, local address, port, process name) of every listening TCP / bound UDP socket of a session."""
    owners: dict[str, str] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            if os.getsid(int(entry)) != sid:
                continue
            name = Path(f"/proc/{entry}/comm").read_text().strip()
            for fd in os.listdir(f"/proc/{entry}/fd"):
                with contextlib.suppress(OSError):
                    link = os.readlink(f"/proc/{entry}/fd/{fd}")
                    if link.startswith("socket:["):
                        owners[link[8:-1]] = name
        except (OSError, ProcessLookupError):
            continue
    found = []
    for proto in ("tcp", "tcp6", "udp", "udp6"):
        with contextlib.suppress(OSError):
            for line in Path(f"/proc/net/{proto}").read_text().splitlines()[1:]:
                fields = line.split()
                local, state, inode = fields[1], fields[3], fields[9]
                if inode not in owners or (proto.startswith("tcp") and state != "0A"):  # 0A: LISTEN
                    continue
                hex_ip, hex_port = local.split(":")
                raw = bytes.fromhex(hex_ip)
                raw = b"".join(raw[i:i + 4][::-1] for i in range(0, len(raw), 4))  # the kernel's word order
                found.append((proto, str(ipaddress.ip_address(raw)), int(hex_port, 16), owners[inode]))
    return found


def is_loopback(address: str) -> bool:
    ip = ipaddress.ip_address(address)
    mapped = getattr(ip, "ipv4_mapped", None)
    return (mapped or ip).is_loopback


class SilentServer:
    """Accepts TCP connections on loopback and never says anything."""

    def __init__(self):
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.port = self.sock.getsockname()[1]
        self.conns: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        with contextlib.suppress(OSError):
            while True:
                self.conns.append(self.sock.accept()[0])

    def close(self):
        for c in [*self.conns, self.sock]:
            c.close()


class QuietHandler(http.server.BaseHTTPRequestHandler):
    """Answers every request with an HTTP error (Ray's HTTP/2 preface included), logging nothing."""

    def log_message(self, *args):
        pass


@pytest.fixture
def not_ray_servers():
    silent = SilentServer()
    web = http.server.ThreadingHTTPServer(("127.0.0.1", 0), QuietHandler)
    threading.Thread(target=web.serve_forever, daemon=True).start()
    yield silent.port, web.server_address[1]
    web.shutdown()
    web.server_close()
    silent.close()


class RayStartHead:
    """`ray start --head` on a free loopback port with a token of its own, in a session of its own.

    Started when first asked for and waited on by `address()`: the unjoinable cases' test asks for it, so
    that its start-up overlaps their waits.
    """

    def __init__(self, cwd: Path):
        self.port, self.env = free_port(), ray_env(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=secrets.token_hex(32))
        self.temp_dir = tempfile.mkdtemp(prefix="sweep-ray-")  # short: Ray's socket paths fit in 107 bytes
        self.process = subprocess.Popen(
            ["ray", "start", "--head", f"--port={self.port}", "--node-ip-address=127.0.0.1",
             f"--temp-dir={self.temp_dir}", "--num-cpus=1", "--include-dashboard=false", "--disable-usage-stats"],
            cwd=cwd, env=self.env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
            start_new_session=True)

    def address(self) -> str:
        out, _ = self.process.communicate(timeout=120)
        assert self.process.returncode == 0, out
        return f"127.0.0.1:{self.port}"

    def stop(self) -> None:
        # Not `ray stop`: that stops every Ray on this machine, other tests' too.
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.process.communicate(timeout=120)
        kill_session(self.process.pid)
        shutil.rmtree(self.temp_dir, ignore_errors=True)


@pytest.fixture(scope="module")
def ray_start_head(tmp_path_factory):
    head = RayStartHead(tmp_path_factory.mktemp("ray-start"))
    yield head
    head.stop()


# --- the local Ray -------------------------------------------------------------------------------------------


@pytest.mark.integration
def test_the_local_ray_listens_on_loopback_only_and_asks_for_its_token(tmp_path):
    # A home of its own: Ray's default token file (~/.ray/auth_token) must not be written, nor read.
    local = subprocess.Popen([sys.executable, "-c", LOCAL], cwd=ROOT, env=ray_env(HOME=str(tmp_path)), text=True,
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             start_new_session=True)
    try:
        assert select.select([local.stdout], [], [], 180)[0], "the local Ray took over 180 s to start"
        line = local.stdout.readline()
        assert line.startswith("{"), f"the local Ray did not start: {line}{local.stderr.read()}"
        info = json.loads(line)
        # The workers run, with the runtime_env's variables, token authentication and a loopback node address.
        assert info["task"] == ["from-runtime-env", "token", "127.0.0.1"]
        sockets = listening_sockets(local.pid)
        names = {name for *_, name in sockets}
        assert {"gcs_server", "raylet"} <= names, sockets
        gcs_port = int(info["gcs"].rsplit(":", 1)[1])
        assert any(port == gcs_port and name == "gcs_server" for _, _, port, name in sockets), sockets
        assert info["gcs"].startswith("127.0.0.1:")
        exposed = [s for s in sockets if not is_loopback(s[1])]
        assert not exposed, f"listening beyond loopback: {exposed}"

        assert not (tmp_path / ".ray").exists()
        # Another driver without the cluster's token (none, or another one) is refused, in one line.
        tries = {
            "none": start_join([info["gcs"]], ray_env()),
            "another": start_join([info["gcs"]], ray_env(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=secrets.token_hex(32))),
        }
        for name, process in tries.items():
            (result,), err = finish(process)
            assert result.get("error") == (
                f"--address {info['gcs']}: cannot join the Ray cluster ({info['gcs']} refused this driver's "
                "token: set RAY_AUTH_MODE=token and RAY_AUTH_TOKEN (or RAY_AUTH_TOKEN_PATH) to the cluster's "
                "token)"), (name, result, err)
            assert result["seconds"] < LIMIT_S and not err.strip(), (name, result, err)
    finally:
        with contextlib.suppress(OSError):
            local.stdin.close()
        with contextlib.suppress(subprocess.TimeoutExpired):
            local.wait(timeout=20)
        kill_session(local.pid)


# --- --address -----------------------------------------------------------------------------------------------


@pytest.mark.integration
@pytest.mark.slow  # the default run keeps one case, through the CLI (below)
def test_unjoinable_addresses_fail_within_30s_in_one_line(tmp_path, not_ray_servers, ray_start_head):
    silent_port, http_port = not_ray_servers
    closed = free_port()
    stale = tmp_path / "stale"
    (stale / "ray").mkdir(parents=True)  # a crashed cluster's address file, as `ray start` leaves it
    (stale / "ray" / "ray_current_cluster").write_text(f"127.0.0.1:{closed}\n")
    (tmp_path / "empty").mkdir()
    own_pids, own_net = unshare_prefix("--pid", "--fork", "--mount-proc"), unshare_prefix("--net")
    refused = f"nothing listens at 127.0.0.1:{closed}: connection refused"
    not_gcs = "accepts connections but did not answer as a Ray cluster's GCS"
    # name: (address, process group, the reason in the message). One process per group; those that wait
    # (a server that listens) get one each, the others fail before ray.init and share one.
    cases = {
        "nothing listens": (f"127.0.0.1:{closed}", "probe", refused),
        "no host name": ("bad..host:6379", "probe", "cannot resolve host 'bad..host': not a valid host name"),
        "ray:// with nothing there": (f"ray://127.0.0.1:{closed}", "probe", refused),
        "a silent TCP server": (f"127.0.0.1:{silent_port}", "silent", f"127.0.0.1:{silent_port} {not_gcs}"),
        "an HTTP server": (f"127.0.0.1:{http_port}", "http", f"127.0.0.1:{http_port} {not_gcs}"),
        "an unresolvable host": ("nosuchhost.invalid:6379", "own network",
                                 re.compile(r"cannot resolve host 'nosuchhost\.invalid': .+")),
        "auto, no cluster": ("auto", "own pids, no cluster", "no running Ray cluster found on this host; start "
                             "one with `ray start --head` or give its HOST:PORT"),
        "auto, a crashed cluster's address": ("auto", "own pids, stale file", refused),
    }
    groups = {
        "probe": ({}, []), "silent": ({}, []), "http": ({}, []), "own network": ({}, own_net),
        "own pids, no cluster": ({"RAY_TMPDIR": str(tmp_path / "empty")}, own_pids),
        "own pids, stale file": ({"RAY_TMPDIR": str(stale)}, own_pids),
    }
    runnable = {name: case for name, case in cases.items() if groups[case[1]][1] is not None}
    began = time.monotonic()
    processes = {group: start_join([a for a, g, _ in runnable.values() if g == group], ray_env(**env), prefix)
                 for group, (env, prefix) in groups.items() if prefix is not None}
    results = {group: finish(process) for group, process in processes.items()}
    wall = time.monotonic() - began
    failures = []
    for name, (address, group, reason) in runnable.items():
        outcomes, err = results[group]
        result = next(r for r in outcomes if r["address"] == address)
        outcomes.remove(result)
        error = result.get("error", "")
        head = f"--address {address}: cannot join the Ray cluster ("
        inner = error[len(head):-1] if error.startswith(head) and error.endswith(")") else None
        matches = inner is not None and (reason.fullmatch(inner) if isinstance(reason, re.Pattern) else
                                         inner == reason)
        if not matches or "\n" in error or result["seconds"] > LIMIT_S or err.strip():
            failures.append(f"{name}: {result} (stderr: {err.strip()!r})")
    assert not failures, "\n".join(failures)
    assert wall < LIMIT_S + 15, wall  # all at once, each process's start-up included
    skipped = sorted(set(cases) - set(runnable))
    if skipped:
        pytest.skip(f"unshare is not permitted here: not run: {', '.join(skipped)}")


@pytest.mark.integration
def test_joining_a_real_cluster_started_with_ray_start(ray_start_head):
    address = ray_start_head.address()
    (result,), err = finish(start_join([address], ray_start_head.env))
    assert result.get("joined") == 1, (result, err)
    assert result["seconds"] < LIMIT_S, result


def test_sweep_start_with_an_unjoinable_address_exits_2_with_one_line(tmp_path, demo_base_dir):
    import hashlib

    import optuna

    db = tmp_path / "studies.db"
    optuna.create_study(study_name="unjoinable", storage=f"sqlite:///{db}", direction="maximize")
    before = hashlib.sha256(db.read_bytes()).hexdigest()
    closed = free_port()
    began = time.monotonic()
    done = subprocess.run([sys.executable, "-m", "sweep.cli", "start", "--trials", "1",
                           *common(tmp_path, "unjoinable"), "--address", f"127.0.0.1:{closed}"],
                          cwd=tmp_path, env=ray_env(), capture_output=True, text=True, timeout=120)
    seconds = time.monotonic() - began
    assert done.returncode == 2, done.stderr
    assert (done.stdout + done.stderr).splitlines() == [
        f"sweep start: error: --address 127.0.0.1:{closed}: cannot join the Ray cluster "
        f"(nothing listens at 127.0.0.1:{closed}: connection refused)"], done.stderr
    assert seconds < LIMIT_S + 30, seconds  # the start's checks before Ray, then the failed join
    assert hashlib.sha256(db.read_bytes()).hexdigest() == before  # nothing written: Ray is joined first
