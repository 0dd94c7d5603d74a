"""Fixtures shared by the cluster tests: a 2 s job and its single-process render (the reference)."""

from __future__ import annotations

import pytest
import ray

from musetalk.pipeline import render_local
from tests.helpers import decode_all, job_for, trimmed_audio


@pytest.fixture(scope="session")
def short_audio(demo_media, tmp_path_factory):
    return trimmed_audio(demo_media.audio, tmp_path_factory.mktemp("audio") / "short.wav", 2.0)


@pytest.fixture(scope="session")
def reference_frames(tiny_models, demo_media, short_audio, tmp_path_factory):
    """The short job rendered in this process as one shard (same thread count as the workers)."""
    out = tmp_path_factory.mktemp("reference") / "ref.mp4"
    base = job_for(tiny_models, demo_media.video, short_audio, out, "shards.length=1000")
    result = render_local(demo_media.video, short_audio, out, base.pipeline, encode=base.encode)
    assert len(result.plan.shards) == 1
    frames = decode_all(out)
    assert len(frames) == 50
    return frames


@pytest.fixture(scope="module")
def local_ray():
    """An embedded Ray cluster for the tests of one module (2 CPUs, no dashboard)."""
    ray.shutdown()
    ray.init(address="local", num_cpus=2, include_dashboard=False)
    yield
    ray.shutdown()
