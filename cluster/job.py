"""One job on a pool: its plan, run directory, preparation, avatar cache, inputs, results and summary.

The dispatch loop (:mod:`cluster.driver`) only sees units go out (:meth:`JobRun.submit`) and results come
back (:meth:`JobRun.landed`, which returns the units they release); everything a job owns lives here:

1. :meth:`JobRun.open`: stage URI inputs, take the output's lock, probe and plan (InputError on bad
   inputs), find the finished segments of an interrupted render (:class:`cluster.rundir.RunDir`);
2. :meth:`JobRun.start`, once the pool's compute identity is known: keep only segments computed with it,
   open the avatar cache under keys that include it, plan the preparation
   (:class:`musetalk.preparation.PrepPlan`) with what the cache holds, put the inputs in the object store;
3. :meth:`JobRun.landed` for every unit: keep preparation results (driver-owned objects, so they outlive a
   lost worker node) and write them to the cache; store segments in the run directory;
4. :meth:`JobRun.finish`: stitch, mux, summary, QA sheet, publish; or report the job's error.

A job run with ``prepare_only`` (a sweep's warm-up: :func:`cluster.sweep.on_footing`) runs its preparation
into the avatar cache and renders nothing: each generation shard counts as landed once released.
"""

from __future__ import annotations

import logging
import os
import shutil
import time
import uuid
from contextlib import ExitStack
from dataclasses import asdict, replace

import numpy as np
import ray

from cluster import storage
from cluster.cache import AvatarCache
from cluster.config import JobConfig
from cluster.inputs import JobInputs, ShardInputs, scratch_root
from cluster.keys import audio_digests, render_parts, shard_key, shard_parts
from cluster.rundir import RunDir, dub_track_path, output_lock
from cluster.summary import JobResult, JobSummary
from cluster.syncjob import JobSync, SyncResult, gate
from musetalk.boxes import boxes_from_detections
from musetalk.config import PipelineConfig
from musetalk.device import ComputeIdentity
from musetalk.entries import detections_from_json
from musetalk.local import plan_job
from musetalk.preparation import PrepPlan
from musetalk.stats import PrepStats, ShardStats, busy_seconds, stage_totals
from musetalk.syncscore import SyncedSegment
from musetalk.tracks import is_track
from shards.errors import FarmError
from shards.plan import PrepUnit, Shard, UnitKind, dispatch_order
from shards.stitch import concat_and_mux

logger = logging.getLogger(__name__)

# Preparation works for at most this many generation shards per unit slot of the pool (workers x
# cluster.max_in_flight) among those still to land: enough queued work to keep every slot busy, while the
# entry chunks in the object store stay bounded however long the video (musetalk.preparation).
PREP_LEAD = 2


def pinned(job: JobConfig) -> PipelineConfig:
    """The job's pipeline with its thread count fixed: every worker computes with the same count, so
    results never depend on placement."""
    p = job.pipeline
    return replace(p, threads=p.threads or max(1, int(job.cluster.cpus_per_worker)))


class JobRun:
    """Driver-side state of one job on a pool, and its verbs."""

    def __init__(self, index: int, cfg: JobConfig, prepare_only: bool = False) -> None:
        self.index = index
        self.prepare_only = prepare_only
        self.given = cfg  # the job as given (``cfg`` names staged local copies of URI inputs)
        self.cfg = cfg
        self.pipeline = pinned(cfg)
        self.opened = time.perf_counter()
        self._lock = ExitStack()
        self.run: RunDir | None = None
        self.todo: list[Shard] = []
        self.prep: PrepPlan | None = None
        self.cache: AvatarCache | None = None
        self.inputs: JobInputs | None = None
        self.prep_stats: list[PrepStats] = []
        self.reused = 0
        self.plan_seconds = 0.0
        self.first_dispatch: float | None = None
        self.loads, self.load_wait = 0, 0.0  # model loads charged to the job, and the wait for them
        self.pool_id = ""
        self.workers, self.workers_end = 0, None  # the pool's size when the job started and ended
        self.sync: JobSync | None = None  # lip-sync scoring (qa.sync)
        self.track = None  # a dub job's audio track (shards.dub), written beside the output

    @property
    def label(self) -> str:
        return self.cfg.output.name

    # 1. Open ---------------------------------------------------------------------------------------
    def open(self) -> None:
        """Stage URI inputs, take the output's lock, probe and plan, find resumable segments (InputError
        on bad inputs; the lock is released again on any error). From here on ``cfg`` names local files."""
        try:
            self._open()
        except BaseException:
            self.close()
            raise

    def _open(self) -> None:
        job = self.cfg = replace(
            self.cfg,
            video=storage.stage(self.cfg.video_uri) if self.cfg.video_uri else self.cfg.video,
            audio=storage.stage(self.cfg.audio_uri) if self.cfg.audio_uri else self.cfg.audio,
        )
        job.output.parent.mkdir(parents=True, exist_ok=True)
        self._lock.enter_context(output_lock(job.output))
        track = self.track = dub_track_path(job.output) if job.dub is not None else None  # under the lock
        self.info, self.samples, self.plan = plan_job(
            job.video,
            job.audio,
            shard_frames=job.shards.length,
            shard_seconds=job.shards.seconds,
            face=str(self.pipeline.face.select),
            dub=job.dub,
            track=track,
        )
        if track is not None:  # the dub's track is what workers read and what is muxed
            job = self.cfg = replace(job, audio=track, audio_uri=None)
        plan = self.plan
        logger.info(
            "plan %s: %d output frames at %s fps from %d source frames, %d shards",
            self.label,
            plan.output_frames,
            plan.fps,
            plan.source_frames,
            len(plan.shards),
        )
        if job.gate.sync:
            self.sync = JobSync(plan, self.pipeline, self.samples)
        self.run = RunDir.open(job.output, resume=job.resume)
        self._audio = audio_digests(self.samples)
        if self.run.compute and self.run.asked == self.asked:  # as last time: is everything kept already?
            self._keys(self.run.compute)
        self._todo()
        self.plan_seconds = time.perf_counter() - self.opened

    @property
    def asked(self) -> str:
        """The settings a compute identity follows from on the same nodes (device, dtype, threads): a job
        asking as its output's last render did stitches kept segments without a pool when they cover
        every shard; one asking otherwise waits for the pool's identity."""
        p = self.pipeline
        return f"{p.device}|{p.dtype}|{p.threads}"

    def _keys(self, compute: str) -> None:
        """Every shard's key (:func:`cluster.keys.shard_key`) under the compute identity ``compute``."""
        job, plan = self.cfg, self.plan
        base = render_parts(job.video, plan, self.pipeline, job.encode, compute)
        parts = {s.name: shard_parts(base, plan, s, plan.face_choice, self._audio) for s in plan.shards}
        self.run.use(compute, {name: (shard_key(p), p) for name, p in parts.items()}, self.asked)

    def _todo(self) -> None:
        self.reused = self.run.done_count
        # a scored job reuses a segment only with its sync data (a resumed render scores every frame)
        synced = (lambda s: True) if self.sync is None else (lambda s: self.run.side(s.name).is_file())
        self.todo = [s for s in dispatch_order(self.plan) if not (self.run.has(s) and synced(s))]

    # 2. Start --------------------------------------------------------------------------------------
    def start(
        self, identity: ComputeIdentity, pool_id: str, workers: int, progress, videos: dict
    ) -> list[PrepUnit | Shard]:
        """The job's first units on a pool computing with ``identity`` (``workers`` slots now):
        segments computed otherwise are dropped, the avatar cache is read, preparation is planned.
        ``videos`` shares one object-store copy per video file among a batch's jobs."""
        job = self.cfg
        self._keys(identity.key())
        self._todo()
        self.pool_id, self.workers = pool_id, workers
        self._tracks_kept = False
        # the face of each source frame (boxes and the cache's chunk keys): the job's face.select, in a dub
        # with ranges each range's face, None (passing through) outside them
        self.choice = self.plan.face_choice
        self.prep = PrepPlan(
            self.plan,
            self.todo,
            chunk=job.shards.prep_length,
            smooth_radius=self.pipeline.face.smooth_radius,
            lead=PREP_LEAD * max(1, workers) * job.cluster.max_in_flight,
            also_detect={s.name: self.sync.source_frames(s) for s in self.todo} if self.sync else None,
            whole=any(is_track(face) for face in self.plan.faces),
        )
        chunks, detections = {}, {}
        self.cache = AvatarCache.open(job.cache, job.video, self.pipeline, identity, self.label, self.choice)
        if self.cache is not None:
            # a local cache's bytes reach workers through Ray (driver-owned); a shared cache's URIs as they are
            chunks = {
                r: ray.put(c) if isinstance(c, bytes) else c for r, c in self.cache.chunks(self.prep).items()
            }
            detections = self.cache.detections(self.prep.detections_wanted(chunks))
        units = self.prep.start(chunks, detections)
        p = self.prep
        logger.info(
            "prepare %s: %d shown source frames, %d from the avatar cache; %d to detect, %d to prepare, "
            "%d audio segments",
            self.label,
            len(p.shown),
            p.cache_hits,
            len(p.detections_needed),
            len(p.entries_needed),
            len(p.units_of(UnitKind.AUDIO)),
        )
        self.inputs = self._job_inputs(progress, videos)
        return self._to_run([*units, *p.ready_shards()])

    def _to_run(self, units: list[PrepUnit | Shard]) -> list[PrepUnit | Shard]:
        """``units`` as they go out; with ``prepare_only`` a released shard has nothing to render, so it
        lands at once (its chunks are let go of, preparation moves ahead) and only preparation goes out."""
        if not self.prepare_only:
            return units
        out, queue = [], list(units)
        while queue:
            unit = queue.pop(0)
            if isinstance(unit, Shard):
                queue += [*self.prep.landed(unit), *self.prep.ready_shards()]
            else:
                out.append(unit)
        return out

    def _job_inputs(self, progress, videos: dict) -> JobInputs:
        """How workers get the job's inputs. With ``cluster.inputs=uri`` workers get the input URIs (or
        local paths) and stage them on their node."""
        job, job_id = self.cfg, uuid.uuid4().hex[:12]
        common = dict(
            pipeline=self.pipeline, progress=progress, tag=f"{self.index}/", scratch=str(scratch_root(job_id))
        )
        if job.cluster.inputs == "object_store":
            key = job.video.resolve()
            if key not in videos:  # many jobs often dub the same presenter video
                # an array, not bytes: a worker writes it to its scratch straight from the object store
                videos[key] = ray.put(np.fromfile(job.video, dtype=np.uint8))
            return JobInputs(
                job_id,
                job.video.suffix,
                self.info,
                video_ref=[videos[key]],
                audio_ref=[ray.put(self.samples)],
                **common,
            )
        return JobInputs(
            job_id,
            job.video.suffix,
            self.info,
            video_path=job.video_uri or str(job.video.resolve()),
            # a dub's track exists on the driver only: it travels through the object store
            audio_ref=[ray.put(self.samples)] if job.dub is not None else None,
            audio_path=None if job.dub is not None else job.audio_uri or str(job.audio.resolve()),
            **common,
        )

    # 3. Units --------------------------------------------------------------------------------------
    def submit(self, actor, unit: PrepUnit | Shard):
        """Start ``unit`` on ``actor``; returns the result's ref."""
        if self.first_dispatch is None:
            self.first_dispatch = time.perf_counter()
        if isinstance(unit, Shard):
            chunks, segments = self.prep.inputs_of(unit)
            prepared = ShardInputs(
                tuple((a, b, [h]) for a, b, h in chunks),
                tuple((k, [h]) for k, h in segments),
                sync=self.sync.shard_plan(unit, self.prep.detections, self.info.width, self._tracks())
                if self.sync is not None
                else None,
            )
            return actor.render.remote(self.inputs, self.plan, unit, self.cfg.encode, prepared)
        if unit.kind is not UnitKind.PREPARE:
            return actor.prepare.remote(self.inputs, unit)
        boxes = boxes_from_detections(
            self.prep.detections_for(unit),
            range(unit.start, unit.end),
            (self.info.height, self.info.width),
            self.pipeline.face,
            self.plan.source_frames,
            self.choice,
            tracks=self._tracks(),
        )
        shared = self.cache.shared(unit) if self.cache is not None else None
        return actor.prepare.remote(self.inputs, unit, boxes, shared)

    def _tracks(self):
        """The video's face tracks once linked (a track choice; else None), kept in the avatar cache once."""
        tracks = self.prep.tracks
        if tracks is not None and self.cache is not None and not self._tracks_kept:
            self.cache.remember_tracks(tracks, self.plan.source_frames)
            self._tracks_kept = True
        return tracks

    def landed(self, unit: PrepUnit | Shard, data, stats) -> list[PrepUnit | Shard]:
        """A unit's result: keep it, and return the units it releases."""
        prep = self.prep
        if isinstance(unit, Shard):
            if isinstance(data, SyncedSegment):  # its sync data first: a listed segment has it
                self.run.put_side(unit, data.sync)
                data = data.segment
            self.run.add(unit, data, stats)
            logger.info("%s of %s done on %s: %d frames", unit.name, self.label, stats.worker, stats.frames)
            # the object store lets go of what only landed shards read; preparation moves ahead
            return prep.landed(unit)
        self.prep_stats.append(stats)
        released: list = []
        if unit.kind is UnitKind.AUDIO:
            for k, features in data.items():
                prep.add_segment(k, ray.put(features))
        elif unit.kind is UnitKind.DETECT:
            if self.cache is not None:
                self.cache.remember(unit, data.encode())
            released = prep.detected(unit, detections_from_json(data))
        elif isinstance(data, str):  # written to the shared cache by the worker: shards read it there
            prep.add_chunk(unit.start, unit.end, data)
        else:
            if self.cache is not None:
                self.cache.remember(unit, data)
            # driver-owned on purpose: a lost worker node must not take prepared work with it
            prep.add_chunk(unit.start, unit.end, ray.put(data))
        return self._to_run([*released, *prep.ready_shards()])

    def work(self) -> tuple[int, int]:
        """(frames of work, of which done before this run): source frames to detect, shown source frames
        to prepare (avatar cache hits done) and output frames to generate (kept segments done). Before
        :meth:`start` the preparation is not known yet: output frames only."""
        total = 0 if self.prepare_only else self.plan.output_frames
        done = 0 if self.prepare_only else sum(s.frames for s in self.plan.shards if self.run.has(s))
        if self.prep is not None:
            total += len(self.prep.detections_needed) + len(self.prep.shown)
            done += self.prep.cache_hits
        return total, done

    @property
    def waiting(self) -> int:
        """Generation shards preparation has not released yet."""
        return self.prep.waiting if self.prep is not None else 0

    # 4. Finish -------------------------------------------------------------------------------------
    def charge(self, loads: int, wait: float = 0.0) -> None:
        """Model loads (and the wait for them) charged to this job."""
        self.loads += loads
        self.load_wait += wait

    def end(self) -> None:
        """The job's units are all done: the object store and the workers' scratch let go of its data."""
        if self.inputs is not None:
            shutil.rmtree(scratch_root(self.inputs.job_id), ignore_errors=True)
            self.inputs = replace(self.inputs, video_ref=None, audio_ref=None)
        if self.prep is not None:
            self.prep.release()

    def finish(self, error: BaseException | None, retries: int) -> JobResult:
        """Stitch a job whose units all landed, write its summary, release its lock; or its error
        (raised when it is not a FarmError)."""
        job, plan, run = self.cfg, self.plan, self.run
        try:
            if error is not None:
                raise error
            if self.prepare_only:  # nothing rendered: no output, and the run directory stays as it was
                return JobResult(self.given, summary=self._summary([], retries))
            concat_and_mux(
                [run.segment(s.name) for s in plan.shards],
                job.audio,
                job.output,
                plan.fps,
                plan.output_frames,
            )
            stats = [run.stats(s) for s in plan.shards]
            summary = self._summary(stats, retries)
            summary = replace(summary, **asdict(self._gate(summary)))
            if job.output_uri:
                summary = replace(summary, output=job.output_uri)  # not the local staging file
            if job.summary:
                path = job.output.with_suffix(".summary.json")
                partial = path.with_name(f".{path.name}.partial")
                partial.write_text(summary.to_json())
                os.replace(partial, path)
            if job.qa:
                self._qa_sheet(stats, summary.sync_confidence_per_second)
            if job.output_uri:
                self._publish()
            run.landed(job.segments_max_mb)  # the segments stay: a later render reuses what did not change
        except FarmError as err:
            logger.error("job %s failed: %s", job.output, err)
            return JobResult(self.given, error=err)
        finally:
            self.close()
        return JobResult(self.given, summary=summary)

    def close(self) -> None:
        """Release the output's lock (a dub job's track first: it lives beside the output)."""
        if self.track is not None:
            self.track.unlink(missing_ok=True)
        self._lock.close()

    def _publish(self) -> None:
        """Upload a finished output to its URI, its QA sheet and summary first (so an output object always
        has them beside it), each object whole or not at all; the local staging copies go once uploaded."""
        job = self.cfg
        sides = [".qa.png", ".summary.json", ".mp4"]  # the output last
        files = [(job.output.with_suffix(side), storage.beside(job.output_uri, side)) for side in sides]
        for path, uri in files:
            if path.exists():
                storage.publish(path, uri)
        for path, _ in files:
            path.unlink(missing_ok=True)
        logger.info("output published to %s", job.output_uri)

    def _gate(self, summary: JobSummary) -> SyncResult:
        """The job's lip-sync scores (qa.sync) and the quality gate's verdict."""
        share = round(
            summary.face_frames / max(1, self.plan.chosen_frames), 4
        )  # a dub: of its ranges' frames
        result = (
            self.sync.result(self.run, summary.face_frames) if self.sync else SyncResult(face_share=share)
        )
        result = gate(result, self.cfg.gate)
        if result.flagged:
            logger.warning("job %s flagged by the quality gate: %s", self.cfg.output, "; ".join(result.flags))
        return result

    def _qa_sheet(self, stats: list[ShardStats], sync: list | None = None) -> None:
        """The job's QA sheet beside its output; a sheet that cannot be drawn is logged, the output stands."""
        from cluster.qa import kinds_of, write_qa_sheet

        path = self.cfg.output.with_suffix(".qa.png")
        try:
            write_qa_sheet(
                path, self.cfg.output, self.info, self.plan, kinds_of(stats, self.plan.output_frames), sync
            )
        except (FarmError, OSError, ValueError) as err:
            logger.warning("no QA sheet for %s: %s", self.cfg.output, err)

    def _summary(self, stats: list[ShardStats], retries: int) -> JobSummary:
        plan, prep = self.plan, self.prep_stats
        stage = {k: round(v, 3) for k, v in stage_totals([*stats, *prep]).items()}
        per_worker: dict[str, int] = {}
        for s in stats:
            per_worker[s.worker] = per_worker.get(s.worker, 0) + s.frames
        # A job's time: planning, waiting for workers it made load, then first unit out to output landed
        # (in a batch, time queued behind other jobs is not the job's).
        now = time.perf_counter()
        if self.first_dispatch:
            seconds = self.plan_seconds + self.load_wait + now - self.first_dispatch
        else:
            seconds = now - self.opened
        render_seconds = max(1e-9, seconds - self.load_wait)
        frames = 0 if self.prepare_only else plan.output_frames
        generation = busy_seconds(stats)
        return JobSummary(
            output="" if self.prepare_only else str(self.cfg.output),
            frames=frames,
            face_frames=sum(s.face_frames for s in stats),
            shards=0 if self.prepare_only else len(plan.shards),
            workers=self.workers if self.workers_end is None else self.workers_end,
            workers_start=self.workers,
            seconds=round(seconds, 3),
            fps=round(frames / seconds, 3),
            stage_seconds=stage,
            worker_frames=per_worker,
            retries=retries,
            reused_shards=self.reused,
            rendered_shards=self.run.rendered_count,
            rendered_because=self.run.changed(),
            enhance_fallbacks=sum(s.enhance_fallbacks for s in stats),
            parsing_fallbacks=sum(s.parsing_fallbacks for s in stats),
            load_seconds=round(self.load_wait, 3),
            render_seconds=round(render_seconds, 3),
            render_fps=round(frames / render_seconds, 3),
            model_loads=self.loads,
            pool=self.pool_id,
            detections=sum(p.detections for p in prep),
            vae_encodes=sum(p.vae_encodes for p in prep),
            parsings=sum(p.parsings for p in prep),
            audio_segments=sum(p.audio_segments for p in prep),
            cache_hits=self.prep.cache_hits if self.prep is not None else 0,
            cache=self.cache.root if self.cache is not None else "",
            busy_seconds=round(busy_seconds([*stats, *prep]), 3),
            prep_seconds=round(busy_seconds(prep), 3),
            generation_seconds=round(generation, 3),
            generation_fps=round(frames / generation, 3) if generation > 0 else 0.0,
            host_cpu_seconds={k: round(v, 4) for k, v in stage_totals([*stats, *prep], "host_cpu").items()},
            model_cpu_seconds={k: round(v, 4) for k, v in stage_totals([*stats, *prep], "model_cpu").items()},
        )
