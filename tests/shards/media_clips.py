"""Test clips made with the real ffmpeg, and frame comparisons, shared by the shards media tests."""

from __future__ import annotations

from pathlib import Path

import av
import numpy as np

from shards.ffmpeg import run_ffmpeg


def lavfi_video(path: Path, *, size: str = "96x64", rate: str = "25", seconds: float = 2.0, extra=()) -> Path:
    """A test-pattern H.264 clip (B-frames on, GOP 12, so ranges start mid-GOP)."""
    run_ffmpeg(
        ["-y", "-f", "lavfi", "-i", f"testsrc2=size={size}:rate={rate}:duration={seconds}", *extra,
         "-c:v", "libx264", "-g", "12", "-pix_fmt", "yuv420p", str(path)],
        what="making a test clip",
    )  # fmt: skip
    return path


def remux(src: Path, dst: Path, *before_input: str) -> Path:
    run_ffmpeg(["-y", *before_input, "-i", str(src), "-c", "copy", str(dst)], what="remuxing a test clip")
    return dst


def sine_audio(path: Path, seconds: float, rate: int = 22050, channels: int = 2) -> Path:
    run_ffmpeg(
        ["-y", "-f", "lavfi", "-i", f"sine=frequency=440:sample_rate={rate}:duration={seconds}",
         "-ac", str(channels), str(path)],
        what="making a test tone",
    )  # fmt: skip
    return path


def plain_decode(path: Path) -> list[tuple[int, np.ndarray]]:
    """Reference: every frame of the first video stream, in order, as (pts, BGR array), no seeking."""
    with av.open(str(path)) as container:
        return [(f.pts, f.to_ndarray(format="bgr24")) for f in container.decode(video=0)]


def same_frames(a: list[np.ndarray], b: list[np.ndarray]) -> bool:
    return len(a) == len(b) and all(
        x.shape == y.shape and np.array_equal(x, y) for x, y in zip(a, b, strict=True)
    )
