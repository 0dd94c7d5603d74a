"""Fixtures shared by the cluster tests: short jobs and their single-process renders (the references)."""

from __future__ import annotations

import pytest
import ray

from musetalk.local import render_local
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


@pytest.fixture(scope="session")
def short_job(tiny_models, demo_media, tmp_path_factory):
    """A 40-frame job (1.6 s of audio) and its single-process render, the reference every run must equal
    (the multi-node and autoscaling tests: rendered once for both modules, which only read it)."""
    tmp = tmp_path_factory.mktemp("multinode")
    audio = trimmed_audio(demo_media.audio, tmp / "short.wav", 1.6)
    base = job_for(tiny_models, demo_media.video, audio, tmp / "ref.mp4")
    reference = decode_all(
        render_local(demo_media.video, audio, base.output, base.pipeline, encode=base.encode).output
    )
    assert len(reference) == 40
    return audio, reference
