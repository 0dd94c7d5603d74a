"""Shard planning: pure functions from probed sizes to a list of shards.

Output frame ``t`` (``0 <= t < output_frames``) shows source frame ``source_index(t)``: the video
plays forward, then backward, then forward again (ping-pong) when the audio outlasts it, as
upstream MuseTalk does. The output is split into shards of consecutive output frames; each shard
also decodes ``overlap`` context source frames on each side of the source frames it shows, which
feed temporal box smoothing. Context frames are decoded but never emitted, and every output frame
belongs to exactly one shard, so the output does not depend on how the video was sharded.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from enum import StrEnum
from fractions import Fraction

from shards.errors import ConfigError, InputError


def source_index(t: int, source_frames: int) -> int:
    """Ping-pong map from output frame ``t`` to a source frame: 0..N-1, N-1..0, 0..N-1, ..."""
    if source_frames <= 0:
        raise ValueError("source_frames must be positive")
    r = t % (2 * source_frames)
    return r if r < source_frames else 2 * source_frames - 1 - r


def output_frame_count(total_samples: int, sample_rate: int, fps: Fraction) -> int:
    """``floor(total_samples / sample_rate * fps)`` in exact integer arithmetic: the output length T."""
    fps = Fraction(fps)
    if fps <= 0:
        raise ValueError(f"fps must be positive, got {fps}")
    if total_samples < 0:
        raise ValueError(f"total_samples must be >= 0, got {total_samples}")
    if sample_rate <= 0:
        raise ValueError(f"sample_rate must be positive, got {sample_rate}")
    return total_samples * fps.numerator // (sample_rate * fps.denominator)


@dataclass(frozen=True)
class Shard:
    """One unit of work: output frames ``[start, end)`` and the source frames ``[src_start, src_end)`` to decode."""

    index: int
    start: int
    end: int
    src_start: int
    src_end: int

    @property
    def frames(self) -> int:
        return self.end - self.start

    @property
    def name(self) -> str:
        return f"shard_{self.index:05d}"


class UnitKind(StrEnum):
    """What a preparation unit does (a ``str``: it compares equal to, prints and serialises as its value)."""

    DETECT = "detect"  # raw boxes + landmarks of source frames
    PREPARE = "prepare"  # crop latents + blend material of source frames, from smoothed boxes
    AUDIO = "audio"  # Whisper features of 30 s audio segments

    @property
    def reads_video(self) -> bool:
        """Whether a unit of this kind decodes the job's video (so a worker must materialise it)."""
        return self is not UnitKind.AUDIO

    @property
    def reads_audio(self) -> bool:
        """Whether a unit of this kind reads the job's audio samples."""
        return self is UnitKind.AUDIO


@dataclass(frozen=True)
class PrepUnit:
    """One unit of a job's preparation phase: ``detect`` or ``prepare`` source frames ``[start, end)``, or
    encode Whisper segments ``[start, end)`` (``audio``). Its results feed the generation shards."""

    kind: UnitKind
    index: int
    start: int
    end: int

    def __post_init__(self) -> None:
        object.__setattr__(self, "kind", UnitKind(self.kind))  # a plain string is checked and converted

    @property
    def frames(self) -> int:
        return self.end - self.start

    @property
    def name(self) -> str:
        return f"{self.kind}_{self.index:05d}"


@dataclass(frozen=True)
class Plan:
    """The whole job: sizes, rate and shards. Plain data, serialisable to JSON."""

    fps_num: int
    fps_den: int
    source_frames: int
    output_frames: int
    total_samples: int
    sample_rate: int
    overlap: int
    shards: tuple[Shard, ...]

    @property
    def fps(self) -> Fraction:
        return Fraction(self.fps_num, self.fps_den)

    def source_index(self, t: int) -> int:
        return source_index(t, self.source_frames)

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=1)

    @classmethod
    def from_json(cls, text: str) -> Plan:
        data = json.loads(text)
        data["shards"] = tuple(Shard(**s) for s in data["shards"])
        return cls(**data)


def shard_length_frames(length: int | None, seconds: float | None, fps: Fraction) -> int:
    """Shard length in frames from either a frame count or a duration in seconds."""
    if length is not None and seconds is not None:
        raise ConfigError("set either shards.length (frames) or shards.seconds, not both")
    if seconds is not None:
        if seconds <= 0:
            raise ConfigError(f"shards.seconds must be positive, got {seconds}")
        return max(1, int(Fraction(seconds).limit_denominator(1000) * fps))
    if length is None or length <= 0:
        raise ConfigError(f"shards.length must be a positive number of frames, got {length}")
    return int(length)


def plan_shards(
    *,
    source_frames: int,
    total_samples: int,
    sample_rate: int,
    fps: Fraction,
    shard_frames: int,
    overlap: int,
    min_overlap: int = 0,
) -> Plan:
    """Split the output into shards of ``shard_frames`` output frames (the last one may be shorter).

    ``overlap`` context source frames are added on each side of each shard's source frames, clipped to
    the video; it must be at least ``min_overlap`` (the temporal smoothing radius), else ConfigError.
    """
    if source_frames <= 0:
        raise InputError("the video has no frames; pass a video with at least one decodable frame")
    if overlap < min_overlap:
        raise ConfigError(
            f"shards.overlap={overlap} is smaller than the {min_overlap} context frames box smoothing needs; "
            f"set shards.overlap>={min_overlap}"
        )
    if shard_frames <= 0:
        raise ConfigError(f"shards.length must be positive, got {shard_frames}")
    output_frames = output_frame_count(total_samples, sample_rate, fps)
    if output_frames <= 0:
        raise InputError(
            f"the audio is shorter than one video frame ({total_samples} samples at {sample_rate} Hz); pass a longer audio file"
        )
    shards = []
    for index, start in enumerate(range(0, output_frames, shard_frames)):
        end = min(start + shard_frames, output_frames)
        lo, hi = _source_extent(start, end, source_frames)
        shards.append(
            Shard(
                index=index,
                start=start,
                end=end,
                src_start=max(0, lo - overlap),
                src_end=min(source_frames, hi + 1 + overlap),
            )
        )
    return Plan(
        fps_num=fps.numerator,
        fps_den=fps.denominator,
        source_frames=source_frames,
        output_frames=output_frames,
        total_samples=total_samples,
        sample_rate=sample_rate,
        overlap=overlap,
        shards=tuple(shards),
    )


def _source_extent(start: int, end: int, n: int) -> tuple[int, int]:
    """Smallest and largest source frame shown by output frames ``[start, end)``."""
    if end - start >= 2 * n:
        return 0, n - 1
    indices = [source_index(t, n) for t in range(start, end)]
    return min(indices), max(indices)


def dispatch_order(plan: Plan) -> list[Shard]:
    """Longest shards first (ties by index), so a short tail shard never finishes a job late."""
    return sorted(plan.shards, key=lambda s: (-s.frames, s.index))
