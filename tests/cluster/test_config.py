"""Every shipped config composes and validates; bad values are all reported at once."""

from __future__ import annotations

import pytest
from hydra import compose, initialize_config_dir

from cluster.config import CONF_DIR, job_from_config
from shards.errors import ConfigError


def _compose(*overrides: str):
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose("config", overrides=["task.output=/tmp/x/out.mp4", *overrides])


@pytest.mark.parametrize("models", ["musetalk_v15", "tiny"])
@pytest.mark.parametrize("enhance", ["none", "gfpgan"])
@pytest.mark.parametrize("cluster", ["local", "remote"])
def test_every_config_composes(models, enhance, cluster):
    cfg = _compose("+task=test", f"models={models}", f"enhance={enhance}", f"cluster={cluster}")
    job = job_from_config(cfg)
    assert job.video.name == "demo.mp4" and job.video.is_absolute()
    assert job.pipeline.tiny == (models == "tiny")
    assert job.pipeline.face.detector == ("haar" if models == "tiny" else "s3fd")
    assert job.pipeline.enhance.enabled == (enhance == "gfpgan")
    assert job.cluster.address == ("auto" if cluster == "remote" else "")


def test_interface_names():
    cfg = _compose(
        "+task=test",
        "task.bbox_shift=-7",
        "render.batch_size=3",
        "render.dtype=float16",
        "shards.length=20",
        "shards.overlap=5",
        "output.lossless=true",
        "enhance=gfpgan",
        "enhance.upscale=2",
        "cluster.workers=3",
        "cluster.gpus_per_worker=0.5",
        "models.dir=/somewhere",
    )
    job = job_from_config(cfg)
    assert job.pipeline.face.bbox_shift == -7
    assert job.pipeline.batch_size == 3 and job.pipeline.dtype == "float16"
    assert (job.shard_length, job.overlap) == (20, 5)
    assert job.encode.lossless and job.pipeline.enhance.upscale == 2
    assert job.cluster.workers == 3 and job.cluster.gpus_per_worker == 0.5
    assert job.pipeline.models_dir == "/somewhere"


def test_missing_task_is_a_clear_error():
    with pytest.raises(ConfigError, match=r"task.video is required .*\+task=test"):
        job_from_config(_compose())


def test_all_problems_reported_at_once():
    cfg = _compose(
        "+task=test",
        "face.detector=yolo",
        "render.batch_size=0",
        "enhance.upscale=3",
        "shards.overlap=0",
        "cluster.inputs=ftp",
        "+face.colour=red",
    )
    with pytest.raises(ConfigError) as err:
        job_from_config(cfg)
    msg = str(err.value)
    for needle in (
        "face.detector",
        "render.batch_size",
        "enhance.upscale",
        "shards.overlap",
        "cluster.inputs",
        "face.colour is not a known setting",
    ):
        assert needle in msg
