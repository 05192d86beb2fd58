"""How `sweep start` reaches Ray: a local Ray on loopback behind a private token, and `--address` checked in seconds.

A local Ray (no `--address`) is this driver's alone. Ray takes the node's
address for every server it starts (the GCS, the raylet's node and object
managers, each worker's core worker, the runtime-env and dashboard agents):
all-interface sockets for a routable node address, loopback ones when the
node address is loopback. `ray.init` turns a loopback `_node_ip_address`
into the host's routable address, except where Ray clusters are switched off
(`RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0`, off by default on macOS and Windows),
so that is the switch a local Ray of ours sets. Token authentication (Ray's
default for a local `ray.init` since 2.59) is made explicit, with a token of
this process's own (`RAY_AUTH_TOKEN`, passed to Ray's processes through their
environment, never written to disk) rather than `~/.ray/auth_token`, which
every local Ray of this user shares and which Ray writes with the umask's
mode (often readable by other users).

Joining (`--address`) changes none of the cluster's settings. What can be
checked first is: the host resolves and the port accepts a TCP connection,
each within `PROBE_SECONDS`. Ray's own waits for a GCS that does not answer
(about 40 s per attempt, 20 attempts) are cut to one short attempt while
`ray.init` runs, where the user has not set them, so a port that listens but
is no Ray fails in about 10 s; Ray's log lines of that attempt are kept back
and only shown once the join succeeds. Every failure is one `SweepError` line.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import secrets
import socket
import sys
import tempfile
import threading
import time
from typing import Iterator, Optional

from sweep.faults import SweepError

log = logging.getLogger(__name__)

LOOPBACK = "127.0.0.1"
PROBE_SECONDS = 5.0
RAY_CLIENT_PORT = 10001  # a ray:// address without a port
_AUTH_REFUSED = re.compile(r"InvalidAuthToken|AuthenticationError|Unauthenticated", re.IGNORECASE)

# A local Ray of ours: node address loopback (Ray's "no multi-node clusters" switch), token authentication.
_LOCAL_ENV = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_AUTH_MODE": "token"}
# Ray's waits while a driver joins, bounded (each only where the user has not set it). The GCS: one
# connection attempt instead of 20, 2 s for the channel and the pubsub channel, 5 s for the cluster's ID.
# ray:// (Ray Client, 3 attempts): 3 s, then 5 s and 5 s.
_JOIN_BOUNDS = {
    "RAY_gcs_server_port_wait_time_s": "1",
    "RAY_gcs_rpc_server_connect_timeout_s": "2",
    "RAY_py_gcs_connect_timeout_s": "5",
    "RAY_CLIENT_INITIAL_CONNECTION_TIMEOUT_S": "3",
    "RAY_CLIENT_MAX_CONNECTION_TIMEOUT_S": "5",
}


def start_local(**init_kwargs) -> None:
    """`ray.init` of a new local Ray, bound to loopback, with token authentication."""
    for key, value in _LOCAL_ENV.items():
        os.environ[key] = value
    # The user's own token if they set one (it is as private), else one for this process.
    if not os.environ.get("RAY_AUTH_TOKEN"):
        os.environ["RAY_AUTH_TOKEN"] = secrets.token_hex(32)
    import ray
    import ray._private.ray_constants as ray_constants

    # Read at Ray's import: when Ray was imported before (a test session), set what the switch sets.
    ray_constants.ENABLE_RAY_CLUSTER = False
    _reload_ray_config()
    # "local": a new Ray even where RAY_ADDRESS names a cluster (`--address auto` joins that one).
    ray.init(address="local", _node_ip_address=LOOPBACK, **init_kwargs)


def join(address: str, **init_kwargs) -> None:
    """`ray.init(address=...)`, or a `SweepError` naming why the cluster cannot be joined, within about 20 s."""
    import ray

    host, port, what = _dial_target(address)
    _probe(address, host, port)
    with _bounded_join(), _stderr_held() as held:
        try:
            ray.init(address=address, **init_kwargs)
        except Exception as e:  # noqa: BLE001 - whatever Ray raises, the user gets one line
            with contextlib.suppress(Exception):
                ray.shutdown()
            failure = _cannot_join(address, _join_error(e, f"{host}:{port}", what))
        else:
            failure = None
    if failure is not None:
        log.debug("Ray's output while failing to join %s:\n%s", address, held.text.decode(errors="replace"))
        raise failure from None
    held.replay()


def _cannot_join(address: str, reason: str) -> SweepError:
    return SweepError(f"--address {address}: cannot join the Ray cluster ({' '.join(reason.split())})")


def _dial_target(address: str) -> tuple[str, int, str]:
    """The host and port Ray will connect to for `address` (resolved as `ray.init` does), and what should answer."""
    from ray._common.network_utils import parse_address
    from ray._private import services

    effective = address
    if address == "auto" and os.environ.get("RAY_ADDRESS"):
        effective = os.environ["RAY_ADDRESS"]
    if "://" in effective:
        what = "a Ray Client server"
        rest = effective.split("://", 1)[1].split("/", 1)[0]
        parsed = parse_address(rest) or (rest.strip("[]"), str(RAY_CLIENT_PORT))
    else:
        what = "a Ray cluster's GCS"
        try:
            canonical = services.canonicalize_bootstrap_address(effective)
        except ConnectionError:  # "auto", and neither a cluster nor RAY_ADDRESS on this host
            raise _cannot_join(address, "no running Ray cluster found on this host; start one with "
                                        "`ray start --head` or give its HOST:PORT") from None
        except ValueError:
            canonical = None
        parsed = parse_address(canonical) if canonical else None
    try:
        host, port = parsed[0], int(parsed[1])
        if not host or not 0 < port < 65536:
            raise ValueError(port)
    except (TypeError, ValueError, IndexError):
        raise _cannot_join(address, f"{effective!r} is not HOST:PORT, ray://HOST[:PORT] or auto") from None
    return host, port, what


def _probe(address: str, host: str, port: int) -> None:
    """The host resolves and something accepts a TCP connection on the port, each within PROBE_SECONDS."""
    where = f"{host}:{port}"
    try:
        infos = _resolve(host, port)
    except TimeoutError:
        raise _cannot_join(address, f"looking up host {host!r} took over {PROBE_SECONDS:g} s") from None
    except socket.gaierror as e:
        raise _cannot_join(address, f"cannot resolve host {host!r}: {e.strerror or e}") from None
    last: Optional[OSError] = None
    deadline = time.monotonic() + PROBE_SECONDS
    for family, kind, proto, _, sockaddr in infos:  # each address the name has, while time is left
        left = deadline - time.monotonic()
        if left <= 0:
            break
        with contextlib.closing(socket.socket(family, kind, proto)) as s:
            s.settimeout(left)
            try:
                s.connect(sockaddr)
                return
            except OSError as e:
                last = e
    if isinstance(last, ConnectionRefusedError):
        reason = f"nothing listens at {where}: connection refused"
    elif isinstance(last, (TimeoutError, socket.timeout)):
        reason = f"no answer from {where} within {PROBE_SECONDS:g} s"
    else:
        reason = f"cannot connect to {where}: {getattr(last, 'strerror', None) or last}"
    raise _cannot_join(address, reason)


def _resolve(host: str, port: int) -> list:
    """getaddrinfo, given up on after PROBE_SECONDS (a resolver that does not answer blocks far longer)."""
    result: dict = {}

    def lookup():
        try:
            result["infos"] = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        except (OSError, UnicodeError) as e:  # UnicodeError: no host name (an empty or over-long label)
            result["error"] = e

    thread = threading.Thread(target=lookup, name="sweep-address-lookup", daemon=True)
    thread.start()
    thread.join(PROBE_SECONDS)
    if thread.is_alive():
        raise TimeoutError(host)
    error = result.get("error")
    if isinstance(error, socket.gaierror):
        raise error
    if error is not None:
        raise socket.gaierror(None, "not a valid host name")
    return result["infos"]


def _join_error(error: BaseException, where: str, what: str) -> str:
    """One line for why `ray.init` could not join `where`, a host:port that accepts TCP connections."""
    from ray.exceptions import AuthenticationError

    text = str(error).strip()
    chain, seen = [], error
    while seen is not None and len(chain) < 8:  # Ray wraps the GCS's refusal in two exceptions
        chain.append(seen)
        seen = seen.__cause__ or seen.__context__
    if any(isinstance(e, AuthenticationError) or _AUTH_REFUSED.search(str(e)) for e in chain):
        return (f"{where} refused this driver's token: set RAY_AUTH_MODE=token and RAY_AUTH_TOKEN "
                "(or RAY_AUTH_TOKEN_PATH) to the cluster's token")
    first = text.splitlines()[0] if text else type(error).__name__
    if isinstance(error, (ConnectionError, RuntimeError)) and "connect" in first.lower():
        return f"{where} accepts connections but did not answer as {what}"
    return first


def _reload_ray_config() -> None:
    """Has Ray's C++ side read the environment again (it reads it once, when Ray is imported)."""
    import ray._raylet as raylet

    raylet.Config.initialize("")
    loader = getattr(raylet, "AuthenticationTokenLoader", None)
    if loader is not None:
        loader.instance().reset_cache()


@contextlib.contextmanager
def _bounded_join() -> Iterator[None]:
    """Ray's join timeouts cut short while `ray.init` runs; the environment as it was afterwards."""
    saved = {key: os.environ.get(key) for key in _JOIN_BOUNDS}
    for key, value in _JOIN_BOUNDS.items():
        os.environ.setdefault(key, value)
    try:
        _reload_ray_config()
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


class _Held:
    """What was written to stderr while it was held."""

    text = b""

    def replay(self) -> None:
        if self.text:
            sys.stderr.flush()
            os.write(sys.stderr.fileno(), self.text)


@contextlib.contextmanager
def _stderr_held() -> Iterator[_Held]:
    """What Ray writes to stderr (its C++ side writes to the file descriptor) kept back while the block runs."""
    try:
        fd = sys.stderr.fileno()
    except (AttributeError, OSError, ValueError):  # no real stderr (a test's capture): nothing to hold
        yield _Held()
        return
    sys.stderr.flush()
    saved = os.dup(fd)
    with tempfile.TemporaryFile() as file:
        held = _Held()
        os.dup2(file.fileno(), fd)
        try:
            yield held
        finally:
            sys.stderr.flush()
            os.dup2(saved, fd)
            os.close(saved)
            file.seek(0)
            held.text = file.read()
