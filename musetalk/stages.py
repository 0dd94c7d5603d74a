"""Plumbing of the pipelined worker: bounded channels between threads, a thread group that propagates
the first error and always cleans up, a thread-safe stage clock, and the performance switches.

Nothing here knows about faces: :mod:`musetalk.pipeline` wires its named steps with these parts.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import torch

from musetalk.stats import model_cpu_seconds

logger = logging.getLogger(__name__)

END = object()  # the last item a producer puts into its channel
_POLL = 0.1  # seconds between checks of the stop flag while a channel is full or empty


def current_stream(device: torch.device):
    """The calling thread's CUDA stream on ``device``, None off CUDA: hand it to a helper thread of the same
    unit (:func:`on_stream`), so the unit's kernels stay on its own stream (the current stream is per thread)."""
    return torch.cuda.current_stream(device) if device.type == "cuda" else None


@contextmanager
def on_stream(stream) -> Iterator[None]:
    """Run the block's kernels on ``stream`` (from :func:`current_stream`); nothing to do when it is None."""
    if stream is None:
        yield
        return
    with torch.cuda.stream(stream):
        yield


def side_stream(device: torch.device):
    """A new CUDA stream on ``device`` for work that must not queue behind the unit's own (compositing
    behind a UNet batch), None off CUDA. Tensors a block allocates under :func:`on_stream` belong to that
    stream in the caching allocator, so nothing needs ``record_stream`` while each tensor stays on the
    stream that made it."""
    return torch.cuda.Stream(device) if device.type == "cuda" else None


class Stopped(Exception):
    """Raised in a thread waiting on a channel when another thread of its group failed."""


@dataclass(frozen=True)
class PipelineTuning:
    """How a worker runs, not what it computes: none of these changes an output pixel, except the GPU
    switches marked below (they change rounding, so every worker of a job must share them). Set from a
    :class:`~musetalk.config.PipelineConfig` (``render.*``) with :meth:`of`.

    ``composite``: "numpy" (the CPU path), "device" (torch ops on the worker's device; within one level of
    the CPU maths) or "auto" (device on CUDA, numpy elsewhere: on this 2-core CPU numpy measures faster).
    Queue depths are in items (frames, or generated faces for ``faces_depth``); ``mask_workers`` threads
    build blend masks off the critical path.
    GPU-only, not measured yet: ``channels_last`` (UNet and VAE memory format: changes rounding),
    ``compile`` (``torch.compile`` the UNet: changes rounding). Uploads to CUDA are always
    page-locked and non-blocking (:func:`musetalk.device.upload`).
    Several workers per GPU is a Ray resource setting (fractional ``num_gpus``) of the driver.
    """

    composite: str = "auto"
    # A decoded or finished item is a whole frame (6 MiB at 1080p) and a worker runs two units side by side,
    # so these depths are most of a worker's transient memory: a generation shard holds about decode +
    # encode + 3 frames (generation reads no frame; its faces queue holds 256x256 faces).
    decode_depth: int = 4
    faces_depth: int = 16
    encode_depth: int = 2
    mask_workers: int = 2
    channels_last: bool = False
    compile: bool = False

    def __post_init__(self) -> None:
        if self.composite not in ("auto", "numpy", "device"):
            raise ValueError(f"composite must be auto, numpy or device, got {self.composite!r}")
        for name in ("decode_depth", "faces_depth", "encode_depth", "mask_workers"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")

    @classmethod
    def of(cls, cfg) -> PipelineTuning:
        """The tuning a :class:`~musetalk.config.PipelineConfig` sets (``render.*``)."""
        return cls(
            composite=cfg.composite,
            decode_depth=cfg.decode_depth,
            faces_depth=cfg.faces_depth,
            encode_depth=cfg.encode_depth,
            mask_workers=cfg.mask_workers,
            channels_last=cfg.channels_last,
            compile=cfg.compile,
        )

    def device_composite(self, device: torch.device) -> bool:
        return self.composite == "device" or (self.composite == "auto" and device.type == "cuda")


class Channel:
    """A bounded FIFO between threads of one :class:`ThreadGroup`; no wait outlives the group's stop flag."""

    def __init__(self, depth: int, stop: threading.Event) -> None:
        self._queue: queue.Queue = queue.Queue(maxsize=depth)
        self._stop = stop
        self._ended = False

    def put(self, item) -> None:
        while True:
            if self._stop.is_set():
                raise Stopped
            try:
                self._queue.put(item, timeout=_POLL)
                return
            except queue.Full:
                continue

    def get(self):
        while True:
            try:
                return self._queue.get(timeout=_POLL)
            except queue.Empty:
                if self._stop.is_set():
                    raise Stopped from None

    def __iter__(self) -> Iterator:
        """Items until the producer's END. The channel is its own iterator, not a generator: a generator
        would keep the item it yielded last until the next one is asked for, so a consumer that drops a
        decoded frame early (a prepare unit keeps only its crops) would still hold it."""
        return self

    def __next__(self):
        if self._ended:
            raise StopIteration
        item = self.get()
        if item is END:
            self._ended = True
            raise StopIteration
        return item


class ThreadGroup:
    """Threads of one shard. The first exception in any of them stops them all (every channel wait
    raises :class:`Stopped`) and is re-raised in the caller, with its original traceback, when the
    ``with`` block ends; threads are always joined before the block exits."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.stop = threading.Event()
        self._errors: list[BaseException] = []
        self._threads: list[threading.Thread] = []
        self._cleanups: list[tuple[Callable[[], None], bool]] = []

    def channel(self, depth: int) -> Channel:
        return Channel(depth, self.stop)

    def on_exit(self, cleanup: Callable[[], None], on_error_only: bool = False) -> None:
        """Run ``cleanup`` (last registered first) after every thread has been joined; with
        ``on_error_only``, only when the block or a thread failed."""
        self._cleanups.append((cleanup, on_error_only))

    def start(self, name: str, target: Callable[..., None], *args) -> threading.Thread:
        def run() -> None:
            try:
                target(*args)
            except Stopped:
                pass
            except BaseException as err:  # noqa: BLE001 - handed to the caller by __exit__
                self._errors.append(err)
                self.stop.set()

        thread = threading.Thread(target=run, name=f"{self.name}-{name}", daemon=True)
        self._threads.append(thread)
        thread.start()
        return thread

    def join(self) -> None:
        """Wait for every thread; raise the first error any of them hit."""
        for thread in self._threads:
            thread.join()
        if self._errors:
            raise self._errors[0]

    def __enter__(self) -> ThreadGroup:
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        if exc_type is not None:
            self.stop.set()
        for thread in self._threads:
            thread.join()
        failed = exc_type is not None or bool(self._errors)
        for cleanup, on_error_only in reversed(self._cleanups):
            if on_error_only and not failed:
                continue
            try:
                cleanup()
            except Exception:  # noqa: BLE001 - cleanup must not hide the original error
                logger.exception("cleanup of %s failed", self.name)
        if self._errors and (exc_type is None or issubclass(exc_type, Stopped)):
            raise self._errors[0]
        return False


class StageClock:
    """Seconds per stage, summed over every thread (stages overlap, so the sum exceeds the wall time).

    Host stages are timed with ``perf_counter``. A ``device`` stage on CUDA is timed with CUDA events
    recorded on the stream that runs the stage's work (``stream``, or the calling thread's current stream),
    so a stage on a side stream never counts the kernels queued on another; the events are resolved once,
    in :meth:`totals`, which waits for the last event of each stage only (no device-wide synchronize).
    Every stage also counts its thread's CPU time, inside model calls and outside them
    (:func:`musetalk.stats.model_call`): :meth:`cpu_totals`.
    """

    def __init__(self, device: torch.device) -> None:
        self._cuda = device.type == "cuda"
        self._lock = threading.Lock()
        self._seconds: dict[str, float] = defaultdict(float)
        self._host_cpu: dict[str, float] = defaultdict(float)
        self._model_cpu: dict[str, float] = defaultdict(float)
        self._events: list[tuple[str, torch.cuda.Event, torch.cuda.Event]] = []

    @contextmanager
    def stage(self, name: str, device: bool = False, stream=None) -> Iterator[None]:
        """Time the block as stage ``name``; with ``device`` on CUDA, by events on ``stream`` (a
        ``torch.cuda.Stream``; None: the current stream). ``stream`` is ignored off CUDA."""
        events = None
        if device and self._cuda:
            events = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            events[0].record(stream)
        start, cpu, model = time.perf_counter(), time.thread_time(), model_cpu_seconds()
        try:
            yield
        finally:
            elapsed = time.perf_counter() - start
            in_model = model_cpu_seconds() - model
            host = time.thread_time() - cpu - in_model
            if events is not None:
                events[1].record(stream)
            with self._lock:
                self._host_cpu[name] += host
                self._model_cpu[name] += in_model
                if events is None:
                    self._seconds[name] += elapsed
                else:
                    self._events.append((name, *events))

    def totals(self) -> dict[str, float]:
        with self._lock:
            for name, start, end in self._events:
                end.synchronize()
                self._seconds[name] += start.elapsed_time(end) / 1000.0
            self._events.clear()
            return dict(self._seconds)

    def report(self) -> dict[str, dict[str, float]]:
        """The ``seconds``, ``host_cpu`` and ``model_cpu`` of a unit's stats (:mod:`musetalk.stats`), once
        its threads are done: wall seconds per stage (:meth:`totals`), and thread CPU seconds per stage
        outside and inside model calls."""
        seconds = self.totals()
        with self._lock:
            return {"seconds": seconds, "host_cpu": dict(self._host_cpu), "model_cpu": dict(self._model_cpu)}


def decode_thread(
    group: ThreadGroup, clock: StageClock, frames: Iterator[np.ndarray], start: int, end: int, depth: int
) -> Channel:
    """Start a thread of ``group`` that puts (src, frame) for source frames ``[start, end)`` from ``frames``
    (a decoder's iterator over exactly those frames) into a channel of ``depth`` items, timed as ``decode``."""
    decoded = group.channel(depth)

    def run() -> None:
        src = start
        while True:
            with clock.stage("decode"):
                frame = next(frames, None)
            if frame is None:
                break
            decoded.put((src, frame))
            src += 1
        if src != end:
            raise RuntimeError(f"source frames [{start}, {end}): decoded {src - start} frames")
        decoded.put(END)

    group.start("decode", run)
    return decoded
