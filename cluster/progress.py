"""Live progress across workers: workers push frame counts to one small actor; the driver polls it.

Workers call it per batch, not per frame or stage change: ``add`` once per batch of source frames
detected or prepared and once per batch of output frames written (the driver's bar counts all three as
a job's work), ``stage`` once per batch of source frames prepared ("prepare 40/130") and when rendering
starts.
"""

from __future__ import annotations

import ray


@ray.remote(num_cpus=0)
class ProgressActor:
    """Counts frames done per unit, preparation units and shards alike (a retried unit's count restarts
    from zero)."""

    def __init__(self) -> None:
        self._frames: dict[int, int] = {}
        self._stages: dict[int, str] = {}

    def stage(self, shard: int, name: str) -> None:
        self._stages[shard] = name

    def done(self, shard: int) -> None:
        self._stages.pop(shard, None)

    def snapshot(self) -> tuple[int, dict[int, str]]:
        """(frames done, {shard: current stage} of the shards being rendered)."""
        return sum(self._frames.values()), dict(self._stages)

    def add(self, shard: int, frames: int) -> None:
        self._frames[shard] = self._frames.get(shard, 0) + frames

    def reset(self, shard: int) -> None:
        self._frames[shard] = 0
