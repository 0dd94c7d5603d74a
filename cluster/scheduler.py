"""The scheduling policy of a pool, free of Ray: which (job, shard) unit goes to which worker slot, what
is retried, when to give up. Av1an's broker is the model; ``cluster/driver.py`` is a thin Ray layer around it.

Time is passed in (``now``, seconds on any monotonic clock), so every rule has a table test.

Rules:
- Units are handed out in the order given: job after job (in the order they were added), each job's
  shards in the planner's longest-first order, so a job's output lands as early as possible while the
  next job's shards fill the slots its tail leaves idle. A retried unit goes to the front of the queue so
  a job never ends on a straggler retried late.
- A shard goes to the least-loaded slot that is up (ties: the lowest slot), never beyond ``max_in_flight``.
- A failure is one of three kinds. ``lost``: the worker died (killed, OOM, node gone): the shard is retried
  and the slot restarted. ``error``: the render raised an unexpected exception: retried. ``fatal``: an
  expected domain error (bad input, bad weights): never retried, the job fails with it. A shard that has
  failed ``max_attempts`` times fails the job. With ``isolate_jobs`` (a batch), a failed job is recorded
  in ``job_errors`` and its pending units dropped while the other jobs go on; without it (one job), the
  error is raised.
- A worker that raises while starting fails the job at once with its reason (no retry loop); one that
  dies while starting is restarted, at most ``max_attempts`` times in a row per slot.
- When no slot has been up for ``start_timeout_s``, the job fails (no node can host a worker).
- The pool follows the cluster (:func:`pool_capacity`, :func:`workers_wanted`): a slot is added when nodes
  join (``add_slot``), and a slot whose worker was lost and cannot be placed again is retired (``retire``):
  never assigned again, never counted as up. ``cluster.workers`` fixes the size: no scaling.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass
from enum import Enum

from cluster.config import ClusterConfig
from shards.errors import RenderError
from shards.plan import Shard


def pool_gpus(cfg: ClusterConfig, cluster_gpus: float, *, can_grow: bool) -> float:
    """GPUs per worker of a new pool: ``gpus_per_worker`` on a cluster with GPUs, or on one that can still
    gain GPU nodes when ``require_gpus`` forbids CPU workers; 0 (a CPU pool) otherwise."""
    return cfg.gpus_per_worker if cluster_gpus or (cfg.require_gpus and can_grow) else 0.0


def pool_capacity(cfg: ClusterConfig, gpus_per_worker: float, resources: dict[str, float]) -> int:
    """Workers the cluster's resources (``ray.cluster_resources()``) hold now, within ``max_workers``.

    A GPU pool counts ``gpus_per_worker`` shares of the GPUs; a CPU pool takes up to ``cpu_workers``,
    as many as the CPUs hold. ``cluster.workers`` fixes the size whatever the resources.
    """
    if cfg.workers is not None:
        return cfg.workers
    if gpus_per_worker:
        n = math.floor(resources.get("GPU", 0) / gpus_per_worker + 1e-9)
    else:
        n = min(cfg.cpu_workers, math.floor(resources.get("CPU", 0) / cfg.cpus_per_worker + 1e-9))
    return n if cfg.max_workers is None else min(n, cfg.max_workers)


def workers_wanted(cfg: ClusterConfig, capacity: int, units: int) -> int:
    """Workers the pool wants: what the cluster holds, never more than the units left to render (pending
    and in flight), never fewer than one (so a job with no room fails by ``start_timeout_s``)."""
    if cfg.workers is not None:
        return cfg.workers
    return max(1, min(capacity, units))


def workers_to_request(cfg: ClusterConfig, gpus_per_worker: float, units: int) -> list[dict[str, float]]:
    """Resource bundles to ask the autoscaler for (``request_resources(bundles=...)``): one per worker the
    job can use, i.e. one per unit left, within ``max_workers`` (``cpu_workers`` for a CPU pool);
    ``cluster.workers`` asks for exactly that many."""
    if cfg.workers is not None:
        n = cfg.workers
    else:
        n = units if gpus_per_worker else min(units, cfg.cpu_workers)
        if cfg.max_workers is not None:
            n = min(n, cfg.max_workers)
    bundle = {"CPU": cfg.cpus_per_worker}
    if gpus_per_worker:
        bundle = {"GPU": gpus_per_worker, **bundle}
    return [dict(bundle) for _ in range(max(0, n))]


class Failure(Enum):
    LOST = "lost"  # the worker process or its node died
    ERROR = "error"  # an unexpected exception inside the render
    FATAL = "fatal"  # an expected domain error: retrying cannot help


@dataclass
class Slot:
    """One worker slot: the one table of a pool's workers, which the pool (``cluster.pool``: its actor,
    the ready() ref it waits on) and the broker (its state and load) both read and write."""

    up: bool = False
    load: int = 0  # units in flight on the slot's worker
    start_deaths: int = 0  # consecutive deaths while starting
    generation: int = 0  # bumped when the slot's worker is lost; older assignments no longer count
    retired: bool = False  # the pool shrank: never up, never assigned again
    replacing: bool = False  # its lost worker was restarted and the replacement is not up yet
    actor: object = None  # the pool's actor handle (opaque here)
    ready: object = None  # the ready() ref of a starting worker (opaque here)


@dataclass(frozen=True)
class Assignment:
    shard: Shard
    attempt: int
    slot: int
    generation: int
    job: int = 0


class Broker:
    """Pending (job, shard) units, attempts and worker slots of a pool; ``shards`` are job 0's."""

    def __init__(
        self,
        shards: Iterable[Shard] = (),
        *,
        slots: int | list[Slot],
        max_in_flight: int,
        max_attempts: int,
        start_timeout_s: float,
        now: float,
        isolate_jobs: bool = False,
    ) -> None:
        if isinstance(slots, int):
            slots = [Slot() for _ in range(slots)]
        if not slots or max_in_flight < 1 or max_attempts < 1:
            raise ValueError("slots, max_in_flight and max_attempts must be >= 1")
        self.max_in_flight = max_in_flight
        self.max_attempts = max_attempts
        self.start_timeout_s = start_timeout_s
        self.isolate_jobs = isolate_jobs
        self.pending: deque[tuple[int, Shard, int]] = deque()  # (job, shard, attempt)
        self.slots = slots  # shared with the pool (a warm pool's table outlives a broker)
        for slot in slots:  # a new broker starts with nothing in flight
            slot.load = 0
        self.in_flight: dict[tuple[int, str], Assignment] = {}  # (job, unit name) -> assignment
        self.done: set[tuple[int, str]] = set()  # (job, unit name)
        self.retries = 0
        self.job_retries: dict[int, int] = {}
        self.job_errors: dict[int, BaseException] = {}
        self._since = now  # last time a slot came up, or the start
        self.add_job(0, shards)

    def add_job(self, job: int, shards: Iterable[Shard], front: bool = False) -> None:
        """Queue ``job``'s units behind everything already queued; with ``front``, ahead of it (in order:
        units a landed unit released, which let that job go on)."""
        units = [(job, s, 1) for s in shards]
        if front:
            self.pending.extendleft(reversed(units))
        else:
            self.pending.extend(units)

    @property
    def finished(self) -> bool:
        return not self.pending and not self.in_flight

    def job_finished(self, job: int) -> bool:
        """No unit of ``job`` is pending or in flight (it succeeded, or failed: see ``job_errors``)."""
        return not any(j == job for j, _, _ in self.pending) and not any(j == job for j, _ in self.in_flight)

    # ---------------------------------------------------------------- slots

    def slot_up(self, slot: int, now: float) -> None:
        s = self.slots[slot]
        if s.retired:
            return
        s.up, s.load, s.start_deaths = True, 0, 0
        self._since = now

    def add_slot(self) -> int:
        """A new slot (the pool grew); it takes units once ``slot_up`` reports its worker. Returns its index."""
        self.slots.append(Slot())
        return len(self.slots) - 1

    def retire(self, slot: int) -> None:
        """The pool shrank: ``slot`` is never assigned again. Units it still held come back through
        ``failed`` as usual (its generation is bumped, so they do not ask for a restart)."""
        s = self.slots[slot]
        s.up, s.load, s.retired, s.replacing, s.generation = False, 0, True, False, s.generation + 1

    @property
    def active_slots(self) -> int:
        """Slots not retired (up or starting)."""
        return sum(not s.retired for s in self.slots)

    @property
    def units_left(self) -> int:
        """Units pending or in flight, over every job."""
        return len(self.pending) + len(self.in_flight)

    def slot_died_starting(self, slot: int, reason: object) -> None:
        """The slot's worker died before it was up: restart it (the caller does), or give up."""
        s = self.slots[slot]
        s.start_deaths += 1
        if s.start_deaths >= self.max_attempts:
            raise RenderError(
                f"worker {slot} died {s.start_deaths} times while starting, last: {reason}; "
                "check the worker log above and the cluster's resources"
            )

    def slot_failed_to_start(self, slot: int, reason: object) -> None:
        """The worker raised while loading (bad device, weights, ...): the job fails with its reason now."""
        raise RenderError(f"worker {slot} failed to start: {reason}")

    def check_start(self, now: float, waiting: bool = False) -> None:
        """Fail when work remains (queued here, or ``waiting`` to be queued: jobs not started until a
        worker is up) and no slot has been up for ``start_timeout_s`` (counted from the start, or from
        the last check that saw a slot up: losing every node late in a long job leaves the autoscaler the
        whole timeout to bring new ones)."""
        if self.finished and not waiting:
            return
        if any(s.up for s in self.slots):
            self._since = now
            return
        waited = now - self._since
        if waited > self.start_timeout_s:
            raise RenderError(
                f"no render worker came up within {waited:.0f} s; check the cluster's resources "
                "(cluster.gpus_per_worker, cluster.cpus_per_worker) or raise cluster.start_timeout_s"
            )

    # ---------------------------------------------------------------- shards

    def next(self) -> Assignment | None:
        """The next shard for the least-loaded up slot with room, or None (nothing pending, or no room)."""
        if not self.pending:
            return None
        ready = [i for i, s in enumerate(self.slots) if s.up and s.load < self.max_in_flight]
        if not ready:
            return None
        slot = min(ready, key=lambda i: (self.slots[i].load, i))
        job, shard, attempt = self.pending.popleft()
        self.slots[slot].load += 1
        a = Assignment(shard, attempt, slot, self.slots[slot].generation, job)
        self.in_flight[(job, shard.name)] = a
        return a

    def assignments(self) -> list[Assignment]:
        """Every assignment possible now (call after slots come up or work finishes)."""
        out = []
        while (a := self.next()) is not None:
            out.append(a)
        return out

    def succeeded(self, a: Assignment) -> None:
        self._release(a)
        if a.job not in self.job_errors:
            self.done.add((a.job, a.shard.name))

    def failed(self, a: Assignment, kind: Failure, reason: object) -> bool:
        """Record a failed attempt: requeue the unit at the front, or end its job (RenderError, or
        ``job_errors`` with ``isolate_jobs``).

        Returns True when the caller must restart the slot's worker (the first ``LOST`` report of that
        worker; the other units it held fail with it and are requeued without a second restart).
        """
        self._release(a)
        restart = False
        slot = self.slots[a.slot]
        if kind is Failure.LOST and a.generation == slot.generation:
            slot.up, slot.load, slot.generation = False, 0, slot.generation + 1
            restart = True
        if a.job in self.job_errors:
            return restart  # the job already failed: its late units are dropped
        if kind is Failure.FATAL:
            self._end_job(a.job, reason if isinstance(reason, BaseException) else RenderError(str(reason)))
            return restart
        if a.attempt >= self.max_attempts:
            self._end_job(
                a.job,
                RenderError(
                    f"{a.shard.name} (frames {a.shard.start}..{a.shard.end - 1}) failed {a.attempt} times, "
                    f"last: {reason}; see the worker log above, or raise cluster.max_attempts"
                ),
            )
            return restart
        self.retries += 1
        self.job_retries[a.job] = self.job_retries.get(a.job, 0) + 1
        self.pending.appendleft((a.job, a.shard, a.attempt + 1))
        return restart

    def _end_job(self, job: int, error: BaseException) -> None:
        if not self.isolate_jobs:
            raise error
        self.job_errors[job] = error
        self.pending = deque(u for u in self.pending if u[0] != job)

    def _release(self, a: Assignment) -> None:
        self.in_flight.pop((a.job, a.shard.name), None)
        s = self.slots[a.slot]
        if a.generation == s.generation:
            s.load -= 1
