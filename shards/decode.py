"""Frame-exact decoding with PyAV: frames ``[start, end)`` of a probed video, seeking or not
(:func:`read_frames`; :func:`read_pictures` converts each only when asked, to the whole frame or to a
small copy for face detection), and decoders kept open across consecutive ranges (:class:`FrameStreams`).

See ``shards.probe`` for how frames are indexed.
"""

from __future__ import annotations

import logging
import math
import os
import threading
from collections import OrderedDict
from collections.abc import Iterator
from fractions import Fraction
from pathlib import Path

import av
import av.error
import numpy as np

from shards.errors import FFmpegError, InputError
from shards.probe import VideoInfo, open_input, slot_tolerance, video_stream

logger = logging.getLogger(__name__)


def read_frames(info: VideoInfo, start: int, end: int) -> Iterator[np.ndarray]:
    """Frames ``[start, end)`` of ``info`` as (H, W, 3) uint8 BGR, C-contiguous, rotation applied.

    Streams with bounded memory: seeks to the keyframe before ``start``, decodes forward and drops frames
    before it. Equal, index for index, to a sequential decode from frame 0 (VFR normalised to ``info.fps``).
    """
    return (picture.bgr() for picture in read_pictures(info, start, end))


def read_pictures(info: VideoInfo, start: int, end: int) -> Iterator[Picture]:
    """The frames of :func:`read_frames` as decoded pictures, converted only when asked (:class:`Picture`)."""
    if not (0 <= start <= end <= info.frame_count):
        raise ValueError(f"frame range [{start}, {end}) is outside [0, {info.frame_count}] for {info.path}")
    if info.mode == "decode order":
        return _frames_in_decode_order(info, start, end)
    return _frames(info, start, end)


def shrunk_size(width: int, height: int, max_side: int) -> tuple[int, int]:
    """(width, height) scaled so the longer side is ``max_side`` (each at least 1); unchanged if it is
    already at most that."""
    if max(height, width) <= max_side:
        return width, height
    ratio = max_side / max(height, width)
    return max(1, round(width * ratio)), max(1, round(height * ratio))


class Picture:
    """Source frame ``index`` as the decoder gave it, converted on demand: :meth:`bgr` (the frame of
    :func:`read_frames`, a new array each call) or :meth:`shrunk` (a small copy for face detection,
    scaled straight from the decoder's YUV by swscale's area filter: a tenth of the work of converting
    the whole frame and shrinking it). The decoder's picture is reference-counted: it stays valid after the
    decoder moves on or closes."""

    __slots__ = ("_frame", "_info", "_small", "index")

    def __init__(self, info: VideoInfo, frame: av.VideoFrame, index: int) -> None:
        self._info, self._frame, self.index = info, frame, index
        self._small: tuple[int, np.ndarray] | None = None

    @property
    def shape(self) -> tuple[int, int, int]:
        """The shape of :meth:`bgr` (rotation applied)."""
        return self._info.height, self._info.width, 3

    def bgr(self) -> np.ndarray:
        """(H, W, 3) uint8 BGR, C-contiguous, rotation applied: a new array each call."""
        return _image(self._info, self._frame, self.index)

    def shrunk(self, max_side: int) -> np.ndarray:
        """(h, w, 3) uint8 BGR with the longer side at most ``max_side`` (:func:`shrunk_size`; the frame
        itself when it is no larger), rotation applied. Kept: a second call returns the same array."""
        if self._small is not None and self._small[0] == max_side:
            return self._small[1]
        info, frame = self._info, self._frame
        width, height = shrunk_size(info.width, info.height, max_side)
        if (width, height) == (info.width, info.height):
            image = self.bgr()
        else:
            _check_size(info, frame, self.index)
            turned = info.rotation in (90, 270)  # the decoder's picture is not rotated yet
            image = frame.to_ndarray(
                width=height if turned else width,
                height=width if turned else height,
                format="bgr24",
                interpolation="AREA",
                src_color_range=frame.color_range,
            )
            if info.rotation:
                image = np.ascontiguousarray(np.rot90(image, k=-(info.rotation // 90)))
        self._small = (max_side, image)
        return image


class FrameStreams:
    """Decoders kept open between range reads of one process (a worker's units), so a read that starts
    where an earlier read of the same file stopped continues that decoder: consecutive units decode as one
    sequential pass, with no seek and no keyframe pre-roll per unit. The frames are :func:`read_frames`'s
    (equal to a sequential decode) either way. Thread-safe: a decoder serves one read at a time; at most
    ``keep`` idle decoders stay open (the oldest is closed), each holding its file and one decoded frame."""

    def __init__(self, keep: int = 2) -> None:
        self._keep = keep
        self._lock = threading.Lock()
        self._idle: OrderedDict[tuple, Iterator[Picture]] = OrderedDict()
        self.opened = 0  # decoders opened (each a seek and its pre-roll); continued reads open none

    def read(self, info: VideoInfo, start: int, end: int) -> Iterator[np.ndarray]:
        """Frames ``[start, end)`` as :func:`read_frames` gives them."""
        return (picture.bgr() for picture in self.pictures(info, start, end))

    def pictures(self, info: VideoInfo, start: int, end: int) -> Iterator[Picture]:
        """Frames ``[start, end)`` as :func:`read_pictures` gives them."""
        if not (0 <= start <= end <= info.frame_count):
            raise ValueError(
                f"frame range [{start}, {end}) is outside [0, {info.frame_count}] for {info.path}"
            )
        return self._read(info, start, end)

    def _read(self, info: VideoInfo, start: int, end: int) -> Iterator[Picture]:
        if start == end:
            return
        st = os.stat(info.path)
        key = (info, st.st_ino, st.st_size, st.st_mtime_ns)  # a file replaced since is a new file
        with self._lock:
            stream = self._idle.pop((key, start), None)
            if stream is None:
                self.opened += 1
        if stream is None:
            stream = read_pictures(info, start, info.frame_count)
        done = False
        try:
            for _ in range(end - start):
                yield next(stream)
            done = True
        finally:
            if done and end < info.frame_count:
                self._park((key, end), stream)
            else:  # the end of the file, or a reader that stopped early or failed
                stream.close()

    def _park(self, key: tuple, stream: Iterator[Picture]) -> None:
        with self._lock:
            closing = [self._idle.pop(key)] if key in self._idle else []
            self._idle[key] = stream
            while len(self._idle) > self._keep:
                closing.append(self._idle.popitem(last=False)[1])
        for old in closing:
            old.close()

    def close(self) -> None:
        """Close every idle decoder."""
        with self._lock:
            idle, self._idle = list(self._idle.values()), OrderedDict()
        for stream in idle:
            stream.close()


def _to_bgr(frame: av.VideoFrame, rotation: int) -> np.ndarray:
    image = frame.to_ndarray(format="bgr24", src_color_range=frame.color_range)
    if rotation:
        image = np.rot90(image, k=-(rotation // 90))
    return np.ascontiguousarray(image)


def _check_size(info: VideoInfo, frame: av.VideoFrame, index: int) -> None:
    turned = info.rotation in (90, 270)
    width, height = (frame.height, frame.width) if turned else (frame.width, frame.height)
    if (width, height) != (info.width, info.height):
        raise InputError(
            f"video input changes size mid-stream at frame {index} ({width}x{height}, "
            f"expected {info.width}x{info.height}): {info.path}; re-encode it to one size"
        )


def _image(info: VideoInfo, frame: av.VideoFrame, index: int) -> np.ndarray:
    _check_size(info, frame, index)
    return _to_bgr(frame, info.rotation)


def _open_at(info: VideoInfo, target_pts: int | None):
    """A container and a frame iterator whose first frame is at or before ``target_pts`` (None: from the start).

    PyAV seeks to a keyframe at or before the target by the demuxer's index; when the first decoded frame
    still comes after the target (dts-indexed formats, missing index), seek further back and try again.
    """
    back = 0
    while True:
        container = open_input(info.path, "video input", "pass a video file")
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


def _frames(info: VideoInfo, start: int, end: int) -> Iterator[Picture]:
    if start == end:
        return
    fps, time_base = info.fps, info.time_base
    tol = slot_tolerance(time_base, fps)
    target = info.start_pts + math.floor((start / fps + tol) / time_base) if start > 0 else None
    container, first, frames = _open_at(info, target)
    with container:
        if first is None:
            raise FFmpegError(f"{info.path}: no frame decoded for index {start}")
        emitted = start
        prev, prev_slot = first, 0

        def slot(frame: av.VideoFrame) -> int:
            """First output index that shows ``frame``."""
            if frame.pts is None:  # probe found none missing; a damaged tail may still lack one
                return prev_slot + 1
            return math.ceil(((frame.pts - info.start_pts) * time_base - tol) * fps)

        prev_slot = slot(first)
        if prev_slot > start:
            raise FFmpegError(
                f"{info.path}: first decoded frame shows index {prev_slot}, after the requested {start}"
            )

        def emit(frame: av.VideoFrame, upto: int) -> Iterator[Picture]:
            nonlocal emitted
            while emitted < upto:  # a frame shown for several indices (VFR) is one picture
                yield Picture(info, frame, emitted)
                emitted += 1

        try:
            for frame in frames:
                s = slot(frame)
                yield from emit(prev, min(s, end))
                if emitted >= end:
                    return
                prev, prev_slot = frame, s
        except av.error.FFmpegError as err:
            # Probe counted only the frames before such an error (a truncated tail): the range ends there.
            logger.debug("%s: decoding stopped near frame %d (%s)", info.path, emitted, err.strerror)
        yield from emit(prev, end if info.vfr else min(end, prev_slot + 1))
        if emitted < end:
            raise FFmpegError(f"{info.path}: decoding ended at frame {emitted}, expected {end} frames")


def _frames_in_decode_order(info: VideoInfo, start: int, end: int) -> Iterator[Picture]:
    """Mode "decode order": frame ``k`` is the ``k``-th decoded frame.

    To start mid-file it seeks to the keyframe two keyframes before ``start`` (the frames just after a seek
    point can decode differently, e.g. packed B-frames that referenced the previous GOP; a whole GOP of
    pre-roll settles them) and finds where it landed by the first frame's pts, which must occur exactly
    once in the probe's list. Every later frame's pts must match that list too; on any doubt it decodes
    from the start instead, which is a sequential decode by definition.
    """
    if start == end:
        return
    earlier = [k for k in info.keyframes if k <= start]
    seek_index = earlier[-2] if len(earlier) >= 2 else None
    if seek_index is not None and info.frame_pts[seek_index] is not None:
        frames = _decoded_from(info, seek_index, start, end)
        try:
            first = next(frames)
        except _Landed as landed:
            logger.debug("%s: seek for frame %d %s; decoding from the start", info.path, start, landed)
        else:
            yield first
            yield from frames
            return
    yield from _decoded_from(info, None, start, end)


class _Landed(Exception):
    """A seek in decode-order mode landed somewhere its frames cannot be placed."""


def _decoded_from(info: VideoInfo, seek_index: int | None, start: int, end: int) -> Iterator[Picture]:
    """Frames [start, end) decoding from the keyframe ``seek_index`` (None: from the start of the file).

    Raises _Landed before yielding anything when the seek cannot be placed on the probe's frame list.
    """
    occurrences: dict[int | None, int] = {}
    for t in info.frame_pts:
        occurrences[t] = occurrences.get(t, 0) + 1
    with open_input(info.path, "video input", "pass a video file") as container:
        stream = container.streams[info.stream_index]
        stream.thread_type = "AUTO"
        index = 0 if seek_index is None else None
        try:
            if seek_index is not None:
                container.seek(info.frame_pts[seek_index], backward=True, any_frame=False, stream=stream)
            for frame in container.decode(stream):
                if index is None:
                    if frame.pts is None or occurrences.get(frame.pts) != 1:
                        raise _Landed(f"landed on a frame with an ambiguous pts ({frame.pts})")
                    index = info.frame_pts.index(frame.pts)
                    if index > seek_index:
                        raise _Landed(f"landed on frame {index}, after keyframe {seek_index}")
                elif index >= info.frame_count:
                    break
                if frame.pts != info.frame_pts[index]:
                    if index < start and seek_index is not None:
                        raise _Landed(f"frame {index} has pts {frame.pts}, not {info.frame_pts[index]}")
                    raise FFmpegError(
                        f"{info.path}: frame {index} decodes with pts {frame.pts}, the probe saw "
                        f"{info.frame_pts[index]}; the file changed since it was probed, probe it again"
                    )
                if index >= start:
                    yield Picture(info, frame, index)
                index += 1
                if index >= end:
                    return
        except av.error.FFmpegError as err:
            logger.debug("%s: decoding stopped near frame %s (%s)", info.path, index, err.strerror)
    if index is None and seek_index is not None:
        raise _Landed("decoded nothing")
    raise FFmpegError(f"{info.path}: decoding ended at frame {index}, expected {end} frames")


def count_frames(path: str | Path) -> int:
    """Number of frames a full decode of the first video stream yields (no normalisation)."""
    p = Path(path)
    with open_input(p, "video", "pass a video file") as container:
        stream = video_stream(container)
        if stream is None:
            raise InputError(f"video has no video stream: {p}; pass a video file")
        stream.thread_type = "AUTO"
        try:
            return sum(1 for _ in container.decode(stream))
        except av.error.FFmpegError as err:
            raise FFmpegError(f"decoding {p} failed ({err.strerror})") from err
