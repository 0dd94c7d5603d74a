"""Joining a cluster (cluster.session): which address, from where, probed and bounded in time.

The address rules are a table (no Ray started); the probe runs against local sockets (one listening, one
closed); the bound on ``ray.init`` runs in a subprocess against a port that accepts and never answers, so
that a half-made connection cannot leak into this process's Ray.
"""

from __future__ import annotations

import socket
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from contextlib import contextmanager

import pytest

from cluster.config import REPO_ROOT, ClusterConfig
from cluster.session import Target, check_reachable, target
from shards.errors import ClusterError


@contextmanager
def _listening() -> Iterator[int]:
    """A local port that accepts connections (the kernel's backlog) and never says a word."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen(8)
        yield sock.getsockname()[1]


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
        ("http://head:8265", None, "cluster.address=http://head:8265 is not an address Ray can join"),
        ("", "head", "RAY_ADDRESS=head is not an address Ray can join"),
        ("auto", None, "cluster.address=auto finds no Ray cluster to join: nothing is recorded in"),
    ],
)  # fmt: skip
def test_the_address_to_join_and_where_it_came_from(no_local_cluster, address, env, expected):
    if env is not None:
        no_local_cluster.setenv("RAY_ADDRESS", env)
    cfg = ClusterConfig(address=address)
    if isinstance(expected, str):
        with pytest.raises(ClusterError, match=expected.replace(".", r"\.").replace("[", r"\[")):
            target(cfg)
    else:
        assert target(cfg) == expected


def test_auto_is_the_cluster_ray_start_recorded(no_local_cluster):
    import ray._private.utils

    no_local_cluster.setattr(ray._private.utils, "read_ray_address", lambda temp_dir=None: "10.0.0.7:6379")
    t = target(ClusterConfig(address="auto"))
    assert (t.address, t.host, t.port) == ("10.0.0.7:6379", "10.0.0.7", 6379)
    assert t.source.startswith("cluster.address=auto: the cluster recorded in ")


def test_probe_passes_a_listening_port_and_names_a_dead_one():
    with _listening() as port:
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


def test_embedded_cluster_is_not_probed(no_local_cluster):
    assert check_reachable(ClusterConfig(address="")) is None


def test_joining_a_port_that_never_answers_is_bounded():
    """The port accepts (the probe passes) but no Ray answers: ``ray.init`` alone would retry for minutes;
    connect() stops it after connect_timeout_s with one line (the subprocess timeout only stops a hang)."""
    with _listening() as port:
        code = textwrap.dedent(
            f"""
            from cluster.config import ClusterConfig
            from cluster.session import connect
            from shards.errors import ClusterError
            try:
                connect(ClusterConfig(address="127.0.0.1:{port}", connect_timeout_s=2))
            except ClusterError as err:
                print("error:", err)
            """
        )
        proc = subprocess.run(
            [sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True, timeout=150
        )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.startswith(
        f"error: cannot join the Ray cluster at 127.0.0.1:{port} (cluster.address): its port answers, but "
        "joining did not finish within 2 s (cluster.connect_timeout_s)"
    ), proc.stdout + proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
