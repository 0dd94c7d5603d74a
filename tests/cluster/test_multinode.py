"""Head + 2 worker nodes (ray.cluster_utils.Cluster), each with a fake GPU: shards run on both nodes,
inputs reach them through the object store, and the output matches a single-process render."""

from __future__ import annotations

import concurrent.futures

import numpy as np
import pytest
import ray
from ray.cluster_utils import Cluster

from cluster.driver import run_job
from musetalk.pipeline import render_local
from tests.helpers import busy_workers, decode_all, job_for, trimmed_audio, wait_for


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


def test_shards_run_on_both_gpu_nodes(three_nodes, tiny_models, demo_media, tmp_path):
    audio = trimmed_audio(demo_media.audio, tmp_path / "short.wav", 1.6)
    out = tmp_path / "multi.mp4"
    job = job_for(
        tiny_models,
        demo_media.video,
        audio,
        out,
        "shards.length=8",
        "cluster.gpus_per_worker=1",
        "cluster.max_in_flight=1",
    )
    assert job.cluster.inputs == "object_store"
    head = ray.get_runtime_context().get_node_id()[:8]
    summary = run_job(job)
    assert summary.workers == 2 and summary.shards == 5
    nodes = {name.rsplit(":", 1)[1] for name in summary.worker_frames}
    assert len(nodes) == 2 and head not in nodes, summary.worker_frames
    ref = render_local(demo_media.video, audio, tmp_path / "ref.mp4", job.pipeline, encode=job.encode)
    a, b = decode_all(ref.output), decode_all(out)
    assert len(a) == len(b) == 40
    assert all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))


def test_job_survives_losing_a_node(three_nodes, tiny_models, demo_media, tmp_path):
    audio = trimmed_audio(demo_media.audio, tmp_path / "short.wav", 1.6)
    out = tmp_path / "lost_node.mp4"
    job = job_for(
        tiny_models,
        demo_media.video,
        audio,
        out,
        "shards.length=8",
        "cluster.gpus_per_worker=1",
        "cluster.max_in_flight=1",
    )
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        future = pool.submit(run_job, job)
        wait_for(lambda: len(busy_workers()) == 2)
        three_nodes.remove_node(three_nodes.gpu_nodes[0])  # its raylet and workers die mid-shard
        summary = future.result(timeout=600)
    assert summary.retries >= 1 and summary.frames == 40
    survivors = {name.rsplit(":", 1)[1] for name in summary.worker_frames}
    assert len(survivors) == 1
    ref = render_local(demo_media.video, audio, tmp_path / "ref.mp4", job.pipeline, encode=job.encode)
    assert all(np.array_equal(x, y) for x, y in zip(decode_all(ref.output), decode_all(out), strict=True))
