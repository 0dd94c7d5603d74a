"""The RenderWorker actor: a thin Ray shell around musetalk.pipeline.FramePipeline.

Models load once in ``__init__``; each ``render`` call renders one shard and returns its encoded
segment bytes and stats. Inputs arrive through the object store (or as paths every node can read)
and are materialised once per job on the worker's node, under ``<tmp>/musetalk-job-<id>/<pid>/``: the
driver removes the job's root on its node, a worker removes its own directory when closed, and a worker
starting on a node removes what dead workers left there.
"""

from __future__ import annotations

import logging
import os
import shutil
import socket
import tempfile
import time
import uuid
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import ray

from musetalk.config import PipelineConfig
from musetalk.pipeline import FramePipeline, ShardStats
from shards.plan import Plan, Shard
from shards.probe import VideoInfo, load_audio
from shards.segment import EncodeSettings

logger = logging.getLogger(__name__)

SCRATCH_PREFIX = "musetalk-job-"
# Test hook: with this set to a directory, a worker about to render shard S creates ``held-S-<pid>`` there
# and waits until ``release-S`` or ``release-all`` appears, so tests kill or interrupt at a known point.
HOLD_ENV = "MUSETALK_HOLD_DIR"


def scratch_root(job_id: str) -> Path:
    """The node-local directory under which every worker of job ``job_id`` keeps its scratch."""
    return Path(tempfile.gettempdir()) / f"{SCRATCH_PREFIX}{job_id}"


def sweep_dead_scratch(tmp: Path | None = None) -> int:
    """Remove scratch of workers on this node whose process is gone (killed mid-job); returns the count."""
    removed = 0
    for d in Path(tmp or tempfile.gettempdir()).glob(f"{SCRATCH_PREFIX}*/*"):
        if d.name.isdigit() and not _alive(int(d.name)):
            shutil.rmtree(d, ignore_errors=True)
            removed += 1
            try:
                d.parent.rmdir()  # the job's root, once its last worker's scratch is gone
            except OSError:
                pass
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _hold(shard: Shard) -> None:
    hold = os.environ.get(HOLD_ENV)
    if not hold:
        return
    d = Path(hold)
    (d / f"held-{shard.name}-{os.getpid()}").touch()
    while not ((d / f"release-{shard.name}").exists() or (d / "release-all").exists()):
        time.sleep(0.05)


@dataclass(frozen=True)
class JobInputs:
    """How a worker gets a job's inputs: object-store refs (held in lists so Ray does not resolve them per call) or paths.

    ``video`` is the driver's probe (probing decodes the whole stream, so workers never repeat it).
    """

    job_id: str
    video_suffix: str
    video: VideoInfo
    video_ref: list | None = None  # [ObjectRef to the video file's bytes]
    audio_ref: list | None = None  # [ObjectRef to (N,) float32 16 kHz samples]
    video_path: str | None = None
    audio_path: str | None = None


class RenderWorker:
    """Holds the models; renders one shard at a time. Use via ``ray.remote(RenderWorker).options(...)``."""

    def __init__(self, cfg: PipelineConfig, progress=None, scratch: str | None = None) -> None:
        logging.basicConfig(level=logging.INFO)
        self.name = f"{socket.gethostname()}:{os.getpid()}:{ray.get_runtime_context().get_node_id()[:8]}"
        self.progress = progress
        self._tmp = (Path(scratch) if scratch else scratch_root(uuid.uuid4().hex[:12])) / str(os.getpid())
        self._job: tuple[str, VideoInfo, np.ndarray] | None = None
        sweep_dead_scratch()
        # A failure while loading (missing weights, a device this node lacks, ...) is kept and raised by
        # ready(), so the driver fails the job with the reason at once instead of restarting workers.
        self._init_error: Exception | None = None
        try:
            self.pipeline = FramePipeline(cfg)
        except Exception as err:  # noqa: BLE001 - re-raised by ready()
            logger.exception("worker %s failed to load its models", self.name)
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
                self._tmp.mkdir(parents=True, exist_ok=True)
                video = self._tmp / f"{job.job_id}{job.video_suffix}"
                video.write_bytes(ray.get(job.video_ref[0]))
                samples = ray.get(job.audio_ref[0])
            else:
                video = Path(job.video_path)
                samples = load_audio(job.audio_path)
            self._job = (job.job_id, replace(job.video, path=str(video)), samples)
        return self._job[1], self._job[2]

    def render(
        self, job: JobInputs, plan: Plan, shard: Shard, encode: EncodeSettings
    ) -> tuple[bytes, ShardStats]:
        info, samples = self._inputs(job)
        _hold(shard)
        self._tmp.mkdir(parents=True, exist_ok=True)
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
        try:
            self._tmp.parent.rmdir()
        except OSError:
            pass  # other workers of the job still use it (or it is gone): the driver removes it
