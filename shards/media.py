"""Media I/O: probe, frame-exact decode, segment encode, concat + mux + verify.

The only module in the project that touches codecs. PyAV probes and decodes (there is no ffprobe here);
the ffmpeg binary encodes, resamples audio, concatenates and muxes, always through argv lists.

Frame indexing. A video is ``frame_count`` frames at the constant rate ``fps``. For a constant-frame-rate
source frame ``i`` is the ``i``-th decoded frame. A variable-frame-rate source is normalised to ``fps``:
output frame ``i`` shows the source frame whose time is the last one ``<= i / fps`` (times relative to the
first frame, with a tolerance of one time-base tick, at most half a frame, for rounded timestamps), like
ffmpeg's ``fps`` filter with ``round=down``. ``read_frames`` gives the same frames at the same indices
whether it starts at 0 or seeks into the middle.

Encoding. Lossy segments are libx264 yuv420p (BT.709, limited range) with no B-frames, so every packet
has dts == pts, every segment starts on an IDR frame with identical parameters, and segments of any length
(even one frame) concatenate by stream copy without timestamp fix-ups. Lossless segments are libx264rgb
at qp 0 (H.264 High 4:4:4 Predictive, RGB): BGR frames round-trip bit-exactly through PyAV, in MP4 and
MKV, and concatenate the same way; chosen over FFV1 because it stays H.264 in an MP4 players accept.
yuv420p needs even dimensions: an odd width/height is padded by one replicated row/column at the
right/bottom (the output is then one pixel larger); lossless keeps the exact size.
"""

from __future__ import annotations

import functools
import logging
import math
import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import IO

import av
import av.error
import numpy as np

from shards.errors import FFmpegError, InputError

logger = logging.getLogger(__name__)

FFMPEG_ENV = "MUSETALK_FFMPEG"

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
# Sample rates the AAC encoder takes as they are; anything else is resampled to 48 kHz.
_AAC_RATES = (8000, 11025, 12000, 16000, 22050, 24000, 32000, 44100, 48000, 88200, 96000)
_SEGMENT_FORMATS = {
    ".mkv": "matroska",
    ".mp4": "mp4",
    ".mov": "mov",
    ".ts": "mpegts",
    ".h264": "h264",
    ".264": "h264",
}


# --------------------------------------------------------------------------- ffmpeg binary


@functools.cache
def ffmpeg_exe() -> str:
    """The ffmpeg binary: ``$MUSETALK_FFMPEG``, else ``ffmpeg`` on PATH, else imageio-ffmpeg's bundled one."""
    override = os.environ.get(FFMPEG_ENV)
    if override:
        found = shutil.which(override)
        if found is None:
            raise FFmpegError(
                f"{FFMPEG_ENV}={override} is not an executable; unset it or point it at an ffmpeg binary"
            )
        return found
    found = shutil.which("ffmpeg")
    if found is not None:
        return found
    import imageio_ffmpeg

    return imageio_ffmpeg.get_ffmpeg_exe()


def _ffmpeg_cmd(args: list[str]) -> list[str]:
    return [ffmpeg_exe(), "-nostdin", "-hide_banner", "-loglevel", "error", *args]


def _run(args: list[str], *, what: str, capture_stdout: bool = False) -> bytes:
    cmd = _ffmpeg_cmd(args)
    logger.debug("running %s", cmd)
    try:
        proc = subprocess.run(
            cmd,
            stdout=subprocess.PIPE if capture_stdout else subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            check=False,
        )
    except OSError as err:
        raise FFmpegError(f"{what}: cannot run ffmpeg ({err})", cmd) from err
    if proc.returncode != 0:
        raise FFmpegError(
            f"{what} failed (exit {proc.returncode})", cmd, proc.stderr.decode(errors="replace")
        )
    return proc.stdout if capture_stdout else b""


def run_ffmpeg(args: list[str], *, what: str) -> None:
    """Run ffmpeg with ``args`` (the binary and ``-nostdin -hide_banner -loglevel error`` are prepended).

    Raises FFmpegError carrying the argv and the tail of stderr when it exits non-zero.
    """
    _run(args, what=what)


# --------------------------------------------------------------------------- probing


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


def _open(path: str | Path, role: str, fix: str) -> av.container.InputContainer:
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


def _tolerance(time_base: Fraction, fps: Fraction) -> Fraction:
    """Slack for timestamps rounded to the time base: one tick, at most half a frame."""
    return min(time_base, 1 / (2 * fps))


def _on_grid(rel_pts: list[int], time_base: Fraction, fps: Fraction) -> bool:
    """True when frame k sits at k / fps (within the tolerance) for every k. Exact integer arithmetic."""
    tol = _tolerance(time_base, fps)
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


def _video_stream(container: av.container.InputContainer):
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
    with _open(p, "video input", fix) as container:
        stream = _video_stream(container)
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
    with _open(p, "audio input", fix) as container:
        if not container.streams.audio:
            raise InputError(f"audio input has no audio stream: {p}; {fix}")
        return _audio_info(p, container, container.streams.audio[0])


def audio_duration(path: str | Path) -> float:
    """Duration in seconds of the first audio stream of ``path``."""
    return probe_audio(path).duration


# --------------------------------------------------------------------------- decoding


def read_frames(info: VideoInfo, start: int, end: int) -> Iterator[np.ndarray]:
    """Frames ``[start, end)`` of ``info`` as (H, W, 3) uint8 BGR, C-contiguous, rotation applied.

    Streams with bounded memory: seeks to the keyframe before ``start``, decodes forward and drops frames
    before it. Equal, index for index, to a sequential decode from frame 0 (VFR normalised to ``info.fps``).
    """
    if not (0 <= start <= end <= info.frame_count):
        raise ValueError(f"frame range [{start}, {end}) is outside [0, {info.frame_count}] for {info.path}")
    return _frames(info, start, end)


def _to_bgr(frame: av.VideoFrame, rotation: int) -> np.ndarray:
    image = frame.to_ndarray(format="bgr24", src_color_range=frame.color_range)
    if rotation:
        image = np.rot90(image, k=-(rotation // 90))
    return np.ascontiguousarray(image)


def _open_at(info: VideoInfo, target_pts: int | None):
    """A container and a frame iterator whose first frame is at or before ``target_pts`` (None: from the start).

    PyAV seeks to a keyframe at or before the target by the demuxer's index; when the first decoded frame
    still comes after the target (dts-indexed formats, missing index), seek further back and try again.
    """
    back = 0
    while True:
        container = _open(info.path, "video input", "pass a video file")
        stream = container.streams[info.stream_index]
        stream.thread_type = "AUTO"
        seek_to = None if target_pts is None else target_pts - back
        if seek_to is not None and seek_to <= info.start_pts:
            seek_to = None
        try:
            if seek_to is not None:
                container.seek(seek_to, backward=True, any_frame=False, stream=stream)
            frames = container.decode(stream)
            first = next(frames, None)
        except av.error.FFmpegError as err:
            container.close()
            raise FFmpegError(f"decoding {info.path} failed ({err.strerror})") from err
        if seek_to is None or (first is not None and first.pts is not None and first.pts <= target_pts):
            return container, first, frames
        container.close()
        one_second = int(1 / Fraction(stream.time_base))
        back = max(2 * back, one_second)
        logger.debug(
            "%s: seek to %d landed after the target; seeking %d ticks earlier", info.path, target_pts, back
        )


def _frames(info: VideoInfo, start: int, end: int) -> Iterator[np.ndarray]:
    if start == end:
        return
    fps, time_base = info.fps, info.time_base
    tol = _tolerance(time_base, fps)
    target = (
        info.start_pts + math.floor((start / fps + tol) / time_base)
        if start > 0 and info.timestamps
        else None
    )
    container, first, frames = _open_at(info, target)
    with container:
        if first is None:
            raise FFmpegError(f"{info.path}: no frame decoded for index {start}")
        expected = (info.height, info.width, 3)
        emitted = start
        prev, prev_slot = first, 0

        def slot(frame: av.VideoFrame) -> int:
            """First output index that shows ``frame``."""
            if not info.timestamps or frame.pts is None:
                return prev_slot + 1
            return math.ceil(((frame.pts - info.start_pts) * time_base - tol) * fps)

        prev_slot = slot(first) if info.timestamps else 0
        if prev_slot > start:
            raise FFmpegError(
                f"{info.path}: first decoded frame shows index {prev_slot}, after the requested {start}"
            )

        def emit(frame: av.VideoFrame, upto: int) -> Iterator[np.ndarray]:
            nonlocal emitted
            if emitted >= upto:
                return
            image = _to_bgr(frame, info.rotation)
            if image.shape != expected:
                raise InputError(
                    f"video input changes size mid-stream at frame {emitted} ({image.shape[1]}x{image.shape[0]}, "
                    f"expected {info.width}x{info.height}): {info.path}; re-encode it to one size"
                )
            yield image
            emitted += 1
            while emitted < upto:
                yield image.copy()
                emitted += 1

        try:
            for frame in frames:
                s = slot(frame)
                yield from emit(prev, min(s, end))
                if emitted >= end:
                    return
                prev, prev_slot = frame, s
        except av.error.FFmpegError as err:
            raise FFmpegError(f"decoding {info.path} failed near frame {emitted} ({err.strerror})") from err
        yield from emit(prev, end if info.vfr else min(end, prev_slot + 1))
        if emitted < end:
            raise FFmpegError(f"{info.path}: decoding ended at frame {emitted}, expected {end} frames")


def count_frames(path: str | Path) -> int:
    """Number of frames a full decode of the first video stream yields (no normalisation)."""
    p = Path(path)
    with _open(p, "video", "pass a video file") as container:
        stream = _video_stream(container)
        if stream is None:
            raise InputError(f"video has no video stream: {p}; pass a video file")
        stream.thread_type = "AUTO"
        try:
            return sum(1 for _ in container.decode(stream))
        except av.error.FFmpegError as err:
            raise FFmpegError(f"decoding {p} failed ({err.strerror})") from err


def load_audio(path: str | Path, sample_rate: int = 16000) -> np.ndarray:
    """The first audio stream of ``path`` as (N,) float32 mono in [-1, 1] at ``sample_rate`` (ffmpeg resamples)."""
    probe_audio(path)
    args = ["-i", str(path), "-map", "0:a:0", "-vn", "-ac", "1", "-ar", str(sample_rate),
            "-f", "f32le", "pipe:1"]  # fmt: skip
    raw = _run(args, what=f"decoding audio {path}", capture_stdout=True)
    samples = np.frombuffer(raw, dtype="<f4").astype(np.float32)
    return np.clip(samples, -1.0, 1.0)


# --------------------------------------------------------------------------- encoding


@dataclass(frozen=True)
class EncodeSettings:
    """Segment encoding. ``lossless``: libx264rgb qp 0 (bit-exact BGR); else libx264 yuv420p at ``crf``.

    ``gop``: keyframe interval in frames (None: x264's default, 250).
    """

    crf: int = 18
    preset: str = "veryfast"
    lossless: bool = False
    gop: int | None = None


def _rate(fps: Fraction) -> str:
    fps = Fraction(fps)
    return f"{fps.numerator}/{fps.denominator}"


def _video_codec_args(settings: EncodeSettings) -> list[str]:
    gop = ["-g", str(settings.gop)] if settings.gop else []
    if settings.lossless:
        return ["-c:v", "libx264rgb", "-qp", "0", "-preset", settings.preset, "-bf", "0", *gop,
                "-pix_fmt", "bgr24"]  # fmt: skip
    return [
        "-vf", "scale=out_color_matrix=bt709:out_range=tv",
        "-c:v", "libx264", "-crf", str(settings.crf), "-preset", settings.preset, "-bf", "0", *gop,
        "-pix_fmt", "yuv420p", "-colorspace", "bt709", "-color_primaries", "bt709", "-color_trc", "bt709",
        "-color_range", "tv",
    ]  # fmt: skip


class SegmentWriter:
    """Streams (H, W, 3) uint8 BGR frames into a video-only segment through an ffmpeg subprocess.

    The container follows the suffix (.mkv, .mp4, .mov, .ts, .h264; anything else: Matroska). Use as a
    context manager: on an exception inside the ``with`` block the partial file is removed.
    """

    def __init__(
        self, path: str | Path, width: int, height: int, fps: Fraction, settings: EncodeSettings
    ) -> None:
        if width <= 0 or height <= 0:
            raise ValueError(f"segment size must be positive, got {width}x{height}")
        self.path = Path(path)
        self.width, self.height = width, height
        self.fps = Fraction(fps)
        self.settings = settings
        self.frames = 0
        pad = not settings.lossless
        self._pad_w = width % 2 if pad else 0
        self._pad_h = height % 2 if pad else 0
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fmt = _SEGMENT_FORMATS.get(self.path.suffix.lower(), "matroska")
        w, h = width + self._pad_w, height + self._pad_h
        self._cmd = _ffmpeg_cmd(
            ["-y", "-f", "rawvideo", "-pix_fmt", "bgr24", "-s", f"{w}x{h}", "-framerate", _rate(self.fps),
             "-i", "pipe:0", "-an", *_video_codec_args(settings), "-f", fmt, str(self.path)]
        )  # fmt: skip
        self._stderr: IO[bytes] = tempfile.TemporaryFile()
        try:
            self._proc: subprocess.Popen | None = subprocess.Popen(
                self._cmd, stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=self._stderr
            )
        except OSError as err:
            self._stderr.close()
            raise FFmpegError(f"cannot start ffmpeg for segment {self.path} ({err})", self._cmd) from err

    def _stderr_text(self) -> str:
        self._stderr.seek(0)
        return self._stderr.read().decode(errors="replace")

    def write(self, frame: np.ndarray) -> None:
        """Append one (H, W, 3) uint8 BGR frame of the declared size."""
        if self._proc is None:
            raise ValueError(f"segment {self.path} is already closed")
        expected = (self.height, self.width, 3)
        if not isinstance(frame, np.ndarray) or frame.dtype != np.uint8 or frame.shape != expected:
            got = f"{frame.shape} {frame.dtype}" if isinstance(frame, np.ndarray) else type(frame).__name__
            raise ValueError(f"segment {self.path} takes {expected} uint8 BGR frames, got {got}")
        if self._pad_w or self._pad_h:
            frame = np.pad(frame, ((0, self._pad_h), (0, self._pad_w), (0, 0)), mode="edge")
        try:
            self._proc.stdin.write(np.ascontiguousarray(frame).data)
        except (BrokenPipeError, OSError) as err:
            self._proc.kill()
            self._proc.wait()
            self._proc = None
            stderr = self._stderr_text()
            self._stderr.close()
            self.path.unlink(missing_ok=True)
            raise FFmpegError(f"encoding segment {self.path} failed", self._cmd, stderr) from err
        self.frames += 1

    def close(self) -> int:
        """Finish the file; returns the number of frames written. FFmpegError when ffmpeg fails."""
        if self._proc is None:
            return self.frames
        proc, self._proc = self._proc, None
        if self.frames == 0:
            proc.kill()
            proc.wait()
            self._stderr.close()
            self.path.unlink(missing_ok=True)
            raise ValueError(f"segment {self.path}: no frames were written")
        try:
            proc.stdin.close()
        except OSError:
            logger.debug("stdin of the encoder for %s was already closed", self.path)
        code = proc.wait()
        stderr = self._stderr_text()
        self._stderr.close()
        if code != 0:
            self.path.unlink(missing_ok=True)
            raise FFmpegError(f"encoding segment {self.path} failed (exit {code})", self._cmd, stderr)
        return self.frames

    def abort(self) -> None:
        """Stop the encoder and remove the partial file."""
        if self._proc is not None:
            self._proc.kill()
            self._proc.wait()
            self._proc = None
            self._stderr.close()
        self.path.unlink(missing_ok=True)

    def __enter__(self) -> SegmentWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            self.abort()
        else:
            self.close()


def encode_segment(
    frames: Iterable[np.ndarray], path: str | Path, fps: Fraction, settings: EncodeSettings
) -> int:
    """Encode (H, W, 3) uint8 BGR frames into a segment at ``path``; returns the frame count."""
    it = iter(frames)
    first = next(it, None)
    if first is None:
        raise ValueError(f"segment {path}: no frames to encode")
    height, width = first.shape[:2]
    with SegmentWriter(path, width, height, fps, settings) as writer:
        writer.write(first)
        for frame in it:
            writer.write(frame)
        return writer.close()


# --------------------------------------------------------------------------- stitching


def _quote_concat(path: Path) -> str:
    return "'" + str(path).replace("'", "'\\''") + "'"


def count_packets(path: str | Path) -> int:
    """Video packets in ``path`` (demux only, no decode). H.264 here is one packet per frame, so for
    our segments and stream-copied outputs this is the frame count at a fraction of a decode's cost."""
    p = Path(path)
    with _open(p, "video", "pass a video file") as container:
        stream = _video_stream(container)
        if stream is None:
            raise InputError(f"video has no video stream: {p}; re-render it")
        return sum(1 for packet in container.demux(stream) if packet.size and not packet.is_discard)


def _check_segments(segments: list[Path]) -> int:
    """Every segment exists and shares the first one's codec and size; returns the total frame count."""
    if not segments:
        raise ValueError("concat_and_mux needs at least one segment")
    reference = None
    total = 0
    for seg in segments:
        with _open(seg, "segment", "re-render this shard") as container:
            if not container.streams.video:
                raise InputError(f"segment has no video stream: {seg}; re-render this shard")
            stream = container.streams.video[0]
            params = (stream.codec_context.name, stream.codec_context.width, stream.codec_context.height)
            if reference is None:
                reference = params
            elif params != reference:
                raise InputError(
                    f"segment {seg} is {params}, the first segment is {reference}; "
                    "re-render every shard with the same encode settings"
                )
        total += count_packets(seg)
    return total


def concat_and_mux(
    segments: list[Path],
    audio: Path | None,
    output: Path,
    fps: Fraction,
    frame_count: int,
) -> Path:
    """Concatenate ``segments`` by stream copy, add ``audio`` (AAC, encoded once), verify, move to ``output``.

    The audio is trimmed or padded with silence to exactly ``frame_count / fps`` seconds. Video timestamps
    are rewritten to a clean constant ``fps`` grid. The result goes to a temporary name beside ``output`` and
    is renamed into place only after the frame count and the stream durations check out; on any failure
    nothing is left at ``output`` (a file already there is not touched). Segments are copied, never
    re-encoded, so they must share one encoder configuration.
    """
    fps = Fraction(fps)
    output = Path(output)
    segments = [Path(s) for s in segments]
    packets = _check_segments(segments)
    if packets != frame_count:
        raise FFmpegError(
            f"segments hold {packets} frames, expected {frame_count}; re-render the missing shards"
        )
    audio_args: list[str] = []
    inputs: list[str] = []
    if audio is not None:
        info = probe_audio(audio)
        rate = info.sample_rate if info.sample_rate in _AAC_RATES else 48000
        channels = min(max(info.channels, 1), 2)
        samples = round(frame_count * rate / fps)
        chain = (
            f"[1:a:0]aresample={rate},asetpts=N/SR/TB,apad=whole_len={samples},atrim=end_sample={samples},"
            f"asetpts=N/SR/TB[a]"
        )
        inputs = ["-i", str(audio)]
        audio_args = ["-filter_complex", chain, "-map", "[a]", "-c:a", "aac", "-b:a", "192k",
                      "-ac", str(channels)]  # fmt: skip
    output.parent.mkdir(parents=True, exist_ok=True)
    tb = 1 / fps
    with tempfile.TemporaryDirectory(prefix=f".{output.stem}.", dir=output.parent) as tmp:
        listing = Path(tmp) / "segments.ffconcat"
        listing.write_text(
            "ffconcat version 1.0\n" + "".join(f"file {_quote_concat(s.resolve())}\n" for s in segments)
        )
        partial = Path(tmp) / "output.mp4"
        run_ffmpeg(
            ["-y", "-f", "concat", "-safe", "0", "-i", str(listing), *inputs,
             "-map", "0:v:0", "-c:v", "copy", "-bsf:v", f"setts=pts=N:dts=N:duration=1:time_base={_rate(tb)}",
             "-time_base:v", _rate(tb), *audio_args, "-map_metadata", "-1", "-movflags", "+faststart",
             "-f", "mp4", str(partial)],
            what=f"concatenating {len(segments)} segments into {output}",
        )  # fmt: skip
        _verify_output(partial, fps, frame_count, with_audio=audio is not None)
        os.replace(partial, output)
    logger.info("wrote %s (%d frames at %s fps)", output, frame_count, fps)
    return output


def _verify_output(path: Path, fps: Fraction, frame_count: int, *, with_audio: bool) -> None:
    """Frame count == ``frame_count``; audio and video durations agree within one frame."""
    frames = count_packets(path)
    if frames != frame_count:
        raise FFmpegError(f"muxed output {path} holds {frames} frames, expected {frame_count}")
    with _open(path, "output", "re-run the stitch") as container:
        video = container.streams.video[0]
        video_s = float(video.duration * video.time_base) if video.duration else frame_count / fps
        if abs(video_s - float(frame_count / fps)) > float(1 / (2 * fps)):
            raise FFmpegError(f"muxed video lasts {video_s:.4f} s, expected {float(frame_count / fps):.4f} s")
        if with_audio:
            if not container.streams.audio:
                raise FFmpegError(f"muxed output {path} lost its audio track")
            stream = container.streams.audio[0]
            audio_s = float(stream.duration * stream.time_base) if stream.duration else 0.0
            if abs(audio_s - video_s) > float(1 / fps):
                raise FFmpegError(f"muxed audio lasts {audio_s:.4f} s but the video {video_s:.4f} s")
