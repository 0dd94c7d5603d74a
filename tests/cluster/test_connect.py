"""Joining a cluster (cluster.session): which address, from where, probed and bounded in time.

The address rules are a table (no Ray started); the probe runs against local sockets: one that answers
HTTP/2 as Ray's gRPC servers do, one that accepts and stays silent, one that answers HTTP/1, a closed
port. The bound on ``ray.init`` itself is checked with a stand-in that never returns.
"""

from __future__ import annotations

import re
import signal
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

import pytest

from cluster.config import ClusterConfig
from cluster.session import Target, check_reachable, connect, target
from shards.errors import ClusterError


@contextmanager
def _server(reply: bytes | None) -> Iterator[int]:
    """A local port that accepts connections; each is answered with ``reply`` once it has said something
    (None: never answered). Closed on exit."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(8)
    sock.settimeout(0.2)
    stop = threading.Event()
    held = []

    def serve() -> None:
        while not stop.is_set():
            try:
                conn, _ = sock.accept()
            except TimeoutError:
                continue
            held.append(conn)
            if reply is not None:
                conn.recv(64)
                conn.sendall(reply)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield sock.getsockname()[1]
    finally:
        stop.set()
        thread.join()
        for conn in held:
            conn.close()
        sock.close()


# What a gRPC server sends first: a SETTINGS frame header (length 0, type 4, no flags, stream 0).
GRPC_SETTINGS = bytes([0, 0, 0, 4, 0, 0, 0, 0, 0])


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]  # nothing listens once it is closed


@pytest.fixture
def no_local_cluster(monkeypatch):
    """``auto`` finds nothing: no recorded cluster, no GCS process, no RAY_ADDRESS."""
    import ray._private.services
    import ray._private.utils

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.setattr(ray._private.utils, "read_ray_address", lambda temp_dir=None: None)
    monkeypatch.setattr(ray._private.services, "find_gcs_addresses", lambda: frozenset())
    return monkeypatch


@pytest.mark.parametrize(
    ("address", "env", "expected"),
    [
        ("", None, None),  # embedded
        ("local", None, None),
        ("", "local", None),
        ("", "10.0.0.5:6379", Target("10.0.0.5:6379", "RAY_ADDRESS", "10.0.0.5", 6379)),
        ("10.0.0.5:6379", "10.9.9.9:1", Target("10.0.0.5:6379", "cluster.address", "10.0.0.5", 6379)),
        ("ray://head", None, Target("ray://head", "cluster.address", "head", 10001)),
        ("ray://head:10002", None, Target("ray://head:10002", "cluster.address", "head", 10002)),
        ("[::1]:6379", None, Target("[::1]:6379", "cluster.address", "::1", 6379)),
        ("auto", "10.0.0.5:6379", Target("10.0.0.5:6379", "RAY_ADDRESS, with cluster.address=auto", "10.0.0.5", 6379)),
        ("head", None, "cluster.address=head is not an address Ray can join"),
        ("head:port", None, "cluster.address=head:port is not an address Ray can join"),
        ("head:70000", None, "is not an address Ray can join"),
        ("http://head:8265", None, "cluster.address=http://head:8265 is a dashboard URL (for ray job submit), not an"),
        ("", "http://127.0.0.1:8265", "RAY_ADDRESS=http://127.0.0.1:8265 is a dashboard URL"),
        ("", "head", "RAY_ADDRESS=head is not an address Ray can join"),
        ("auto", None, "cluster.address=auto finds no Ray cluster to join: nothing is recorded in"),
    ],
)  # fmt: skip
def test_the_address_to_join_and_where_it_came_from(no_local_cluster, address, env, expected):
    if env is not None:
        no_local_cluster.setenv("RAY_ADDRESS", env)
    cfg = ClusterConfig(address=address)
    if isinstance(expected, str):
        with pytest.raises(ClusterError, match=re.escape(expected)):
            target(cfg)
    else:
        assert target(cfg) == expected


def test_auto_is_the_cluster_ray_start_recorded(no_local_cluster):
    import ray._private.utils

    no_local_cluster.setattr(ray._private.utils, "read_ray_address", lambda temp_dir=None: "10.0.0.7:6379")
    t = target(ClusterConfig(address="auto"))
    assert (t.address, t.host, t.port) == ("10.0.0.7:6379", "10.0.0.7", 6379)
    assert t.source.startswith("cluster.address=auto: the cluster recorded in ")


def test_probe_passes_a_grpc_server_and_names_a_dead_port():
    with _server(GRPC_SETTINGS) as port:
        assert check_reachable(ClusterConfig(address=f"127.0.0.1:{port}", connect_timeout_s=3)).port == port
    dead = _closed_port()
    with pytest.raises(ClusterError) as err:
        check_reachable(ClusterConfig(address=f"127.0.0.1:{dead}", connect_timeout_s=3))
    assert str(err.value) == (
        f"cannot reach the Ray cluster at 127.0.0.1:{dead} (cluster.address): connection refused; check that the "
        "cluster is running (ray status) and the address, or leave cluster.address empty for an embedded cluster"
    )
    with pytest.raises(ClusterError, match="unknown host nohost.invalid"):
        check_reachable(ClusterConfig(address="nohost.invalid:6379", connect_timeout_s=3))


@pytest.mark.parametrize(
    ("reply", "needle"),
    [
        (None, "the port accepts connections but says nothing within 1 s (Ray's gRPC servers answer at once)"),
        (b"HTTP/1.1 400 Bad Request\r\n\r\n", "the port answers, but not as Ray's gRPC servers do (it said 'HTTP/1.1 400 Bad Request'"),
    ],
    ids=["silent", "http1"],
)  # fmt: skip
def test_a_port_that_is_not_ray_fails_within_the_timeout(reply, needle):
    """``ray.init`` against these would block in C++ for ~40 s, out of reach of a timer: the probe's HTTP/2
    greeting finds them within connect_timeout_s."""
    with _server(reply) as port:
        with pytest.raises(ClusterError) as err:  # the probe alone: ray.init is never reached
            check_reachable(ClusterConfig(address=f"ray://127.0.0.1:{port}", connect_timeout_s=1))
    assert str(err.value).startswith(
        f"cannot join the Ray Client server at 127.0.0.1:{port} (cluster.address): "
    )
    assert needle in str(err.value)
    assert "check that it is the Ray Client port (usually 10001) of a running cluster" in str(err.value)


def test_embedded_cluster_is_not_probed(no_local_cluster):
    assert check_reachable(ClusterConfig(address="")) is None


def test_ray_init_is_bounded(monkeypatch):
    """Past the probe, a ``ray.init`` that does not return (here a stand-in that sleeps in Python) is
    interrupted after what is left of connect_timeout_s, and the half-made session is shut down."""
    import ray

    calls = []
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    # it would return after 600 s and connect would then succeed: the ClusterError proves the interruption
    monkeypatch.setattr(ray, "init", lambda **kw: (calls.append(kw), time.sleep(600)))
    monkeypatch.setattr(ray, "shutdown", lambda: calls.append("shutdown"))
    with _server(GRPC_SETTINGS) as port:
        with pytest.raises(ClusterError) as err:
            connect(ClusterConfig(address=f"127.0.0.1:{port}", connect_timeout_s=1))
    assert str(err.value).startswith(
        f"cannot join the Ray cluster at 127.0.0.1:{port} (cluster.address): its port answers, but joining did "
        "not finish within 1 s (cluster.connect_timeout_s); check that it is a Ray "
    )
    assert calls == [{"address": f"127.0.0.1:{port}", "logging_level": 30}, "shutdown"]
    assert signal.getsignal(signal.SIGALRM) == signal.SIG_DFL and signal.getitimer(signal.ITIMER_REAL) == (
        0.0,
        0.0,
    )


def test_a_failed_join_is_one_line(monkeypatch):
    import ray

    def refuse(**kw):
        raise RuntimeError("Version mismatch: The cluster was started with:\n    Ray: 2.59.0\n...")

    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", refuse)
    monkeypatch.setattr(ray, "shutdown", lambda: None)
    with _server(GRPC_SETTINGS) as port:
        with pytest.raises(ClusterError) as err:
            connect(ClusterConfig(address=f"127.0.0.1:{port}", connect_timeout_s=3))
    assert str(err.value).startswith(
        f"cannot join the Ray cluster at 127.0.0.1:{port} (cluster.address): Version mismatch: The cluster was "
        "started with:; check that"
    )
    assert "\n" not in str(err.value)
