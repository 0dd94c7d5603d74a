"""A worker's jobs' inputs, free of Ray: scratch directories, inputs materialised once per job on the
worker's node, and the Whisper segments its generation units read.

Inputs arrive as object-store refs (the worker passes how to resolve one: ``fetch=ray.get``), as paths
every node can read, or as URIs each node stages once (:mod:`cluster.storage`). Each part is materialised
the first time a unit reads it: the video for units that decode frames, the audio samples for units that
encode audio; a generation shard never holds the samples. A worker's scratch lives under
``<tmp>/musetalk-job-<id>/<pid>/``: the driver removes the job's root on its node when the job ends, a
worker removes its own directory when it forgets or evicts a job or closes, and a worker starting on a
node removes what dead workers left there (:func:`sweep_dead_scratch`).

Thread safety (units of several jobs run side by side in one worker): one lock guards the bookkeeping
and is never held across a download; a job's materialisation runs under that job's own gate, so one
job's download never blocks another job's unit; a job with a unit running is never evicted, and that is
decided under the lock that counts its running units.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import threading
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from cluster import storage
from musetalk.config import PipelineConfig
from musetalk.lru import LRU
from shards.probe import VideoInfo, load_audio

SCRATCH_PREFIX = "musetalk-job-"

# Inputs of this many jobs stay materialised per worker (units of neighbouring jobs interleave).
KEEP_JOBS = 4
# Whisper segments kept per worker for the next unit of the same job.
KEEP_SEGMENTS = 4


def scratch_root(job_id: str) -> Path:
    """The node-local directory under which every worker of job ``job_id`` keeps its scratch."""
    return Path(tempfile.gettempdir()) / f"{SCRATCH_PREFIX}{job_id}"


def sweep_dead_scratch(tmp: Path | None = None) -> int:
    """Remove scratch of workers on this node whose process is gone (killed mid-job); returns the count."""
    removed = 0
    for d in Path(tmp or tempfile.gettempdir()).glob(f"{SCRATCH_PREFIX}*/*"):
        if d.name.isdigit() and not _alive(int(d.name)):
            remove_scratch(d)
            removed += 1
    return removed


def remove_scratch(scratch: Path) -> None:
    """Remove one worker's scratch of a job, and the job's root once no other worker's is left in it."""
    shutil.rmtree(scratch, ignore_errors=True)
    try:
        scratch.parent.rmdir()
    except OSError:
        pass  # other workers of the job still use it (or it is gone): the driver removes it


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@dataclass(frozen=True)
class JobInputs:
    """How a worker gets a job's inputs: object-store refs (held in lists so Ray does not resolve them per call) or paths.

    ``video`` is the driver's probe (probing decodes the whole stream, so workers never repeat it).
    ``pipeline`` is the job's own settings: they may differ from the pool's only where the models do not
    (see ``cluster.pool.pool_key``). ``progress`` is the driver's progress actor, ``tag`` this job's
    prefix in it (units of several jobs share one counter); ``scratch`` is the job's scratch root.
    """

    job_id: str
    video_suffix: str
    video: VideoInfo
    video_ref: list | None = None  # [ObjectRef to the video file's bytes, as a uint8 array]
    audio_ref: list | None = None  # [ObjectRef to (N,) float32 16 kHz samples]
    video_path: str | None = None
    audio_path: str | None = None
    pipeline: PipelineConfig | None = None
    progress: object = None
    tag: str = ""
    scratch: str | None = None


@dataclass(frozen=True)
class ShardInputs:
    """Where a generation unit finds what the preparation phase made: entry chunks as ``(start, end,
    [ref])`` over source frames ``[start, end)``, and Whisper segments as ``(k, [ref])`` (refs in lists so
    Ray does not resolve them per call: the worker fetches only the chunks holding its frames)."""

    chunks: tuple = ()
    segments: tuple = ()
    sync: object = None  # a musetalk.syncscore.ShardSyncPlan when the job is lip-sync scored


@dataclass(frozen=True)
class JobFiles:
    """A job's inputs on this worker, as one unit asked for them (``None`` where it did not): ``video``
    is the driver's probe with its ``path`` on this node, ``samples`` (N,) float32 16 kHz mono, and
    ``scratch`` this worker's directory for the job (created when the video is written there)."""

    video: VideoInfo | None
    samples: np.ndarray | None
    scratch: Path


class _Job:
    """What is materialised of one job (fields written under the job's gate)."""

    def __init__(self, scratch: Path) -> None:
        self.scratch = scratch
        self.video: VideoInfo | None = None
        self.samples: np.ndarray | None = None


class WorkerInputs:
    """The inputs of the jobs one worker serves: materialised once per job, the last ``keep_jobs`` jobs
    kept, and the last ``keep_segments`` Whisper segments. ``fetch(ref)`` resolves an object-store ref
    (``ray.get`` in the worker; any callable in tests); ``pid`` names this worker's scratch directories."""

    def __init__(
        self,
        fetch: Callable[[object], object],
        *,
        keep_jobs: int = KEEP_JOBS,
        keep_segments: int = KEEP_SEGMENTS,
        pid: int | None = None,
    ) -> None:
        self._fetch = fetch
        self._pid = os.getpid() if pid is None else pid
        self._lock = threading.Lock()
        self._running: Counter[str] = Counter()  # job id -> units of it running now (never evicted)
        self._gates: dict[str, threading.Lock] = {}  # job id -> held while its inputs are materialised
        self._jobs: LRU[str, _Job] = LRU(keep_jobs, pinned=self._running.__contains__)
        self._segments: LRU[tuple[str, int], np.ndarray] = LRU(keep_segments)

    def scratch(self, job: JobInputs) -> Path:
        """This worker's scratch directory for ``job`` (not created here)."""
        return Path(job.scratch or scratch_root(job.job_id)) / str(self._pid)

    def jobs(self) -> list[str]:
        """Ids of the jobs with inputs held, least recently used first."""
        with self._lock:
            return list(self._jobs)

    @contextmanager
    def use(self, job: JobInputs, *, video: bool = False, audio: bool = False) -> Iterator[JobFiles]:
        """The job's inputs that a unit reads (``video``, ``audio``) while the unit runs: a job with a unit
        running is never evicted. Materialising (writing the video out of the object store, staging a URI,
        decoding an audio file) happens under the job's own gate, not the bookkeeping lock: a unit of
        another job goes on meanwhile, and concurrent units of this job wait for the one materialisation."""
        with self._lock:
            self._running[job.job_id] += 1
            gate = self._gates.setdefault(job.job_id, threading.Lock())
        try:
            with gate:
                files = self._materialise(job, video, audio)
            yield files
        finally:
            with self._lock:
                self._running[job.job_id] -= 1
                if not self._running[job.job_id]:
                    del self._running[job.job_id]

    def _materialise(self, job: JobInputs, video: bool, audio: bool) -> JobFiles:
        """The parts asked for, each made once per job (call with the job's gate held)."""
        with self._lock:
            state = self._jobs.get(job.job_id)
            evicted = [] if state is not None else self._dropped(self._jobs.make_room())
        _remove_all(evicted)
        if state is None:
            state = _Job(self.scratch(job))
        if video and state.video is None:
            state.video = replace(job.video, path=str(self._video(job, state.scratch)))
        if audio and state.samples is None:
            state.samples = self._samples(job)
        with self._lock:
            evicted = self._dropped(self._jobs.put(job.job_id, state))
        _remove_all(evicted)
        return JobFiles(state.video if video else None, state.samples if audio else None, state.scratch)

    def _video(self, job: JobInputs, scratch: Path) -> Path:
        if job.video_ref is None:  # a local path every node can read, or a URI staged on this node
            return storage.stage(job.video_path)
        scratch.mkdir(parents=True, exist_ok=True)
        path = scratch / f"{job.job_id}{job.video_suffix}"
        with open(path, "wb") as f:  # from the object store's pages: no copy of the file on the heap
            f.write(memoryview(self._fetch(job.video_ref[0])))
        return path

    def _samples(self, job: JobInputs) -> np.ndarray:
        if job.audio_ref is None:
            return load_audio(storage.stage(job.audio_path))
        return self._fetch(job.audio_ref[0])

    def segments(self, job_id: str, refs: Iterable[tuple[int, object]]) -> dict[int, np.ndarray]:
        """Whisper segments ``{k: (1500, L, D) float32}`` from ``(k, ref)`` pairs, each fetched once while
        it stays among the last ``keep_segments`` used (a writable copy: the store's is read-only)."""
        out = {}
        for k, ref in refs:
            with self._lock:
                out[k] = self._segments.get((job_id, k))
            if out[k] is None:
                out[k] = np.array(self._fetch(ref))
                with self._lock:
                    self._segments.put((job_id, k), out[k])
        return out

    def forget(self, job_id: str) -> None:
        """Drop a finished job's inputs, Whisper segments and scratch directory."""
        with self._lock:
            state = self._jobs.pop(job_id)
            self._dropped([(job_id, state)])
        if state is not None:
            remove_scratch(state.scratch)

    def close(self) -> None:
        """Forget every job (the worker is going away)."""
        for job_id in self.jobs():
            self.forget(job_id)

    def _dropped(self, jobs: list[tuple[str, _Job | None]]) -> list[Path]:
        """Forget what goes with dropped jobs (call with the lock held); the scratch dirs to remove."""
        for job_id, _ in jobs:
            if job_id not in self._running:
                self._gates.pop(job_id, None)
            for key in [key for key in self._segments if key[0] == job_id]:
                self._segments.pop(key)
        return [state.scratch for _, state in jobs if state is not None]


def _remove_all(scratch: list[Path]) -> None:
    for d in scratch:
        remove_scratch(d)
