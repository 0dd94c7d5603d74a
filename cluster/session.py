"""The driver's Ray session: start or join a cluster once per process, ask its autoscaler for workers,
and the environment every worker starts with."""

from __future__ import annotations

import logging
import os

import ray

from cluster import faults
from cluster.config import ClusterConfig

logger = logging.getLogger(__name__)

# glibc malloc arenas per worker process (MALLOC_ARENA_MAX, set at its start unless the driver's environment
# sets it). A worker's unit threads (decoders, mask pools, encoders, units side by side) would otherwise
# each get an arena, and fragmentation grows its RSS with the units it has run: on the 1080p bench clip,
# peak worker RSS grew 17% from a 4 s to a 10 s clip with glibc's default (8 per core), 4% with 2, at the
# same speed (docs/benchmarks.md).
MALLOC_ARENAS = 2


# cuBLAS workspace config for deterministic GEMMs on CUDA (without it, cuBLAS may pick split-K reductions
# whose order depends on the stream and the workspace available; PyTorch's reproducibility notes). Set
# in every worker unless the driver's environment sets it; the CPU ignores it.
CUBLAS_WORKSPACE = ":4096:8"


def worker_env() -> dict[str, str]:
    """The environment every worker starts with: glibc malloc tuning (:data:`MALLOC_ARENAS`; every
    ``MALLOC_*`` variable of the driver's environment travels too, and wins), ``CUBLAS_WORKSPACE_CONFIG``
    (:data:`CUBLAS_WORKSPACE`, the driver's wins) and the fault-injection points a test set
    (:mod:`cluster.faults`: they travel to workers on every node)."""
    env = {k: v for k, v in os.environ.items() if k.startswith("MALLOC_")}
    env.setdefault("MALLOC_ARENA_MAX", str(MALLOC_ARENAS))
    env["CUBLAS_WORKSPACE_CONFIG"] = os.environ.get("CUBLAS_WORKSPACE_CONFIG") or CUBLAS_WORKSPACE
    return {**env, **faults.env()}


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


def joined(cfg: ClusterConfig) -> bool:
    """Whether the driver joined a cluster (which may gain nodes) rather than starting an embedded one."""
    if ray.is_initialized():
        node = ray._private.worker._global_node  # None under Ray Client
        return node is None or not node.head
    return bool(cfg.address or os.environ.get("RAY_ADDRESS"))


def request_workers(bundles: list[dict[str, float]]) -> None:
    """Ask the cluster's autoscaler for room for ``bundles`` (replacing the last request; ``[]`` clears it).

    Without an autoscaler (an embedded or hand-started cluster) the request is only recorded in the GCS's
    key-value store, which nothing reads: harmless. Under Ray Client the SDK needs a GCS connection this
    process lacks, so the request is made from a task on the cluster.
    """
    from ray.autoscaler.sdk import request_resources
    from ray.util.client import ray as client

    if client.is_connected():
        ray.get(ray.remote(num_cpus=0)(request_resources).remote(bundles=bundles))
    else:
        request_resources(bundles=bundles)
