"""Probing with PyAV (there is no ffprobe here): what a video or audio file holds, and loading audio.

Frame indexing. A video is ``frame_count`` frames at the constant rate ``fps``. For a constant-frame-rate
source frame ``i`` is the ``i``-th decoded frame. A variable-frame-rate source is normalised to ``fps``:
output frame ``i`` shows the source frame whose time is the last one ``<= i / fps`` (times relative to the
first frame, with a tolerance of one time-base tick, at most half a frame, for rounded timestamps), like
ffmpeg's ``fps`` filter with ``round=down``. ``shards.decode.read_frames`` gives the same frames at the
same indices whether it starts at 0 or seeks into the middle.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import av
import av.error
import numpy as np

from shards.errors import InputError
from shards.ffmpeg import ffmpeg_stdout

logger = logging.getLogger(__name__)

# Rates a variable-frame-rate source is snapped to (the nearest one within 2% of its average rate).
_STANDARD_RATES = tuple(
    Fraction(r)
    for r in (
        "24000/1001",
        "24",
        "25",
        "30000/1001",
        "30",
        "48",
        "50",
        "60000/1001",
        "60",
        "90",
        "100",
        "120",
    )
)


@dataclass(frozen=True)
class AudioInfo:
    """One audio stream: sample rate (Hz), channel count, duration (s), codec name."""

    path: str
    sample_rate: int
    channels: int
    duration: float
    codec: str


@dataclass(frozen=True)
class VideoInfo:
    """A probed video. Build it with ``probe_video``; ``read_frames`` relies on its private fields.

    ``width``/``height`` are the display size (rotation applied). ``fps`` is the constant rate frames are
    indexed at (for VFR sources, the rate they are normalised to); ``frame_count`` frames at ``fps`` make
    ``duration`` seconds. ``rotation`` is the clockwise display rotation (0/90/180/270).
    """

    path: str
    width: int
    height: int
    fps: Fraction
    avg_fps: Fraction
    real_fps: Fraction
    frame_count: int
    duration: float
    rotation: int
    vfr: bool
    audio: tuple[AudioInfo, ...]
    stream_index: int = 0  # container-wide index of the video stream
    start_pts: int = 0  # pts of the first frame, in units of time_base
    time_base: Fraction = Fraction(1, 90000)  # the stream's time base
    timestamps: bool = True  # False: the stream has no timestamps (raw bitstream); frames are counted


def open_input(path: str | Path, role: str, fix: str) -> av.container.InputContainer:
    """Open ``path`` for reading with PyAV, or raise a one-line InputError naming it."""
    p = Path(path)
    if not p.exists():
        raise InputError(f"{role} not found: {p}; check the path")
    if not p.is_file():
        raise InputError(f"{role} is not a file: {p}; {fix}")
    try:
        return av.open(str(p), mode="r")
    except av.error.FFmpegError as err:
        raise InputError(f"{role} is not a media file ffmpeg can read: {p} ({err.strerror}); {fix}") from err


def _audio_info(
    path: Path, container: av.container.InputContainer, stream: av.audio.stream.AudioStream
) -> AudioInfo:
    ctx = stream.codec_context
    if stream.duration is not None:
        duration = float(stream.duration * stream.time_base)
    elif container.duration is not None:
        duration = container.duration / av.time_base
    else:
        duration = 0.0
    return AudioInfo(
        path=str(path),
        sample_rate=int(ctx.sample_rate),
        channels=int(ctx.layout.nb_channels),
        duration=duration,
        codec=ctx.name,
    )


def slot_tolerance(time_base: Fraction, fps: Fraction) -> Fraction:
    """Slack for timestamps rounded to the time base: one tick, at most half a frame."""
    return min(time_base, 1 / (2 * fps))


def _on_grid(rel_pts: list[int], time_base: Fraction, fps: Fraction) -> bool:
    """True when frame k sits at k / fps (within the tolerance) for every k. Exact integer arithmetic."""
    tol = slot_tolerance(time_base, fps)
    a, b = time_base.numerator, time_base.denominator
    c, d = fps.numerator, fps.denominator
    e, f = tol.numerator, tol.denominator
    bound = e * b * c
    return all(abs(r * a * c - k * d * b) * f <= bound for k, r in enumerate(rel_pts))


def _snap_rate(rate: Fraction) -> Fraction:
    """The standard rate nearest to ``rate`` if within 2%, else ``rate`` rounded to 1/1000."""
    nearest = min(_STANDARD_RATES, key=lambda std: abs(rate - std))
    if abs(rate - nearest) <= nearest / 50:
        return nearest
    return Fraction(round(rate * 1000), 1000)


def _as_fraction(rate) -> Fraction | None:
    if rate is None:
        return None
    rate = Fraction(rate)
    return rate if rate > 0 else None


def _scan_pts(container: av.container.InputContainer, stream) -> tuple[list[int], int | None]:
    """Sorted pts of every video packet the decoder will show, and the last one's duration (demux only).

    Packets before the first keyframe (a stream cut mid-GOP) are skipped: the decoder shows none of them.
    Empty when any packet lacks a pts (raw bitstreams).
    """
    pts: list[tuple[int, int | None]] = []
    keyframe_seen = False
    for packet in container.demux(stream):
        if packet.size == 0 or packet.is_discard:
            continue
        if packet.pts is None:
            return [], None
        keyframe_seen = keyframe_seen or packet.is_keyframe
        if keyframe_seen:
            pts.append((packet.pts, packet.duration))
    pts.sort(key=lambda entry: entry[0])
    return [p for p, _ in pts], (pts[-1][1] if pts else None)


def video_stream(container: av.container.InputContainer):
    """The first video stream that is not an attached picture (cover art), or None."""
    for stream in container.streams.video:
        if not stream.disposition & av.stream.Disposition.attached_pic:
            return stream
    return None


def _scan_decoded(path: Path, stream_index: int) -> tuple[list[int | None], int]:
    """Fallback for streams whose packets carry no pts: decode everything, return frame pts and count."""
    with av.open(str(path)) as container:
        stream = container.streams[stream_index]
        stream.thread_type = "AUTO"
        pts = [frame.pts for frame in container.decode(stream)]
    return pts, len(pts)


def _first_frame_rotation(path: Path, stream_index: int) -> tuple[int, int, int]:
    """Decode the first frame: (coded width, coded height, clockwise rotation in degrees)."""
    with av.open(str(path)) as container:
        stream = container.streams[stream_index]
        try:
            frame = next(container.decode(stream), None)
        except av.error.FFmpegError as err:
            raise InputError(f"video input cannot be decoded: {path} ({err.strerror}); re-encode it") from err
    if frame is None:
        raise InputError(f"video input has no decodable frames: {path}; pass a video with at least one frame")
    # PyAV reports the display matrix as a counter-clockwise angle in [-180, 180].
    clockwise = (-int(frame.rotation)) % 360
    snapped = int(round(clockwise / 90)) % 4 * 90
    if snapped != clockwise:
        logger.warning("%s: display rotation %d is not a multiple of 90; using %d", path, clockwise, snapped)
    return frame.width, frame.height, snapped


def probe_video(path: str | Path) -> VideoInfo:
    """Probe a video file (demux only, plus one decoded frame). InputError for anything unusable."""
    p = Path(path)
    fix = "pass a video file (any container/codec ffmpeg reads)"
    with open_input(p, "video input", fix) as container:
        stream = video_stream(container)
        if stream is None:
            raise InputError(f"video input has no video stream: {p}; {fix}")
        index = stream.index
        time_base = Fraction(stream.time_base)
        avg = _as_fraction(stream.average_rate)
        real = _as_fraction(stream.base_rate) or _as_fraction(stream.guessed_rate)
        audio = tuple(_audio_info(p, container, s) for s in container.streams.audio)
        try:
            pts, last_duration = _scan_pts(container, stream)
        except av.error.FFmpegError as err:
            raise InputError(
                f"video input cannot be read: {p} ({err.strerror}); re-encode or re-download it"
            ) from err
    coded_w, coded_h, rotation = _first_frame_rotation(p, index)

    timestamps = True
    if not pts:  # packets without timestamps (raw bitstreams): count decoded frames
        decoded, count = _scan_decoded(p, index)
        if count == 0:
            raise InputError(
                f"video input has no decodable frames: {p}; pass a video with at least one frame"
            )
        if all(t is not None for t in decoded):
            pts = sorted(decoded)
        else:
            timestamps = False
            pts = list(range(count))
            time_base = 1 / (avg or real or Fraction(25))

    rel = [t - pts[0] for t in pts]
    candidates = [r for r in (avg, real) if r is not None] or [Fraction(25)]
    candidates += [_snap_rate(r) for r in candidates]
    fps = next((r for r in candidates if _on_grid(rel, time_base, r)), None) if timestamps else candidates[0]
    vfr = fps is None
    if vfr:
        last = Fraction(last_duration) * time_base if last_duration else None
        span = rel[-1] * time_base
        rough = (
            avg or (Fraction(len(rel)) / (span + (last or 0)) if span > 0 else None) or real or Fraction(25)
        )
        fps = _snap_rate(rough)
        total = span + (last if last else 1 / fps)
        frame_count = max(1, math.floor(total * fps + Fraction(1, 2)))
        logger.info("%s: variable frame rate (%d frames); normalised to %s fps", p, len(rel), fps)
    else:
        frame_count = len(rel)
    width, height = (coded_h, coded_w) if rotation in (90, 270) else (coded_w, coded_h)
    return VideoInfo(
        path=str(p),
        width=width,
        height=height,
        fps=fps,
        avg_fps=avg or fps,
        real_fps=real or fps,
        frame_count=frame_count,
        duration=float(frame_count / fps),
        rotation=rotation,
        vfr=vfr,
        audio=audio,
        stream_index=index,
        start_pts=pts[0],
        time_base=time_base,
        timestamps=timestamps,
    )


def probe_audio(path: str | Path) -> AudioInfo:
    """Probe the first audio stream of ``path`` (an audio file, or a video with an audio track)."""
    p = Path(path)
    fix = "pass an audio file or a video with an audio track"
    with open_input(p, "audio input", fix) as container:
        if not container.streams.audio:
            raise InputError(f"audio input has no audio stream: {p}; {fix}")
        return _audio_info(p, container, container.streams.audio[0])


def audio_duration(path: str | Path) -> float:
    """Duration in seconds of the first audio stream of ``path``."""
    return probe_audio(path).duration


def load_audio(path: str | Path, sample_rate: int = 16000) -> np.ndarray:
    """The first audio stream of ``path`` as (N,) float32 mono in [-1, 1] at ``sample_rate`` (ffmpeg resamples)."""
    probe_audio(path)
    args = ["-i", str(path), "-map", "0:a:0", "-vn", "-ac", "1", "-ar", str(sample_rate),
            "-f", "f32le", "pipe:1"]  # fmt: skip
    raw = ffmpeg_stdout(args, what=f"decoding audio {path}")
    samples = np.frombuffer(raw, dtype="<f4").astype(np.float32)
    return np.clip(samples, -1.0, 1.0)
