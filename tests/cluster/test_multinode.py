"""Head + 2 worker nodes (ray.cluster_utils.Cluster), each with a fake GPU: shards run on both nodes,
inputs reach them through the object store, and the output matches a single-process render."""

from __future__ import annotations

import concurrent.futures

import pytest
import ray
from ray.cluster_utils import Cluster

from cluster.driver import run_job
from cluster.faults import HOLD_ENV
from tests.helpers import assert_same_frames, held, job_for, wait_for


@pytest.fixture
def three_nodes():
    ray.shutdown()
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
    cluster.gpu_nodes = [cluster.add_node(num_cpus=1, num_gpus=1) for _ in range(2)]
    cluster.wait_for_nodes()
    ray.init(address=cluster.address)
    yield cluster
    ray.shutdown()
    cluster.shutdown()


def _two_gpu_job(tiny_models, demo_media, audio, out):
    return job_for(
        tiny_models,
        demo_media.video,
        audio,
        out,
        "shards.length=8",
        "cluster.gpus_per_worker=1",
        "cluster.max_in_flight=1",
    )


def test_shards_run_on_both_gpu_nodes(three_nodes, tiny_models, demo_media, short_job, tmp_path):
    audio, reference = short_job
    out = tmp_path / "multi.mp4"
    job = _two_gpu_job(tiny_models, demo_media, audio, out)
    assert job.cluster.inputs == "object_store"
    head = ray.get_runtime_context().get_node_id()[:8]
    summary = run_job(job)
    assert summary.workers == 2 and summary.shards == 5
    nodes = {name.rsplit(":", 1)[1] for name in summary.worker_frames}
    assert len(nodes) == 2 and head not in nodes, summary.worker_frames
    assert_same_frames(reference, out)


def test_job_survives_losing_a_node(three_nodes, tiny_models, demo_media, short_job, tmp_path, monkeypatch):
    audio, reference = short_job
    hold = tmp_path / "hold"
    hold.mkdir()
    monkeypatch.setenv(HOLD_ENV, str(hold))
    out = tmp_path / "lost_node.mp4"
    job = _two_gpu_job(tiny_models, demo_media, audio, out)
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        future = pool.submit(run_job, job)
        wait_for(lambda: len(held(hold)) == 2)  # both workers are blocked inside a shard
        three_nodes.remove_node(three_nodes.gpu_nodes[0])  # its raylet and workers die mid-shard
        (hold / "release-all").touch()
        summary = future.result(timeout=1800)
    assert summary.retries >= 1 and summary.frames == 40
    survivors = {name.rsplit(":", 1)[1] for name in summary.worker_frames}
    assert len(survivors) == 1
    assert_same_frames(reference, out)
