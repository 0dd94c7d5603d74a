"""The 1080p benchmark clip: exact length and size, a face >= 400 px tall that the Haar cascade finds and
that moves, none in the cut-away."""

from __future__ import annotations

import cv2
import pytest

from scripts.make_bench_media import SHORT_SECONDS, bench_frame, ensure_bench_media
from shards.errors import ConfigError
from shards.probe import load_audio, probe_video
from tests.helpers import decode_all


def _faces(frame):
    cascade = cv2.CascadeClassifier(cv2.data.haarcascades + "haarcascade_frontalface_default.xml")
    small = cv2.resize(frame, (640, 360), interpolation=cv2.INTER_AREA)  # as detection does (max side 640)
    found = cascade.detectMultiScale(cv2.cvtColor(small, cv2.COLOR_BGR2GRAY), 1.1, 5, minSize=(40, 40))
    return [tuple(int(v) * 3 for v in box) for box in found]


def test_short_clip_has_a_moving_face_and_a_cutaway(tmp_path):
    media = ensure_bench_media(tmp_path / "bench", SHORT_SECONDS)
    info = probe_video(media.video)
    assert (info.width, info.height, info.frame_count, info.fps) == (1920, 1080, 30, 25)
    assert len(load_audio(media.audio)) == 16000 * 30 // 25
    frames = decode_all(media.video)
    assert media.no_face_frames == (13, 14, 15, 16, 17)
    boxes = {}
    for i, frame in enumerate(frames):
        found = _faces(frame)
        if i in media.no_face_frames:
            assert not found, f"cut-away frame {i} shows a face"
        else:
            assert len(found) == 1 and found[0][3] >= 400, f"frame {i}: {found}"
            boxes[i] = found[0]
    assert len({b[:2] for b in boxes.values()}) > 5, "the face moves"
    again = ensure_bench_media(tmp_path / "bench", SHORT_SECONDS)  # present: not rebuilt
    assert again == media and media.video.stat().st_mtime_ns == again.video.stat().st_mtime_ns


def test_frames_are_deterministic_and_refuses_foreign_dirs(tmp_path):
    assert (bench_frame(3.0, 30.0) == bench_frame(3.0, 30.0)).all()
    (tmp_path / "mine.txt").write_text("user file")
    with pytest.raises(ConfigError, match="refuses"):
        ensure_bench_media(tmp_path, SHORT_SECONDS)
