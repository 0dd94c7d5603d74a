"""The driver: run jobs on a warm pool of RenderWorker actors, interleaving their units.

Ray is started once per process (:mod:`cluster.session`: an embedded local cluster by default) and reused
by every job in it; so is the pool (:mod:`cluster.pool`). Jobs are grouped by the pool they need. Each job
(:class:`cluster.job.JobRun`) owns its plan, run directory, preparation, cache and summary; this module
only opens them, starts them once the pool's compute identity is known, and runs the dispatch loop:
units go out to free worker slots (policy in :class:`cluster.scheduler.Broker`), results come back to
their job, which releases the next units, and a job whose units are all done is finished.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass

import ray
from ray.exceptions import RayActorError, RayTaskError
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy
from tqdm import tqdm

from cluster.config import JobConfig
from cluster.job import JobRun, pinned
from cluster.pool import Pool, pool_key, warm_pools
from cluster.progress import ProgressActor
from cluster.scheduler import Broker, Failure
from cluster.session import connect
from cluster.summary import JobResult, JobSummary
from shards.errors import FarmError, Interrupted

logger = logging.getLogger(__name__)
# Workers' tracebacks, at DEBUG: the terminal shows a failure as one line, a run's log file keeps the
# traceback (conf/config.yaml sends this logger's records to Hydra's log file, not to the console).
tracebacks = logging.getLogger("cluster.tracebacks")

__all__ = ["JobResult", "JobSummary", "RenderProgress", "run_job", "run_jobs"]


@dataclass(frozen=True)
class RenderProgress:
    """Where a group of jobs stands, in frames of work: every job's source frames to detect, shown source
    frames to prepare and output frames to generate, each counted as it lands (avatar cache hits and
    segments kept from an interrupted run count as done from the start). A job not started yet counts its
    output frames only (its preparation is known once the pool computes)."""

    done: int
    total: int
    jobs_done: int
    jobs: int
    stages: dict[str, str]  # unit -> what it is doing now ("detect 8/64", "render")

    @property
    def description(self) -> str:
        return "render" if self.jobs == 1 else f"render, {self.jobs_done}/{self.jobs} jobs done"


def run_job(job: JobConfig) -> JobSummary:
    """Render one job end to end; the output appears atomically or not at all.

    Holds the output's lock throughout; finished segments survive a crash or Ctrl-C in the output's run
    directory, and running the same job again renders only the missing shards. Raises the job's error.
    """
    (result,) = run_jobs([job], isolate=False)
    return result.summary


def run_jobs(
    jobs: list[JobConfig],
    *,
    isolate: bool = True,
    on_result: Callable[[JobResult], None] | None = None,
    on_progress: Callable[[RenderProgress], None] | None = None,
    prepare_only: bool = False,
) -> list[JobResult]:
    """Render many jobs, grouped by the models they need, each group on one warm pool with its jobs'
    units interleaved. With ``isolate``, a failed job is reported in its result while the others finish;
    without, its error is raised. ``on_result`` is told of each job as it ends, ``on_progress`` of each
    group's progress as the dispatch loop reads it (the bar shows the same). Ctrl-C raises Interrupted.
    With ``prepare_only``, each job's preparation runs into the avatar cache and nothing is rendered (a
    sweep's warm-up); its summary counts the preparation and the model loads, ``frames`` 0.
    """
    groups: dict[tuple, list[int]] = {}
    for i, job in enumerate(jobs):
        groups.setdefault((pool_key(pinned(job)), job.cluster), []).append(i)
    results: dict[int, JobResult] = {}

    def report(result: JobResult, i: int) -> None:
        if result.error is not None and not isolate:
            raise result.error
        results[i] = result
        if on_result is not None:
            on_result(result)

    for members in groups.values():
        _run_group([JobRun(i, jobs[i], prepare_only) for i in members], isolate, report, on_progress)
    return [results[i] for i in range(len(jobs))]


def _run_group(runs: list[JobRun], isolate: bool, report, on_progress) -> None:
    opened: list[JobRun] = []
    try:
        for run in runs:
            try:
                run.open()
            except FarmError as err:
                report(JobResult(run.given, error=err), run.index)
                continue
            opened.append(run)
        for run in [r for r in opened if not r.todo]:
            report(run.finish(None, 0), run.index)  # every shard was kept from an interrupted run
        busy = [r for r in opened if r.todo]
        if busy:
            connect(busy[0].cfg.cluster)
            _render(busy, isolate, report, on_progress)
    except KeyboardInterrupt:
        kept = [r for r in opened if r.run is not None and r.run.root.exists()]
        if not kept:
            raise
        if len(kept) == 1:
            run = kept[0]
            raise Interrupted(
                f"interrupted; {run.run.done_count} of {len(run.plan.shards)} shards are kept in "
                f"{run.run.root}: run the same command again to resume"
            ) from None
        raise Interrupted(
            f"interrupted; finished shards of {len(kept)} jobs are kept beside their outputs: "
            "run the same command again to resume"
        ) from None
    finally:
        for run in opened:
            run.close()


def _render(runs: list[JobRun], isolate: bool, report, on_progress) -> None:
    """Render every job's missing shards on the warm pool, finishing each job as its last unit lands."""
    first = runs[0].cfg
    # Progress lives on the driver's node: a lost worker node must not take the progress counter with it.
    here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
    progress = ProgressActor.options(scheduling_strategy=here).remote()
    ok = False
    try:
        pool = warm_pools().get(runs[0].pipeline, first.cluster, units=sum(len(r.todo) for r in runs))
        broker = Broker(
            slots=pool.slots,  # one table: the broker reads and updates the pool's slots
            max_in_flight=first.cluster.max_in_flight,
            max_attempts=first.cluster.max_attempts,
            start_timeout_s=first.cluster.start_timeout_s,
            now=time.monotonic(),
            isolate_jobs=isolate,
        )
        _dispatch(pool, broker, {r.index: r for r in runs}, progress, report, on_progress)
        ok = True
    finally:
        if not ok:  # Ctrl-C, a worker that cannot load, a job error raised: the pool goes too
            warm_pools().discard(graceful=False)
            for run in runs:
                run.end()
        ray.kill(progress)


def _dispatch(pool: Pool, broker: Broker, runs: dict[int, JobRun], progress, report, on_progress) -> None:
    """The loop: start jobs once the pool computes (its identity known), send units to free slots, take
    results, finish jobs; follow the cluster's size."""
    unstarted, in_flight, videos, ended = dict(runs), {}, {}, set()
    users = Counter(r.cfg.video.resolve() for r in runs.values())
    work = {i: r.work() for i, r in runs.items()}  # job -> (total, done before this run), frames of work
    bar = tqdm(total=sum(t for t, _ in work.values()), unit="frame", dynamic_ncols=True, mininterval=1.0)

    def show() -> RenderProgress:
        frames, stages = ray.get(progress.snapshot.remote())
        total = sum(t for t, _ in work.values())
        now = RenderProgress(
            min(total, frames + sum(d for _, d in work.values())), total, len(ended), len(runs), stages
        )
        bar.total, bar.n = now.total, now.done
        bar.set_description_str(now.description, refresh=False)
        bar.set_postfix_str(" ".join(f"{s}:{st}" for s, st in sorted(stages.items())), refresh=False)
        bar.refresh()
        if on_progress is not None:
            on_progress(now)
        return now

    def end(i: int) -> None:
        ended.add(i)
        run = runs[i]
        run.charge(pool.take_loads()[0])
        run.workers_end = pool.size
        pool.forget(run.inputs.job_id)
        run.end()
        users[run.cfg.video.resolve()] -= 1
        if not users[run.cfg.video.resolve()]:
            videos.pop(run.cfg.video.resolve(), None)  # its last job let go of the video
        report(run.finish(broker.job_errors.get(i), broker.job_retries.get(i, 0)), i)

    try:
        while unstarted or not broker.finished:
            if unstarted and pool.identity is not None:
                for i, run in unstarted.items():
                    broker.add_job(i, run.start(pool.identity, pool.id, pool.size, progress, videos))
                    run.charge(*pool.take_loads())
                    work[i] = run.work()  # its preparation is known now
                    if broker.job_finished(i):  # nothing to run (a warm-up the avatar cache holds)
                        end(i)
                unstarted = {}
            for a in broker.assignments():
                try:
                    ref = runs[a.job].submit(pool.actor(a.slot), a.shard)
                except FarmError as err:  # the job's own input (a face track the video lacks): it alone fails
                    broker.failed(a, Failure.FATAL, err)
                    if a.job not in ended and broker.job_finished(a.job):
                        end(a.job)
                    continue
                in_flight[ref] = a
            ready, _ = ray.wait([*in_flight, *pool.starting], num_returns=1, timeout=1.0)
            show()
            for ref in ready:
                if ref in pool.starting:
                    _came_up(pool, broker, ref)
                    continue
                a = in_flight.pop(ref)
                _landed(pool, broker, runs[a.job], a, ref)
                if a.job not in ended and broker.job_finished(a.job):
                    end(a.job)
            waiting = sum(r.waiting for i, r in runs.items() if i not in broker.job_errors)
            # grow onto joined nodes, retire slots with no room
            pool.rescale(broker, time.monotonic(), waiting)
            broker.check_start(time.monotonic(), waiting=bool(unstarted))
        if show().done < bar.total:  # a failed job's units never land: the bar ends full all the same
            bar.n = bar.total
            bar.refresh()
    finally:
        bar.close()


def _landed(pool: Pool, broker: Broker, run: JobRun, a, ref) -> None:
    """A unit's ref resolved: hand the result to its job, or tell the broker how it failed."""
    try:
        data, stats = ray.get(ref)
    except RayActorError as err:
        if broker.failed(a, Failure.LOST, err):
            logger.warning("worker %d died; starting a replacement", a.slot)
            pool.restart(a.slot)
        return
    except RayTaskError as err:
        cause = err.cause if isinstance(err.cause, BaseException) else err
        tracebacks.debug("%s of job %d failed on worker %d:\n%s", a.shard.name, a.job, a.slot, err)
        broker.failed(a, Failure.FATAL if isinstance(cause, FarmError) else Failure.ERROR, cause)
        return
    if a.job not in broker.job_errors:
        broker.add_job(a.job, run.landed(a.shard, data, stats), front=True)
    broker.succeeded(a)


def _came_up(pool: Pool, broker: Broker, ref) -> None:
    """A ready() ref resolved: the slot is up, its worker failed to start (the pool fails), it died, or
    it computes differently from the pool (refused: one job never mixes compute identities)."""
    i = pool.resolved(ref)
    try:
        name, identity = ray.get(ref)
    except RayTaskError as err:
        cause = err.cause if isinstance(err.cause, BaseException) else err
        tracebacks.debug("worker %d failed to start:\n%s", i, err)  # its text is the remote traceback
        if isinstance(cause, FarmError):
            raise cause from None
        broker.slot_failed_to_start(i, cause)
        return
    except RayActorError as err:
        if pool.retire_if_no_room(i, broker):
            return
        broker.slot_died_starting(i, err)
        logger.warning("worker %d died while starting (%s); starting another", i, err)
        pool.restart(i)
        return
    if not pool.came_up(i, identity):
        logger.warning(
            "worker %d (%s) computes on %s, the pool on %s: not used (results would differ in rounding "
            "between shards); run jobs on nodes of one kind",
            i,
            name,
            identity,
            pool.identity,
        )
        pool.retire(i, broker)
        return
    broker.slot_up(i, time.monotonic())
    logger.info("worker %d up: %s", i, name)
