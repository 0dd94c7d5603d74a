"""Build the bundled demo clip from a photograph shipped in scikit-image (offline, deterministic).

:func:`ensure_demo_media` writes ``demo.mp4`` (25 fps) + ``demo.wav`` and the 29.97 fps variant
``demo_2997.mp4`` + ``demo_2997.wav`` (command line: ``python -m scripts.make_demo_media``).

Video: a slow zoom and pan over the astronaut's face in ``skimage.data.astronaut()`` (the face stays
100-140 px tall, where OpenCV's frontal-face Haar cascade finds it), with a cut-away of about one second
in the middle to ``skimage.data.coffee()`` (no face). H.264 yuv420p through ``shards.segment``.
Audio: 16-bit mono 16 kHz WAV with a speech-like envelope: a voiced harmonic buzz (pitch 120-180 Hz with
vibrato, vowel-like formants) in syllables at ~4.5 Hz, grouped into words separated by pauses.
"""

from __future__ import annotations

import functools
import logging
import math
import os
import tempfile
import wave
from collections.abc import Iterator
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import cv2
import numpy as np
from skimage import data

from musetalk.testing.owned import claim
from shards.segment import EncodeSettings, encode_segment

logger = logging.getLogger(__name__)

# Bump when the generated media change, so stale copies are rebuilt by ensure_demo_media.
DEMO_VERSION = "1"
MARKER = ".demo-media"  # in every directory this tool writes into; it writes into no other non-empty one
TOOL = "make_demo_media"  # the command line's name, in refusals
FIX = "build the demo in a new or empty directory (--out), or give your own clip with task.video= and task.audio="
SAMPLE_RATE = 16000
DEMO_FPS = Fraction(25)
DEMO_2997_FPS = Fraction(30000, 1001)
_FACE_CENTRE = (224.0, 116.0)  # (x, y) of the astronaut's face in the 512x512 photograph
_ENCODE = EncodeSettings(crf=18, preset="veryfast", gop=12)


@dataclass(frozen=True)
class DemoMedia:
    """A generated clip: its files, rate and length, and which frame indices show a face."""

    video: Path
    audio: Path
    fps: Fraction
    frames: int
    face_frames: tuple[int, ...]
    no_face_frames: tuple[int, ...]


def cutaway_span(seconds: float) -> tuple[float, float]:
    """The [start, end) seconds of the no-face cut-away: one second centred in the clip."""
    return seconds / 2 - 0.5, seconds / 2 + 0.5


@functools.cache
def _photo(name: str) -> np.ndarray:
    """A scikit-image sample photograph as (H, W, 3) uint8 BGR (read-only: cached)."""
    image = np.ascontiguousarray(getattr(data, name)()[:, :, ::-1])
    image.setflags(write=False)
    return image


def camera_window(
    source: np.ndarray, cx: float, cy: float, win_h: float, size: tuple[int, int]
) -> np.ndarray:
    """The window of ``source`` centred on (cx, cy), ``win_h`` source pixels tall with the output's aspect,
    resampled to ``size`` = (W, H): (H, W, 3) uint8 BGR. A virtual camera that pans and zooms."""
    width, height = size
    win_w = win_h * width / height
    sx, sy = win_w / width, win_h / height
    # Inverse map: output pixel centre (u + 0.5) lands on source coordinate x0 + (u + 0.5) * sx - 0.5.
    matrix = np.array(
        [[sx, 0.0, cx - win_w / 2 + 0.5 * sx - 0.5], [0.0, sy, cy - win_h / 2 + 0.5 * sy - 0.5]],
        dtype=np.float64,
    )
    return cv2.warpAffine(
        source,
        matrix,
        (width, height),
        flags=cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP,
        borderMode=cv2.BORDER_REFLECT_101,
    )


def demo_frame(t: float, seconds: float, size: tuple[int, int]) -> np.ndarray:
    """The frame shown at ``t`` seconds: (H, W, 3) uint8 BGR, ``size`` = (W, H). Pure function of its inputs."""
    lo, hi = cutaway_span(seconds)
    phase = 2 * math.pi * t / seconds
    if lo <= t < hi:
        source = _photo("coffee")  # 400x600, a cup of coffee, no face
        u = (t - lo) / (hi - lo)
        win_h = 300.0 - 40.0 * u
        cx, cy = 300.0 + 60.0 * (u - 0.5), 200.0
    else:
        source = _photo("astronaut")  # 512x512, face ~95 px at (224, 113)
        win_h = 225.0 - 40.0 * (0.5 - 0.5 * math.cos(phase))  # zoom in, then out again
        cx = _FACE_CENTRE[0] + 10.0 * math.sin(phase)
        cy = _FACE_CENTRE[1] + 5.0 * math.sin(phase + 1.0)
    return camera_window(source, cx, cy, win_h, size)


def demo_frames(fps: Fraction, seconds: float, size: tuple[int, int]) -> Iterator[np.ndarray]:
    """Every frame of the clip, (H, W, 3) uint8 BGR, frame ``i`` at ``i / fps`` seconds."""
    for i in range(frame_total(fps, seconds)):
        yield demo_frame(float(i / fps), seconds, size)


def frame_total(fps: Fraction, seconds: float) -> int:
    return round(Fraction(seconds) * Fraction(fps))


def face_schedule(fps: Fraction, seconds: float) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """(face frame indices, cut-away frame indices) for a clip at ``fps`` lasting ``seconds``."""
    lo, hi = cutaway_span(seconds)
    total = frame_total(fps, seconds)
    away = tuple(i for i in range(total) if lo <= float(i / fps) < hi)
    face = tuple(i for i in range(total) if not lo <= float(i / fps) < hi)
    return face, away


def speech_like(seconds: float, sample_rate: int = SAMPLE_RATE, seed: int = 0) -> np.ndarray:
    """A speech-like test signal: (N,) float32 in [-1, 1], N = ceil(seconds * sample_rate)."""
    rng = np.random.default_rng(seed)
    n = math.ceil(seconds * sample_rate - 1e-9)
    t = np.arange(n) / sample_rate
    # Syllable timing: words of 2-5 syllables at ~4.5 Hz, separated by 0.2-0.4 s pauses.
    envelope = np.zeros(n)
    formants = np.zeros((n, 2))
    vowels = np.array([[730, 1090], [530, 1840], [270, 2290], [570, 840], [300, 870]], dtype=np.float64)
    pos = 0.15
    while pos < seconds:
        for _ in range(int(rng.integers(2, 6))):
            length = float(rng.uniform(0.18, 0.26))
            a, b = round(pos * sample_rate), min(n, round((pos + length) * sample_rate))
            if a >= n:
                break
            u = np.linspace(0.0, 1.0, b - a, endpoint=False)
            envelope[a:b] = np.sin(np.pi * u) ** 2 * rng.uniform(0.6, 1.0)
            formants[a:b] = vowels[rng.integers(len(vowels))]
            pos += length
        pos += float(rng.uniform(0.2, 0.4))
    f0 = (
        150.0 + 25.0 * np.sin(2 * np.pi * 0.6 * t) + 4.0 * np.sin(2 * np.pi * 5.5 * t)
    )  # intonation + vibrato
    phase = 2 * np.pi * np.cumsum(f0) / sample_rate
    signal = np.zeros(n)
    for k in range(1, 30):
        freq = k * f0
        gain = 0.15 / k + sum(np.exp(-(((freq - formants[:, j]) / 120.0) ** 2)) for j in range(2))
        signal += gain * np.sin(k * phase) * (freq < sample_rate / 2)
    signal = signal * envelope + 0.002 * rng.standard_normal(n) * (envelope > 0)
    signal *= 0.8 / max(np.abs(signal).max(), 1e-9)
    return signal.astype(np.float32)


def _write_wav(path: Path, samples: np.ndarray, sample_rate: int) -> None:
    pcm = np.round(np.clip(samples, -1.0, 1.0) * 32767).astype("<i2")
    with wave.open(str(path), "wb") as out:
        out.setnchannels(1)
        out.setsampwidth(2)
        out.setframerate(sample_rate)
        out.writeframes(pcm.tobytes())


def _atomic(path: Path, suffix: str):
    """A temporary path beside ``path`` (same directory, so os.replace is atomic)."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=suffix, dir=path.parent)
    os.close(fd)
    return Path(tmp)


def make_demo_media(
    out_dir: Path,
    *,
    fps: Fraction = DEMO_FPS,
    seconds: float = 4.0,
    size: tuple[int, int] = (256, 256),
    name: str = "demo",
) -> DemoMedia:
    """Write ``{name}.mp4`` and ``{name}.wav`` into ``out_dir`` (atomically) and describe them.

    ``out_dir`` must be absent, marked as the demo's, or free of the two names: a ConfigError refuses a
    directory holding a ``demo.mp4``/``demo.wav`` it did not make, before a file is written, so a user's own
    ``demo.mp4`` is never replaced.
    """
    out_dir = claim(out_dir, MARKER, TOOL, FIX, writes=(f"{name}.mp4", f"{name}.wav"))
    fps = Fraction(fps)
    video, audio = out_dir / f"{name}.mp4", out_dir / f"{name}.wav"
    tmp_video, tmp_audio = _atomic(video, ".mp4"), _atomic(audio, ".wav")
    try:
        written = encode_segment(demo_frames(fps, seconds, size), tmp_video, fps, _ENCODE)
        # As long as the video (29.97 fps: 120 frames last 4.004 s), so every frame gets audio.
        _write_wav(tmp_audio, speech_like(max(seconds, float(written / fps))), SAMPLE_RATE)
        for tmp in (tmp_video, tmp_audio):
            os.chmod(tmp, 0o644)  # mkstemp creates 0600
        os.replace(tmp_video, video)
        os.replace(tmp_audio, audio)
    finally:
        tmp_video.unlink(missing_ok=True)
        tmp_audio.unlink(missing_ok=True)
    face, away = face_schedule(fps, seconds)
    logger.info(
        "wrote %s (%d frames at %s fps, cut-away %d..%d) and %s",
        video,
        written,
        fps,
        away[0],
        away[-1],
        audio,
    )
    return DemoMedia(video, audio, fps, written, face, away)


def _describe(out_dir: Path, name: str, fps: Fraction, seconds: float = 4.0) -> DemoMedia:
    face, away = face_schedule(fps, seconds)
    return DemoMedia(
        out_dir / f"{name}.mp4", out_dir / f"{name}.wav", fps, frame_total(fps, seconds), face, away
    )


def ensure_demo_media(out_dir: Path, *, force: bool = False) -> DemoMedia:
    """Build the 25 fps demo and the 29.97 fps variant in ``out_dir`` unless present; return the 25 fps one."""
    variants = (("demo", DEMO_FPS), ("demo_2997", DEMO_2997_FPS))
    names = [f"{name}{ext}" for name, _ in variants for ext in (".mp4", ".wav")]
    out_dir = claim(out_dir, MARKER, TOOL, FIX, writes=names)
    marker = out_dir / MARKER
    files = [out_dir / n for n in names]
    current = marker.exists() and marker.read_text().strip() == f"version={DEMO_VERSION}"
    if force or not current or not all(f.exists() for f in files):
        logger.info("building the demo media in %s", out_dir)
        for name, fps in variants:
            make_demo_media(out_dir, fps=fps, name=name)
        tmp = _atomic(marker, ".tmp")
        tmp.write_text(f"version={DEMO_VERSION}\n")
        os.replace(tmp, marker)
    return _describe(out_dir, "demo", DEMO_FPS)
