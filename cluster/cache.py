"""The avatar cache: per source frame, raw detections and prepared entries (:mod:`musetalk.entries`) of
many videos, kept for later renders of the same video with any audio (:class:`AvatarStore`), and as one
job uses it (:class:`AvatarCache`): opened in one place, keyed by :mod:`cluster.keys`, never fatal.

The cache is an optimisation: a cache that cannot be read or written costs reuse, never the render, and
nothing at its path is ever touched when it is not a usable directory. :meth:`AvatarCache.open` checks
it once (a ``cache.dir`` that names a file, or a directory that cannot be created, turns the cache off
for the job with one warning); later failures to read or write one file are logged and skipped.
"""

from __future__ import annotations

import bisect
import contextlib
import logging
import os
import re
import uuid
from collections.abc import Callable
from pathlib import Path

from cluster import storage
from cluster.config import CacheConfig
from cluster.keys import choice_digest, content_digest, detect_key, prepare_key, weights_identity
from musetalk.config import PipelineConfig
from musetalk.device import ComputeIdentity
from musetalk.entries import ChunkReader, detections_from_json
from musetalk.faces import FrameFaces
from musetalk.preparation import PrepPlan
from musetalk.tracks import VERSION as TRACKS_VERSION
from musetalk.tracks import Tracks
from shards.errors import StorageError
from shards.plan import PrepUnit, UnitKind

logger = logging.getLogger(__name__)


Choice = Callable[[int], str | int | None] | None
_RANGE = re.compile(r"^(\d{6})-(\d{6})\.(json|npz)$")


def chunk_name(start: int, end: int, suffix: str) -> str:
    return f"{start:06d}-{end:06d}.{suffix}"


class AvatarStore:
    """Avatar entries of many videos under one root (a local directory or an fsspec URI, opened through
    :mod:`cluster.storage`).

    Layout: ``<root>/<video sha256>/<key>/<start>-<end>.{json,npz}``: detections (``d...`` keys) as JSON,
    prepared entries (``p...`` keys) as npz, one file per range of source frames ``[start, end)``; the
    face tracks of a whole video (``t<version>-d...``) as one JSON over ``[0, frames)``. A file
    is written under a temporary name and renamed (or, on object stores, put in one request), so a
    reader never sees half of one; unreadable files are skipped and logged, never trusted.
    """

    def __init__(self, root: str) -> None:
        self.root = root
        self.fs, path = storage.open_fs(os.path.expanduser(root))
        self.path = path.rstrip("/")
        self.local = "file" in (
            self.fs.protocol if isinstance(self.fs.protocol, tuple) else (self.fs.protocol,)
        )

    def _dir(self, video: str, key: str) -> str:
        return f"{self.path}/{video}/{key}"

    def ranges(self, video: str, key: str) -> list[tuple[int, int]]:
        """The ``[start, end)`` ranges stored under ``key`` for ``video``."""
        d = self._dir(video, key)
        try:
            names = [p.rsplit("/", 1)[-1] for p in self.fs.ls(d, detail=False)]
        except FileNotFoundError:
            return []
        out = []
        for name in names:
            m = _RANGE.match(name)
            if m:
                out.append((int(m.group(1)), int(m.group(2))))
        return sorted(out)

    def keys(self, video: str) -> list[str]:
        """The keys ``video`` has files under."""
        try:
            return sorted(p.rsplit("/", 1)[-1] for p in self.fs.ls(f"{self.path}/{video}", detail=False))
        except FileNotFoundError:
            return []

    def uri(self, video: str, key: str, start: int, end: int, suffix: str) -> str:
        """The full URI of one file (with its protocol), for :func:`cluster.storage.cat` on any node."""
        return self.fs.unstrip_protocol(f"{self._dir(video, key)}/{chunk_name(start, end, suffix)}")

    def read(self, video: str, key: str, start: int, end: int, suffix: str) -> bytes:
        return self.fs.cat_file(f"{self._dir(video, key)}/{chunk_name(start, end, suffix)}")

    def write(self, video: str, key: str, start: int, end: int, suffix: str, data: bytes) -> None:
        d = self._dir(video, key)
        final = f"{d}/{chunk_name(start, end, suffix)}"
        if not self.local:
            self.fs.pipe_file(final, data)  # one PUT: the object appears whole or not at all
            return
        self.fs.makedirs(d, exist_ok=True)
        tmp = f"{d}/.{uuid.uuid4().hex}.partial"
        try:
            with open(tmp, "wb") as f:
                f.write(data)
            os.replace(tmp, final)
        finally:  # a failed write (a full disk) leaves nothing behind, not even the temporary file
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)


class AvatarCache:
    """One video's entries in the avatar cache under the keys of one pipeline and compute identity."""

    def __init__(
        self, store: AvatarStore, video: str, detect: str, prepare: str, label: str, choice: Choice = None
    ) -> None:
        self.store, self.video, self.detect, self.prepare = store, video, detect, prepare
        self.label = label  # the job's name in log lines
        self.choice = choice or (lambda s: "largest")  # which face each source frame's entry holds

    @classmethod
    def open(
        cls,
        cfg: CacheConfig,
        video: Path,
        pipeline: PipelineConfig,
        identity: ComputeIdentity,
        label: str,
        choice: Choice = None,
    ) -> AvatarCache | None:
        """The cache for ``video``, or None when it is off or cannot be used (logged once). ``choice(src)``:
        the face choice of each source frame (:func:`musetalk.boxes.boxes_from_detections`; default
        ``pipeline.face.select``), part of each entry chunk's key (:meth:`chunk_key`)."""
        if not cfg.enabled:
            return None
        try:
            store = AvatarStore(cfg.dir)
            if store.local:
                if os.path.exists(store.path) and not os.path.isdir(store.path):
                    raise NotADirectoryError(f"{store.path} exists and is not a directory")
                os.makedirs(store.path, exist_ok=True)
            weights = weights_identity(pipeline, preparation=True)
            return cls(
                store,
                content_digest(video),
                detect_key(pipeline, identity, weights),
                prepare_key(pipeline, identity, weights),
                label,
                choice or (lambda s: pipeline.face.select),
            )
        except (OSError, ValueError, StorageError) as err:
            logger.warning(
                "avatar cache %s cannot be used (%s): rendering %s without it; set cache.dir to a "
                "directory or URI, or cache.enabled=false",
                cfg.dir,
                err,
                label,
            )
            return None

    @property
    def root(self) -> str:
        return self.store.root

    def chunk_key(self, start: int, end: int) -> str:
        """The key of the entries of source frames ``[start, end)``: the prepare key, and what their boxes
        depend on beyond it, each frame's face choice (with the tracker's version where one names a
        track). All ``largest``: the bare prepare key, where entries were kept before face choices."""
        choices = [self.choice(s) for s in range(start, end)]
        if all(c == "largest" for c in choices):
            return self.prepare
        return f"{self.prepare}-{choice_digest(choices)}"

    def shared(self, unit: PrepUnit) -> tuple[str, str, str] | None:
        """(root, video, chunk key) of a prepare unit when every node reaches the cache (an object
        store): workers then write and read prepared chunks there themselves. None for a local directory."""
        return (
            None if self.store.local else (self.store.root, self.video, self.chunk_key(unit.start, unit.end))
        )

    def _ranges(self, key: str) -> list[tuple[int, int]]:
        try:
            return self.store.ranges(self.video, key)
        except OSError as err:
            logger.warning("avatar cache %s: cannot list entries for %s: %s", self.root, self.label, err)
            return []

    def chunks(self, prep: PrepPlan) -> dict[tuple[int, int], bytes | str]:
        """(start, end) -> the entry chunks holding frames ``prep`` shows: a local cache's bytes (an
        unreadable file is skipped, so it is prepared and rewritten), a shared cache's URIs (only listed:
        workers read them there, so no entry passes through the driver)."""
        out: dict[tuple[int, int], bytes | str] = {}
        keys = [
            k for k in self.store.keys(self.video) if k == self.prepare or k.startswith(self.prepare + "-")
        ]
        ranges = [(a, b, key) for key in keys for a, b in self._ranges(key)]
        for a, b, key in sorted(ranges):
            if not prep.wanted(a, b) or (a, b) in out or self.chunk_key(a, b) != key:
                continue  # not shown, or made for other face choices
            if not self.store.local:
                out[(a, b)] = self.store.uri(self.video, key, a, b, "npz")
                continue
            try:
                blob = self.store.read(self.video, key, a, b, "npz")
                ChunkReader(blob)  # refuse a file we cannot read before any worker gets it
            except (OSError, ValueError, KeyError) as err:
                logger.warning(
                    "avatar cache: skipping unreadable entries %d-%d of %s: %s", a, b, self.label, err
                )
                continue
            out[(a, b)] = blob
        return out

    def detections(self, frames: list[int]) -> dict[int, FrameFaces]:
        """Raw detections the cache holds for sorted ``frames`` (only the files that hold some of them)."""
        out: dict[int, FrameFaces] = {}
        if not frames:
            return out
        for a, b in self._ranges(self.detect):
            i = bisect.bisect_left(frames, a)
            if i >= len(frames) or frames[i] >= b:
                continue
            try:
                out.update(detections_from_json(self.store.read(self.video, self.detect, a, b, "json")))
            except (OSError, ValueError, KeyError) as err:
                logger.warning(
                    "avatar cache: skipping unreadable detections %d-%d of %s: %s", a, b, self.label, err
                )
        return out

    def tracks(self, frames: int) -> Tracks | None:
        """The face tracks of the video's ``frames`` source frames, if kept (a per-video result, keyed by
        the detections it was linked from and the tracker's version)."""
        if (0, frames) not in self._ranges(self._tracks_key):
            return None
        try:
            return Tracks.from_json(self.store.read(self.video, self._tracks_key, 0, frames, "json"))
        except (OSError, ValueError, KeyError) as err:
            logger.warning("avatar cache: skipping unreadable face tracks of %s: %s", self.label, err)
            return None

    def remember_tracks(self, tracks: Tracks, frames: int) -> None:
        """Keep the face tracks of the whole video; a failed write is logged (it costs reuse only)."""
        try:
            self.store.write(self.video, self._tracks_key, 0, frames, "json", tracks.to_json().encode())
        except OSError as err:
            logger.warning("avatar cache: could not write the face tracks of %s: %s", self.label, err)

    @property
    def _tracks_key(self) -> str:
        return f"t{TRACKS_VERSION}-{self.detect}"

    def remember(self, unit: PrepUnit, data: bytes) -> None:
        """Write a detect or prepare unit's result; a failed write is logged (it costs reuse only)."""
        if unit.kind is UnitKind.DETECT:
            key, suffix = self.detect, "json"
        else:
            key, suffix = self.chunk_key(unit.start, unit.end), "npz"
        try:
            self.store.write(self.video, key, unit.start, unit.end, suffix, data)
        except OSError as err:
            logger.warning("avatar cache: could not write %s of %s: %s", unit.name, self.label, err)
