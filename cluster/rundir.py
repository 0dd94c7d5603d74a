"""The kept segments of one output: a lock, finished segments named by their content, and a manifest.

Beside ``<dir>/<name>.mp4`` live ``<dir>/.<name>.mp4.lock`` (held while a render of that output runs) and
``<dir>/.<name>.mp4.run/`` holding ``manifest.json`` and ``segments/<key>.mkv`` (with
``segments/<key>.sync.npz``, its lip-sync data, when the job is scored). A segment's key
(:func:`cluster.keys.shard_key`) is what its pixels depend on: the compute identity, the encoder, the
pixel settings, the weights, the video, the shard's output range, each frame's source index and face
choice, and the Whisper segments its lip-synced frames read. Any later render of the output whose shard
has the same key reuses the segment: resuming after Ctrl-C or a crash, and re-rendering after a revision
(one changed line renders only the shards that read it). One output never mixes rounding: every key of a
render holds the pool's compute identity.

The directory is created when the first segment lands (a render that fails before leaves nothing beside
the output) and is kept after the output has landed. A segment is listed in the manifest only after it
was written whole (temporary name, then rename), so a crash never leaves a listed segment half-written.
Segments are removed only by ``python -m cluster.clean`` or by ``output.segments_max_mb`` (those the last
render did not use, oldest first, each removal logged), never silently.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import logging
import os
import shutil
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path

from cluster.keys import content_digest, shard_key
from musetalk.stats import ShardStats
from shards.errors import InputError
from shards.plan import Shard

logger = logging.getLogger(__name__)

MANIFEST_VERSION = 2  # 1: one key per run directory, segments named by shard
# Everything a run directory can hold (a crash right after creating it may leave it without a manifest).
SIDE = ".sync.npz"  # a segment's lip-sync data beside it
_OURS = {"segments", "manifest.json", "manifest.json.partial", "plan.json"}  # plan.json: older versions


def run_dir_path(output: Path) -> Path:
    """Where the run directory of ``output`` lives."""
    return output.parent / f".{output.name}.run"


def dub_track_path(output: Path) -> Path:
    """Where a dub job's audio track (:mod:`shards.dub`) is written while ``output`` renders."""
    return output.parent / f".{output.name}.dub.wav"


def lock_path(output: Path) -> Path:
    return output.parent / f".{output.name}.lock"


@contextmanager
def output_lock(output: Path) -> Iterator[Path]:
    """Hold the output's lock file for the duration; a second render of the same output gets InputError.

    ``flock`` is released by the kernel when the process dies, so a crashed render never leaves a stale
    lock. The file is removed on release; a waiter that opened the old file notices and retries.
    """
    path = lock_path(output)
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as err:
            os.close(fd)
            if err.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
                holder = _read_holder(path)
                raise InputError(
                    f"another render is writing {output}{holder}; wait for it to finish or choose another task.output"
                ) from None
            raise
        try:
            same = os.fstat(fd).st_ino == os.stat(path).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)  # the holder removed the file between our open and lock: take the new one
    try:
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        yield path
    finally:
        path.unlink(missing_ok=True)
        os.close(fd)


def _read_holder(path: Path) -> str:
    try:
        pid = path.read_text().strip()
    except OSError:
        return ""
    return f" (process {pid})" if pid.isdigit() else ""


class RunDir:
    """The kept segments of one output. Build with :meth:`open` while holding the lock, give it the
    render's shard keys (:meth:`use`), then ask which shards it holds."""

    def __init__(self, root: Path, known: dict[str, dict], last: dict[str, dict], compute: str = "") -> None:
        self.root = root
        self.segments = root / "segments"
        self.compute = compute  # the compute identity's key of the last render (or this one, once used)
        self.asked = ""  # the settings that asked for that identity (cluster.job.JobRun.asked)
        self.reuse = True  # output.resume=false: render every shard again (kept segments stay)
        self._known = known  # key -> {"bytes", "sha256", "stats", "used"}
        self._last = last  # shard name -> the parts of its key in the last render that landed
        self._keys: dict[str, str] = {}  # this render: shard name -> key
        self._parts: dict[str, dict] = {}
        self._added: set[str] = set()  # shards rendered by this render
        self._verified: set[str] = set()

    @classmethod
    def open(cls, output: Path, *, resume: bool) -> RunDir:
        """The kept segments of ``output`` (none yet: a directory that appears with the first segment).
        ``resume`` false: every shard renders again."""
        root = run_dir_path(output)
        run = cls(root, {}, {})
        if root.exists():
            old = _load_manifest(root / "manifest.json")
            if old is None:
                if not set(os.listdir(root)) <= _OURS:
                    raise InputError(
                        f"{root} exists but is not a run directory of this renderer (no valid manifest.json); "
                        "move it away or choose another task.output"
                    )
                logger.info("starting over in %s: it holds no segments this version can reuse", root)
                shutil.rmtree(root)
            else:
                run = cls(root, old["segments"], old.get("last", {}), old.get("compute", ""))
                run.asked = old.get("asked", "")
                run._check()
        run.reuse = resume
        return run

    def use(self, compute: str, keys: dict[str, tuple[str, dict]], asked: str = "") -> None:
        """This render's shards: name -> (key, parts), computed with the compute identity ``compute``
        (which the settings ``asked`` asked for)."""
        self.compute, self.asked = compute, asked
        self._keys = {name: key for name, (key, _) in keys.items()}
        self._parts = {name: parts for name, (_, parts) in keys.items()}
        for name, key in self._keys.items():
            if key in self._known and key not in self._verified and name not in self._added:
                self._verify(key)

    def has(self, shard: Shard) -> bool:
        return self._holds(shard.name)

    def _holds(self, name: str) -> bool:
        if name in self._added:
            return True
        return self.reuse and self._keys.get(name) in self._known

    def segment(self, name: str) -> Path:
        return self.segments / f"{self._keys[name]}.mkv"

    def side(self, name: str) -> Path:
        """A segment's lip-sync data (:class:`musetalk.syncscore.ShardSync`), beside it."""
        return self.segments / f"{self._keys[name]}{SIDE}"

    def put_side(self, shard: Shard, data: bytes) -> None:
        """Store a segment's lip-sync data whole (before :meth:`add` lists the segment), so a resumed
        render still scores every frame."""
        self.segments.mkdir(parents=True, exist_ok=True)
        _write_whole(self.side(shard.name), data)

    def stats(self, shard: Shard) -> ShardStats:
        return ShardStats(**self._known[self._keys[shard.name]]["stats"])

    @property
    def done_count(self) -> int:
        """Shards of this render the kept segments hold."""
        return sum(self._holds(name) for name in self._keys)

    @property
    def rendered_count(self) -> int:
        """Shards this render rendered (the others came from the kept segments)."""
        return len(self._added)

    def add(self, shard: Shard, data: bytes, stats: ShardStats) -> None:
        """Store a finished segment, then list it (both atomically); the first one creates the directory."""
        if not self.compute:
            raise RuntimeError("RunDir.add before use(): the segments' keys are unknown")
        self.segments.mkdir(parents=True, exist_ok=True)
        key = self._keys[shard.name]
        _write_whole(self.segment(shard.name), data)
        self._known[key] = {
            "bytes": len(data),
            "sha256": hashlib.sha256(data).hexdigest(),
            "stats": asdict(stats),
            "used": time.time(),
        }
        self._added.add(shard.name)
        self._verified.add(key)
        self._write_manifest()

    def changed(self) -> dict[str, int]:
        """Why this render's shards rendered: per changed part of their keys (``audio``, ``frames`` (a
        face choice or the source frames shown), ``encode``, ``compute``, ...), how many shards; ``new``
        for a shard the last landed render did not have."""
        why: dict[str, int] = {}
        for name in sorted(self._added):
            before, now = self._last.get(name), self._parts[name]
            parts = (
                ["new"] if before is None else [k for k in now if before.get(k) != now[k]] or ["unchanged"]
            )
            for part in parts:
                why[part] = why.get(part, 0) + 1
        return why

    def landed(self, limit_mb: float | None = None, last_only: bool = False) -> None:
        """The output landed: remember this render's shards (the next render names what changed), mark
        their segments used, and with ``limit_mb`` remove segments this render did not use, oldest
        first, until the kept segments fit (each removal logged). ``last_only`` (no render: cleaning)
        keeps the segments of the last render that landed instead."""
        if not self.root.exists():
            return
        if last_only:
            keep = {shard_key(parts) for parts in self._last.values()}
        else:
            now = time.time()
            for key in self._keys.values():
                if key in self._known:
                    self._known[key]["used"] = now
            self._last = self._parts
            keep = set(self._keys.values())
        if limit_mb is not None:
            self._evict(limit_mb * 1e6, keep)
        self._write_manifest()

    def _evict(self, limit: float, keep: set[str]) -> None:
        total = sum(e["bytes"] for e in self._known.values())
        for key, entry in sorted(self._known.items(), key=lambda kv: kv[1].get("used", 0.0)):
            if total <= limit:
                break
            if key in keep:
                continue
            self._drop(key)
            total -= entry["bytes"]
            logger.info(
                "kept segments of %s: removed %s (%.1f MB, last used %s) to stay under output.segments_max_mb",
                self.root,
                key,
                entry["bytes"] / 1e6,
                time.strftime("%Y-%m-%d %H:%M", time.localtime(entry.get("used", 0.0))),
            )

    def _drop(self, key: str) -> None:
        del self._known[key]
        for path in (self.segments / f"{key}.mkv", self.segments / f"{key}{SIDE}"):
            path.unlink(missing_ok=True)

    def _check(self) -> None:
        """Drop listed segments that are missing or of the wrong size, and unlisted files (partial
        writes). Contents are checked when a render is about to reuse a segment (:meth:`use`)."""
        for key, entry in list(self._known.items()):
            seg = self.segments / f"{key}.mkv"
            if not seg.is_file() or seg.stat().st_size != entry["bytes"]:
                logger.warning("kept segment %s is missing or altered; its shard will render again", seg)
                self._drop(key)
        for f in self.segments.iterdir() if self.segments.is_dir() else ():
            if f.name.removesuffix(".mkv").removesuffix(SIDE) not in self._known:
                f.unlink()
        self._write_manifest()

    def _verify(self, key: str) -> None:
        seg = self.segments / f"{key}.mkv"
        if not seg.is_file() or content_digest(seg) != self._known[key]["sha256"]:
            logger.warning("kept segment %s is missing or altered; its shard will render again", seg)
            self._drop(key)
            self._write_manifest()
        else:
            self._verified.add(key)

    def _write_manifest(self) -> None:
        if not self.root.exists():
            return
        data = {
            "version": MANIFEST_VERSION,
            "compute": self.compute,
            "asked": self.asked,
            "segments": self._known,
            "last": self._last,
        }
        _write_whole(self.root / "manifest.json", json.dumps(data, indent=1).encode())

    def size_bytes(self) -> int:
        return sum(e["bytes"] for e in self._known.values())

    def remove(self) -> None:
        """Every kept segment of the output (``python -m cluster.clean``)."""
        shutil.rmtree(self.root, ignore_errors=True)


def _write_whole(final: Path, data: bytes) -> None:
    tmp = final.with_name(final.name + ".partial")
    tmp.write_bytes(data)
    os.replace(tmp, final)


def _load_manifest(path: Path) -> dict | None:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    if (
        not isinstance(data, dict)
        or data.get("version") != MANIFEST_VERSION
        or not isinstance(data.get("segments"), dict)
    ):
        return None
    return data
