"""Live progress across workers: workers push frame counts to one small actor; the driver polls it."""

from __future__ import annotations

import ray


@ray.remote(num_cpus=0)
class ProgressActor:
    """Counts frames done per shard (a retried shard's count restarts from zero)."""

    def __init__(self) -> None:
        self._frames: dict[int, int] = {}

    def add(self, shard: int, frames: int) -> None:
        self._frames[shard] = self._frames.get(shard, 0) + frames

    def reset(self, shard: int) -> None:
        self._frames[shard] = 0

    def total(self) -> int:
        return sum(self._frames.values())
