"""The run directory of one output: a lock, finished segments and a manifest, for resume.

Beside ``<dir>/<name>.mp4`` live ``<dir>/.<name>.mp4.lock`` (held while a render of that output runs) and
``<dir>/.<name>.mp4.run/`` holding ``manifest.json`` and ``segments/<shard>.mkv`` (with
``segments/<shard>.sync.npz``, its lip-sync data, when the job is scored). The directory is created
when the first segment lands (a render that fails before leaves nothing beside the output). A segment is
listed in the manifest only after it was written whole (temporary name, then rename), so a crash or
Ctrl-C never leaves a listed segment half-written. The manifest carries the resume key
(:func:`cluster.keys.resume_key`: inputs, plan, pixel settings, encoder, weights) and the compute identity
the segments were computed with. Re-running the same command resumes: segments listed under the same key
are reused when the pool computes with the same identity; a different key (changed input or setting) or
identity (another device model, dtype, thread count, torch or CUDA version) starts over, so one output
never mixes segments computed differently. The directory is removed after the output has landed.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import logging
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING

from cluster.keys import content_digest
from musetalk.stats import ShardStats
from shards.errors import InputError
from shards.plan import Plan, Shard

if TYPE_CHECKING:  # torch: keep this module cheap for the pre-flight checks
    from musetalk.device import ComputeIdentity

logger = logging.getLogger(__name__)

MANIFEST_VERSION = 1
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
    """Finished segments of one output under one key. Build with :meth:`open` while holding the lock."""

    def __init__(self, root: Path, key: str, done: dict[str, dict], compute: str = "") -> None:
        self.root = root
        self.key = key
        self.compute = compute  # the compute identity of the listed segments ("" while there are none)
        self._done = done  # shard name -> {"bytes", "sha256", "stats"}
        self.segments = root / "segments"

    @classmethod
    def open(cls, output: Path, key: str, plan: Plan, *, resume: bool) -> RunDir:
        """The run directory for ``output``: resumed when its manifest has ``key`` and ``resume``, else new
        (an old one is removed; a new one appears on disk with its first segment)."""
        root = run_dir_path(output)
        manifest = root / "manifest.json"
        if root.exists():
            old = _load_manifest(manifest)
            if old is None and not set(os.listdir(root)) <= _OURS:
                raise InputError(
                    f"{root} exists but is not a run directory of this renderer (no valid manifest.json); "
                    "move it away or choose another task.output"
                )
            if resume and old is not None and old.get("key") == key:
                run = cls(root, key, old["shards"], old.get("compute", ""))
                run._check()
                logger.info(
                    "resuming: %d of %d shards already rendered in %s", len(run._done), len(plan.shards), root
                )
                return run
            why = "a fresh run was asked for" if not resume else "the inputs or settings changed"
            logger.info("starting over in %s: %s", root, why)
            shutil.rmtree(root)
        return cls(root, key, {})

    def adopt(self, identity: ComputeIdentity) -> None:
        """The segments still to render will be computed with ``identity``: listed segments computed
        with another one are dropped (the output would mix rounding otherwise)."""
        if self._done and self.compute != identity.key():
            logger.info(
                "starting over in %s: its %d segments were computed on %s, this pool computes on %s",
                self.root,
                len(self._done),
                self.compute.replace("|", " "),
                identity,
            )
            self._done = {}
            shutil.rmtree(self.root, ignore_errors=True)
        self.compute = identity.key()

    def _check(self) -> None:
        """Drop listed segments that are missing or altered, and unlisted files (partial writes)."""
        for name, entry in list(self._done.items()):
            seg = self.segment(name)
            if (
                not seg.is_file()
                or seg.stat().st_size != entry["bytes"]
                or content_digest(seg) != entry["sha256"]
            ):
                logger.warning("segment %s is missing or altered; rendering it again", seg)
                del self._done[name]
        for f in self.segments.iterdir() if self.segments.is_dir() else ():
            if f.name.removesuffix(".mkv").removesuffix(SIDE) not in self._done:
                f.unlink()
        self._write_manifest()

    def segment(self, name: str) -> Path:
        return self.segments / f"{name}.mkv"

    def side(self, name: str) -> Path:
        """A segment's lip-sync data (:class:`musetalk.syncscore.ShardSync`), beside it."""
        return self.segments / f"{name}{SIDE}"

    def put_side(self, shard: Shard, data: bytes) -> None:
        """Store a segment's lip-sync data whole (before :meth:`add` lists the segment), so a resumed
        render still scores every frame."""
        self.segments.mkdir(parents=True, exist_ok=True)
        final = self.side(shard.name)
        tmp = final.with_name(final.name + ".partial")
        tmp.write_bytes(data)
        os.replace(tmp, final)

    def has(self, shard: Shard) -> bool:
        return shard.name in self._done

    def stats(self, shard: Shard) -> ShardStats:
        return ShardStats(**self._done[shard.name]["stats"])

    @property
    def done_count(self) -> int:
        return len(self._done)

    def add(self, shard: Shard, data: bytes, stats: ShardStats) -> None:
        """Store a finished segment, then list it (both atomically); the first one creates the directory."""
        if not self.compute:
            raise RuntimeError("RunDir.add before adopt(): the segments' compute identity is unknown")
        self.segments.mkdir(parents=True, exist_ok=True)
        final = self.segment(shard.name)
        tmp = final.with_suffix(".partial")
        tmp.write_bytes(data)
        os.replace(tmp, final)
        self._done[shard.name] = {
            "bytes": len(data),
            "sha256": hashlib.sha256(data).hexdigest(),
            "stats": asdict(stats),
        }
        self._write_manifest()

    def _write_manifest(self) -> None:
        data = {"version": MANIFEST_VERSION, "key": self.key, "compute": self.compute, "shards": self._done}
        tmp = self.root / "manifest.json.partial"
        tmp.write_text(json.dumps(data, indent=1))
        os.replace(tmp, self.root / "manifest.json")

    def remove(self) -> None:
        shutil.rmtree(self.root, ignore_errors=True)


def _load_manifest(path: Path) -> dict | None:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    if (
        not isinstance(data, dict)
        or data.get("version") != MANIFEST_VERSION
        or not isinstance(data.get("shards"), dict)
    ):
        return None
    return data
