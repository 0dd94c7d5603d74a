"""Probing with PyAV (there is no ffprobe here): what a video or audio file holds, and loading audio.

Frame indexing. A video is ``frame_count`` frames at the constant rate ``fps``. For a constant-frame-rate
source frame ``i`` is the ``i``-th decoded frame. A variable-frame-rate source is normalised to ``fps``:
output frame ``i`` shows the source frame whose time is the last one ``<= i / fps`` (times relative to the
first frame, with a tolerance of one time-base tick, at most half a frame, for rounded timestamps), like
ffmpeg's ``fps`` filter with ``round=down``. ``shards.decode.read_frames`` gives the same frames at the
same indices whether it starts at 0 or seeks into the middle.
"""

from __future__ import annotations

import functools
import itertools
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
    # How decoded frames map to indices: "timestamps" (by pts, see the module docstring) or "decode order"
    # (frame k is the k-th decoded frame; the pts are missing, repeated or out of order).
    mode: str = "timestamps"
    # "decode order" only: each decoded frame's pts and the keyframes' indices, to find where a seek landed.
    frame_pts: tuple[int | None, ...] = ()
    keyframes: tuple[int, ...] = ()


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


@dataclass(frozen=True)
class _Decoded:
    """One pass over the video stream: every frame the decoder shows, in the order it shows them."""

    pts: list[int | None]  # each frame's pts as the decoder hands it out
    keyframes: list[int]  # indices (in that order) of the frames flagged as keyframes
    last_duration: int | None  # duration of the packet with the largest pts (VFR end time)
    width: int
    height: int
    rotation: int  # clockwise, snapped to a multiple of 90


def video_stream(container: av.container.InputContainer):
    """The first video stream that is not an attached picture (cover art), or None."""
    for stream in container.streams.video:
        if not stream.disposition & av.stream.Disposition.attached_pic:
            return stream
    return None


def _rotation(path: Path, frame: av.VideoFrame) -> int:
    # PyAV reports the display matrix as a counter-clockwise angle in [-180, 180].
    clockwise = (-int(frame.rotation)) % 360
    snapped = int(round(clockwise / 90)) % 4 * 90
    if snapped != clockwise:
        logger.warning("%s: display rotation %d is not a multiple of 90; using %d", path, clockwise, snapped)
    return snapped


def _decode_scan(path: Path, container: av.container.InputContainer, stream) -> _Decoded:
    """Decode the whole stream once (no pixel conversion): what it really holds, whatever the header says.

    A decode error after some frames (a truncated or damaged tail) ends the scan there, with a warning:
    the frames before it are the video. InputError when nothing decodes.
    """
    stream.thread_type = "AUTO"
    pts: list[int | None] = []
    keyframes: list[int] = []
    durations: dict[int, int | None] = {}
    first: av.VideoFrame | None = None
    try:
        for packet in container.demux(stream):
            if packet.pts is not None and packet.size and not packet.is_discard:
                durations[packet.pts] = packet.duration
            for frame in packet.decode():
                if first is None:
                    first = frame
                if frame.key_frame:
                    keyframes.append(len(pts))
                pts.append(frame.pts)
    except av.error.FFmpegError as err:
        if not pts:
            raise InputError(f"video input cannot be decoded: {path} ({err.strerror}); re-encode it") from err
        logger.warning(
            "%s: decoding stops after %d frames (%s); using the frames that decode",
            path,
            len(pts),
            err.strerror,
        )
    if first is None:
        raise InputError(f"video input has no decodable frames: {path}; pass a video with at least one frame")
    known = [t for t in pts if t is not None]
    last_duration = durations.get(max(known)) if known else None
    return _Decoded(pts, keyframes, last_duration, first.width, first.height, _rotation(path, first))


def _untrusted(pts: list[int | None]) -> str | None:
    """Why the decoded frames' timestamps cannot place them (None: they can)."""
    if any(t is None for t in pts):
        return "frames without timestamps"
    if any(b <= a for a, b in itertools.pairwise(pts)):
        return "timestamps out of order or repeated (e.g. packed B-frames in AVI)"
    return None


def probe_video(path: str | Path) -> VideoInfo:
    """Probe a video file: its streams by demux, its frames by one full decode. InputError if unusable.

    The frame count and the mode are what the decode yields, not what the header claims. Mode
    "timestamps": frames sit at their pts (CFR on a grid, or VFR normalised). Mode "decode order": the
    decoded pts are missing, repeated or out of order, so frame ``k`` is the ``k``-th decoded frame at the
    stream's constant rate.

    The full decode costs seconds per minute of video, so results are kept per process, keyed by the
    path and the file's size and modification time: a batch of many audio tracks on one video probes it
    once.
    """
    p = Path(path)
    try:
        st = p.stat()
    except OSError:
        return _probe_video(p)  # the one-line InputError for a missing file
    return _probe_cached(str(p), st.st_ino, st.st_size, st.st_mtime_ns)


@functools.lru_cache(maxsize=32)
def _probe_cached(path: str, inode: int, size: int, mtime_ns: int) -> VideoInfo:
    return _probe_video(Path(path))


def _probe_video(p: Path) -> VideoInfo:
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
        header_frames = stream.frames
        scan = _decode_scan(p, container, stream)

    count = len(scan.pts)
    if header_frames and header_frames != count:
        logger.info("%s: the header says %d frames, %d decode; using %d", p, header_frames, count, count)
    reason = _untrusted(scan.pts)
    candidates = [r for r in (avg, real) if r is not None] or [Fraction(25)]
    if reason is not None:
        fps = candidates[0]
        logger.info("%s: %s; frames are placed in decode order at %s fps", p, reason, fps)
        mode, vfr, frame_count, start_pts, time_base = "decode order", False, count, 0, 1 / fps
    else:
        mode, pts = "timestamps", scan.pts
        start_pts = pts[0]
        rel = [t - start_pts for t in pts]
        candidates += [_snap_rate(r) for r in candidates]
        fps = next((r for r in candidates if _on_grid(rel, time_base, r)), None)
        vfr = fps is None
        if vfr:
            last = Fraction(scan.last_duration) * time_base if scan.last_duration else None
            span = rel[-1] * time_base
            rough = (
                avg or (Fraction(count) / (span + (last or 0)) if span > 0 else None) or real or Fraction(25)
            )
            fps = _snap_rate(rough)
            total = span + (last if last else 1 / fps)
            frame_count = max(1, math.floor(total * fps + Fraction(1, 2)))
            logger.info("%s: variable frame rate (%d frames); normalised to %s fps", p, count, fps)
        else:
            frame_count = count
    width, height = (scan.height, scan.width) if scan.rotation in (90, 270) else (scan.width, scan.height)
    return VideoInfo(
        path=str(p),
        width=width,
        height=height,
        fps=fps,
        avg_fps=avg or fps,
        real_fps=real or fps,
        frame_count=frame_count,
        duration=float(frame_count / fps),
        rotation=scan.rotation,
        vfr=vfr,
        audio=audio,
        stream_index=index,
        start_pts=start_pts,
        time_base=time_base,
        mode=mode,
        frame_pts=tuple(scan.pts) if mode == "decode order" else (),
        keyframes=tuple(scan.keyframes) if mode == "decode order" else (),
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
