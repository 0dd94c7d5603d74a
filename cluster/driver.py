"""The driver: plan a job, run its shards on a pool of RenderWorker actors, stitch the segments.

Ray is started once per process (an embedded local cluster by default) and reused by every job
in it, so a Hydra multirun sweep renders job after job on the same cluster.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
import uuid
from collections import deque
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import ray
from ray.exceptions import RayActorError, RayTaskError
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy
from tqdm import tqdm

from cluster.config import ClusterConfig, JobConfig
from cluster.progress import ProgressActor
from cluster.worker import JobInputs, RenderWorker
from musetalk.pipeline import ShardStats, plan_job, stage_totals
from shards.errors import FarmError, RenderError
from shards.plan import Plan, dispatch_order
from shards.stitch import concat_and_mux

logger = logging.getLogger(__name__)


def connect(cfg: ClusterConfig) -> None:
    """Start (or join) Ray once per process; later jobs in the same process reuse it."""
    if ray.is_initialized():
        return
    if cfg.address:
        logger.info("connecting to Ray cluster at %s", cfg.address)
        ray.init(address=cfg.address, logging_level=logging.WARNING)
    else:
        logger.info("starting an embedded local Ray cluster")
        ray.init(
            address="local",
            num_cpus=cfg.num_cpus,
            include_dashboard=False,
            logging_level=logging.WARNING,
            log_to_driver=True,
        )


def pool_shape(cfg: ClusterConfig) -> tuple[int, float]:
    """(number of workers, GPUs per worker) from the cluster's resources and the config."""
    gpus = ray.cluster_resources().get("GPU", 0)
    per = cfg.gpus_per_worker if gpus else 0.0
    if cfg.workers is not None:
        return cfg.workers, per
    if gpus:
        return max(1, int(gpus / per)), per
    return cfg.cpu_workers, 0.0


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
    enhance_fallbacks: int
    parsing_fallbacks: int

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=1)

    def lines(self) -> list[str]:
        out = [
            f"output      {self.output}",
            f"frames      {self.frames} ({self.face_frames} with a face) in {self.shards} shards on {self.workers} workers",
            f"time        {self.seconds:.1f} s, {self.fps:.2f} frames/s, {self.retries} retried shards",
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
    """Worker slots. A slot takes work only once its actor has loaded its models; a dead actor is
    replaced, and the job goes on with the slots that are up (a lost node's replacement may never
    be placed: the others finish the job)."""

    def __init__(self, job: JobConfig, progress, size: int, gpus: float) -> None:
        self.job, self.progress, self.gpus = job, progress, gpus
        self.actors: list = [None] * size
        self.load = [0] * size
        self.up = [False] * size
        self.starting: dict = {}  # ready() ref -> slot
        self.since = time.monotonic()  # last time a slot came up (or the pool started)
        for i in range(size):
            self._start(i)

    def _start(self, i: int) -> None:
        c = self.job.cluster
        remote = ray.remote(RenderWorker).options(
            num_gpus=self.gpus, num_cpus=c.cpus_per_worker, max_restarts=0, max_task_retries=0
        )
        # Every worker computes with the same thread count, so results never depend on placement.
        pipeline = replace(
            self.job.pipeline, threads=self.job.pipeline.threads or max(1, int(c.cpus_per_worker))
        )
        self.actors[i] = remote.remote(pipeline, self.progress)
        self.load[i], self.up[i] = 0, False
        self.starting[self.actors[i].ready.remote()] = i

    def came_up(self, ref) -> None:
        """A ready() ref resolved: the slot is up, or its worker failed to start (FarmError: not retried)."""
        i = self.starting.pop(ref)
        try:
            name = ray.get(ref)
        except RayTaskError as err:
            cause = err.cause if isinstance(err.cause, BaseException) else err
            raise (
                cause if isinstance(cause, FarmError) else RenderError(f"worker {i} failed to start: {cause}")
            ) from None
        except RayActorError as err:
            logger.warning("worker %d died while starting (%s); starting another", i, err)
            self._start(i)
            return
        self.up[i] = True
        self.since = time.monotonic()
        logger.info("worker %d up: %s", i, name)

    def least_loaded(self) -> int | None:
        slots = [k for k in range(len(self.actors)) if self.up[k]]
        if not slots:
            return None
        i = min(slots, key=lambda k: self.load[k])
        return i if self.load[i] < self.job.cluster.max_in_flight else None

    def replace(self, i: int) -> None:
        logger.warning("worker %d died; starting a replacement", i)
        self._start(i)

    def check_alive(self) -> None:
        """Fail the job when no worker is up and none came up within cluster.start_timeout_s."""
        if any(self.up):
            return
        waited = time.monotonic() - self.since
        if waited > self.job.cluster.start_timeout_s:
            raise RenderError(
                f"no render worker came up within {waited:.0f} s (each needs {self.gpus} GPU and "
                f"{self.job.cluster.cpus_per_worker} CPU); check the cluster's resources or cluster.gpus_per_worker"
            )

    def shutdown(self) -> None:
        """Let live workers delete their scratch files (bounded wait), then stop every actor."""
        live = [a for a, up in zip(self.actors, self.up, strict=True) if up]
        done, _ = ray.wait([a.close.remote() for a in live], num_returns=len(live), timeout=10)
        for ref in done:
            try:
                ray.get(ref)
            except (RayActorError, RayTaskError) as err:
                logger.warning("a worker could not clean up: %s", err)
        for a in self.actors:
            ray.kill(a)


def run_job(job: JobConfig) -> JobSummary:
    """Render one job end to end; the output appears atomically or not at all."""
    start = time.perf_counter()
    _, samples, plan = plan_job(
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
    connect(job.cluster)
    run_dir = job.output.parent / f".{job.output.stem}.run"
    seg_dir = run_dir / "segments"
    seg_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "plan.json").write_text(plan.to_json())

    job_id = uuid.uuid4().hex[:12]
    if job.cluster.inputs == "object_store":
        inputs = JobInputs(
            job_id,
            job.video.suffix,
            video_ref=[ray.put(job.video.read_bytes())],
            audio_ref=[ray.put(samples)],
        )
    else:
        inputs = JobInputs(
            job_id, job.video.suffix, video_path=str(job.video.resolve()), audio_path=str(job.audio.resolve())
        )
    # Progress lives on the driver's node: a lost worker node must not take the progress counter with it.
    here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
    progress = ProgressActor.options(scheduling_strategy=here).remote()
    size, gpus = pool_shape(job.cluster)
    try:
        pool = _Pool(job, progress, size, gpus)
        try:
            stats, retries = _dispatch(plan, pool, inputs, job, seg_dir, progress)
        finally:
            pool.shutdown()
            ray.kill(progress)
        segments = [seg_dir / f"{s.name}.mkv" for s in plan.shards]
        concat_and_mux(segments, job.audio, job.output, plan.fps, plan.output_frames)
    finally:
        # The run directory (plan + finished segments) is scratch until resuming lands: never left behind.
        shutil.rmtree(run_dir, ignore_errors=True)
    seconds = time.perf_counter() - start
    summary = _summarise(job, plan, stats, size, seconds, retries)
    if job.summary:
        job.output.with_suffix(".summary.json").write_text(summary.to_json())
    return summary


def _dispatch(plan: Plan, pool: _Pool, inputs: JobInputs, job: JobConfig, seg_dir: Path, progress):
    pending = deque((s, 1) for s in dispatch_order(plan))
    in_flight: dict = {}
    done: dict[int, ShardStats] = {}
    retries = 0
    bar = tqdm(total=plan.output_frames, unit="frame", desc="render", dynamic_ncols=True, mininterval=1.0)
    try:
        while pending or in_flight:
            while pending and (i := pool.least_loaded()) is not None:
                shard, attempt = pending.popleft()
                actor = pool.actors[i]
                in_flight[actor.render.remote(inputs, plan, shard, job.encode)] = (shard, attempt, i, actor)
                pool.load[i] += 1
            ready, _ = ray.wait([*in_flight, *pool.starting], num_returns=1, timeout=1.0)
            frames, stages = ray.get(progress.snapshot.remote())
            bar.n = min(plan.output_frames, frames)
            bar.set_postfix_str(" ".join(f"{s}:{st}" for s, st in sorted(stages.items())), refresh=False)
            bar.refresh()
            for ref in ready:
                if ref in pool.starting:
                    pool.came_up(ref)
                    continue
                shard, attempt, i, actor = in_flight.pop(ref)
                current = pool.actors[i] is actor  # False once the slot holds a replacement
                if current:
                    pool.load[i] -= 1
                try:
                    data, st = ray.get(ref)
                except RayActorError as err:
                    if current:
                        pool.replace(i)
                    retries += _retry(pending, shard, attempt, job, err)
                    continue
                except RayTaskError as err:
                    cause = err.cause if isinstance(err.cause, BaseException) else err
                    if isinstance(cause, FarmError):
                        raise cause from None
                    retries += _retry(pending, shard, attempt, job, cause)
                    continue
                (seg_dir / f"{shard.name}.mkv").write_bytes(data)
                done[shard.index] = st
                logger.info("%s done on %s: %d frames", shard.name, st.worker, st.frames)
            if pending and not in_flight:
                pool.check_alive()
        bar.n = plan.output_frames
        bar.refresh()
    finally:
        bar.close()
    return [done[s.index] for s in plan.shards], retries


def _retry(pending: deque, shard, attempt: int, job: JobConfig, err: BaseException) -> int:
    if attempt >= job.cluster.max_attempts:
        raise RenderError(
            f"{shard.name} (frames {shard.start}..{shard.end - 1}) failed {attempt} times, last: {err}; "
            "see the worker log above, or raise cluster.max_attempts"
        )
    logger.warning(
        "%s failed (attempt %d of %d): %s; retrying", shard.name, attempt, job.cluster.max_attempts, err
    )
    pending.appendleft((shard, attempt + 1))
    return 1


def _summarise(
    job: JobConfig, plan: Plan, stats: list[ShardStats], workers: int, seconds: float, retries: int
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
        enhance_fallbacks=sum(s.enhance_fallbacks for s in stats),
        parsing_fallbacks=sum(s.parsing_fallbacks for s in stats),
    )
