"""A test clip with two different faces side by side, for face tracks and ``face.select`` (offline).

Frames are 512x256: the left half a camera window on skimage's astronaut, the right half a mirrored,
blue-tinted copy of it, both moving slightly (OpenCV's Haar cascade finds both). Shot 1 is frames
``[0, CUT)``; inside it, frames ``[ABSENT_START, ABSENT_END)`` cover the right face with a flat patch (one
face absent, no cut: the rest of the picture is unchanged). At ``CUT`` the camera jumps (closer, darker
and with the faces' sides swapped), a shot cut that ends every track. Written lossless (libx264rgb qp 0, bit-exact BGR),
so a test compares decoded pixels; audio is a speech-like WAV as long as the video.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import numpy as np

from musetalk.testing.demo_media import SAMPLE_RATE, _photo, _write_wav, camera_window, speech_like
from shards.segment import EncodeSettings, encode_segment

FPS = Fraction(25)
FRAMES = 30
CUT = 20
ABSENT_START, ABSENT_END = 10, 15
HALF = 256  # each face's half of the frame is HALF x HALF
_FACE = (224.0, 116.0)  # the astronaut's face in the 512x512 photograph


@dataclass(frozen=True)
class TwoFaces:
    video: Path
    audio: Path
    frames: int = FRAMES
    cut: int = CUT
    absent: range = range(ABSENT_START, ABSENT_END)

    def region(self, side: str, frame: int) -> tuple[int, int, int, int]:
        """(x1, y1, x2, y2) of the half of ``frame`` that shows the face on ``side`` (left | right)."""
        x = 0 if side == "left" else HALF
        return (x, 0, x + HALF, HALF)


def _half(t: int, win_h: float, phase: float) -> np.ndarray:
    cx = _FACE[0] + 6.0 * math.sin(2 * math.pi * t / FRAMES + phase)
    cy = _FACE[1] + 3.0 * math.cos(2 * math.pi * t / FRAMES + phase)
    return camera_window(_photo("astronaut"), cx, cy, win_h, (HALF, HALF))


def two_faces_frame(t: int) -> np.ndarray:
    """Frame ``t``: (256, 512, 3) uint8 BGR. Pure function of ``t``."""
    shot2 = t >= CUT
    win_h = 190.0 if shot2 else 240.0
    person_a = _half(t, win_h, 0.0)
    person_b = _half(t, win_h, 1.5)[:, ::-1].astype(np.float32)
    person_b = np.clip(person_b * np.array([1.25, 0.9, 0.8], np.float32), 0, 255).astype(np.uint8)
    if ABSENT_START <= t < ABSENT_END:
        person_b[40:220, 40:220] = 128  # the right person is hidden: no face there
    left, right = (person_b, person_a) if shot2 else (person_a, person_b)
    frame = np.concatenate([left, right], axis=1)
    if shot2:
        frame = (frame.astype(np.float32) * 0.45).astype(np.uint8)  # another camera, another exposure
    return np.ascontiguousarray(frame)


def make_two_faces(out_dir: Path) -> TwoFaces:
    """Write ``two_faces.mkv`` (lossless) and ``two_faces.wav`` into ``out_dir``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    video, audio = out_dir / "two_faces.mkv", out_dir / "two_faces.wav"
    encode_segment((two_faces_frame(t) for t in range(FRAMES)), video, FPS, EncodeSettings(lossless=True))
    _write_wav(audio, speech_like(float(FRAMES / FPS)), SAMPLE_RATE)
    return TwoFaces(video, audio)
