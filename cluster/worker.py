"""The RenderWorker actor: a thin Ray shell around musetalk.pipeline.FramePipeline.

Models load once in ``__init__``; each ``render`` call renders one shard and returns its encoded
segment bytes and stats. Inputs arrive through the object store (or as paths every node can read)
and are materialised once per job on the worker's node.
"""

from __future__ import annotations

import logging
import os
import shutil
import socket
import tempfile
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import ray

from musetalk.config import PipelineConfig
from musetalk.pipeline import FramePipeline, ShardStats
from shards.errors import FarmError
from shards.plan import Plan, Shard
from shards.probe import VideoInfo, load_audio, probe_video
from shards.segment import EncodeSettings

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class JobInputs:
    """How a worker gets a job's inputs: object-store refs (held in lists so Ray does not resolve them per call) or paths."""

    job_id: str
    video_suffix: str
    video_ref: list | None = None  # [ObjectRef to the video file's bytes]
    audio_ref: list | None = None  # [ObjectRef to (N,) float32 16 kHz samples]
    video_path: str | None = None
    audio_path: str | None = None


class RenderWorker:
    """Holds the models; renders one shard at a time. Use via ``ray.remote(RenderWorker).options(...)``."""

    def __init__(self, cfg: PipelineConfig, progress=None) -> None:
        logging.basicConfig(level=logging.INFO)
        self.name = f"{socket.gethostname()}:{os.getpid()}:{ray.get_runtime_context().get_node_id()[:8]}"
        self.progress = progress
        self._tmp = Path(tempfile.mkdtemp(prefix="musetalk-worker-"))
        self._job: tuple[str, VideoInfo, np.ndarray] | None = None
        # An expected failure (missing weights, bad config) is kept and raised by ready(), so the
        # driver sees the FarmError itself rather than an opaque actor death.
        self._init_error: FarmError | None = None
        try:
            self.pipeline = FramePipeline(cfg)
        except FarmError as err:
            self._init_error = err
            return
        logger.info("worker %s ready on %s", self.name, self.pipeline.models.device)

    def ready(self) -> str:
        if self._init_error is not None:
            raise self._init_error
        return self.name

    def _inputs(self, job: JobInputs) -> tuple[VideoInfo, np.ndarray]:
        if self._job is None or self._job[0] != job.job_id:
            if job.video_ref is not None:
                video = self._tmp / f"{job.job_id}{job.video_suffix}"
                video.write_bytes(ray.get(job.video_ref[0]))
                samples = ray.get(job.audio_ref[0])
            else:
                video = Path(job.video_path)
                samples = load_audio(job.audio_path)
            self._job = (job.job_id, probe_video(video), samples)
        return self._job[1], self._job[2]

    def render(
        self, job: JobInputs, plan: Plan, shard: Shard, encode: EncodeSettings
    ) -> tuple[bytes, ShardStats]:
        info, samples = self._inputs(job)
        out = self._tmp / f"{job.job_id}-{shard.name}.mkv"
        progress = on_stage = None
        if self.progress is not None:
            self.progress.reset.remote(shard.index)

            def progress(n: int) -> None:
                self.progress.add.remote(shard.index, n)

            def on_stage(name: str) -> None:
                self.progress.stage.remote(shard.index, name)

        try:
            stats = self.pipeline.render_shard(
                video=info,
                samples=samples,
                plan=plan,
                shard=shard,
                out_path=out,
                encode=encode,
                progress=progress,
                on_stage=on_stage,
            )
            return out.read_bytes(), replace(stats, worker=self.name)
        finally:
            out.unlink(missing_ok=True)
            if self.progress is not None:
                self.progress.done.remote(shard.index)

    def close(self) -> None:
        shutil.rmtree(self._tmp, ignore_errors=True)
