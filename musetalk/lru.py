"""A small least-recently-used map: the one cache policy of the entry chunks a shard reads
(:class:`musetalk.entries.EntrySource`) and of a worker's job inputs and Whisper segments
(:mod:`cluster.inputs`). It lives at this floor so both ``musetalk`` and ``cluster`` can use it.

Not thread-safe: a caller shared by threads holds its own lock around every call (the worker's
bookkeeping lock), so that eviction can be decided together with the caller's other state.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Hashable, Iterator
from typing import Generic, TypeVar

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")


class LRU(Generic[K, V]):
    """Up to ``size`` entries, least recently used first out. ``pinned(key)``, where given, names entries
    that must stay (e.g. a job with a unit running): they are skipped by eviction, so the map may then
    hold more than ``size`` until they are unpinned and something else is inserted."""

    def __init__(self, size: int, pinned: Callable[[K], bool] | None = None) -> None:
        if size < 1:
            raise ValueError(f"an LRU must hold at least one entry, got size={size}")
        self.size = size
        self._pinned = pinned or (lambda key: False)
        self._items: OrderedDict[K, V] = OrderedDict()

    def __len__(self) -> int:
        return len(self._items)

    def __contains__(self, key: object) -> bool:
        return key in self._items

    def __iter__(self) -> Iterator[K]:
        """Keys, least recently used first."""
        return iter(list(self._items))

    def get(self, key: K, default: V | None = None) -> V | None:
        """The entry for ``key`` (now the most recently used), or ``default``."""
        if key not in self._items:
            return default
        self._items.move_to_end(key)
        return self._items[key]

    def put(self, key: K, value: V) -> list[tuple[K, V]]:
        """Insert or replace ``key`` as the most recently used; returns the ``(key, value)`` pairs evicted
        to keep at most ``size`` (never ``key`` itself, never a pinned one)."""
        self._items[key] = value
        self._items.move_to_end(key)
        return self._evict(self.size, spare=key)

    def make_room(self) -> list[tuple[K, V]]:
        """Evict so that one more entry fits within ``size`` (before an insert whose value is costly to
        build: a download into scratch); returns what was evicted."""
        return self._evict(self.size - 1)

    def pop(self, key: K, default: V | None = None) -> V | None:
        return self._items.pop(key, default)

    def _evict(self, limit: int, spare: K | None = None) -> list[tuple[K, V]]:
        out = []
        for key in list(self._items):
            if len(self._items) <= limit:
                break
            if key != spare and not self._pinned(key):
                out.append((key, self._items.pop(key)))
        return out
