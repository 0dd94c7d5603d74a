"""The warm pool of RenderWorker actors: slots, their actors, restarts, growth and shutdown.

The pool is warm: it outlives a job, so a batch (``cluster.batch``) or the runs of a Hydra multirun sweep
load the models once per worker. A pool is keyed by what its workers load (:func:`pool_key`) and its
settings (not its momentary size); a job with other model settings replaces it. Pools are shut down at
process exit. During a job the pool follows the cluster: it asks the autoscaler for the workers the job
can use, grows when GPU nodes join and retires the slots of lost workers that no node has room for any
more (rules in :mod:`cluster.scheduler`).
"""

from __future__ import annotations

import atexit
import logging
import time
import uuid
from dataclasses import replace

import ray
from ray.exceptions import RayActorError, RayTaskError

from cluster.config import ClusterConfig
from cluster.preflight import gpu_problem
from cluster.scheduler import Broker, Slot, pool_capacity, pool_gpus, workers_to_request, workers_wanted
from cluster.session import joined, request_workers, worker_env
from cluster.worker import RenderWorker
from musetalk.config import PACING_FIELDS, PipelineConfig
from musetalk.device import ComputeIdentity
from shards.errors import ConfigError

logger = logging.getLogger(__name__)

# How often the dispatch loop re-reads the cluster's resources to grow or shrink the pool.
RESCALE_EVERY_S = 2.0


def pool_key(pipeline: PipelineConfig) -> PipelineConfig:
    """What a worker loads: ``pipeline`` with the settings a job may set on its own blanked out.

    ``face.bbox_shift``, ``face.extra_margin``, ``face.smooth_radius`` and ``face.select`` act on boxes
    inside ``render_shard``, not on any loaded model, and ``render.batch_size``, ``render.composite`` and
    the queue depths act on a job's own pipeline over the loaded models (the VAE and UNet take the batch
    size per call), so jobs that differ only there share a pool: a sweep over batch sizes loads the
    weights once.
    (``render.channels_last`` and ``render.compile`` change the loaded models: they stay.)
    """
    pacing = {name: getattr(PipelineConfig, name) for name in PACING_FIELDS}
    return replace(
        pipeline,
        batch_size=PipelineConfig.batch_size,
        composite=PipelineConfig.composite,
        **pacing,
        face=replace(pipeline.face, bbox_shift=0, extra_margin=0, smooth_radius=0, select="largest"),
    )


# The actor class, defined once (Ray's pattern: not a new remote class per start).
_RemoteWorker = ray.remote(RenderWorker)


class Pool:
    """The Ray side of the worker slots: actors, their ready() refs, restarts and shutdown.

    The slots are one table (:class:`cluster.scheduler.Slot`) that the broker of each run reads and
    updates: the pool keeps each slot's actor and ready() ref there, the broker its state and load.
    Policy (what to retry, when to give up) lives in :class:`cluster.scheduler.Broker`; how many workers
    the pool wants lives in :mod:`cluster.scheduler` too (``pool_capacity``, ``workers_wanted``).
    """

    def __init__(
        self, pipeline: PipelineConfig, cluster: ClusterConfig, size: int, gpus: float, units: int
    ) -> None:
        self.pipeline, self.cluster, self.gpus = pipeline, cluster, gpus
        self.id = uuid.uuid4().hex[:8]
        self.slots: list[Slot] = [Slot() for _ in range(size)]
        self.started = 0  # actors started (each loads the models once)
        self.charged = 0  # of which already reported in a job's summary
        self.created = time.monotonic()
        self.first_up: float | None = None
        self.requested: list[dict[str, float]] | None = None  # the last request to the autoscaler
        # How the pool's workers compute (the first worker up sets it; a worker that differs is refused)
        self.identity: ComputeIdentity | None = None
        self._next_check = 0.0
        for i in range(size):
            self.start(i)
        self.request(units)

    @property
    def size(self) -> int:
        """Slots not retired (up or starting)."""
        return sum(not s.retired for s in self.slots)

    @property
    def starting(self) -> dict:
        """ready() ref -> slot, for the workers still starting."""
        return {s.ready: i for i, s in enumerate(self.slots) if s.ready is not None}

    def actor(self, i: int):
        return self.slots[i].actor

    def request(self, units: int) -> None:
        """Ask the autoscaler for the workers ``units`` left can use, when that changed."""
        bundles = workers_to_request(self.cluster, self.gpus, units)
        if bundles != self.requested:
            request_workers(bundles)
            self.requested = bundles

    def restart(self, i: int) -> None:
        """Replace slot ``i``'s lost worker; :meth:`rescale` retires the slot if the replacement finds no room."""
        self.slots[i].replacing = True
        self.start(i)

    def retire(self, i: int, broker: Broker) -> None:
        """Give up slot ``i`` (the cluster has no room for it, or its worker computes otherwise): kill its
        worker; the broker never assigns it again."""
        slot = self.slots[i]
        actor, slot.actor, slot.ready = slot.actor, None, None
        broker.retire(i)
        if actor is not None:
            ray.kill(actor)

    def room(self) -> int:
        """Workers the cluster's resources hold for this pool now."""
        return pool_capacity(self.cluster, self.gpus, ray.cluster_resources())

    def retire_if_no_room(self, i: int, broker: Broker) -> bool:
        """Retire slot ``i`` (whose worker died while starting) when the pool is bigger than the cluster."""
        if self.cluster.workers is not None or self.size <= max(1, self.room()):
            return False
        logger.info("worker %d died while starting and the cluster has no room for it: the pool shrinks", i)
        self.retire(i, broker)
        return True

    def rescale(self, broker: Broker, now: float, waiting: int = 0) -> None:
        """Follow the cluster (at most every ``RESCALE_EVERY_S``): update the autoscaler request, retire
        replaced slots the cluster has no room for, start new slots when it holds more workers than the
        pool has (never more than the units left, counting the ``waiting`` generation shards that
        preparation has not released yet). ``cluster.workers`` fixes the size."""
        if now < self._next_check:
            return
        self._next_check = now + RESCALE_EVERY_S
        units = broker.units_left + waiting
        self.request(units)
        if self.cluster.workers is not None:
            return
        room = self.room()
        for i in reversed([i for i, s in enumerate(self.slots) if s.replacing]):
            if self.size <= max(1, room):
                break
            logger.info(
                "worker %d was lost and the cluster has room for %d workers: the pool shrinks", i, room
            )
            self.retire(i, broker)
        want = workers_wanted(self.cluster, room, units)
        while self.size < want:
            self.start(broker.add_slot())
            logger.info("the cluster has room for %d workers: the pool grows to %d", room, self.size)

    def compact(self) -> None:
        """Drop retired slots (between runs: each run's broker numbers the slots it is given from 0)."""
        self.slots[:] = [s for s in self.slots if not s.retired]

    def start(self, i: int) -> None:
        c = self.cluster
        options = dict(
            num_gpus=self.gpus,
            num_cpus=c.cpus_per_worker,
            max_restarts=0,
            max_task_retries=0,
            # units run side by side (a threaded actor), plus a thread for info(), forget() and close()
            max_concurrency=c.max_in_flight + 1,
        )
        options["runtime_env"] = {"env_vars": worker_env()}  # merged with a Ray job's own runtime_env
        slot = self.slots[i]
        slot.up = False
        slot.actor = _RemoteWorker.options(**options).remote(self.pipeline)
        slot.ready = slot.actor.ready.remote()
        self.started += 1

    def resolved(self, ref) -> int:
        """A starting worker's ready() ref resolved (up, failed or dead): its slot, no longer starting."""
        i = self.starting[ref]
        self.slots[i].ready = None
        return i

    def came_up(self, i: int, identity: ComputeIdentity) -> bool:
        """Slot ``i``'s worker is up and computes with ``identity``; False when that is not the pool's
        identity (the caller retires the slot: a job's shards never mix compute identities)."""
        if self.identity is None:
            self.identity = identity
        elif identity != self.identity:
            return False
        self.slots[i].replacing = False
        if self.first_up is None:
            self.first_up = time.monotonic()
        return True

    def take_loads(self) -> tuple[int, float]:
        """(model loads not yet charged to a job, and the wait for the first worker when the pool is new)."""
        first = self.charged == 0
        loads, self.charged = self.started - self.charged, self.started
        wait = (self.first_up or time.monotonic()) - self.created if first and loads else 0.0
        return loads, wait

    def _live(self) -> list:
        return [s.actor for s in self.slots if s.actor is not None]

    def forget(self, job_id: str) -> None:
        """Tell every worker to drop a finished job's inputs (no reply awaited)."""
        for actor in self._live():
            actor.forget.remote(job_id)

    def worker_info(self) -> list[dict]:
        """Each live worker's own report: name, model loads, load seconds, units rendered. A worker that
        died since the broker last heard of it is left out (its slot is marked down when its units fail)."""
        out = []
        for ref in [s.actor.info.remote() for s in self.slots if s.up and s.actor is not None]:
            try:
                out.append(ray.get(ref))
            except RayActorError as err:
                logger.info("a worker died before it could report: %s", str(err).splitlines()[0])
        return out

    def shutdown(self, *, graceful: bool) -> None:
        """Stop every actor; when ``graceful``, first let live ones delete their scratch (bounded wait)."""
        live = self._live()
        if graceful:
            done, _ = ray.wait([a.close.remote() for a in live], num_returns=len(live), timeout=10)
            for ref in done:
                try:
                    ray.get(ref)
                except (RayActorError, RayTaskError) as err:
                    logger.warning("a worker could not clean up: %s", err)
        for actor in live:
            ray.kill(actor)
        if self.requested:
            request_workers([])


class WarmPools:
    """The process's warm pool: reused by the next job with the same key, replaced otherwise.

    One pool at a time (a second would hold the GPUs the next one needs). The key is what the workers
    load (:func:`pool_key`), the pool's settings (GPUs and CPUs per worker, ``cluster.workers`` and
    ``max_workers``; not its size, which follows the cluster) and the Ray session (a pool does not survive
    ``ray.shutdown()``). Only what changes results or placement: not a test's fault-injection point
    (:mod:`cluster.faults`), which a test sets before the pool it holds starts.
    """

    def __init__(self) -> None:
        self.pool: Pool | None = None
        self.key: tuple | None = None
        self.built = 0
        self._registered = False

    def get(self, pipeline: PipelineConfig, cluster: ClusterConfig, units: int) -> Pool:
        """The pool for ``units`` units of work: the warm one when its key matches, else a new one sized
        for the cluster's resources (ConfigError: ``require_gpus`` on an embedded cluster without GPU)."""
        resources = ray.cluster_resources()
        can_grow = joined(cluster)
        gpus = pool_gpus(cluster, resources.get("GPU", 0), can_grow=can_grow)
        if problem := gpu_problem(cluster.require_gpus, gpus, can_grow=can_grow):
            raise ConfigError(problem)
        session = ray.get_runtime_context().get_node_id()  # new for every Ray session
        key = (
            pool_key(pipeline),
            gpus,
            cluster.cpus_per_worker,
            cluster.cpu_workers,
            cluster.workers,
            cluster.max_workers,
            session,
        )
        if self.key is not None and self.key[-1] != session:
            self.pool = self.key = None  # its actors went with the old session: nothing to stop
        if self.pool is not None and key == self.key:
            self.pool.compact()
            self.pool.cluster = cluster
            self.pool.request(units)
            logger.info("reusing warm pool %s (%d workers)", self.pool.id, self.pool.size)
            return self.pool
        if self.pool is not None:
            logger.info("model settings changed: replacing pool %s", self.pool.id)
            self.discard(graceful=True)
        room = pool_capacity(cluster, gpus, resources)
        size = workers_wanted(cluster, room, units)
        if gpus and not room and cluster.workers is None:
            # A joined cluster without GPU yet (an autoscaler at min 0): ask for the GPU workers the job
            # can use and wait (up to start_timeout_s). One worker waits to be placed; the pool grows as
            # more GPU nodes join, so no surplus of unplaced workers outlives the job in the warm pool.
            logger.warning(
                "the Ray cluster has no GPU yet: asking its autoscaler for %d GPU workers and waiting for "
                "GPU nodes (up to cluster.start_timeout_s=%.0f s)",
                len(workers_to_request(cluster, gpus, units)),
                cluster.start_timeout_s,
            )
        self.pool, self.key = Pool(pipeline, cluster, size, gpus, units), key
        self.built += 1
        if not self._registered:  # registered after ray.init, so it runs before Ray's own exit hook
            atexit.register(self.close)
            self._registered = True
        return self.pool

    def discard(self, *, graceful: bool) -> None:
        pool, key, self.pool, self.key = self.pool, self.key, None, None
        if pool is not None and ray.is_initialized() and key[-1] == ray.get_runtime_context().get_node_id():
            pool.shutdown(graceful=graceful)

    def close(self) -> None:
        try:
            self.discard(graceful=True)
        except Exception as err:  # noqa: BLE001 - at exit, Ray may already be going down
            logger.debug("closing the warm pool: %s", err)


# The one process-wide pool cache: a multirun calls run_job once per run in this process.
_WARM = WarmPools()


def warm_pools() -> WarmPools:
    """The process's warm pools (a batch, or the runs of a multirun sweep, reuse them)."""
    return _WARM
