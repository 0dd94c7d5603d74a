"""One job's preparation phase and the release of its generation shards (Ray-free: refs are opaque).

A job runs as units of three kinds before its shards (see :mod:`musetalk.avatar`):

- ``detect`` units over the source frames whose detections are missing (the shown frames that need new
  entries, plus ``smooth_radius`` context frames each side), and ``audio`` units, one per 30 s Whisper
  segment the shards read, all at once;
- ``prepare`` units over the shown frames without entries, each with its smoothed boxes (smoothing runs
  here, over the raw boxes of ``smooth_radius`` frames each side), each released as soon as the
  detections those boxes read are in (preparation starts while later frames are still being detected)
  and it serves one of the next ``lead`` shards still to land (a look-ahead: preparation does not run
  arbitrarily far ahead of generation and fill the object store with a long video's chunks);
- a generation shard is released as soon as the chunks holding its frames and its Whisper segments
  have landed;
- a chunk or a Whisper segment is let go (its ref dropped, so Ray frees the object once no running unit
  holds it) as soon as every shard that reads it has landed: the object store holds the results of the
  part of the video still being rendered, not of the whole video.

So each distinct source frame is detected and prepared once per job, however many shards show it
(ping-pong bounces) and however the output is sharded; with an avatar cache, once per video.
"""

from __future__ import annotations

import bisect

from musetalk.avatar import JobPrep, boxes_from_detections
from musetalk.config import PipelineConfig
from musetalk.faces import Detection
from shards.plan import Plan, PrepUnit, Shard, UnitKind


class JobPhases:
    """Which units of one job can run now, and what each generation shard reads."""

    def __init__(
        self,
        plan: Plan,
        todo: list[Shard],
        pipeline: PipelineConfig,
        frame_shape: tuple[int, int],
        *,
        chunk: int,
        detections: dict[int, Detection | None] | None = None,
        cached: dict[tuple[int, int], object] | None = None,
        lead: int | None = None,
    ) -> None:
        """``todo`` in dispatch order; ``detections``: raw detections already known (a cache); ``cached``:
        entry chunks already available, ``(start, end) -> ref``; ``lead``: prepare only for the first
        ``lead`` shards still to land (in ``todo`` order), so the chunks alive at once are bounded by the
        look-ahead, not by the video's length (None: prepare everything as soon as it can be)."""
        self.plan, self.pipeline, self.frame_shape = plan, pipeline, frame_shape
        self.detections: dict[int, Detection | None] = dict(detections or {})
        self.chunks: dict[tuple[int, int], object] = dict(cached or {})
        self.segments: dict[int, object] = {}
        have = {s for a, b in self.chunks for s in range(a, b)}
        self.prep = JobPrep(
            plan,
            chunk,
            pipeline.face.smooth_radius,
            shards=todo,
            have_detections=self.detections,
            have_entries=have,
        )
        self.cache_hits = len(self.prep.shown) - len(self.prep.entries_needed)
        self._count = 0
        self._detect = [self._unit(UnitKind.DETECT, a, b) for a, b in self.prep.detect_ranges()]
        self._detecting = {u.name for u in self._detect}
        self._audio = [self._unit(UnitKind.AUDIO, k, k + 1) for k in self.prep.audio_segments()]
        self._waiting = list(todo)
        self._needs = {s.name: {plan.source_index(t) for t in range(s.start, s.end)} for s in todo}
        self._shown = {name: sorted(needs) for name, needs in self._needs.items()}
        self._covered = have  # source frames some available chunk holds
        self._landed: set[str] = set()
        self._order = [s.name for s in todo]
        self._lead = lead
        self._ready: list[PrepUnit] = []  # prepare units whose detections are all in
        self._missing: dict[str, int] = {}  # prepare unit -> detections it still waits for
        self._waiters: dict[int, list[PrepUnit]] = {}  # source frame -> prepare units waiting for it
        self._first: dict[str, int] = {}  # prepare unit -> position in todo of the first shard it serves
        self._hold_prepare_units()
        # chunk (start, end) -> shards still to land that read it; Whisper segment -> the same
        self._chunk_readers = {key: self._readers(*key) for key in self.chunks}
        self._segment_readers: dict[int, set[str]] = {}
        for name, ks in self.prep.shard_segments.items():
            for k in ks:
                self._segment_readers.setdefault(k, set()).add(name)

    def _unit(self, kind: UnitKind, start: int, end: int) -> PrepUnit:
        self._count += 1
        return PrepUnit(kind, self._count - 1, start, end)

    def _hold_prepare_units(self) -> None:
        """Every prepare unit, ready now or waiting for the raw detections its smoothed boxes read."""
        n, r = self.plan.source_frames, self.pipeline.face.smooth_radius
        needed = self.prep.entries_needed
        position = {name: i for i, name in enumerate(self._order)}
        for a, b in self.prep.prepare_ranges():
            unit = self._unit(UnitKind.PREPARE, a, b)
            self._first[unit.name] = min((position[name] for name in self._readers(a, b)), default=0)
            frames = needed[bisect.bisect_left(needed, a) : bisect.bisect_left(needed, b)]
            reads = {k for s in frames for k in range(max(0, s - r), min(n, s + r + 1))}
            missing = reads.difference(self.detections)
            if not missing:
                self._ready.append(unit)
                continue
            self._missing[unit.name] = len(missing)
            for k in missing:
                self._waiters.setdefault(k, []).append(unit)

    def _horizon(self) -> float:
        """The position in todo of the last shard preparation may work for now (see ``lead``)."""
        if self._lead is None:
            return float("inf")
        left = self._lead
        for i, name in enumerate(self._order):
            if name not in self._landed:
                left -= 1
                if not left:
                    return i
        return float("inf")

    def _take_ready(self) -> list[PrepUnit]:
        """Prepare units whose detections are in and that serve a shard within the look-ahead."""
        horizon = self._horizon()
        ready = sorted((u for u in self._ready if self._first[u.name] <= horizon), key=lambda u: u.start)
        self._ready = [u for u in self._ready if self._first[u.name] > horizon]
        return ready

    def initial_units(self) -> list[PrepUnit]:
        """Detection and audio units, and the prepare units whose detections are all known (cached)."""
        return [*self._detect, *self._audio, *self._take_ready()]

    def detected(self, unit: PrepUnit, found: dict[int, Detection | None]) -> list[PrepUnit]:
        """A detect unit landed: the prepare units it completed (each released once, in frame order)."""
        if unit.name not in self._detecting:
            return []  # a duplicate report
        self._detecting.discard(unit.name)
        for k, det in found.items():
            self.detections[k] = det
            for waiting in self._waiters.pop(k, ()):
                self._missing[waiting.name] -= 1
                if not self._missing[waiting.name]:
                    del self._missing[waiting.name]
                    self._ready.append(waiting)
        return self._take_ready()

    def boxes_for(self, unit: PrepUnit) -> dict:
        """The smoothed crop boxes of a prepare unit's source frames."""
        return boxes_from_detections(
            self.detections,
            range(unit.start, unit.end),
            self.frame_shape,
            self.pipeline,
            self.plan.source_frames,
        )

    def _readers(self, start: int, end: int) -> set[str]:
        """Shards still to land that show a source frame in ``[start, end)``."""
        out = set()
        for name, shown in self._shown.items():
            i = bisect.bisect_left(shown, start)
            if name not in self._landed and i < len(shown) and shown[i] < end:
                out.add(name)
        return out

    def add_chunk(self, start: int, end: int, ref: object) -> None:
        self._covered.update(range(start, end))
        readers = self._readers(start, end)
        if readers:  # else every shard showing these frames has landed: nothing will read it
            self.chunks[(start, end)] = ref
            self._chunk_readers[(start, end)] = readers

    def add_segment(self, k: int, ref: object) -> None:
        if self._segment_readers.get(k):
            self.segments[k] = ref

    def landed(self, shard: Shard) -> list[PrepUnit]:
        """A generation shard landed: let go of the chunks and Whisper segments no shard still to land
        reads (a retry of a shard that has not landed still finds everything it reads); returns the
        prepare units the look-ahead now lets run."""
        if shard.name in self._landed or shard.name not in self._needs:
            return []
        self._landed.add(shard.name)
        for readers, held in ((self._chunk_readers, self.chunks), (self._segment_readers, self.segments)):
            for key in [k for k, names in readers.items() if shard.name in names]:
                readers[key].discard(shard.name)
                if not readers[key]:
                    del readers[key]
                    held.pop(key, None)
        return self._take_ready()

    def release(self) -> None:
        """The job ended: let go of every chunk and Whisper segment."""
        self.chunks.clear()
        self.segments.clear()
        self._chunk_readers.clear()
        self._segment_readers.clear()

    @property
    def waiting(self) -> int:
        """Generation shards not released yet."""
        return len(self._waiting)

    def ready_shards(self) -> list[Shard]:
        """Generation shards whose frames and Whisper segments are all available (each released once)."""
        ready, waiting = [], []
        for shard in self._waiting:
            done = self._needs[shard.name] <= self._covered
            if done and all(k in self.segments for k in self.prep.shard_segments[shard.name]):
                ready.append(shard)
            else:
                waiting.append(shard)
        self._waiting = waiting
        return ready

    def inputs_of(self, shard: Shard) -> tuple[tuple, tuple]:
        """(chunks as (start, end, [ref]) holding the shard's frames, segments as (k, [ref]))."""
        shown = self._needs[shard.name]
        lo, hi = min(shown), max(shown)
        chunks = tuple(
            (a, b, [ref])
            for (a, b), ref in sorted(self.chunks.items())
            if a <= hi and b > lo and any(s in shown for s in range(a, b))
        )
        segments = tuple((k, [self.segments[k]]) for k in self.prep.shard_segments[shard.name])
        return chunks, segments
