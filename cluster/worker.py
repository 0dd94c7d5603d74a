"""The RenderWorker actor: a thin Ray shell around musetalk.pipeline.FramePipeline.

Models load once in ``__init__`` and serve every job the pool is given (a warm pool outlives a job: a
batch, or the runs of a multirun sweep). A worker runs up to ``cluster.max_in_flight`` units at once, each
in its own thread over the same models (a threaded actor): a preparation unit beside a generation shard
keeps the device busy while the other unit decodes, builds masks, composites or encodes. ``prepare`` runs one unit of a job's preparation phase (detect,
prepare or audio: see :mod:`cluster.phases`) and returns its result; ``render`` renders one generation
shard from those results and returns its encoded segment bytes and stats. Per-job settings that do not change the models (``bbox_shift``)
travel with the job. Inputs arrive through the object store (or as paths every node can read, or as URIs
each node stages once: ``cluster.storage``; a URI ``models.dir`` is synced per node likewise) and are
materialised once per job on the worker's node, under ``<tmp>/musetalk-job-<id>/<pid>/``: the driver
removes the job's root on its node when the job ends, a worker removes its own directories when told to
forget a job or when closed, and a worker starting on a node removes what dead workers left there.
"""

from __future__ import annotations

import logging
import os
import resource
import shutil
import socket
import tempfile
import threading
import time
from collections import Counter
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import ray
import torch

from cluster import storage
from cluster.memory import cpu_seconds, memory_mib, trim_heap
from cluster.weights import local_models
from musetalk.audio import AudioFeatures
from musetalk.avatar import AvatarStore, fetch
from musetalk.config import PipelineConfig
from musetalk.entries import EntrySource, detections_to_json, pack_chunk
from musetalk.pipeline import FramePipeline
from musetalk.stages import on_stream
from musetalk.stats import PrepStats, ShardStats
from shards.plan import Plan, PrepUnit, Shard
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
    ``pipeline`` is the job's own settings: they may differ from the pool's only where the models do not
    (see ``cluster.pool.pool_key``). ``progress`` is the driver's progress actor, ``tag`` this job's
    prefix in it (units of several jobs share one counter); ``scratch`` is the job's scratch root.
    """

    job_id: str
    video_suffix: str
    video: VideoInfo
    video_ref: list | None = None  # [ObjectRef to the video file's bytes, as a uint8 array]
    audio_ref: list | None = None  # [ObjectRef to (N,) float32 16 kHz samples]
    video_path: str | None = None
    audio_path: str | None = None
    pipeline: PipelineConfig | None = None
    progress: object = None
    tag: str = ""
    scratch: str | None = None


@dataclass(frozen=True)
class ShardInputs:
    """Where a generation unit finds what the preparation phase made: entry chunks as ``(start, end,
    [ref])`` over source frames ``[start, end)``, and Whisper segments as ``(k, [ref])`` (refs in lists so
    Ray does not resolve them per call: the worker fetches only the chunks holding its frames)."""

    chunks: tuple = ()
    segments: tuple = ()


# Inputs of this many jobs stay materialised per worker (units of neighbouring jobs interleave).
_KEEP_JOBS = 4
# Whisper segments kept per worker for the next unit of the same job.
_KEEP_SEGMENTS = 4


class RenderWorker:
    """Holds the models; runs units in threads. Use via ``ray.remote(RenderWorker).options(...)``, with
    ``max_concurrency`` above the units the driver gives it at once (control calls need a thread too).

    Shared state (job inputs, pipelines, Whisper segments, counters) is guarded by one lock, held only
    for bookkeeping (never across a download or a model call); the models
    are shared by the unit threads (torch modules run concurrently; the Haar cascade locks itself)."""

    def __init__(self, cfg: PipelineConfig) -> None:
        logging.basicConfig(level=logging.INFO)
        self.name = f"{socket.gethostname()}:{os.getpid()}:{ray.get_runtime_context().get_node_id()[:8]}"
        self.cfg = cfg
        self._jobs: dict[str, tuple[VideoInfo, np.ndarray, Path]] = {}  # job id -> inputs, scratch dir
        self._pipelines: dict[PipelineConfig, FramePipeline] = {}
        self._segments: dict[tuple, torch.Tensor] = {}  # (job id, k) -> Whisper features
        self._lock = threading.RLock()
        self._busy: Counter[str] = Counter()  # job id -> units of it running now (never evicted)
        self._gates: dict[str, threading.Lock] = {}  # job id -> held while its inputs are materialised
        self._cpu_at_ready = 0.0
        self.loads = 0
        self.load_seconds = 0.0
        self.units = 0  # generation shards rendered
        self.prep_units = 0  # preparation units (detect, prepare, audio)
        sweep_dead_scratch()
        # A failure while loading (missing weights, a device this node lacks, ...) is kept and raised by
        # ready(), so the driver fails the job with the reason at once instead of restarting workers.
        self._init_error: Exception | None = None
        start = time.perf_counter()
        try:
            # A URI models.dir is synced into this node's staging directory first (once per node).
            self.pipeline = FramePipeline(local_models(cfg))
        except Exception as err:  # noqa: BLE001 - re-raised by ready()
            logger.exception("worker %s failed to load its models", self.name)
            self._init_error = err
            return
        self.loads += 1
        self.load_seconds = time.perf_counter() - start
        self._pipelines[cfg] = self.pipeline
        self._cpu_at_ready = cpu_seconds()
        logger.info(
            "worker %s ready on %s (models loaded in %.1f s)",
            self.name,
            self.pipeline.models.device,
            self.load_seconds,
        )

    def ready(self) -> str:
        if self._init_error is not None:
            raise self._init_error
        return self.name

    def info(self) -> dict:
        """Name, model loads and their seconds, units rendered (the driver charges loads to jobs); CPU
        seconds since the models loaded (ffmpeg children included) and peak RSS (benchmarks)."""
        with self._lock:
            return {
                "name": self.name,
                "loads": self.loads,
                "load_seconds": self.load_seconds,
                "units": self.units,
                "prep_units": self.prep_units,
                "cpu_seconds": cpu_seconds() - self._cpu_at_ready,
                "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                "memory_mib": memory_mib(),
                "peak_cuda_mib": torch.cuda.max_memory_allocated() / 2**20
                if torch.cuda.is_initialized()
                else None,
            }

    def _pipeline(self, cfg: PipelineConfig | None) -> FramePipeline:
        """The job's pipeline over the already-loaded models (per-job settings such as bbox_shift)."""
        if cfg is None:
            return self.pipeline
        with self._lock:
            if cfg not in self._pipelines:
                self._pipelines[cfg] = FramePipeline(cfg, models=self.pipeline.models)
            return self._pipelines[cfg]

    def _scratch(self, job: JobInputs) -> Path:
        return Path(job.scratch or scratch_root(job.job_id)) / str(os.getpid())

    @contextmanager
    def _job(self, job: JobInputs):
        """The job's materialised inputs while one of its units runs (a running job is never evicted).

        Materialising (writing the video out of the object store, or staging a URI) happens under the
        job's own gate, not the worker's lock: a unit of another job goes on meanwhile."""
        with self._lock:
            self._busy[job.job_id] += 1
            gate = self._gates.setdefault(job.job_id, threading.Lock())
        try:
            with gate:
                inputs = self._inputs(job)
            yield inputs
        finally:
            with self._lock:
                self._busy[job.job_id] -= 1
                if not self._busy[job.job_id]:
                    del self._busy[job.job_id]

    def _inputs(self, job: JobInputs) -> tuple[VideoInfo, np.ndarray, Path]:
        """Materialise the job's inputs once (call with the job's gate held)."""
        with self._lock:
            if job.job_id in self._jobs:
                return self._jobs[job.job_id]
            evicted = []  # the oldest jobs with no unit running (checked under the lock that counts them)
            for old in [j for j in self._jobs if j not in self._busy]:
                if len(self._jobs) < _KEEP_JOBS:
                    break
                evicted.append(self._drop(old))
        for scratch in evicted:
            _remove_scratch(scratch)
        tmp = self._scratch(job)
        if job.video_ref is not None:
            tmp.mkdir(parents=True, exist_ok=True)
            video = tmp / f"{job.job_id}{job.video_suffix}"
            with open(video, "wb") as f:  # from the object store's pages: no copy of the file on the heap
                f.write(memoryview(ray.get(job.video_ref[0])))
            samples = ray.get(job.audio_ref[0])
        else:  # local paths every node can read, or URIs staged on this node (once per object version)
            video = storage.stage(job.video_path)
            samples = load_audio(storage.stage(job.audio_path))
        with self._lock:
            self._jobs[job.job_id] = (replace(job.video, path=str(video)), samples, tmp)
            return self._jobs[job.job_id]

    def forget(self, job_id: str) -> None:
        """Drop a finished job's inputs and scratch directory."""
        with self._lock:
            scratch = self._drop(job_id)
        if scratch is not None:
            _remove_scratch(scratch)

    def _drop(self, job_id: str) -> Path | None:
        """Forget a job's inputs and Whisper segments (call with the lock held); its scratch dir to remove."""
        entry = self._jobs.pop(job_id, None)
        if job_id not in self._busy:
            self._gates.pop(job_id, None)
        for key in [k for k in self._segments if k[0] == job_id]:
            del self._segments[key]
        return None if entry is None else entry[2]

    def _tracker(self, job: JobInputs, name: str):
        """(progress, on_stage) callbacks into the driver's progress actor, or Nones."""
        tracker, key = job.progress, f"{job.tag}{name}"
        if tracker is None:
            return None, None
        tracker.reset.remote(key)
        return (lambda n: tracker.add.remote(key, n)), (lambda text: tracker.stage.remote(key, text))

    def _untrack(self, job: JobInputs, name: str) -> None:
        if job.progress is not None:
            job.progress.done.remote(f"{job.tag}{name}")

    def prepare(
        self, job: JobInputs, unit: PrepUnit, boxes: dict | None = None, store: tuple | None = None
    ) -> tuple[object, PrepStats]:
        """One preparation unit: ``detect`` -> detections JSON of source frames ``[start, end)``;
        ``prepare`` -> their entry chunk (:func:`musetalk.avatar.pack_chunk`) from ``boxes``; ``audio``
        -> {k: (1500, L, D) float32 array} for Whisper segments ``[start, end)``.

        With ``store`` = (cache root URI, video hash, key), an avatar cache every node reaches, a chunk is
        written there by this worker and its URI returned instead of its bytes (shards then read it from
        there, and it never passes through the driver)."""
        try:
            with self._job(job) as (info, samples, _), _own_stream(self.pipeline.models.device):
                result, stats = self._prepare(job, info, samples, unit, boxes, store)
        finally:
            trim_heap()
        with self._lock:
            self.prep_units += 1
        return result, replace(stats, unit=unit.name, worker=self.name)

    def _prepare(self, job, info, samples, unit, boxes, store) -> tuple[object, PrepStats]:
        pipeline = self._pipeline(job.pipeline)
        _, on_stage = self._tracker(job, unit.name)
        try:
            if unit.kind == "detect":
                found, stats = pipeline.detect_range(info, unit.start, unit.end, on_stage)
                result = detections_to_json(found)
            elif unit.kind == "prepare":
                entries, stats = pipeline.prepare_range(info, unit.start, unit.end, boxes, on_stage)
                result = pack_chunk(entries)
                if store is not None:
                    result = _publish_chunk(store, unit, result)
            elif unit.kind == "audio":
                features, stats = pipeline.encode_audio(samples, list(range(unit.start, unit.end)))
                result = {k: v.numpy() for k, v in features.items()}
            else:
                raise ValueError(f"unknown preparation unit kind {unit.kind!r}")
        finally:
            self._untrack(job, unit.name)
        return result, stats

    def _audio(self, job: JobInputs, prepared: ShardInputs, plan: Plan) -> AudioFeatures:
        segments = {}
        for k, ref in prepared.segments:
            key = (job.job_id, k)
            with self._lock:
                segments[k] = self._segments.get(key)
            if segments[k] is None:
                segments[k] = torch.from_numpy(np.array(ray.get(ref[0])))  # a writable copy
                with self._lock:
                    while len(self._segments) >= _KEEP_SEGMENTS:
                        del self._segments[next(iter(self._segments))]
                    self._segments[key] = segments[k]
        return AudioFeatures(segments, plan.total_samples, plan.fps)

    def render(
        self, job: JobInputs, plan: Plan, shard: Shard, encode: EncodeSettings, prepared: ShardInputs
    ) -> tuple[bytes, ShardStats]:
        """One generation unit: output frames ``[shard.start, shard.end)`` from the prepared entries."""
        try:
            with self._job(job) as (info, _, tmp), _own_stream(self.pipeline.models.device):
                return self._render(job, plan, shard, encode, prepared, info, tmp)
        finally:
            trim_heap()

    def _render(self, job, plan, shard, encode, prepared, info, tmp) -> tuple[bytes, ShardStats]:
        _hold(shard)
        tmp.mkdir(parents=True, exist_ok=True)
        out = tmp / f"{job.job_id}-{shard.name}.mkv"
        progress, on_stage = self._tracker(job, shard.name)
        try:
            stats = self._pipeline(job.pipeline).render_shard(
                video=info,
                plan=plan,
                shard=shard,
                out_path=out,
                encode=encode,
                entries=EntrySource([(a, b, ref[0]) for a, b, ref in prepared.chunks], _fetch_chunk),
                audio=self._audio(job, prepared, plan),
                progress=progress,
                on_stage=on_stage,
            )
            with self._lock:
                self.units += 1
            return out.read_bytes(), replace(stats, worker=self.name)
        finally:
            out.unlink(missing_ok=True)
            self._untrack(job, shard.name)

    def close(self) -> None:
        for job_id in list(self._jobs):
            self.forget(job_id)


@contextmanager
def _own_stream(device: torch.device):
    """On CUDA, the calling unit's kernels go to a stream of its own, so units side by side overlap on the
    GPU too and each unit's CUDA-event stage timings are its own (the current stream is per thread: a unit's
    device work runs in its calling thread, and a shard's generation thread is handed the same stream,
    see :func:`musetalk.stages.current_stream`). Elsewhere nothing changes."""
    with on_stream(torch.cuda.Stream(device) if device.type == "cuda" else None):
        yield


def _publish_chunk(store: tuple, unit: PrepUnit, blob: bytes) -> bytes | str:
    """Write a chunk to the shared avatar cache and return its URI; if that fails, the bytes (they go
    through the driver instead: the cache costs reuse, never the render)."""
    root, video, key = store
    cache = AvatarStore(root)
    try:
        cache.write(video, key, unit.start, unit.end, "npz", blob)
    except OSError as err:
        logger.warning(
            "avatar cache %s: could not write %s (%s); sending it to the driver", root, unit.name, err
        )
        return blob
    uri = cache.uri(video, key, unit.start, unit.end, "npz")
    logger.info("wrote avatar entries %d-%d to %s", unit.start, unit.end, uri)
    return uri


def _fetch_chunk(handle) -> bytes:
    """A chunk's bytes from Ray's object store, or from the avatar cache by URI."""
    return fetch(handle) if isinstance(handle, str) else ray.get(handle)


def _remove_scratch(tmp: Path) -> None:
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tmp.parent.rmdir()
    except OSError:
        pass  # other workers of the job still use it (or it is gone): the driver removes it
