"""Stage stats: what each shard and preparation unit cost and produced, as plain data.

:data:`STAGES` names the timed stages in pipeline order; :class:`ShardStats` and :class:`PrepStats` travel
back from Ray workers as is (a resume manifest stores ShardStats as JSON); :func:`stage_totals` and
:func:`busy_seconds` sum them over a job. No torch here: the run directory imports this cheaply.

Host CPU: each stage also counts the CPU time of the thread that ran it (``time.thread_time``), apart
from the CPU time spent inside model calls (:func:`model_call`, wrapped around every network forward and
the Haar cascade): ``host_cpu`` is what a GPU node would still pay on its CPU, ``model_cpu`` what a GPU
takes off it. Thread time is load-proof: other processes on the machine do not inflate it.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

STAGES = (
    "decode",
    "detect",
    "vae_encode",
    "blend_prepare",
    "audio",
    "generate",
    "enhance",
    "blend",
    "encode",
)

# ShardStats.frame_kinds, one character per output frame.
FACE, PASSTHROUGH, PARSING_FALLBACK, ENHANCE_FALLBACK = "F", "P", "p", "e"


_model = threading.local()  # per thread: CPU seconds inside model calls so far, and the nesting depth


@contextmanager
def model_call() -> Iterator[None]:
    """Charge this thread's CPU time inside the block to model calls (nested blocks count once)."""
    depth = getattr(_model, "depth", 0)
    _model.depth = depth + 1
    start = time.thread_time() if depth == 0 else 0.0
    try:
        yield
    finally:
        _model.depth = depth
        if depth == 0:
            _model.seconds = model_cpu_seconds() + time.thread_time() - start


def model_cpu_seconds() -> float:
    """CPU seconds this thread has spent inside :func:`model_call` blocks so far."""
    return getattr(_model, "seconds", 0.0)


@dataclass(frozen=True)
class ShardStats:
    """What one shard cost and produced; plain data (travels back from Ray workers as is, and is stored
    as JSON in a resume manifest: ``ShardStats(**json.loads(json.dumps(asdict(stats))))`` round-trips).

    ``seconds`` sums each stage over the worker's threads (stages overlap: the sum may exceed
    ``wall_seconds``, the shard's own wall time). ``frame_kinds``: one character per output frame, in
    order: ``F`` face rendered, ``P`` passthrough (no face), ``p`` face rendered with the parsing
    fallback mask, ``e`` face rendered but GFPGAN fell back (``e`` wins over ``p``).
    """

    shard: int
    frames: int
    face_frames: int
    decoded_frames: int
    seconds: dict[str, float] = field(default_factory=dict)
    enhance_fallbacks: int = 0
    parsing_fallbacks: int = 0
    worker: str = ""
    frame_kinds: str = ""
    wall_seconds: float = 0.0
    started: float = 0.0  # wall-clock (epoch) seconds when the shard started: busy intervals per worker
    host_cpu: dict[str, float] = field(default_factory=dict)  # thread CPU s per stage outside model calls
    model_cpu: dict[str, float] = field(default_factory=dict)  # thread CPU s per stage inside model calls

    @property
    def total_seconds(self) -> float:
        return sum(self.seconds.values())


@dataclass(frozen=True)
class PrepStats:
    """What one preparation unit cost and did (plain data, like :class:`ShardStats`).

    ``detections``: source frames run through the face detector; ``vae_encodes``: face crops VAE-encoded;
    ``parsings``: face crops run through face parsing; ``audio_segments``: 30 s Whisper segments encoded.
    """

    unit: str
    frames: int = 0
    seconds: dict[str, float] = field(default_factory=dict)
    detections: int = 0
    vae_encodes: int = 0
    parsings: int = 0
    audio_segments: int = 0
    worker: str = ""
    wall_seconds: float = 0.0
    started: float = 0.0  # wall-clock (epoch) seconds when the unit started
    host_cpu: dict[str, float] = field(default_factory=dict)  # as ShardStats.host_cpu
    model_cpu: dict[str, float] = field(default_factory=dict)  # as ShardStats.model_cpu


def stage_totals(stats, what: str = "seconds") -> dict[str, float]:
    """Seconds per stage summed over units (ShardStats and PrepStats), in pipeline order: wall
    (``what="seconds"``), thread CPU outside model calls (``"host_cpu"``) or inside them (``"model_cpu"``)."""
    return {k: sum(getattr(s, what).get(k, 0.0) for s in stats) for k in STAGES}


def busy_seconds(stats) -> float:
    """Seconds some unit was running, per worker (units a worker runs side by side counted once), summed
    over workers: the wall time the stage seconds of ``stats`` (ShardStats and PrepStats) were spent in."""
    spans: dict[str, list[tuple[float, float]]] = {}
    for st in stats:
        spans.setdefault(st.worker, []).append((st.started, st.started + st.wall_seconds))
    total = 0.0
    for intervals in spans.values():
        end = -math.inf
        for a, b in sorted(intervals):
            total += max(0.0, b - max(a, end))
            end = max(end, b)
    return total
