"""Autoscaling on a real multi-node Ray cluster (ray.cluster_utils.Cluster, fake GPUs): the pool grows onto
a GPU node that joins mid-job, shrinks cleanly when one leaves, and with cluster.require_gpus waits for GPU
nodes instead of rendering on CPU workers. Every output equals the single-process render."""

from __future__ import annotations

import concurrent.futures
import json
import logging

import pytest
import ray
from ray._private.ray_constants import AUTOSCALER_RESOURCE_REQUEST_CHANNEL
from ray.cluster_utils import Cluster
from ray.experimental.internal_kv import _internal_kv_get

from cluster.driver import run_job
from cluster.faults import HOLD_ENV
from cluster.pool import warm_pools
from shards.errors import ConfigError
from tests.helpers import assert_same_frames, held, job_for, wait_for


@pytest.fixture
def gpu_cluster(request):
    """A head without GPU (1 CPU) and ``request.param`` worker nodes with one fake GPU each, joined."""
    ray.shutdown()
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
    cluster.gpu_nodes = [cluster.add_node(num_cpus=1, num_gpus=1) for _ in range(request.param)]
    cluster.wait_for_nodes()
    ray.init(address=cluster.address)
    yield cluster
    ray.shutdown()
    cluster.shutdown()


@pytest.fixture
def hold(tmp_path, monkeypatch):
    d = tmp_path / "hold"
    d.mkdir()
    monkeypatch.setenv(HOLD_ENV, str(d))
    return d


def _gpu_job(tiny_models, demo_media, audio, out, *overrides):
    return job_for(
        tiny_models,
        demo_media.video,
        audio,
        out,
        "shards.length=8",  # 5 shards
        "cluster.gpus_per_worker=1",
        "cluster.max_in_flight=1",
        *overrides,
    )


def _nodes(summary) -> set[str]:
    """Node id prefixes of the workers that rendered (worker names end with one)."""
    return {name.rsplit(":", 1)[1] for name in summary.worker_frames}


def _requested() -> list[dict]:
    """What the driver last asked the autoscaler for (recorded in the GCS without an autoscaler)."""
    raw = _internal_kv_get(AUTOSCALER_RESOURCE_REQUEST_CHANNEL)
    return json.loads(raw) if raw else []


@pytest.mark.parametrize("gpu_cluster", [1], indirect=True)
def test_the_pool_grows_onto_a_node_that_joins_mid_job(
    gpu_cluster, hold, tiny_models, demo_media, short_job, tmp_path
):
    audio, reference = short_job
    out = tmp_path / "grown.mp4"
    job = _gpu_job(tiny_models, demo_media, audio, out)
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        future = pool.submit(run_job, job)
        try:
            wait_for(lambda: held(hold) or future.done())  # the only worker is blocked inside a shard
            assert len(held(hold)) == 1
            # A GPU worker asked for per shard the job still has (the request follows the pool's next look).
            wait_for(lambda: len(_requested()) == 5 or future.done())
            joined = gpu_cluster.add_node(num_cpus=1, num_gpus=1)
            wait_for(lambda: len(held(hold)) == 2 or future.done())  # a second worker, on the new node
        finally:
            (hold / "release-all").touch()  # a failed check must not leave the job held forever
        summary = future.result(timeout=600)
    assert (summary.workers_start, summary.workers) == (1, 2)
    assert summary.model_loads == 2 and summary.retries == 0
    assert _nodes(summary) == {gpu_cluster.gpu_nodes[0].node_id[:8], joined.node_id[:8]}
    assert_same_frames(reference, out)
    warm_pools().discard(graceful=True)
    assert _requested() == []  # the discarded pool clears its request


@pytest.mark.parametrize("gpu_cluster", [2], indirect=True)
def test_the_pool_shrinks_when_a_node_leaves(gpu_cluster, hold, tiny_models, demo_media, short_job, tmp_path):
    audio, reference = short_job
    out = tmp_path / "shrunk.mp4"
    job = _gpu_job(tiny_models, demo_media, audio, out)
    leaving, staying = gpu_cluster.gpu_nodes
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        future = pool.submit(run_job, job)
        try:
            wait_for(lambda: len(held(hold)) == 2 or future.done())  # both workers are blocked inside a shard
            gpu_cluster.remove_node(leaving)  # its worker dies mid-shard; no node has room for a replacement
            # The survivor stays held until the pool has given the lost slot up (rather than restarting it
            # forever): a real state change of the driver's pool, observed, not waited for by time.
            wait_for(lambda: warm_pools().pool.size == 1 or future.done())
        finally:
            (hold / "release-all").touch()  # a failed check must not leave the job held forever
        summary = future.result(timeout=600)
    assert (summary.workers_start, summary.workers) == (2, 1)
    assert summary.retries >= 1 and summary.frames == 40
    assert _nodes(summary) <= {leaving.node_id[:8], staying.node_id[:8]}
    assert staying.node_id[:8] in _nodes(summary)
    assert_same_frames(reference, out)
    # The shrunk pool stays warm: the next job with the same models runs on it without loading models.
    built = warm_pools().built
    again = run_job(_gpu_job(tiny_models, demo_media, audio, tmp_path / "again.mp4"))
    assert warm_pools().built == built and again.model_loads == 0
    assert (again.workers_start, again.workers) == (1, 1) and _nodes(again) == {staying.node_id[:8]}
    assert_same_frames(reference, tmp_path / "again.mp4")


@pytest.mark.parametrize("gpu_cluster", [0], indirect=True)
def test_require_gpus_waits_for_a_gpu_node(gpu_cluster, tiny_models, demo_media, short_job, tmp_path, caplog):
    """A joined cluster without GPU (an autoscaler at min 0): the driver asks for GPU workers, waits for a
    GPU node and renders there; it never starts CPU workers on the head."""
    audio, reference = short_job
    out = tmp_path / "waited.mp4"
    job = _gpu_job(tiny_models, demo_media, audio, out, "cluster.require_gpus=true", "cluster.max_workers=1")
    caplog.set_level(logging.WARNING, logger="cluster.pool")
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        future = pool.submit(run_job, job)
        try:
            wait_for(lambda: "no GPU yet" in caplog.text or future.done())
            assert _requested() == [{"GPU": 1.0, "CPU": 1.0}]  # max_workers=1
        finally:
            gpu = gpu_cluster.add_node(num_cpus=1, num_gpus=1)  # a failed check must not leave it waiting
        summary = future.result(timeout=600)
    assert _nodes(summary) == {gpu.node_id[:8]}
    assert summary.workers == 1 and summary.model_loads == 1
    assert_same_frames(reference, out)


def test_require_gpus_on_an_embedded_cluster_fails_before_any_worker(
    tiny_models, demo_media, short_job, tmp_path
):
    """An embedded cluster never gains a GPU node: with require_gpus, the driver refuses before starting
    any worker (the CLI checks first; run_jobs, as a batch calls it, refuses too)."""
    audio, _ = short_job
    ray.shutdown()
    ray.init(address="local", num_cpus=1, include_dashboard=False)
    try:
        out = tmp_path / "never.mp4"
        with pytest.raises(ConfigError, match="cluster.require_gpus=true but the Ray cluster has no GPU"):
            run_job(_gpu_job(tiny_models, demo_media, audio, out, "cluster.require_gpus=true"))
        assert warm_pools().pool is None and not out.exists()
    finally:
        ray.shutdown()
