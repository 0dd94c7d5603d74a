"""Segment encoding: (H, W, 3) uint8 BGR frames streamed into an ffmpeg subprocess.

Lossy segments are libx264 yuv420p (BT.709, limited range) with no B-frames, so every packet has
dts == pts, every segment starts on an IDR frame with identical parameters, and segments of any length
(even one frame) concatenate by stream copy without timestamp fix-ups. Lossless segments are libx264rgb
at qp 0 (H.264 High 4:4:4 Predictive, RGB): BGR frames round-trip bit-exactly through PyAV, in MP4 and
MKV, and concatenate the same way; chosen over FFV1 because it stays H.264 in an MP4 players accept.
yuv420p needs even dimensions: an odd width/height is padded by one replicated row/column at the
right/bottom (the output is then one pixel larger); lossless keeps the exact size.
"""

from __future__ import annotations

import logging
import subprocess
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import IO

import numpy as np

from shards.errors import FFmpegError
from shards.ffmpeg import ffmpeg_cmd, rate_arg

logger = logging.getLogger(__name__)

_SEGMENT_FORMATS = {
    ".mkv": "matroska",
    ".mp4": "mp4",
    ".mov": "mov",
    ".ts": "mpegts",
    ".h264": "h264",
    ".264": "h264",
}


@dataclass(frozen=True)
class EncodeSettings:
    """Segment encoding. ``lossless``: libx264rgb qp 0 (bit-exact BGR); else libx264 yuv420p at ``crf``.

    ``gop``: keyframe interval in frames (None: x264's default, 250).
    """

    crf: int = 18
    preset: str = "veryfast"
    lossless: bool = False
    gop: int | None = None


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


class _Segment:
    """What both segment writers share: the frame size, the even padding H.264 4:2:0 needs, checked and
    padded frames, and ``with`` semantics (an exception inside the block removes the partial file)."""

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
        self._format = _SEGMENT_FORMATS.get(self.path.suffix.lower(), "matroska")

    def _checked(self, frame: np.ndarray) -> np.ndarray:
        """``frame`` checked to be (H, W, 3) uint8 of the declared size, padded to even sides, contiguous."""
        expected = (self.height, self.width, 3)
        if not isinstance(frame, np.ndarray) or frame.dtype != np.uint8 or frame.shape != expected:
            got = f"{frame.shape} {frame.dtype}" if isinstance(frame, np.ndarray) else type(frame).__name__
            raise ValueError(f"segment {self.path} takes {expected} uint8 BGR frames, got {got}")
        if self._pad_w or self._pad_h:
            frame = np.pad(frame, ((0, self._pad_h), (0, self._pad_w), (0, 0)), mode="edge")
        return np.ascontiguousarray(frame)

    def close(self) -> int:
        raise NotImplementedError

    def abort(self) -> None:
        raise NotImplementedError

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            self.abort()
        else:
            self.close()


class SegmentWriter(_Segment):
    """Streams (H, W, 3) uint8 BGR frames into a video-only segment through an ffmpeg subprocess.

    The container follows the suffix (.mkv, .mp4, .mov, .ts, .h264; anything else: Matroska). Use as a
    context manager: on an exception inside the ``with`` block the partial file is removed.
    """

    def __init__(
        self, path: str | Path, width: int, height: int, fps: Fraction, settings: EncodeSettings
    ) -> None:
        super().__init__(path, width, height, fps, settings)
        fmt = self._format
        w, h = width + self._pad_w, height + self._pad_h
        self._cmd = ffmpeg_cmd(
            ["-y", "-f", "rawvideo", "-pix_fmt", "bgr24", "-s", f"{w}x{h}", "-framerate", rate_arg(self.fps),
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
        frame = self._checked(frame)
        try:
            self._proc.stdin.write(frame.data)
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


class AVSegmentWriter(_Segment):
    """:class:`SegmentWriter`'s interface over PyAV's bundled libx264, in-process: for machines without an
    ffmpeg binary (the lent GPU machine; ``scripts/gpu_check.py``). Same codecs and options (libx264
    yuv420p BT.709 limited range, or libx264rgb qp 0; no B-frames); the colour conversion is libswscale's
    inside PyAV instead of the ffmpeg binary's filter, so lossy bytes may differ from :class:`SegmentWriter`'s
    (lossless frames are bit-exact either way). ``threads``: the encoder's threads (0: x264's choice).
    """

    def __init__(
        self,
        path: str | Path,
        width: int,
        height: int,
        fps: Fraction,
        settings: EncodeSettings,
        threads: int = 0,
    ) -> None:
        import av

        super().__init__(path, width, height, fps, settings)
        self._container = av.open(str(self.path), "w", format=self._format)
        codec = "libx264rgb" if settings.lossless else "libx264"
        stream = self._container.add_stream(codec, rate=self.fps)
        stream.width, stream.height = width + self._pad_w, height + self._pad_h
        stream.time_base = 1 / self.fps
        options = {"preset": settings.preset, "bf": "0"}
        if settings.gop:
            options["g"] = str(settings.gop)
        if settings.lossless:
            stream.pix_fmt = "bgr24"
            options["qp"] = "0"
        else:
            stream.pix_fmt = "yuv420p"
            options["crf"] = str(settings.crf)
            options["x264-params"] = "colorprim=bt709:transfer=bt709:colormatrix=bt709:range=tv"
        stream.options = options
        stream.codec_context.thread_count = threads
        self._stream = stream

    def write(self, frame: np.ndarray) -> None:
        """Append one (H, W, 3) uint8 BGR frame of the declared size."""
        import av

        if self._container is None:
            raise ValueError(f"segment {self.path} is already closed")
        image = av.VideoFrame.from_ndarray(self._checked(frame), format="bgr24")
        if not self.settings.lossless:
            image = image.reformat(
                format="yuv420p", dst_colorspace="ITU709", dst_color_range="MPEG", interpolation="BICUBIC"
            )
        image.pts = self.frames
        try:
            self._container.mux(self._stream.encode(image))
        except av.FFmpegError as err:
            self.abort()
            raise FFmpegError(f"encoding segment {self.path} failed (PyAV: {err})") from err
        self.frames += 1

    def close(self) -> int:
        """Flush the encoder and finish the file; returns the number of frames written."""
        import av

        if self._container is None:
            return self.frames
        if self.frames == 0:
            self.abort()
            raise ValueError(f"segment {self.path}: no frames were written")
        container, self._container = self._container, None
        try:
            container.mux(self._stream.encode(None))
            container.close()
        except av.FFmpegError as err:
            self.path.unlink(missing_ok=True)
            raise FFmpegError(f"encoding segment {self.path} failed (PyAV: {err})") from err
        return self.frames

    def abort(self) -> None:
        """Stop encoding and remove the partial file."""
        if self._container is not None:
            container, self._container = self._container, None
            try:
                container.close()
            except Exception:  # noqa: BLE001 - the file is removed anyway
                logger.debug("closing the PyAV container of %s failed", self.path)
        self.path.unlink(missing_ok=True)
