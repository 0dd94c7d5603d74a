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
from shards.dub import DubSettings, dub_track, frame_ranges, write_track
from shards.plan import Plan, ShardsConfig, plan_shards, shard_length_frames
from shards.probe import VideoInfo, load_audio, probe_video
from shards.ranges import check_within, load_ranges
from shards.segment import EncodeSettings
from shards.stitch import concat_and_mux


def plan_job(
    video: str | Path,
    audio: str | Path,
    *,
    shard_frames: int | None = None,
    shard_seconds: float | None = None,
    face: str = "largest",
    dub: DubSettings | None = None,
    track: Path | None = None,
) -> tuple[VideoInfo, np.ndarray, Plan]:
    """Probe both inputs (InputError on bad ones), load the audio at 16 kHz and plan the shards
    (``shard_frames`` output frames each, or ``shard_seconds`` of output); ``face`` is the job's face
    choice (``Plan.face_choice``). With ``dub``, the output keeps
    the picture's timeline (:mod:`shards.dub`): the segments file is checked against the picture, and the
    dub's audio track is assembled and written to ``track`` (a WAV: what is muxed); the samples returned
    are that track's."""
    info = probe_video(video)
    samples = load_audio(audio, SAMPLE_RATE)  # probes first: InputError for a file without audio
    shard_length = shard_length_frames(shard_frames, shard_seconds, info.fps)
    if dub is None:
        plan = plan_shards(
            source_frames=info.frame_count,
            total_samples=len(samples),
            sample_rate=SAMPLE_RATE,
            fps=info.fps,
            shard_frames=shard_length,
            face=face,
        )
        return info, samples, plan
    if track is None:
        raise ValueError("a dub job needs the path of its audio track")
    n, fps = info.frame_count, info.fps
    ranges = load_ranges(dub.segments) if dub.segments is not None else ()
    check_within(ranges, n / fps, dub.segments)
    frames = frame_ranges(ranges, fps, n, face, dub.segments)
    samples = dub_track(samples, ranges, n, fps, SAMPLE_RATE, dub.segments)
    write_track(track, samples, SAMPLE_RATE)
    plan = plan_shards(
        source_frames=n,
        total_samples=len(samples),
        sample_rate=SAMPLE_RATE,
        fps=fps,
        shard_frames=shard_length,
        dub=True,
        face=face,
        ranges=frames,
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
    dub: DubSettings | None = None,
) -> LocalResult:
    """Render a whole job in this process (no Ray): probe, plan, prepare every shown source frame once,
    render every shard, stitch, mux. The output does not depend on ``shard_frames`` or ``chunk`` (source
    frames per preparation unit). With ``dub``, in dub mode (:func:`plan_job`)."""
    encode = encode or EncodeSettings()
    stats = []
    with tempfile.TemporaryDirectory(prefix="musetalk-local-") as tmp:
        track = Path(tmp) / "dub.wav"
        face = str(cfg.face.select)
        info, samples, plan = plan_job(
            video, audio, shard_frames=shard_frames, face=face, dub=dub, track=track
        )
        pipeline = pipeline or FramePipeline(cfg)
        entries, features, prep = pipeline.prepare_job(info, samples, plan, chunk)
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
        concat_and_mux(segments, track if dub else Path(audio), Path(output), plan.fps, plan.output_frames)
    return LocalResult(Path(output), plan, tuple(stats), tuple(prep))
