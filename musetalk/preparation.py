"""One job's preparation plan: which units run before its generation shards, and when each shard is
released. Pure and Ray-free: results are opaque handles (object refs, URIs, arrays) the caller stores.

A job runs units of three kinds before its shards:

- ``detect`` over the source frames whose raw detections are missing: the smoothing context
  (:func:`musetalk.boxes.smoothing_window`) of every shown frame that needs a new entry;
- ``audio``, one per 30 s Whisper segment some shard's windows read;
- ``prepare`` over the shown frames without entries, ``chunk`` source frames at a time (ranges split at
  multiples of ``chunk``, so cache files line up across jobs on one video), each released once the raw
  detections its smoothed boxes read are in and it serves one of the next ``lead`` shards still to land
  (a look-ahead: preparation does not fill the object store with a long video's chunks).

A generation shard is released once chunks holding all its shown frames and its Whisper segments are
in; a chunk or a segment is let go (dropped here, so the object store frees it) once every shard that
reads it has landed. So each distinct shown source frame is detected and prepared at most once per job,
however many shards show it (ping-pong bounces) and however the output is sharded; with an avatar
cache, once per video. Every frame set is computed once, here.

Use: build the plan over the shards still to render, ask it what to read from a cache
(:meth:`PrepPlan.wanted`, :meth:`PrepPlan.detections_wanted`), :meth:`PrepPlan.start` with what was
found, then feed it what lands (:meth:`detected`, :meth:`add_chunk`, :meth:`add_segment`,
:meth:`landed`); each returns the units it releases.
"""

from __future__ import annotations

import bisect
from collections.abc import Iterable, Mapping, Sequence

from musetalk.audio import audio_span
from musetalk.boxes import smoothing_window
from musetalk.faces import FrameFaces
from musetalk.tracks import Tracks, link_frames
from shards.plan import Plan, PrepUnit, Shard, UnitKind


def block_ranges(frames: Iterable[int], block: int) -> list[tuple[int, int]]:
    """Sorted distinct ``frames`` as ``[start, end)`` runs of consecutive frames, split at multiples of
    ``block`` (so ranges, and the cache files named after them, line up across jobs on one video)."""
    if block < 1:
        raise ValueError(f"block must be >= 1, got {block}")
    out: list[tuple[int, int]] = []
    for s in sorted(set(frames)):
        if out and out[-1][1] == s and s % block:
            out[-1] = (out[-1][0], s + 1)
        else:
            out.append((s, s + 1))
    return out


def _touches(frames: list[int], start: int, end: int) -> bool:
    """Whether sorted ``frames`` holds a frame in ``[start, end)``."""
    i = bisect.bisect_left(frames, start)
    return i < len(frames) and frames[i] < end


class PrepPlan:
    """The preparation of one job's ``shards`` (those still to render, in dispatch order)."""

    def __init__(
        self,
        plan: Plan,
        shards: Sequence[Shard],
        *,
        chunk: int,
        smooth_radius: int,
        lead: int | None = None,
        also_detect: Mapping[str, Iterable[int]] | None = None,
        whole: bool = False,
    ) -> None:
        """``lead``: prepare only for the first ``lead`` shards still to land (None: everything at once).
        ``also_detect``: shard name -> source frames whose raw detections that shard reads besides its
        boxes' (the lip-sync crops, :mod:`cluster.syncjob`): they are detected too, and the shard is
        released only once they are in. ``whole``: every prepare unit reads every source frame's detections
        (a face chosen by track: tracks link the whole video), so all are detected before any prepares."""
        self.plan, self.chunk, self.radius, self._lead = plan, chunk, smooth_radius, lead
        self.whole = whole
        self._tracks: Tracks | None = None
        self._also_of = {name: sorted(set(frames)) for name, frames in (also_detect or {}).items()}
        if whole:  # the lip-sync crops read the chosen track's faces: the tracks of every frame
            self._also_of = {name: list(range(plan.source_frames)) for name in self._also_of}
        self._also = sorted({k for frames in self._also_of.values() for k in frames})
        self._order = [s.name for s in shards]
        self._shown = {s.name: plan.shown_frames(s.start, s.end) for s in shards}
        self.shown: list[int] = sorted({f for frames in self._shown.values() for f in frames})
        self.shard_segments: dict[str, range] = {}  # shard -> the Whisper segments its windows read
        for s in shards:
            span = audio_span(plan.total_samples, plan.fps, s.start, s.end)
            self.shard_segments[s.name] = range(span.first_segment, span.end_segment)
        self._shards = list(shards)
        self.detections: dict[int, FrameFaces] = {}
        self.chunks: dict[tuple[int, int], object] = {}
        self.segments: dict[int, object] = {}
        self.units: list[PrepUnit] = []
        self.entries_needed: list[int] = []
        self.detections_needed: list[int] = []
        self._started = False

    # What to read from a cache ---------------------------------------------------------------------
    def wanted(self, start: int, end: int) -> bool:
        """Whether an entry chunk over source frames ``[start, end)`` holds a frame the shards show."""
        return _touches(self.shown, start, end)

    def context(self, frames: Iterable[int]) -> list[int]:
        """The source frames whose raw detections the smoothed boxes of ``frames`` read, sorted."""
        n = self.plan.source_frames
        if self.whole:
            return list(range(n)) if any(True for _ in frames) else []
        return sorted({k for s in frames for k in smoothing_window(s, self.radius, n)})

    def detections_wanted(self, covered: Iterable[tuple[int, int]] = ()) -> list[int]:
        """Raw detections the frames still to prepare read, given entry chunks ``covered`` already in."""
        have = {s for a, b in covered for s in range(a, b)}
        return sorted({*self.context(s for s in self.shown if s not in have), *self._also})

    # Start -----------------------------------------------------------------------------------------
    def start(
        self,
        chunks: dict[tuple[int, int], object] | None = None,
        detections: dict[int, FrameFaces] | None = None,
    ) -> list[PrepUnit]:
        """Plan every unit, given entry ``chunks`` already available (``(start, end) -> handle``) and raw
        ``detections`` already known; returns the units that can run now (detect, audio, and prepare
        units whose detections are all known, within the look-ahead)."""
        if self._started:
            raise RuntimeError("PrepPlan.start called twice")
        self._started = True
        self.detections = dict(detections or {})
        self._covered = {s for a, b in (chunks or {}) for s in range(a, b)}
        self.entries_needed = [s for s in self.shown if s not in self._covered]
        wanted = sorted({*self.context(self.entries_needed), *self._also})
        self.detections_needed = [k for k in wanted if k not in self.detections]
        detect = [
            self._unit(UnitKind.DETECT, a, b) for a, b in block_ranges(self.detections_needed, self.chunk)
        ]
        audio = [
            self._unit(UnitKind.AUDIO, k, k + 1)
            for k in sorted({k for r in self.shard_segments.values() for k in r})
        ]
        self._detecting = {u.name for u in detect}
        self._landed: set[str] = set()
        self._waiting = list(self._shards)  # shards not released yet
        self._ready: list[PrepUnit] = []  # prepare units whose detections are all in
        self._missing: dict[str, int] = {}  # prepare unit -> detections it still waits for
        self._waiters: dict[int, list[PrepUnit]] = {}  # source frame -> prepare units waiting for it
        self._first: dict[str, int] = {}  # prepare unit -> position of the first shard it serves
        position = {name: i for i, name in enumerate(self._order)}
        for a, b in block_ranges(self.entries_needed, self.chunk):
            unit = self._unit(UnitKind.PREPARE, a, b)
            self._first[unit.name] = min((position[n] for n in self._readers(a, b)), default=0)
            missing = set(self.context(range(a, b))).difference(self.detections)
            if not missing:
                self._ready.append(unit)
                continue
            self._missing[unit.name] = len(missing)
            for k in missing:
                self._waiters.setdefault(k, []).append(unit)
        self._chunk_readers: dict[tuple[int, int], set[str]] = {}
        self._segment_readers: dict[int, set[str]] = {}
        for key, handle in (chunks or {}).items():
            self.add_chunk(*key, handle)
        for name, ks in self.shard_segments.items():
            for k in ks:
                self._segment_readers.setdefault(k, set()).add(name)
        return [*detect, *audio, *self._take_ready()]

    @property
    def tracks(self) -> Tracks | None:
        """With ``whole``, the face tracks of the video once every frame's detections are in (linked once);
        else None."""
        if not self.whole or len(self.detections) < self.plan.source_frames:
            return None
        if self._tracks is None:
            n = self.plan.source_frames
            self._tracks = link_frames([self.detections[k] for k in range(n)])
        return self._tracks

    @property
    def cache_hits(self) -> int:
        """Shown source frames whose entries were already available when the plan started."""
        return len(self.shown) - len(self.entries_needed)

    def units_of(self, kind: UnitKind) -> list[PrepUnit]:
        """Every unit of ``kind`` the plan made (ready or not), in order."""
        return [u for u in self.units if u.kind == kind]

    def _unit(self, kind: UnitKind, start: int, end: int) -> PrepUnit:
        unit = PrepUnit(kind, len(self.units), start, end)
        self.units.append(unit)
        return unit

    # Progress --------------------------------------------------------------------------------------
    def detected(self, unit: PrepUnit, found: dict[int, FrameFaces]) -> list[PrepUnit]:
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

    def add_chunk(self, start: int, end: int, handle: object) -> None:
        """Entries of source frames ``[start, end)`` are available (kept while some shard reads them)."""
        self._covered.update(range(start, end))
        readers = self._readers(start, end)
        if readers:  # else every shard showing these frames has landed: nothing will read it
            self.chunks[(start, end)] = handle
            self._chunk_readers[(start, end)] = readers

    def add_segment(self, k: int, handle: object) -> None:
        """Whisper segment ``k`` is available (kept while some shard reads it)."""
        if self._segment_readers.get(k):
            self.segments[k] = handle

    def ready_shards(self) -> list[Shard]:
        """Generation shards whose frames, Whisper segments and ``also_detect`` detections are all
        available (each released once)."""
        ready, waiting = [], []
        for shard in self._waiting:
            frames = self._shown[shard.name]
            done = all(s in self._covered for s in frames)
            done = done and all(k in self.detections for k in self._also_of.get(shard.name, ()))
            if done and all(k in self.segments for k in self.shard_segments[shard.name]):
                ready.append(shard)
            else:
                waiting.append(shard)
        self._waiting = waiting
        return ready

    def landed(self, shard: Shard) -> list[PrepUnit]:
        """A generation shard landed: let go of the chunks and Whisper segments no shard still to land
        reads (a retry of a shard that has not landed still finds everything it reads); returns the
        prepare units the look-ahead now lets run."""
        if shard.name in self._landed or shard.name not in self._shown:
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

    def inputs_of(self, shard: Shard) -> tuple[list[tuple[int, int, object]], list[tuple[int, object]]]:
        """What a released shard reads: entry chunks as ``(start, end, handle)`` holding its frames, and
        its Whisper segments as ``(k, handle)``."""
        frames = self._shown[shard.name]
        chunks = [(a, b, h) for (a, b), h in sorted(self.chunks.items()) if _touches(frames, a, b)]
        segments = [(k, self.segments[k]) for k in self.shard_segments[shard.name]]
        return chunks, segments

    def detections_for(self, unit: PrepUnit) -> dict[int, FrameFaces]:
        """The raw detections a prepare unit's smoothed boxes read."""
        return {k: self.detections[k] for k in self.context(range(unit.start, unit.end))}

    # Internals -------------------------------------------------------------------------------------
    def _readers(self, start: int, end: int) -> set[str]:
        """Shards still to land that show a source frame in ``[start, end)``."""
        return {
            n for n, frames in self._shown.items() if n not in self._landed and _touches(frames, start, end)
        }

    def _horizon(self) -> float:
        """The position of the last shard preparation may work for now (see ``lead``)."""
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
