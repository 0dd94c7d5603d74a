"""What a job reports: its summary (``<output>.summary.json``, the lines a render prints, the batch and
sweep tables read it) and a batch job's result (the summary, or the error that ended the job)."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field

from cluster.config import JobConfig
from shards.errors import FarmError


@dataclass(frozen=True)
class JobSummary:
    output: str
    frames: int
    face_frames: int
    shards: int
    workers: int
    seconds: float
    fps: float
    stage_seconds: dict[str, float]
    worker_frames: dict[str, int]
    retries: int
    reused_shards: int  # shards whose segment an earlier render of the output kept (same key)
    enhance_fallbacks: int
    parsing_fallbacks: int
    rendered_shards: int = 0  # shards this render rendered
    # why they rendered: per changed part of their keys (cluster.keys.shard_parts), how many shards
    rendered_because: dict = field(default_factory=dict)
    # Model loading, apart from rendering: ``seconds`` = ``load_seconds`` + ``render_seconds``.
    load_seconds: float = 0.0  # waiting for the pool's workers to load their models (0 on a warm pool)
    render_seconds: float = 0.0
    render_fps: float = 0.0  # frames / render_seconds: throughput without model loading
    model_loads: int = 0  # workers that loaded models for this job (0 when it ran on a warm pool)
    pool: str = ""  # the pool's id: jobs with the same id shared loaded models
    # The preparation phase: work done this run (each distinct source frame at most once) and reuse.
    detections: int = 0  # source frames run through face detection
    vae_encodes: int = 0  # face crops VAE-encoded
    parsings: int = 0  # face crops run through face parsing
    audio_segments: int = 0  # 30 s Whisper segments encoded
    cache_hits: int = 0  # shown source frames whose entries came from the avatar cache
    cache: str = ""  # the avatar cache's root, or "" when off
    workers_start: int = 0  # the pool's size when the job started (``workers``: when it ended)
    # Seconds some unit of the job ran, per worker (side-by-side units counted once), summed over workers:
    # sum(stage_seconds) / busy_seconds is how much the stages overlapped.
    busy_seconds: float = 0.0
    # The two phases apart, each as ``busy_seconds`` counts it (units of a phase a worker runs side by side
    # counted once; the phases may overlap on one worker): preparation units (detect, prepare, audio) and
    # generation shards; ``generation_fps`` = frames / generation_seconds, one generating worker's rate.
    prep_seconds: float = 0.0
    generation_seconds: float = 0.0
    generation_fps: float = 0.0
    # Thread CPU seconds per stage outside model calls (what a GPU node still pays on its CPU) and inside
    # them (musetalk/stats.py), summed over units.
    host_cpu_seconds: dict[str, float] = field(default_factory=dict)
    model_cpu_seconds: dict[str, float] = field(default_factory=dict)
    # Lip sync (cluster/syncjob.py: SyncNet on the frames before encoding; None when not scored) and the
    # quality gate (qa.*): a flagged job's output is written all the same.
    sync_confidence: float | None = None  # LSE-C, higher is better
    sync_distance: float | None = None  # LSE-D, lower is better
    sync_offset: int | None = None  # 25 fps frames; positive: the picture lags the sound
    sync_windows: int = 0  # 5-frame windows scored
    sync_confidence_per_second: list = field(default_factory=list)
    sync_distance_per_second: list = field(default_factory=list)
    sync_offset_per_second: list = field(default_factory=list)
    face_share: float = 0.0  # output frames rendered with a face / output frames (a dub: its ranges' frames)
    flagged: bool = False
    flags: list = field(default_factory=list)  # the reasons, one per threshold missed

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=1)

    def lines(self) -> list[str]:
        out = [
            f"output      {self.output}",
            f"frames      {self.frames} ({self.face_frames} with a face) in {self.shards} shards on {self.workers} workers"
            + (
                f" ({self.workers_start} at the start)" if self.workers_start not in (0, self.workers) else ""
            ),
            f"time        {self.seconds:.1f} s, {self.fps:.2f} frames/s, {self.retries} retried shards",
            f"shards      {self.rendered_shards} rendered"
            + (
                " (" + ", ".join(f"{k}: {v}" for k, v in sorted(self.rendered_because.items())) + ")"
                if self.rendered_because
                else ""
            )
            + f", {self.reused_shards} reused from kept segments",
            f"prepare     {self.detections} detections, {self.vae_encodes} VAE encodes, {self.parsings} parsings, "
            f"{self.audio_segments} audio segments; {self.cache_hits} frames from the avatar cache"
            + (f" ({self.cache})" if self.cache else " (off)"),
            f"models      {self.model_loads} worker loads, {self.load_seconds:.1f} s waited; without loading "
            f"{self.render_seconds:.1f} s, {self.render_fps:.2f} frames/s (pool {self.pool})",
            "stages      " + ", ".join(f"{k} {v:.1f}s" for k, v in self.stage_seconds.items() if v > 0),
            f"overlap     {sum(self.stage_seconds.values()):.1f} stage s in {self.busy_seconds:.1f} s of busy "
            f"workers ({sum(self.stage_seconds.values()) / max(self.busy_seconds, 1e-9):.2f}x): preparation "
            f"{self.prep_seconds:.1f} s, generation {self.generation_seconds:.1f} s "
            f"({self.generation_fps:.2f} frames/s per worker)",
            "workers     "
            + ", ".join(f"{k}: {v / max(1, self.frames):.0%}" for k, v in self.worker_frames.items()),
        ]
        if self.sync_confidence is not None or self.flagged:
            out.append(
                "lip sync    "
                + (
                    f"confidence {self.sync_confidence:.2f}, distance {self.sync_distance:.2f}, offset "
                    f"{self.sync_offset} frames over {self.sync_windows} windows; "
                    if self.sync_confidence is not None
                    else "not scored; "
                )
                + f"face share {self.face_share:.0%}"
                + (f"; FLAGGED: {'; '.join(self.flags)}" if self.flagged else "")
            )
        if self.enhance_fallbacks or self.parsing_fallbacks:
            out.append(
                f"fallbacks   enhance {self.enhance_fallbacks} frames, face parsing {self.parsing_fallbacks} source frames"
            )
        return out


@dataclass(frozen=True)
class JobResult:
    """One job of a batch: its summary, or the error that ended it."""

    job: JobConfig
    summary: JobSummary | None = None
    error: FarmError | None = None
