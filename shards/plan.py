"""Shard planning: pure functions from probed sizes to a list of shards.

Output frame ``t`` (``0 <= t < output_frames``) shows source frame ``source_index(t)``: the video
plays forward, then backward, then forward again (ping-pong) when the audio outlasts it, as
upstream MuseTalk does. In dub mode (``Plan.dub``) the output keeps the picture's timeline instead:
output frame ``t`` shows source frame ``t`` and only frames inside the dub's ranges are lip-synced
(:meth:`Plan.face_choice`; :mod:`shards.dub`). The output is split into shards of consecutive output frames; every output
frame belongs to exactly one shard, so the output does not depend on how the video was sharded (a
shard reads only per-source-frame results of the preparation phase: ``musetalk.preparation``).
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
class ShardsConfig:
    """How a job is cut into units (``shards.*``): ``length`` output frames per generation shard, or
    ``seconds`` of output per shard (one of them, the other None); ``prep_length`` source frames per
    preparation unit (detect, prepare) and avatar cache file. The one home of these defaults: the YAML
    agrees with them (a test), and code that runs without Hydra uses them as they are."""

    length: int | None = 100
    seconds: float | None = None
    prep_length: int = 64


@dataclass(frozen=True)
class Shard:
    """One generation unit: output frames ``[start, end)``."""

    index: int
    start: int
    end: int

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
class DubRange:
    """A range of a dub job in frames: frames ``[start, end)`` lip-sync the face ``face`` (a face spec)."""

    start: int
    end: int
    face: str


@dataclass(frozen=True)
class Plan:
    """The whole job: sizes, rate and shards. Plain data, serialisable to JSON."""

    fps_num: int
    fps_den: int
    source_frames: int
    output_frames: int
    total_samples: int
    sample_rate: int
    shards: tuple[Shard, ...]
    dub: bool = False  # the picture's timeline: output frame t shows source frame t, ranges lip-synced
    face: str = "largest"  # the job's face choice (face.select)
    ranges: tuple[DubRange, ...] = ()  # dub mode: the only frames lip-synced (none: every frame)

    @property
    def fps(self) -> Fraction:
        return Fraction(self.fps_num, self.fps_den)

    def source_index(self, t: int) -> int:
        return source_index(t, self.source_frames)

    def face_choice(self, src: int) -> str | None:
        """Which face source frame ``src`` lip-syncs (a face spec), or None: it passes through untouched.
        The job's face everywhere, except in dub mode with ranges: a range's face inside it, None outside."""
        if not (self.dub and self.ranges):
            return self.face
        for r in self.ranges:
            if r.start <= src < r.end:
                return r.face
        return None

    @property
    def faces(self) -> set[str]:
        """Every face choice the job makes (the job's, and each dub range's)."""
        return {self.face, *(r.face for r in self.ranges)}

    @property
    def chosen_frames(self) -> int:
        """Output frames meant to be lip-synced (those whose choice is not None): the face share's base."""
        if not (self.dub and self.ranges):
            return self.output_frames
        return sum(r.end - r.start for r in self.ranges)

    def shown_frames(self, start: int, end: int) -> list[int]:
        """The distinct source frames output frames ``[start, end)`` show, sorted."""
        n = self.source_frames
        if end - start >= 2 * n:  # a whole ping-pong period shows every frame
            return list(range(n))
        return sorted({source_index(t, n) for t in range(start, end)})

    def to_json(self) -> str:
        """The plan as JSON (part of the resume key: the shard boundaries decide which segments exist)."""
        return json.dumps(asdict(self), sort_keys=True)


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
    dub: bool = False,
    face: str = "largest",
    ranges: tuple[DubRange, ...] = (),
) -> Plan:
    """Split the output into shards of ``shard_frames`` output frames (the last one may be shorter). In dub
    mode the output has the video's frames (``total_samples`` must last them: :func:`shards.dub.track_samples`)
    and the shards also cut at every range's start and end (a shard's boundaries then depend only on the
    fixed grid and the ranges it touches)."""
    if source_frames <= 0:
        raise InputError("the video has no frames; pass a video with at least one decodable frame")
    if shard_frames <= 0:
        raise ConfigError(f"shards.length must be positive, got {shard_frames}")
    output_frames = output_frame_count(total_samples, sample_rate, fps)
    if dub and output_frames != source_frames:
        raise ValueError(
            f"a dub track of {total_samples} samples lasts {output_frames} frames, not {source_frames}"
        )
    if output_frames <= 0:
        raise InputError(
            f"the audio is shorter than one video frame ({total_samples} samples at {sample_rate} Hz); pass a longer audio file"
        )
    cuts = {*range(0, output_frames, shard_frames), *(e for r in ranges for e in (r.start, r.end))}
    edges = sorted(c for c in cuts if 0 <= c < output_frames) + [output_frames]
    shards = [Shard(index=i, start=a, end=b) for i, (a, b) in enumerate(zip(edges, edges[1:], strict=False))]
    return Plan(
        fps_num=fps.numerator,
        fps_den=fps.denominator,
        source_frames=source_frames,
        output_frames=output_frames,
        total_samples=total_samples,
        sample_rate=sample_rate,
        shards=tuple(shards),
        dub=dub,
        face=face,
        ranges=tuple(ranges),
    )


def dispatch_order(plan: Plan) -> list[Shard]:
    """Longest shards first (ties by index), so a short tail shard never finishes a job late."""
    return sorted(plan.shards, key=lambda s: (-s.frames, s.index))
