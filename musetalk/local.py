"""A whole job in one process, without Ray: :func:`plan_job` probes the inputs and plans the shards, then
:func:`render_local` prepares every shown source frame once, renders every shard with one
:class:`~musetalk.pipeline.FramePipeline`, stitches and muxes. The tests and the benchmark render with it;
the Ray driver shares :func:`plan_job`.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from musetalk.audio import SAMPLE_RATE
from musetalk.config import PipelineConfig
from musetalk.pipeline import FramePipeline
from musetalk.stats import PrepStats, ShardStats
from shards.plan import Plan, ShardsConfig, plan_shards, shard_length_frames
from shards.probe import VideoInfo, load_audio, probe_video
from shards.segment import EncodeSettings
from shards.stitch import concat_and_mux


def plan_job(
    video: str | Path,
    audio: str | Path,
    *,
    shard_frames: int | None = None,
    shard_seconds: float | None = None,
) -> tuple[VideoInfo, np.ndarray, Plan]:
    """Probe both inputs (InputError on bad ones), load the audio at 16 kHz and plan the shards
    (``shard_frames`` output frames each, or ``shard_seconds`` of output)."""
    info = probe_video(video)
    samples = load_audio(audio, SAMPLE_RATE)  # probes first: InputError for a file without audio
    plan = plan_shards(
        source_frames=info.frame_count,
        total_samples=len(samples),
        sample_rate=SAMPLE_RATE,
        fps=info.fps,
        shard_frames=shard_length_frames(shard_frames, shard_seconds, info.fps),
    )
    return info, samples, plan


@dataclass(frozen=True)
class LocalResult:
    output: Path
    plan: Plan
    stats: tuple[ShardStats, ...]
    prep: tuple[PrepStats, ...] = ()


def render_local(
    video: str | Path,
    audio: str | Path,
    output: str | Path,
    cfg: PipelineConfig,
    *,
    shard_frames: int = 250,
    encode: EncodeSettings | None = None,
    pipeline: FramePipeline | None = None,
    chunk: int = ShardsConfig.prep_length,
) -> LocalResult:
    """Render a whole job in this process (no Ray): probe, plan, prepare every shown source frame once,
    render every shard, stitch, mux. The output does not depend on ``shard_frames`` or ``chunk`` (source
    frames per preparation unit)."""
    encode = encode or EncodeSettings()
    info, samples, plan = plan_job(video, audio, shard_frames=shard_frames)
    pipeline = pipeline or FramePipeline(cfg)
    entries, features, prep = pipeline.prepare_job(info, samples, plan, chunk)
    stats = []
    with tempfile.TemporaryDirectory(prefix="musetalk-local-") as tmp:
        segments = []
        for shard in plan.shards:
            path = Path(tmp) / f"{shard.name}.mkv"
            stats.append(
                pipeline.render_shard(
                    video=info,
                    plan=plan,
                    shard=shard,
                    out_path=path,
                    encode=encode,
                    entries=entries.__getitem__,
                    audio=features,
                )
            )
            segments.append(path)
        concat_and_mux(segments, Path(audio), Path(output), plan.fps, plan.output_frames)
    return LocalResult(Path(output), plan, tuple(stats), tuple(prep))
