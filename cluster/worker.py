"""The RenderWorker actor: a thin Ray shell around musetalk.pipeline.FramePipeline.

Models load once in ``__init__`` and serve every job the pool is given (a warm pool outlives a job: a
batch, or the runs of a multirun sweep). A worker runs up to ``cluster.max_in_flight`` units at once, each
in its own thread over the same models (a threaded actor): a preparation unit beside a generation shard
keeps the device busy while the other unit decodes, builds masks, composites or encodes. ``prepare`` runs
one unit of a job's preparation phase (detect, prepare or audio: see :mod:`musetalk.preparation`) and returns its
result; ``render`` renders one generation shard from those results and returns its encoded segment bytes
and stats. Per-job settings that do not change the models (``bbox_shift``) travel with the job. A job's
inputs, its scratch directories and the Whisper segments shards read are :mod:`cluster.inputs` (Ray-free:
this actor hands it ``ray.get`` to resolve refs).
"""

from __future__ import annotations

import logging
import os
import resource
import socket
import threading
import time
from contextlib import contextmanager
from dataclasses import replace

import ray
import torch

from cluster import faults, storage
from cluster.cache import AvatarStore
from cluster.inputs import JobFiles, JobInputs, ShardInputs, WorkerInputs, sweep_dead_scratch
from cluster.memory import child_cpu_seconds, cpu_seconds, memory_mib, trim_heap
from cluster.weights import local_models
from musetalk.audio import AudioFeatures
from musetalk.config import PipelineConfig
from musetalk.device import ComputeIdentity
from musetalk.entries import EntrySource, detections_to_json, pack_chunk
from musetalk.layout import ModelLayout
from musetalk.pipeline import FramePipeline
from musetalk.stages import on_stream
from musetalk.stats import PrepStats, ShardStats
from musetalk.syncnet import SyncScorer, load_syncnet
from musetalk.syncscore import ShardCropper, SyncedSegment, shard_sync
from shards.plan import Plan, PrepUnit, Shard, UnitKind
from shards.segment import EncodeSettings

logger = logging.getLogger(__name__)


class RenderWorker:
    """Holds the models; runs units in threads. Use via ``ray.remote(RenderWorker).options(...)``, with
    ``max_concurrency`` above the units the driver gives it at once (control calls need a thread too).

    Job inputs and Whisper segments are :class:`cluster.inputs.WorkerInputs` (thread-safe); the rest of
    the shared state (pipelines, counters) is guarded by one lock, held only for bookkeeping (never across
    a download or a model call); the models are shared by the unit threads (torch modules run
    concurrently; the Haar cascade locks itself)."""

    def __init__(self, cfg: PipelineConfig) -> None:
        logging.basicConfig(level=logging.INFO)
        self.name = f"{socket.gethostname()}:{os.getpid()}:{ray.get_runtime_context().get_node_id()[:8]}"
        self.cfg = cfg
        self.inputs = WorkerInputs(fetch=ray.get)
        self._pipelines: dict[PipelineConfig, FramePipeline] = {}
        self._lock = threading.Lock()
        self._cpu_at_ready = self._child_cpu_at_ready = 0.0
        self.loads = 0
        self.load_seconds = 0.0
        self.units = 0  # generation shards rendered
        self.prep_units = 0  # preparation units (detect, prepare, audio)
        self._sync_scorer: SyncScorer | None = None
        sweep_dead_scratch()
        # A failure while loading (missing weights, a device this node lacks, ...) is kept and raised by
        # ready(), so the driver fails the job with the reason at once instead of restarting workers.
        self._init_error: Exception | None = None
        start = time.perf_counter()
        try:
            # A URI models.dir is synced into this node's staging directory first (once per node).
            self.pipeline = FramePipeline(local_models(cfg))
        except Exception as err:  # noqa: BLE001 - re-raised by ready()
            # Not on the terminal (Ray forwards workers' output there): the driver reports the error as one
            # line and writes its traceback into the run's log file.
            logger.debug("worker %s failed to load its models", self.name, exc_info=True)
            self._init_error = err
            return
        self.loads += 1
        self.load_seconds = time.perf_counter() - start
        self._pipelines[cfg] = self.pipeline
        self._cpu_at_ready, self._child_cpu_at_ready = cpu_seconds(), child_cpu_seconds()
        logger.info(
            "worker %s ready on %s (models loaded in %.1f s)",
            self.name,
            self.pipeline.models.device,
            self.load_seconds,
        )

    def ready(self) -> tuple[str, ComputeIdentity]:
        """The worker's name and compute identity, once its models are loaded (or its loading error)."""
        if self._init_error is not None:
            raise self._init_error
        return self.name, self.pipeline.identity

    def info(self) -> dict:
        """Name, model loads and their seconds, units rendered (the driver charges loads to jobs); CPU
        seconds since the models loaded (ffmpeg children included, and apart) and peak RSS (benchmarks)."""
        with self._lock:
            return {
                "name": self.name,
                "loads": self.loads,
                "load_seconds": self.load_seconds,
                "units": self.units,
                "prep_units": self.prep_units,
                "cpu_seconds": cpu_seconds() - self._cpu_at_ready,
                "child_cpu_seconds": child_cpu_seconds() - self._child_cpu_at_ready,  # the ffmpeg encoders
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

    def forget(self, job_id: str) -> None:
        """Drop a finished job's inputs and scratch directory."""
        self.inputs.forget(job_id)

    @contextmanager
    def _tracked(self, job: JobInputs, name: str):
        """(progress, on_stage) callbacks into the driver's progress actor (or Nones) while a unit runs."""
        tracker, key = job.progress, f"{job.tag}{name}"
        if tracker is None:
            yield None, None
            return
        tracker.reset.remote(key)
        try:
            yield (lambda n: tracker.add.remote(key, n)), (lambda text: tracker.stage.remote(key, text))
        finally:
            tracker.done.remote(key)

    def prepare(
        self, job: JobInputs, unit: PrepUnit, boxes: dict | None = None, store: tuple | None = None
    ) -> tuple[object, PrepStats]:
        """One preparation unit: ``detect`` -> detections JSON of source frames ``[start, end)``;
        ``prepare`` -> their entry chunk (:func:`musetalk.entries.pack_chunk`) from ``boxes``; ``audio``
        -> {k: (1500, L, D) float32 array} for Whisper segments ``[start, end)``.

        With ``store`` = (cache root URI, video hash, key), an avatar cache every node reaches, a chunk is
        written there by this worker and its URI returned instead of its bytes (shards then read it from
        there, and it never passes through the driver). Otherwise the result goes back by value: the
        driver keeps its own copy on purpose (a lost node must not lose prepared work) and writes it to
        its avatar cache."""
        pipeline = self._pipeline(job.pipeline)
        try:
            with (
                self.inputs.use(job, video=unit.kind.reads_video, audio=unit.kind.reads_audio) as files,
                _own_stream(self.pipeline.models.device),
                self._tracked(job, unit.name) as (progress, on_stage),
            ):
                result, stats = self._prepare(pipeline, files, unit, boxes, store, on_stage, progress)
        finally:
            trim_heap()
        with self._lock:
            self.prep_units += 1
        return result, replace(stats, unit=unit.name, worker=self.name)

    @staticmethod
    def _prepare(
        pipeline, files: JobFiles, unit, boxes, store, on_stage, progress
    ) -> tuple[object, PrepStats]:
        match unit.kind:
            case UnitKind.DETECT:
                found, stats = pipeline.detect_range(files.video, unit.start, unit.end, on_stage, progress)
                return detections_to_json(found), stats
            case UnitKind.PREPARE:
                entries, stats = pipeline.prepare_range(
                    files.video, unit.start, unit.end, boxes, on_stage, progress
                )
                chunk = pack_chunk(entries)
                return (chunk if store is None else _publish_chunk(store, unit, chunk)), stats
            case UnitKind.AUDIO:
                features, stats = pipeline.encode_audio(files.samples, list(range(unit.start, unit.end)))
                return {k: v.numpy() for k, v in features.items()}, stats
        raise ValueError(f"unknown preparation unit kind {unit.kind!r}")  # PrepUnit admits none

    def render(
        self, job: JobInputs, plan: Plan, shard: Shard, encode: EncodeSettings, prepared: ShardInputs
    ) -> tuple[object, ShardStats]:
        """One generation unit: output frames ``[shard.start, shard.end)`` from the prepared entries (the
        job's video only: the audio it reads is the prepared Whisper segments). The segment goes back as
        bytes: the driver writes it into the run directory. When the job is lip-sync scored
        (``prepared.sync``), a :class:`musetalk.syncscore.SyncedSegment` with the shard's sync data."""
        try:
            with self.inputs.use(job, video=True) as files, _own_stream(self.pipeline.models.device):
                faults.hold(shard.name)
                data, stats = self._render(job, plan, shard, encode, prepared, files)
        finally:
            trim_heap()
        with self._lock:
            self.units += 1
        return data, replace(stats, worker=self.name)

    def _render(self, job, plan, shard, encode, prepared, files: JobFiles) -> tuple[object, ShardStats]:
        files.scratch.mkdir(parents=True, exist_ok=True)
        out = files.scratch / f"{job.job_id}-{shard.name}.mkv"
        cropper = ShardCropper(prepared.sync) if prepared.sync is not None else None
        try:
            with self._tracked(job, shard.name) as (progress, on_stage):
                stats = self._pipeline(job.pipeline).render_shard(
                    video=files.video,
                    plan=plan,
                    shard=shard,
                    out_path=out,
                    encode=encode,
                    entries=EntrySource([(a, b, ref[0]) for a, b, ref in prepared.chunks], _fetch_chunk),
                    audio=self._audio(job, prepared, plan),
                    progress=progress,
                    on_stage=on_stage,
                    on_frame=cropper,
                )
            if cropper is not None:  # lip-sync data of the frames before encoding (musetalk.syncscore)
                sync = shard_sync(prepared.sync, cropper.crops, self._scorer().lips)
                return SyncedSegment(out.read_bytes(), sync.to_bytes()), stats
            return out.read_bytes(), stats
        finally:
            out.unlink(missing_ok=True)

    def _audio(self, job: JobInputs, prepared: ShardInputs, plan: Plan) -> AudioFeatures:
        arrays = self.inputs.segments(job.job_id, [(k, ref[0]) for k, ref in prepared.segments])
        segments = {k: torch.from_numpy(a) for k, a in arrays.items()}
        return AudioFeatures(segments, plan.total_samples, plan.fps)

    def _scorer(self) -> SyncScorer:
        """The lip-sync scorer, loaded on the first scored shard (rendering never needs it)."""
        with self._lock:
            if self._sync_scorer is None:
                p = self.pipeline
                self._sync_scorer = load_syncnet(
                    ModelLayout.at(p.cfg.models_dir, p.cfg.tiny), p.models.device
                )
            return self._sync_scorer

    def close(self) -> None:
        self.inputs.close()


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
    return storage.cat(handle) if isinstance(handle, str) else ray.get(handle)
