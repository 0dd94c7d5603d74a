"""The driver's Ray session: start or join a cluster once per process (a cluster to join is probed first,
and joining it is bounded in time), ask its autoscaler for workers, and the environment every worker
starts with."""

from __future__ import annotations

import logging
import os
import signal
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import ray

from cluster import faults
from cluster.config import ClusterConfig
from shards.errors import ClusterError

logger = logging.getLogger(__name__)

# glibc malloc arenas per worker process (MALLOC_ARENA_MAX, set at its start unless the driver's environment
# sets it). A worker's unit threads (decoders, mask pools, encoders, units side by side) would otherwise
# each get an arena, and fragmentation grows its RSS with the units it has run: on the 1080p bench clip,
# peak worker RSS grew 17% from a 4 s to a 10 s clip with glibc's default (8 per core), 4% with 2, at the
# same speed (docs/benchmarks.md).
MALLOC_ARENAS = 2


# cuBLAS workspace config for deterministic GEMMs on CUDA (without it, cuBLAS may pick split-K reductions
# whose order depends on the stream and the workspace available; PyTorch's reproducibility notes). Set
# in every worker unless the driver's environment sets it; the CPU ignores it.
CUBLAS_WORKSPACE = ":4096:8"


def worker_env() -> dict[str, str]:
    """The environment every worker starts with: glibc malloc tuning (:data:`MALLOC_ARENAS`; every
    ``MALLOC_*`` variable of the driver's environment travels too, and wins), ``CUBLAS_WORKSPACE_CONFIG``
    (:data:`CUBLAS_WORKSPACE`, the driver's wins) and the fault-injection points a test set
    (:mod:`cluster.faults`: they travel to workers on every node)."""
    env = {k: v for k, v in os.environ.items() if k.startswith("MALLOC_")}
    env.setdefault("MALLOC_ARENA_MAX", str(MALLOC_ARENAS))
    env["CUBLAS_WORKSPACE_CONFIG"] = os.environ.get("CUBLAS_WORKSPACE_CONFIG") or CUBLAS_WORKSPACE
    return {**env, **faults.env()}


def connect(cfg: ClusterConfig) -> None:
    """Start (or join) Ray once per process; later jobs in the same process reuse it.

    ``cluster.address`` names a cluster to join; when it is empty, the cluster that ``RAY_ADDRESS`` names
    (as under Ray Jobs) is joined, and only without either is an embedded local cluster started. Joining
    is bounded by ``cluster.connect_timeout_s`` (``ray.init`` has no timeout of its own and retries a dead
    address for minutes): the address is probed first (:func:`check_reachable`), then ``ray.init`` gets
    what is left of the time; either failing raises ClusterError.
    """
    if ray.is_initialized():
        return
    deadline = time.monotonic() + cfg.connect_timeout_s
    joining = check_reachable(cfg)
    if joining is not None:
        logger.info("connecting to Ray cluster at %s", joining.address)
        with _bounded(deadline - time.monotonic(), joining, cfg.connect_timeout_s):
            ray.init(address=joining.address, logging_level=logging.WARNING)
    else:
        logger.info("starting an embedded local Ray cluster")
        ray.init(
            address="local",
            num_cpus=cfg.num_cpus,
            include_dashboard=False,
            logging_level=logging.WARNING,
            log_to_driver=True,
        )


@dataclass(frozen=True)
class Target:
    """The cluster the driver joins: ``address`` as given to ``ray.init``, ``source`` where it came from
    (``cluster.address``, ``RAY_ADDRESS``, ...), and the ``host``:``port`` that must answer (the GCS, or
    the Ray Client server for ``ray://``)."""

    address: str
    source: str
    host: str
    port: int

    @property
    def what(self) -> str:
        at = f"{self.host}:{self.port}"
        shown = at if self.address in (at, f"ray://{at}") else f"{self.address} ({at})"
        kind = "the Ray Client server" if self.address.startswith("ray://") else "the Ray cluster"
        return f"{kind} at {shown} ({self.source})"

    def fix(self, check: str = "the cluster is running (ray status)") -> str:
        empty = " and ".join(
            fix
            for name, fix in (
                ("RAY_ADDRESS", "unset RAY_ADDRESS"),
                ("cluster.address", "leave cluster.address empty"),
            )
            if name in self.source
        )
        return f"check that {check} and the address, or {empty} for an embedded cluster"


def target(cfg: ClusterConfig) -> Target | None:
    """The cluster to join (None: start an embedded one), resolved as ``ray.init`` would resolve it.

    ``auto`` is ``RAY_ADDRESS`` when set, else the cluster ``ray start`` recorded last
    (``/tmp/ray/ray_current_cluster``), else a GCS running on this machine. ClusterError when ``auto``
    finds none or an address is not ``host:port`` / ``ray://host[:port]``.
    """
    address, source = cfg.address, "cluster.address"
    if not address:
        address, source = os.environ.get("RAY_ADDRESS", ""), "RAY_ADDRESS"
    if address in ("", "local"):
        return None
    if address == "auto":
        address, source = _auto(source)
    if address.startswith("ray://"):
        host, port = _host_port(address[len("ray://") :], RAY_CLIENT_PORT)
    else:
        host, port = _host_port(address, None)
    if address.startswith(("http://", "https://")):
        raise ClusterError(
            f"{source}={address} is a dashboard URL (for ray job submit), not an address Ray can join: give "
            "host:port (the GCS, e.g. head:6379), ray://host:port (Ray Client) or auto"
        )
    if host is None or port is None:
        raise ClusterError(
            f"{source}={address} is not an address Ray can join: give host:port (the GCS, e.g. 10.0.0.5:6379), "
            "ray://host:port (Ray Client) or auto"
        )
    return Target(address, source, host, port)


def check_reachable(cfg: ClusterConfig) -> Target | None:
    """Probe the cluster the driver would join and raise one-line ClusterError unless it answers as Ray
    does, within ``cluster.connect_timeout_s``: a TCP connect to its GCS (or Ray Client server for
    ``ray://``), then an HTTP/2 greeting, which Ray's gRPC servers answer at once with their settings (a
    port that accepts and stays silent would hold ``ray.init`` in C++ for ~40 s, out of reach of any
    timer). Cheap, starts nothing: the CLIs call it before any output or scratch is written. None for an
    embedded cluster."""
    t = target(cfg)
    if t is None:
        return None
    timeout = cfg.connect_timeout_s
    deadline = time.monotonic() + timeout
    try:
        with socket.create_connection((t.host, t.port), timeout=timeout) as sock:
            if os.environ.get("RAY_USE_TLS", "0") in (
                "0",
                "",
            ):  # under TLS the greeting would need a handshake
                sock.settimeout(max(0.1, deadline - time.monotonic()))
                reply = _grpc_greeting(sock, timeout)
                if reply is not None:
                    port = (
                        "Ray Client port (usually 10001)"
                        if t.address.startswith("ray://")
                        else "GCS port (usually 6379)"
                    )
                    check = f"it is the {port} of a running cluster (ray status on the head)"
                    raise ClusterError(f"cannot join {t.what}: the port {reply}; {t.fix(check)}")
    except TimeoutError:
        raise ClusterError(f"cannot reach {t.what}: no answer within {timeout:g} s; {t.fix()}") from None
    except socket.gaierror:
        raise ClusterError(f"cannot reach {t.what}: unknown host {t.host}; {t.fix()}") from None
    except ConnectionRefusedError:
        raise ClusterError(f"cannot reach {t.what}: connection refused; {t.fix()}") from None
    except OSError as err:
        raise ClusterError(f"cannot reach {t.what}: {err.strerror or err}; {t.fix()}") from None
    return t


# HTTP/2's client connection preface and an empty SETTINGS frame: a gRPC server replies with its SETTINGS.
_H2_GREETING = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + bytes([0, 0, 0, 4, 0, 0, 0, 0, 0])
_H2_SETTINGS = 4


def _grpc_greeting(sock: socket.socket, timeout: float) -> str | None:
    """None when the peer answers the HTTP/2 greeting with a SETTINGS frame, as gRPC servers do; else
    what it did instead. The socket's timeout bounds the wait."""
    sock.sendall(_H2_GREETING)
    head = b""
    try:
        while len(head) < 9:  # a frame header: length (3), type (1), flags (1), stream (4)
            chunk = sock.recv(9 - len(head))
            if not chunk:
                return (
                    "accepts connections but closes them without a word (Ray's gRPC servers answer at once)"
                )
            head += chunk
    except TimeoutError:
        return (
            f"accepts connections but says nothing within {timeout:g} s (Ray's gRPC servers answer at once)"
        )
    except ConnectionResetError:
        return "accepts connections but resets them (Ray's gRPC servers answer at once)"
    if head[3] != _H2_SETTINGS:
        try:  # the rest of its first line, to name it
            sock.settimeout(0.2)
            head += sock.recv(120)
        except OSError:
            pass
        text = head.split(b"\r", 1)[0].split(b"\n", 1)[0].decode("ascii", "replace")
        return (
            f"answers, but not as Ray's gRPC servers do (it said {text!r}: the dashboard or another service?)"
        )
    return None


RAY_CLIENT_PORT = 10001  # ray://host without a port


def _auto(source: str) -> tuple[str, str]:
    """What ``address="auto"`` means to ``ray.init`` (its own lookup order), and where it was found."""
    from ray._private.services import find_gcs_addresses
    from ray._private.utils import get_ray_address_file, read_ray_address

    if (env := os.environ.get("RAY_ADDRESS", "")) not in ("", "auto", "local"):
        return env, "RAY_ADDRESS, with cluster.address=auto"
    record = get_ray_address_file(None)
    if recorded := read_ray_address(None):
        return recorded, f"{source}=auto: the cluster recorded in {record}"
    running = sorted(find_gcs_addresses())
    if len(running) == 1:
        return running[0], f"{source}=auto: the GCS running on this machine"
    found = f"{len(running)} GCS processes run on this machine" if running else "no GCS runs on this machine"
    raise ClusterError(
        f"{source}=auto finds no Ray cluster to join: nothing is recorded in {record} and {found}; "
        "start one (ray start --head) or give its address, or leave cluster.address empty for an embedded cluster"
    )


def _host_port(text: str, default_port: int | None) -> tuple[str | None, int | None]:
    """``host:port``, ``[v6]:port`` or (with a default port) ``host`` -> (host, port); (None, None) if not."""
    text = text.strip().rstrip("/")
    if text.startswith("["):
        host, _, rest = text[1:].partition("]")
        port = rest[1:] if rest.startswith(":") else ("" if not rest else None)
    else:
        host, sep, port = text.rpartition(":")
        if not sep:
            host, port = text, ""
        elif ":" in host:  # a bare IPv6 address, no port
            host, port = text, ""
    if not host or port is None or "/" in host:
        return None, None
    if not port:
        return (host, default_port) if default_port is not None else (None, None)
    if not port.isdigit() or not 0 < int(port) < 65536:
        return None, None
    return host, int(port)


class _JoinTimeout(BaseException):
    """Raised in the main thread when joining took longer than allowed (see :func:`_bounded`); a
    BaseException, as KeyboardInterrupt is, so that Ray's retry loops (``except Exception``) let it through."""


@contextmanager
def _bounded(seconds: float, t: Target, timeout: float) -> Iterator[None]:
    """Bound ``ray.init``: in the main thread a timer interrupts it after ``seconds`` (at least 1), and any
    failure to join becomes one-line ClusterError; the half-made connection is shut down. Ray's GCS client
    retries in Python between attempts, where the timer lands; a single blocking wait in C++ (~40 s
    against a port that accepts and stays silent) is out of its reach, which is why
    :func:`check_reachable` greets the port first."""
    main = threading.current_thread() is threading.main_thread()
    previous = None
    if main:

        def expired(signum, frame):
            raise _JoinTimeout

        previous = signal.signal(signal.SIGALRM, expired)
        signal.setitimer(signal.ITIMER_REAL, max(1.0, seconds))
    try:
        yield
    except _JoinTimeout:
        ray.shutdown()
        raise ClusterError(
            f"cannot join {t.what}: its port answers, but joining did not finish within {timeout:g} s "
            f"(cluster.connect_timeout_s); {t.fix(f'it is a Ray {ray.__version__} cluster (ray status)')}"
        ) from None
    except (ConnectionError, RuntimeError, TimeoutError, ValueError) as err:
        ray.shutdown()
        first = next((line.strip() for line in str(err).splitlines() if line.strip()), type(err).__name__)
        raise ClusterError(f"cannot join {t.what}: {first}; {t.fix()}") from None
    finally:
        if main:
            signal.setitimer(signal.ITIMER_REAL, 0)
            signal.signal(signal.SIGALRM, previous)


def joined(cfg: ClusterConfig) -> bool:
    """Whether the driver joined a cluster (which may gain nodes) rather than starting an embedded one."""
    if ray.is_initialized():
        node = ray._private.worker._global_node  # None under Ray Client
        return node is None or not node.head
    return bool(cfg.address or os.environ.get("RAY_ADDRESS"))


def request_workers(bundles: list[dict[str, float]]) -> None:
    """Ask the cluster's autoscaler for room for ``bundles`` (replacing the last request; ``[]`` clears it).

    Without an autoscaler (an embedded or hand-started cluster) the request is only recorded in the GCS's
    key-value store, which nothing reads: harmless. Under Ray Client the SDK needs a GCS connection this
    process lacks, so the request is made from a task on the cluster.
    """
    from ray.autoscaler.sdk import request_resources
    from ray.util.client import ray as client

    if client.is_connected():
        ray.get(ray.remote(num_cpus=0)(request_resources).remote(bundles=bundles))
    else:
        request_resources(bundles=bundles)
