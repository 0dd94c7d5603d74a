"""Dub mode, on the picture's timeline: the ranges of a segments file (:mod:`shards.ranges`) as frames, and
the dub's one audio track.

Output frame ``t`` shows source frame ``t`` and the output has the video's frame count. The job's audio
replaces the video's sound: shorter, it is padded with silence, longer, it is trimmed to the picture.
Over a range with its own audio, that audio (from its offset) replaces the job's audio from the range's
start to its end (padded with silence when shorter, cut at the range's end when longer). The result is
one 16 kHz track, written as a WAV: what Whisper reads and what is muxed.
"""

from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import numpy as np

from shards.errors import InputError
from shards.plan import DubRange
from shards.probe import load_audio
from shards.ranges import TimeRange, load_ranges

logger = logging.getLogger(__name__)


MODES = ("audio", "dub")  # task.mode: the audio drives the output (default), or the picture does


@dataclass(frozen=True)
class DubSettings:
    """A dub job (``task.mode=dub``): its segments file (``task.segments``; None: lip-sync every frame)."""

    segments: Path | None = None


def dub_settings(mode: str | None, segments: str | None, problems: list[str]) -> DubSettings | None:
    """``task.mode`` and ``task.segments`` as the job's dub settings (None: audio mode); the segments file
    is read and checked here, before any work (its ranges against the picture once the video is probed)."""
    if mode not in MODES:
        problems.append(f"task.mode must be audio or dub, got {mode!r}")
        return None
    if segments is not None and mode != "dub":
        problems.append(
            f"task.segments={segments} needs task.mode=dub (ranges are on the picture's timeline)"
        )
        return None
    if mode == "audio":
        return None
    if segments is None:
        return DubSettings()
    path = Path(segments).expanduser()
    try:
        load_ranges(path)
    except InputError as err:
        problems.append(str(err))
    return DubSettings(segments=path.resolve())


def frame_of(seconds: Fraction, fps: Fraction) -> int:
    """The first frame whose start time ``t / fps`` is at or after ``seconds``."""
    return math.ceil(Fraction(seconds) * Fraction(fps))


def frame_ranges(
    ranges: tuple[TimeRange, ...], fps: Fraction, frames: int, face: str, path: str | Path = ""
) -> tuple[DubRange, ...]:
    """Each range as the frames ``[start, end)`` whose start times lie inside it; InputError for a range
    that holds no frame."""
    out = []
    for r in ranges:
        start, end = frame_of(r.start, fps), min(frames, frame_of(r.end, fps))
        if end <= start:
            raise InputError(
                f"segments file {path}: {r.where} holds no frame at {fps} fps; widen it to at least "
                f"{float(1 / Fraction(fps)):.3f} s"
            )
        out.append(DubRange(start, end, r.face or face))
    return tuple(out)


def track_samples(frames: int, fps: Fraction, sample_rate: int) -> int:
    """Samples of a track that lasts the picture: ``ceil(frames / fps * rate)``, so that
    ``floor(samples / rate * fps) == frames`` (the plan's output length) exactly."""
    return math.ceil(Fraction(frames) / Fraction(fps) * sample_rate)


def dub_track(
    job_audio: np.ndarray,
    ranges: tuple[TimeRange, ...],
    frames: int,
    fps: Fraction,
    sample_rate: int,
    path: str | Path = "",
) -> np.ndarray:
    """The dub's audio ((N,) float32 at ``sample_rate``, lasting the picture): the job's audio, padded or
    trimmed, with each range's own audio in place over the range (InputError for an offset past the end
    of a range's audio)."""
    total = track_samples(frames, fps, sample_rate)
    out = np.zeros(total, dtype=np.float32)
    n = min(total, len(job_audio))
    out[:n] = job_audio[:n]
    if len(job_audio) < total:
        logger.info(
            "dub: the job's audio (%.3f s) is shorter than the picture (%.3f s): padded with silence",
            len(job_audio) / sample_rate,
            total / sample_rate,
        )
    elif len(job_audio) > total:
        logger.info(
            "dub: the job's audio (%.3f s) is longer than the picture (%.3f s): trimmed to the picture",
            len(job_audio) / sample_rate,
            total / sample_rate,
        )
    for r in ranges:
        if r.audio is None:
            continue
        own = load_audio(r.audio, sample_rate)
        skip = round(r.offset * sample_rate)
        if skip >= len(own):
            raise InputError(
                f"segments file {path}: {r.where}: offset {float(r.offset):g} s is past the end of "
                f"{r.audio} ({len(own) / sample_rate:.3f} s); lower the offset"
            )
        a, b = min(total, round(r.start * sample_rate)), min(total, round(r.end * sample_rate))
        piece = own[skip : skip + b - a]
        out[a:b] = 0.0
        out[a : a + len(piece)] = piece
    return out


def write_track(path: Path, samples: np.ndarray, sample_rate: int) -> Path:
    """``samples`` as a float32 WAV at ``path``, written whole (temporary name, then rename)."""
    import soundfile as sf

    partial = path.with_name(f".{path.name}.partial")
    sf.write(partial, samples, sample_rate, subtype="FLOAT", format="WAV")
    os.replace(partial, path)
    return path
