"""The driver: plan a job, run its shards on a pool of RenderWorker actors, stitch the segments.

Ray is started once per process (an embedded local cluster by default) and reused by every job
in it, so a Hydra multirun sweep renders job after job on the same cluster.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
import uuid
from dataclasses import asdict, dataclass, replace

import ray
from ray.exceptions import RayActorError, RayTaskError
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy
from tqdm import tqdm

from cluster.config import ClusterConfig, JobConfig
from cluster.progress import ProgressActor
from cluster.rundir import RunDir, job_key, output_lock
from cluster.scheduler import Broker, Failure, pool_shape
from cluster.worker import HOLD_ENV, JobInputs, RenderWorker, scratch_root
from musetalk.pipeline import ShardStats, plan_job, required_weights, stage_totals
from shards.errors import FarmError, Interrupted
from shards.plan import Plan, Shard, dispatch_order
from shards.probe import VideoInfo
from shards.stitch import concat_and_mux

logger = logging.getLogger(__name__)


def connect(cfg: ClusterConfig) -> None:
    """Start (or join) Ray once per process; later jobs in the same process reuse it.

    ``cluster.address`` names a cluster to join; when it is empty, the cluster that ``RAY_ADDRESS`` names
    (as under Ray Jobs) is joined, and only without either is an embedded local cluster started.
    """
    if ray.is_initialized():
        return
    address = cfg.address or os.environ.get("RAY_ADDRESS", "")
    if address:
        logger.info("connecting to Ray cluster at %s", address)
        ray.init(address=address, logging_level=logging.WARNING)
    else:
        logger.info("starting an embedded local Ray cluster")
        ray.init(
            address="local",
            num_cpus=cfg.num_cpus,
            include_dashboard=False,
            logging_level=logging.WARNING,
            log_to_driver=True,
        )


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

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=1)

    def lines(self) -> list[str]:
        out = [
            f"output      {self.output}",
            f"frames      {self.frames} ({self.face_frames} with a face) in {self.shards} shards on {self.workers} workers",
            f"time        {self.seconds:.1f} s, {self.fps:.2f} frames/s, {self.retries} retried shards, "
            f"{self.reused_shards} reused from an interrupted run",
            "stages      " + ", ".join(f"{k} {v:.1f}s" for k, v in self.stage_seconds.items() if v > 0),
            "workers     "
            + ", ".join(f"{k}: {v / max(1, self.frames):.0%}" for k, v in self.worker_frames.items()),
        ]
        if self.enhance_fallbacks or self.parsing_fallbacks:
            out.append(
                f"fallbacks   enhance {self.enhance_fallbacks} frames, face parsing {self.parsing_fallbacks} source frames"
            )
        return out


class _Pool:
    """The Ray side of the worker slots: actors, their ready() refs, restarts and shutdown.

    Policy (what to retry, when to give up) lives in :class:`cluster.scheduler.Broker`.
    """

    def __init__(self, job: JobConfig, progress, size: int, gpus: float, scratch: str) -> None:
        self.job, self.progress, self.gpus, self.scratch = job, progress, gpus, scratch
        self.actors: list = [None] * size
        self.starting: dict = {}  # ready() ref -> slot
        for i in range(size):
            self.start(i)

    def start(self, i: int) -> None:
        c = self.job.cluster
        options = dict(num_gpus=self.gpus, num_cpus=c.cpus_per_worker, max_restarts=0, max_task_retries=0)
        hold = os.environ.get(HOLD_ENV)
        if hold:  # a test's hold point travels to workers on every node
            options["runtime_env"] = {"env_vars": {HOLD_ENV: hold}}
        # Every worker computes with the same thread count, so results never depend on placement.
        pipeline = replace(
            self.job.pipeline, threads=self.job.pipeline.threads or max(1, int(c.cpus_per_worker))
        )
        self.actors[i] = (
            ray.remote(RenderWorker).options(**options).remote(pipeline, self.progress, self.scratch)
        )
        self.starting[self.actors[i].ready.remote()] = i

    def shutdown(self, *, graceful: bool) -> None:
        """Stop every actor; when ``graceful``, first let live ones delete their scratch (bounded wait)."""
        if graceful:
            live = [a for a in self.actors if a is not None]
            done, _ = ray.wait([a.close.remote() for a in live], num_returns=len(live), timeout=10)
            for ref in done:
                try:
                    ray.get(ref)
                except (RayActorError, RayTaskError) as err:
                    logger.warning("a worker could not clean up: %s", err)
        for a in self.actors:
            if a is not None:
                ray.kill(a)


def run_job(job: JobConfig) -> JobSummary:
    """Render one job end to end; the output appears atomically or not at all.

    Holds the output's lock throughout; finished segments survive a crash or Ctrl-C in the output's run
    directory, and running the same job again renders only the missing shards.
    """
    start = time.perf_counter()
    job.output.parent.mkdir(parents=True, exist_ok=True)
    with output_lock(job.output):
        info, samples, plan = plan_job(
            job.video,
            job.audio,
            overlap=job.overlap,
            smooth_radius=job.pipeline.face.smooth_radius,
            shard_frames=job.shard_length,
            shard_seconds=job.shard_seconds,
        )
        logger.info(
            "plan: %d output frames at %s fps from %d source frames, %d shards",
            plan.output_frames,
            plan.fps,
            plan.source_frames,
            len(plan.shards),
        )
        key = job_key(
            [job.video, job.audio],
            {"plan": plan.to_json(), "pipeline": asdict(job.pipeline), "encode": asdict(job.encode)},
            [p for p, _ in required_weights(job.pipeline)],
        )
        run = RunDir.open(job.output, key, plan, resume=job.resume)
        reused = run.done_count
        todo = [s for s in dispatch_order(plan) if not run.has(s)]
        workers, retries = 0, 0
        try:
            if todo:
                connect(job.cluster)
                workers, retries = _render(job, info, plan, todo, samples, run)
            concat_and_mux(
                [run.segment(s.name) for s in plan.shards],
                job.audio,
                job.output,
                plan.fps,
                plan.output_frames,
            )
        except KeyboardInterrupt:
            raise Interrupted(
                f"interrupted; {run.done_count} of {len(plan.shards)} shards are kept in {run.root}: "
                "run the same command again to resume"
            ) from None
        stats = [run.stats(s) for s in plan.shards]
        run.remove()
        summary = _summarise(job, plan, stats, workers, time.perf_counter() - start, retries, reused)
        if job.summary:
            path = job.output.with_suffix(".summary.json")
            partial = path.with_name(f".{path.name}.partial")
            partial.write_text(summary.to_json())
            os.replace(partial, path)
    return summary


def _render(
    job: JobConfig, info: VideoInfo, plan: Plan, todo: list[Shard], samples, run: RunDir
) -> tuple[int, int]:
    """Render ``todo`` on a pool into ``run``; returns (pool size, retried shards)."""
    job_id = uuid.uuid4().hex[:12]
    if job.cluster.inputs == "object_store":
        inputs = JobInputs(
            job_id,
            job.video.suffix,
            info,
            video_ref=[ray.put(job.video.read_bytes())],
            audio_ref=[ray.put(samples)],
        )
    else:
        inputs = JobInputs(
            job_id,
            job.video.suffix,
            info,
            video_path=str(job.video.resolve()),
            audio_path=str(job.audio.resolve()),
        )
    # Progress lives on the driver's node: a lost worker node must not take the progress counter with it.
    here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
    progress = ProgressActor.options(scheduling_strategy=here).remote()
    size, gpus = pool_shape(job.cluster, ray.cluster_resources().get("GPU", 0))
    scratch = scratch_root(job_id)
    graceful = False
    pool = None
    try:
        pool = _Pool(job, progress, size, gpus, str(scratch))
        broker = Broker(
            todo,
            slots=size,
            max_in_flight=job.cluster.max_in_flight,
            max_attempts=job.cluster.max_attempts,
            start_timeout_s=job.cluster.start_timeout_s,
            now=time.monotonic(),
        )
        done_before = sum(s.frames for s in plan.shards if run.has(s))
        _dispatch(job, plan, pool, broker, inputs, progress, run, done_before)
        graceful = True
        return size, broker.retries
    finally:
        if pool is not None:
            pool.shutdown(graceful=graceful)
        ray.kill(progress)
        # Workers on this node keep their scratch under one root per job: removed even when one was killed.
        shutil.rmtree(scratch, ignore_errors=True)


def _dispatch(
    job, plan: Plan, pool: _Pool, broker: Broker, inputs: JobInputs, progress, run: RunDir, done_before
):
    in_flight: dict = {}  # render ref -> (Assignment, actor)
    bar = tqdm(total=plan.output_frames, unit="frame", desc="render", dynamic_ncols=True, mininterval=1.0)
    bar.n = done_before
    try:
        while not broker.finished:
            for a in broker.assignments():
                actor = pool.actors[a.slot]
                in_flight[actor.render.remote(inputs, plan, a.shard, job.encode)] = a
            ready, _ = ray.wait([*in_flight, *pool.starting], num_returns=1, timeout=1.0)
            frames, stages = ray.get(progress.snapshot.remote())
            bar.n = min(plan.output_frames, done_before + frames)
            bar.set_postfix_str(" ".join(f"{s}:{st}" for s, st in sorted(stages.items())), refresh=False)
            bar.refresh()
            for ref in ready:
                if ref in pool.starting:
                    _came_up(pool, broker, ref)
                    continue
                a = in_flight.pop(ref)
                try:
                    data, st = ray.get(ref)
                except RayActorError as err:
                    if broker.failed(a, Failure.LOST, err):
                        logger.warning("worker %d died; starting a replacement", a.slot)
                        pool.start(a.slot)
                    continue
                except RayTaskError as err:
                    cause = err.cause if isinstance(err.cause, BaseException) else err
                    broker.failed(a, Failure.FATAL if isinstance(cause, FarmError) else Failure.ERROR, cause)
                    continue
                run.add(a.shard, data, st)
                broker.succeeded(a)
                logger.info("%s done on %s: %d frames", a.shard.name, st.worker, st.frames)
            broker.check_start(time.monotonic())
        bar.n = plan.output_frames
        bar.refresh()
    finally:
        bar.close()


def _came_up(pool: _Pool, broker: Broker, ref) -> None:
    """A ready() ref resolved: the slot is up, its worker failed to start (the job fails), or it died."""
    i = pool.starting.pop(ref)
    try:
        name = ray.get(ref)
    except RayTaskError as err:
        cause = err.cause if isinstance(err.cause, BaseException) else err
        if isinstance(cause, FarmError):
            raise cause from None
        broker.slot_failed_to_start(i, cause)
    except RayActorError as err:
        broker.slot_died_starting(i, err)
        logger.warning("worker %d died while starting (%s); starting another", i, err)
        pool.start(i)
        return
    broker.slot_up(i, time.monotonic())
    logger.info("worker %d up: %s", i, name)


def _summarise(
    job: JobConfig,
    plan: Plan,
    stats: list[ShardStats],
    workers: int,
    seconds: float,
    retries: int,
    reused: int,
):
    stage = {k: round(v, 3) for k, v in stage_totals(stats).items()}
    per_worker: dict[str, int] = {}
    for s in stats:
        per_worker[s.worker] = per_worker.get(s.worker, 0) + s.frames
    return JobSummary(
        output=str(job.output),
        frames=plan.output_frames,
        face_frames=sum(s.face_frames for s in stats),
        shards=len(plan.shards),
        workers=workers,
        seconds=round(seconds, 3),
        fps=round(plan.output_frames / seconds, 3),
        stage_seconds=stage,
        worker_frames=per_worker,
        retries=retries,
        reused_shards=reused,
        enhance_fallbacks=sum(s.enhance_fallbacks for s in stats),
        parsing_fallbacks=sum(s.parsing_fallbacks for s in stats),
    )
