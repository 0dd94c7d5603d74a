"""Build the 1080p benchmark clip: a talking-head-sized face that drifts, and a cut-away (offline, deterministic).

``python -m scripts.make_bench_media --out media/bench [--seconds 30] [--force]`` writes
``bench_1080p_<seconds>s.mp4`` (1920x1080, 25 fps, H.264 yuv420p) + ``bench_1080p_<seconds>s.wav``
(speech-like, 16 kHz, exactly as long as the video).

Video: the astronaut's face from ``skimage.data.astronaut()`` seen through a window 185-225 source pixels
tall, so the face is 460-550 px tall in the frame (about a close-up talking head); the window zooms in
and out once over the clip and drifts by a few pixels, so boxes move as a real head does. The middle
10% of the clip (at least 0.2 s) cuts away to ``skimage.data.coffee()`` (no face). OpenCV's Haar cascade
finds the face in every face frame (tested).
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import sys
from collections.abc import Iterator
from fractions import Fraction
from pathlib import Path

import numpy as np

from musetalk.testing.demo_media import (
    _FACE_CENTRE,
    SAMPLE_RATE,
    DemoMedia,
    _atomic,
    _photo,
    _write_wav,
    camera_window,
    speech_like,
)
from musetalk.testing.owned import claim
from shards.errors import FarmError
from shards.segment import EncodeSettings, encode_segment

logger = logging.getLogger(__name__)

BENCH_VERSION = "1"
MARKER = ".bench-media"
TOOL = "make_bench_media"
FIX = "build the benchmark media in a new or empty directory (--out)"
BENCH_FPS = Fraction(25)
BENCH_SIZE = (1920, 1080)  # (W, H)
SHORT_SECONDS = 1.2  # the short variant tests use: 30 frames, 6 of them the cut-away
_ENCODE = EncodeSettings(crf=18, preset="veryfast", gop=50)


def cutaway_span(seconds: float) -> tuple[float, float]:
    """[start, end) seconds of the no-face cut-away: the middle 10% of the clip, at least 0.2 s."""
    half = max(0.05 * seconds, 0.1)
    return seconds / 2 - half, seconds / 2 + half


def bench_frame(t: float, seconds: float, size: tuple[int, int] = BENCH_SIZE) -> np.ndarray:
    """The frame at ``t`` seconds: (H, W, 3) uint8 BGR, ``size`` = (W, H). Pure function of its inputs."""
    lo, hi = cutaway_span(seconds)
    if lo <= t < hi:
        source = _photo("coffee")
        u = (t - lo) / (hi - lo)
        win_h, cx, cy = 300.0 - 40.0 * u, 300.0 + 60.0 * (u - 0.5), 200.0
    else:
        source = _photo("astronaut")  # face ~95 px tall at (224, 116)
        phase = 2 * math.pi * t / max(seconds, 1e-9)
        wobble = 2 * math.pi * t / 3.0  # a small head movement every 3 s
        win_h = 225.0 - 40.0 * (0.5 - 0.5 * math.cos(phase))
        cx = _FACE_CENTRE[0] + 6.0 * math.sin(phase) + 2.0 * math.sin(wobble)
        cy = _FACE_CENTRE[1] + 3.0 * math.sin(phase + 1.0) + 1.5 * math.cos(wobble)
    return camera_window(source, cx, cy, win_h, size)


def frame_total(fps: Fraction, seconds: float) -> int:
    return round(Fraction(seconds).limit_denominator(1000) * Fraction(fps))


def bench_frames(fps: Fraction, seconds: float, size: tuple[int, int]) -> Iterator[np.ndarray]:
    for i in range(frame_total(fps, seconds)):
        yield bench_frame(float(i / fps), seconds, size)


def face_schedule(fps: Fraction, seconds: float) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """(face frame indices, cut-away frame indices)."""
    lo, hi = cutaway_span(seconds)
    total = frame_total(fps, seconds)
    away = tuple(i for i in range(total) if lo <= float(i / fps) < hi)
    return tuple(i for i in range(total) if i not in set(away)), away


def clip_name(seconds: float) -> str:
    return f"bench_1080p_{seconds:g}s"


def _describe(out_dir: Path, seconds: float, fps: Fraction) -> DemoMedia:
    name = clip_name(seconds)
    face, away = face_schedule(fps, seconds)
    return DemoMedia(
        out_dir / f"{name}.mp4", out_dir / f"{name}.wav", fps, frame_total(fps, seconds), face, away
    )


def ensure_bench_media(
    out_dir: Path,
    seconds: float = 30.0,
    *,
    size: tuple[int, int] = BENCH_SIZE,
    fps: Fraction = BENCH_FPS,
    force: bool = False,
) -> DemoMedia:
    """Write the ``seconds``-long clip into ``out_dir`` unless it is there already; describe it.

    ``out_dir`` must be absent, empty or marked as this tool's (ConfigError otherwise). Each clip has its
    own stamp file, so clips of several lengths share a directory.
    """
    out_dir = claim(out_dir, MARKER, TOOL, FIX)
    media = _describe(out_dir, seconds, Fraction(fps))
    stamp = out_dir / f".{clip_name(seconds)}.done"
    want = f"version={BENCH_VERSION} size={size[0]}x{size[1]} fps={fps}"
    fresh = stamp.exists() and stamp.read_text().strip() == want
    if not force and fresh and media.video.exists() and media.audio.exists():
        return media
    stamp.unlink(missing_ok=True)
    tmp_video, tmp_audio = _atomic(media.video, ".mp4"), _atomic(media.audio, ".wav")
    try:
        written = encode_segment(bench_frames(fps, seconds, size), tmp_video, Fraction(fps), _ENCODE)
        if written != media.frames:
            raise RuntimeError(f"wrote {written} frames, expected {media.frames}")
        _write_wav(tmp_audio, speech_like(float(written / Fraction(fps))), SAMPLE_RATE)
        for tmp in (tmp_video, tmp_audio):
            os.chmod(tmp, 0o644)
        os.replace(tmp_video, media.video)
        os.replace(tmp_audio, media.audio)
    finally:
        tmp_video.unlink(missing_ok=True)
        tmp_audio.unlink(missing_ok=True)
    stamp.write_text(want + "\n")
    (out_dir / MARKER).write_text(f"version={BENCH_VERSION}\n")
    away = media.no_face_frames
    logger.info("wrote %s (%d frames, cut-away %d..%d)", media.video, written, away[0], away[-1])
    return media


def main(argv: list[str] | None = None) -> DemoMedia:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("media/bench"))
    parser.add_argument("--seconds", type=float, default=30.0)
    parser.add_argument("--force", action="store_true")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        return ensure_bench_media(args.out, args.seconds, force=args.force)
    except FarmError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(err.exit_code)


if __name__ == "__main__":
    main()
