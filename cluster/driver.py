"""The driver: plan jobs, run their shards on a warm pool of RenderWorker actors, stitch the segments.

Ray is started once per process (an embedded local cluster by default) and reused by every job in it.
The pool is warm too: it outlives a job, so a batch (``cluster.batch``) or the runs of a Hydra multirun
sweep load the models once per worker. A pool is keyed by what its workers load (:func:`pool_key`) and
its settings (not its momentary size); a job with other model settings replaces it. Pools are shut down
at process exit.

The pool follows the cluster during a job: it asks the autoscaler for the workers the job can use
(``request_resources``), grows when GPU nodes join and retires the slots of lost workers that no node has
room for any more (rules in :mod:`cluster.scheduler`).
"""

from __future__ import annotations

import bisect
import hashlib
import json
import logging
import os
import shutil
import time
import uuid
from collections import Counter
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import asdict, dataclass, field, replace

import numpy as np
import ray
from ray.exceptions import RayActorError, RayTaskError
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy
from tqdm import tqdm

from cluster import storage
from cluster.config import JobConfig
from cluster.phases import JobPhases
from cluster.pool import Pool, pool_key, warm_pools
from cluster.progress import ProgressActor
from cluster.rundir import RunDir, file_digest, job_key, output_lock
from cluster.scheduler import (
    Broker,
    Failure,
)
from cluster.session import connect
from cluster.weights import weight_files, weight_ids
from cluster.worker import JobInputs, ShardInputs, scratch_root
from musetalk.avatar import (
    AvatarStore,
    detect_key,
    prepare_key,
    weights_fingerprint,
)
from musetalk.config import PipelineConfig
from musetalk.entries import ChunkReader, detections_from_json
from musetalk.layout import ModelLayout
from musetalk.local import plan_job
from musetalk.models import required_weights
from musetalk.stats import PrepStats, ShardStats, busy_seconds, stage_totals
from shards.errors import FarmError, Interrupted
from shards.plan import Plan, PrepUnit, Shard, dispatch_order
from shards.probe import VideoInfo
from shards.stitch import concat_and_mux

logger = logging.getLogger(__name__)


# Preparation works for at most this many generation shards per unit slot of the pool (workers x
# cluster.max_in_flight) among those still to land: enough queued work to keep every slot busy, while the
# entry chunks in the object store stay bounded however long the video (cluster.phases).
PREP_LEAD = 2


@dataclass(frozen=True)
class JobSummary:
    output: str
    frames: int
    face_frames: int
    shards: int
    workers: int
    seconds: float
    fps: float
    stage_seconds: dict[str, float]
    worker_frames: dict[str, int]
    retries: int
    reused_shards: int
    enhance_fallbacks: int
    parsing_fallbacks: int
    # Model loading, apart from rendering: ``seconds`` = ``load_seconds`` + ``render_seconds``.
    load_seconds: float = 0.0  # waiting for the pool's workers to load their models (0 on a warm pool)
    render_seconds: float = 0.0
    render_fps: float = 0.0  # frames / render_seconds: throughput without model loading
    model_loads: int = 0  # workers that loaded models for this job (0 when it ran on a warm pool)
    pool: str = ""  # the pool's id: jobs with the same id shared loaded models
    # The preparation phase: work done this run (each distinct source frame at most once) and reuse.
    detections: int = 0  # source frames run through face detection
    vae_encodes: int = 0  # face crops VAE-encoded
    parsings: int = 0  # face crops run through face parsing
    audio_segments: int = 0  # 30 s Whisper segments encoded
    cache_hits: int = 0  # shown source frames whose entries came from the avatar cache
    cache: str = ""  # the avatar cache's root, or "" when off
    workers_start: int = 0  # the pool's size when the job started (``workers``: when it ended)
    # Seconds some unit of the job ran, per worker (side-by-side units counted once), summed over workers:
    # sum(stage_seconds) / busy_seconds is how much the stages overlapped.
    busy_seconds: float = 0.0

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=1)

    def lines(self) -> list[str]:
        out = [
            f"output      {self.output}",
            f"frames      {self.frames} ({self.face_frames} with a face) in {self.shards} shards on {self.workers} workers"
            + (
                f" ({self.workers_start} at the start)" if self.workers_start not in (0, self.workers) else ""
            ),
            f"time        {self.seconds:.1f} s, {self.fps:.2f} frames/s, {self.retries} retried shards, "
            f"{self.reused_shards} reused from an interrupted run",
            f"prepare     {self.detections} detections, {self.vae_encodes} VAE encodes, {self.parsings} parsings, "
            f"{self.audio_segments} audio segments; {self.cache_hits} frames from the avatar cache"
            + (f" ({self.cache})" if self.cache else " (off)"),
            f"models      {self.model_loads} worker loads, {self.load_seconds:.1f} s waited; without loading "
            f"{self.render_seconds:.1f} s, {self.render_fps:.2f} frames/s (pool {self.pool})",
            "stages      " + ", ".join(f"{k} {v:.1f}s" for k, v in self.stage_seconds.items() if v > 0),
            f"overlap     {sum(self.stage_seconds.values()):.1f} stage s in {self.busy_seconds:.1f} s of busy "
            f"workers ({sum(self.stage_seconds.values()) / max(self.busy_seconds, 1e-9):.2f}x)",
            "workers     "
            + ", ".join(f"{k}: {v / max(1, self.frames):.0%}" for k, v in self.worker_frames.items()),
        ]
        if self.enhance_fallbacks or self.parsing_fallbacks:
            out.append(
                f"fallbacks   enhance {self.enhance_fallbacks} frames, face parsing {self.parsing_fallbacks} source frames"
            )
        return out


@dataclass(frozen=True)
class JobResult:
    """One job of a batch: its summary, or the error that ended it."""

    job: JobConfig
    summary: JobSummary | None = None
    error: FarmError | None = None


def pinned(job: JobConfig) -> PipelineConfig:
    """The job's pipeline with its thread count fixed: every worker computes with the same count, so
    results never depend on placement."""
    p = job.pipeline
    return replace(p, threads=p.threads or max(1, int(job.cluster.cpus_per_worker)))


@dataclass
class _Job:
    """Driver-side state of one job on a pool."""

    index: int
    cfg: JobConfig
    pipeline: PipelineConfig
    lock: ExitStack
    opened: float
    plan: Plan | None = None
    info: VideoInfo | None = None
    samples: object = None
    run: RunDir | None = None
    todo: list[Shard] = field(default_factory=list)
    reused: int = 0
    plan_seconds: float = 0.0
    first_dispatch: float | None = None
    load: tuple[int, float] = (0, 0.0)
    inputs: JobInputs | None = None
    pool_id: str = ""
    workers: int = 0
    phases: JobPhases | None = None
    given: JobConfig | None = None  # the job as given (``cfg`` names staged local copies of URI inputs)
    prep_stats: list = field(default_factory=list)
    store: AvatarStore | None = None
    keys: tuple[str, str, str] = ("", "", "")  # (video sha256, detect key, prepare key); with the cache on
    workers_end: int | None = None  # the pool's size when the job ended (it may grow or shrink)


def run_job(job: JobConfig) -> JobSummary:
    """Render one job end to end; the output appears atomically or not at all.

    Holds the output's lock throughout; finished segments survive a crash or Ctrl-C in the output's run
    directory, and running the same job again renders only the missing shards. Raises the job's error.
    """
    (result,) = run_jobs([job], isolate=False)
    return result.summary


def run_jobs(
    jobs: list[JobConfig], *, isolate: bool = True, on_result: Callable[[JobResult], None] | None = None
) -> list[JobResult]:
    """Render many jobs, grouped by the models they need, each group on one warm pool with its jobs'
    shards interleaved. With ``isolate``, a failed job is reported in its result while the others finish;
    without, its error is raised. ``on_result`` is told of each job as it ends. Ctrl-C raises Interrupted.
    """
    groups: dict[tuple, list[int]] = {}
    for i, job in enumerate(jobs):
        groups.setdefault((pool_key(pinned(job)), job.cluster), []).append(i)
    results: dict[int, JobResult] = {}

    def report(r: JobResult, i: int) -> None:
        results[i] = r
        if on_result is not None:
            on_result(r)

    for members in groups.values():
        _run_group([jobs[i] for i in members], members, isolate, report)
    return [results[i] for i in range(len(jobs))]


def _run_group(jobs: list[JobConfig], indices: list[int], isolate: bool, report) -> None:
    states: list[_Job] = []
    try:
        with ExitStack() as every_lock:
            for i, job in zip(indices, jobs, strict=True):
                lock = every_lock.enter_context(ExitStack())
                st = _Job(i, job, pinned(job), lock, time.perf_counter())
                try:
                    _open(st)
                except FarmError as err:
                    if not isolate:
                        raise
                    lock.close()
                    report(JobResult(job, error=err), i)
                    continue
                states.append(st)
            for st in [s for s in states if not s.todo]:
                _finish(st, None, 0, isolate, report)  # every shard was kept from an interrupted run
            busy = [s for s in states if s.todo]
            if busy:
                connect(busy[0].cfg.cluster)
                _render(busy, isolate, report)
    except KeyboardInterrupt:
        kept = [st.run for st in states if st.run is not None and st.run.root.exists()]
        if not kept:
            raise
        if len(kept) == 1:
            run = kept[0]
            total = next(len(st.plan.shards) for st in states if st.run is run)
            raise Interrupted(
                f"interrupted; {run.done_count} of {total} shards are kept in {run.root}: "
                "run the same command again to resume"
            ) from None
        raise Interrupted(
            f"interrupted; finished shards of {len(kept)} jobs are kept beside their outputs: "
            "run the same command again to resume"
        ) from None


def _open(st: _Job) -> None:
    """Stage URI inputs, take the output's lock, probe and plan, open the run directory (InputError on
    bad inputs). From here on ``st.cfg`` names local files (see :func:`_staged`)."""
    st.given, st.cfg = st.cfg, _staged(st.cfg)
    job = st.cfg
    job.output.parent.mkdir(parents=True, exist_ok=True)
    st.lock.enter_context(output_lock(job.output))
    st.info, st.samples, st.plan = plan_job(
        job.video,
        job.audio,
        overlap=job.pipeline.face.smooth_radius,  # the shards' src ranges only: boxes are smoothed in preparation
        smooth_radius=job.pipeline.face.smooth_radius,
        shard_frames=job.shard_length,
        shard_seconds=job.shard_seconds,
    )
    plan = st.plan
    logger.info(
        "plan %s: %d output frames at %s fps from %d source frames, %d shards",
        job.output.name,
        plan.output_frames,
        plan.fps,
        plan.source_frames,
        len(plan.shards),
    )
    key = job_key(
        [job.video, job.audio],
        {"plan": plan.to_json(), "pipeline": asdict(job.pipeline), "encode": asdict(job.encode)},
        weight_ids(job.pipeline),
    )
    st.run = RunDir.open(job.output, key, plan, resume=job.resume)
    st.reused = st.run.done_count
    st.todo = [s for s in dispatch_order(plan) if not st.run.has(s)]
    st.plan_seconds = time.perf_counter() - st.opened


def _staged(job: JobConfig) -> JobConfig:
    """``job`` with its URI inputs downloaded into this node's staging directory (once per object
    version); a URI output is rendered at its local staging path and published by :func:`_finish`."""
    return replace(
        job,
        video=storage.stage(job.video_uri) if job.video_uri else job.video,
        audio=storage.stage(job.audio_uri) if job.audio_uri else job.audio,
    )


def _inputs(st: _Job, progress, videos: dict) -> JobInputs:
    """How workers get the job's inputs; ``videos`` shares one object-store copy per video file. With
    ``cluster.inputs=uri`` workers get the input URIs (or local paths) and stage them on their node."""
    job, job_id = st.cfg, uuid.uuid4().hex[:12]
    common = dict(
        pipeline=st.pipeline, progress=progress, tag=f"{st.index}/", scratch=str(scratch_root(job_id))
    )
    if job.cluster.inputs == "object_store":
        key = job.video.resolve()
        if key not in videos:  # many jobs often dub the same presenter video
            # an array, not bytes: a worker writes it to its scratch straight from the object store
            videos[key] = ray.put(np.fromfile(job.video, dtype=np.uint8))
        return JobInputs(
            job_id,
            job.video.suffix,
            st.info,
            video_ref=[videos[key]],
            audio_ref=[ray.put(st.samples)],
            **common,
        )
    return JobInputs(
        job_id,
        job.video.suffix,
        st.info,
        video_path=job.video_uri or str(job.video.resolve()),
        audio_path=job.audio_uri or str(job.audio.resolve()),
        **common,
    )


def _render(states: list[_Job], isolate: bool, report) -> None:
    """Render every state's ``todo`` on the warm pool, finishing each job as its last unit lands."""
    first = states[0].cfg
    # Progress lives on the driver's node: a lost worker node must not take the progress counter with it.
    here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
    progress = ProgressActor.options(scheduling_strategy=here).remote()
    ok = False
    try:
        pool = warm_pools().get(states[0].pipeline, first.cluster, units=sum(len(st.todo) for st in states))
        broker = Broker(
            slots=len(pool.actors),
            max_in_flight=first.cluster.max_in_flight,
            max_attempts=first.cluster.max_attempts,
            start_timeout_s=first.cluster.start_timeout_s,
            now=time.monotonic(),
            isolate_jobs=isolate,
        )
        for i in pool.up:
            broker.slot_up(i, time.monotonic())
        by_index, videos = {}, {}
        for st in states:
            st.inputs = _inputs(st, progress, videos)
            st.pool_id, st.workers = pool.id, len(pool.actors)
            _start_phases(st, pool.gpus)
            broker.add_job(st.index, st.phases.initial_units() + st.phases.ready_shards())
            by_index[st.index] = st

        users = Counter(st.cfg.video.resolve() for st in states)

        def job_done(index: int) -> None:
            st = by_index[index]
            _pool_changes(st, pool)
            err = broker.job_errors.get(index)
            try:
                _finish(st, err, broker.job_retries.get(index, 0), isolate, report)
            finally:
                pool.forget(st.inputs.job_id)
                shutil.rmtree(scratch_root(st.inputs.job_id), ignore_errors=True)
                # the object store lets go of the job's inputs and results (a batch's jobs end one by one)
                st.phases.release()
                st.inputs = replace(st.inputs, video_ref=None, audio_ref=None)
                video = st.cfg.video.resolve()
                users[video] -= 1
                if not users[video]:
                    videos.pop(video, None)

        _dispatch(pool, broker, by_index, progress, job_done)
        ok = True
    finally:
        if not ok:  # Ctrl-C, a worker that cannot load, a job error raised: the pool goes too
            warm_pools().discard(graceful=False)
            for st in states:
                if st.inputs is not None:
                    shutil.rmtree(scratch_root(st.inputs.job_id), ignore_errors=True)
        ray.kill(progress)


def _finish(st: _Job, error, retries: int, isolate: bool, report) -> None:
    """Stitch a job whose units all landed, write its summary, release its lock; or report its error."""
    job, plan, run = st.cfg, st.plan, st.run
    try:
        if error is not None:
            raise error
        concat_and_mux(
            [run.segment(s.name) for s in plan.shards], job.audio, job.output, plan.fps, plan.output_frames
        )
        stats = [run.stats(s) for s in plan.shards]
        summary = _summarise(st, stats, retries)
        if job.output_uri:
            summary = replace(summary, output=job.output_uri)  # not the local staging file
        if job.summary:
            path = job.output.with_suffix(".summary.json")
            partial = path.with_name(f".{path.name}.partial")
            partial.write_text(summary.to_json())
            os.replace(partial, path)
        if job.qa:
            _qa_sheet(st, stats)
        if job.output_uri:
            _publish(job)
        run.remove()  # last: a failed summary or upload is retried by the same command without rendering
    except FarmError as err:
        st.lock.close()
        if not isolate:
            raise
        logger.error("job %s failed: %s", job.output, err)
        report(JobResult(st.given or job, error=err), st.index)
        return
    st.lock.close()
    report(JobResult(st.given or job, summary=summary), st.index)


def _publish(job: JobConfig) -> None:
    """Upload a finished output to its URI, its QA sheet and summary first (so an output object always
    has them beside it), each object whole or not at all; the local staging copies go once uploaded."""
    sides = [".qa.png", ".summary.json", ".mp4"]  # the output last
    files = [(job.output.with_suffix(side), storage.beside(job.output_uri, side)) for side in sides]
    for path, uri in files:
        if path.exists():
            storage.publish(path, uri)
    for path, _ in files:
        path.unlink(missing_ok=True)
    logger.info("output published to %s", job.output_uri)


def _qa_sheet(st: _Job, stats: list[ShardStats]) -> None:
    """The job's QA sheet beside its output; a sheet that cannot be drawn is logged, the output stands."""
    from cluster.qa import kinds_of, write_qa_sheet

    path = st.cfg.output.with_suffix(".qa.png")
    try:
        write_qa_sheet(path, st.cfg.output, st.info, st.plan, kinds_of(stats, st.plan.output_frames))
    except (FarmError, OSError, ValueError) as err:
        logger.warning("no QA sheet for %s: %s", st.cfg.output, err)


def _dispatch(pool: Pool, broker: Broker, jobs: dict[int, _Job], progress, job_done) -> None:
    in_flight: dict = {}  # render ref -> Assignment
    ended: set[int] = set()
    total = sum(st.plan.output_frames for st in jobs.values())
    done_before = sum(s.frames for st in jobs.values() for s in st.plan.shards if st.run.has(s))
    bar = tqdm(total=total, unit="frame", desc="render", dynamic_ncols=True, mininterval=1.0)
    bar.n = done_before
    try:
        while not broker.finished:
            for a in broker.assignments():
                st = jobs[a.job]
                if st.first_dispatch is None:
                    st.first_dispatch = time.perf_counter()
                    st.load = pool.take_loads()
                in_flight[_submit(pool.actors[a.slot], st, a.shard)] = a
            ready, _ = ray.wait([*in_flight, *pool.starting], num_returns=1, timeout=1.0)
            frames, stages = ray.get(progress.snapshot.remote())
            bar.n = min(total, done_before + frames)
            bar.set_postfix_str(" ".join(f"{s}:{st}" for s, st in sorted(stages.items())), refresh=False)
            bar.refresh()
            for ref in ready:
                if ref in pool.starting:
                    _came_up(pool, broker, ref)
                    continue
                a = in_flight.pop(ref)
                _landed(pool, broker, jobs[a.job], a, ref)
                if a.job not in ended and broker.job_finished(a.job):
                    ended.add(a.job)
                    job_done(a.job)
            waiting = sum(
                st.phases.waiting for i, st in jobs.items() if st.phases and i not in broker.job_errors
            )
            pool.rescale(
                broker, time.monotonic(), waiting
            )  # grow onto joined nodes, retire slots with no room
            broker.check_start(time.monotonic())
        bar.n = total
        bar.refresh()
    finally:
        bar.close()


def _landed(pool: Pool, broker: Broker, st: _Job, a, ref) -> None:
    """A render ref resolved: store the segment, or tell the broker how it failed."""
    try:
        data, stats = ray.get(ref)
    except RayActorError as err:
        if broker.failed(a, Failure.LOST, err):
            logger.warning("worker %d died; starting a replacement", a.slot)
            pool.restart(a.slot)
        return
    except RayTaskError as err:
        cause = err.cause if isinstance(err.cause, BaseException) else err
        broker.failed(a, Failure.FATAL if isinstance(cause, FarmError) else Failure.ERROR, cause)
        return
    if a.job not in broker.job_errors:
        if isinstance(a.shard, PrepUnit):
            released = _prepared(st, a.shard, data, stats)
            broker.add_job(a.job, released, front=True)
        else:
            st.run.add(a.shard, data, stats)
            # the object store lets go of what only landed shards read; preparation moves ahead
            broker.add_job(a.job, st.phases.landed(a.shard), front=True)
            logger.info(
                "%s of %s done on %s: %d frames", a.shard.name, st.cfg.output.name, stats.worker, stats.frames
            )
    broker.succeeded(a)


def _device_type(pipeline: PipelineConfig, gpus: float) -> str:
    """The device type the pool's workers compute on (it changes rounding, so it keys the avatar cache)."""
    if pipeline.device == "auto":
        return "cuda" if gpus else "cpu"
    return pipeline.device.split(":")[0]


def _prep_weights(pipeline: PipelineConfig) -> str:
    """A fingerprint of the weight files preparation reads (detector, landmarks, VAE, face parsing): of
    their contents when local, of their size and ETag under a URI ``models.dir``."""
    layout = ModelLayout.at(pipeline.models_dir, tiny=pipeline.tiny)
    if storage.is_remote(pipeline.models_dir):
        skip = {
            p.relative_to(layout.root).as_posix()
            for p in (layout.unet_config, layout.unet_weights, layout.gfpgan)
        }
        whisper = layout.whisper_dir.relative_to(layout.root).as_posix() + "/"
        ids = [
            f"{rel}:{storage.identity(storage.info(storage.join(pipeline.models_dir, rel)))}"
            for rel, _ in weight_files(pipeline)
            if rel not in skip and not rel.startswith(whisper)
        ]
        return hashlib.sha256("\n".join(sorted(ids)).encode()).hexdigest()
    skip = {layout.unet_config, layout.unet_weights, layout.gfpgan}
    files = [
        p for p, _ in required_weights(pipeline) if p not in skip and layout.whisper_dir not in p.parents
    ]
    return weights_fingerprint(sorted({*files, *(p for p in layout.vae_dir.iterdir() if p.is_file())}))


def _start_phases(st: _Job, gpus: float) -> None:
    """The job's preparation units, with what the avatar cache already holds for its video."""
    job, plan = st.cfg, st.plan
    detections: dict = {}
    cached: dict = {}
    if job.cache.enabled:  # the keys read weights (objects' metadata under a URI): only for a cache
        device = _device_type(st.pipeline, gpus)
        weights = _prep_weights(st.pipeline)
        video = file_digest(job.video)
        st.keys = (video, detect_key(st.pipeline, device, weights), prepare_key(st.pipeline, device, weights))
        st.store = AvatarStore(job.cache.dir)
        shown = sorted({plan.source_index(t) for s in st.todo for t in range(s.start, s.end)})
        cached = _cached_chunks(st, shown)
        have = {x for a, b in cached for x in range(a, b)}
        r, n = st.pipeline.face.smooth_radius, plan.source_frames
        # only the raw boxes that frames still to prepare read (none when every shown frame is cached)
        context = sorted({k for x in shown if x not in have for k in range(max(0, x - r), min(n, x + r + 1))})
        detections = _cached_detections(st, context)
    st.phases = JobPhases(
        plan,
        st.todo,
        st.pipeline,
        (st.info.height, st.info.width),
        chunk=job.prep_length,
        detections=detections,
        cached=cached,
        lead=PREP_LEAD * max(1, st.workers) * job.cluster.max_in_flight,
    )
    p = st.phases.prep
    logger.info(
        "prepare %s: %d shown source frames, %d from the avatar cache; %d to detect, %d to prepare, %d audio segments",
        job.output.name,
        len(p.shown),
        st.phases.cache_hits,
        len(p.detections_needed),
        len(p.entries_needed),
        len(p.segments),
    )


def _touches(start: int, end: int, frames: list[int]) -> bool:
    """Whether sorted ``frames`` holds a frame in ``[start, end)``."""
    i = bisect.bisect_left(frames, start)
    return i < len(frames) and frames[i] < end


def _cached_chunks(st: _Job, shown: list[int]) -> dict:
    """(start, end) -> handle of the cached entry chunks holding some of ``shown``. A local cache's chunks
    are read here (an unreadable one is skipped, so it is prepared and rewritten) and reach workers
    through Ray; a shared cache's are only listed: workers read them there (written in one PUT each,
    under a key that names their format), so no entry passes through the driver."""
    video, key, out = st.keys[0], st.keys[2], {}
    for a, b in st.store.ranges(video, key):
        if not _touches(a, b, shown):
            continue
        if not st.store.local:
            out[(a, b)] = st.store.uri(video, key, a, b, "npz")
            continue
        try:
            blob = st.store.read(video, key, a, b, "npz")
            ChunkReader(blob)  # refuse a file we cannot read before any worker gets it
        except (OSError, ValueError, KeyError) as err:
            logger.warning(
                "avatar cache: skipping unreadable entries %d-%d of %s: %s", a, b, st.cfg.video, err
            )
            continue
        out[(a, b)] = ray.put(blob)
    return out


def _cached_detections(st: _Job, frames: list[int]) -> dict:
    """Raw detections the cache holds for sorted ``frames`` (only the files that hold some of them)."""
    video, key, out = st.keys[0], st.keys[1], {}
    if not frames:
        return out
    for a, b in st.store.ranges(video, key):
        if not _touches(a, b, frames):
            continue
        try:
            out.update(detections_from_json(st.store.read(video, key, a, b, "json")))
        except (OSError, ValueError, KeyError) as err:
            logger.warning(
                "avatar cache: skipping unreadable detections %d-%d of %s: %s", a, b, st.cfg.video, err
            )
    return out


def _submit(actor, st: _Job, unit):
    if isinstance(unit, PrepUnit):
        if unit.kind != "prepare":
            return actor.prepare.remote(st.inputs, unit)
        # A cache every node reaches (an object store): the worker writes the chunk there itself.
        shared = st.store is not None and not st.store.local
        store = (st.store.root, st.keys[0], st.keys[2]) if shared else None
        return actor.prepare.remote(st.inputs, unit, st.phases.boxes_for(unit), store)
    chunks, segments = st.phases.inputs_of(unit)
    return actor.render.remote(st.inputs, st.plan, unit, st.cfg.encode, ShardInputs(chunks, segments))


def _prepared(st: _Job, unit: PrepUnit, data, stats: PrepStats) -> list:
    """A preparation unit landed: keep its result (driver-owned, so it outlives the worker's node), write
    it to the avatar cache, and return the units it releases."""
    st.prep_stats.append(stats)
    phases = st.phases
    if unit.kind == "audio":
        for k, features in data.items():
            phases.add_segment(k, ray.put(features))
        return phases.ready_shards()
    if unit.kind == "detect":
        _remember(st, st.keys[1], unit, data.encode(), "json")
        return phases.detected(unit, detections_from_json(data)) + phases.ready_shards()
    if isinstance(data, str):  # written to the shared cache by the worker: shards read it there
        phases.add_chunk(unit.start, unit.end, data)
        return phases.ready_shards()
    _remember(st, st.keys[2], unit, data, "npz")
    phases.add_chunk(unit.start, unit.end, ray.put(data))
    return phases.ready_shards()


def _remember(st: _Job, key: str, unit: PrepUnit, data: bytes, suffix: str) -> None:
    """Write a preparation result to the avatar cache; a cache that cannot be written costs reuse, not
    the render (logged)."""
    if st.store is None:
        return
    try:
        st.store.write(st.keys[0], key, unit.start, unit.end, suffix, data)
    except OSError as err:
        logger.warning("avatar cache: could not write %s of %s: %s", unit.name, st.cfg.output.name, err)


def _came_up(pool: Pool, broker: Broker, ref) -> None:
    """A ready() ref resolved: the slot is up, its worker failed to start (the pool fails), or it died."""
    i = pool.starting.pop(ref)
    try:
        name = ray.get(ref)
    except RayTaskError as err:
        cause = err.cause if isinstance(err.cause, BaseException) else err
        if isinstance(cause, FarmError):
            raise cause from None
        broker.slot_failed_to_start(i, cause)
    except RayActorError as err:
        if pool.retire_if_no_room(i, broker):
            return
        broker.slot_died_starting(i, err)
        logger.warning("worker %d died while starting (%s); starting another", i, err)
        pool.restart(i)
        return
    pool.came_up(i)
    broker.slot_up(i, time.monotonic())
    logger.info("worker %d up: %s", i, name)


def _pool_changes(st: _Job, pool: Pool) -> None:
    """At a job's end: the pool's size now, and workers started during the job (growth, replacements)
    charged to it as model loads."""
    loads, _ = pool.take_loads()
    st.load = (st.load[0] + loads, st.load[1])
    st.workers_end = pool.size


def _summarise(st: _Job, stats: list[ShardStats], retries: int) -> JobSummary:
    plan = st.plan
    stage = {k: round(v, 3) for k, v in stage_totals([*stats, *st.prep_stats]).items()}
    prep = st.prep_stats
    per_worker: dict[str, int] = {}
    for s in stats:
        per_worker[s.worker] = per_worker.get(s.worker, 0) + s.frames
    loads, load_wait = st.load
    # A job's time: planning, waiting for workers it made load, then first unit out to output landed
    # (in a batch, time queued behind other jobs is not the job's).
    span = time.perf_counter() - (st.first_dispatch or st.opened)
    seconds = st.plan_seconds + load_wait + span if st.first_dispatch else time.perf_counter() - st.opened
    render_seconds = max(1e-9, seconds - load_wait)
    return JobSummary(
        output=str(st.cfg.output),
        frames=plan.output_frames,
        face_frames=sum(s.face_frames for s in stats),
        shards=len(plan.shards),
        workers=st.workers if st.workers_end is None else st.workers_end,
        workers_start=st.workers,
        seconds=round(seconds, 3),
        fps=round(plan.output_frames / seconds, 3),
        stage_seconds=stage,
        worker_frames=per_worker,
        retries=retries,
        reused_shards=st.reused,
        enhance_fallbacks=sum(s.enhance_fallbacks for s in stats),
        parsing_fallbacks=sum(s.parsing_fallbacks for s in stats),
        load_seconds=round(load_wait, 3),
        render_seconds=round(render_seconds, 3),
        render_fps=round(plan.output_frames / render_seconds, 3),
        model_loads=loads,
        pool=st.pool_id,
        detections=sum(p.detections for p in prep),
        vae_encodes=sum(p.vae_encodes for p in prep),
        parsings=sum(p.parsings for p in prep),
        audio_segments=sum(p.audio_segments for p in prep),
        cache_hits=st.phases.cache_hits if st.phases is not None else 0,
        cache=st.cfg.cache.dir if st.cfg.cache.enabled else "",
        busy_seconds=round(busy_seconds([*stats, *prep]), 3),
    )
