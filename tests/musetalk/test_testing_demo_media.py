"""The demo clip: deterministic, exact length and rate, a face where it says, none in the cut-away."""

from __future__ import annotations

import wave
from fractions import Fraction

import cv2
import numpy as np
import pytest

from musetalk.testing.demo_media import (
    DEMO_2997_FPS,
    demo_frame,
    ensure_demo_media,
    make_demo_media,
    speech_like,
)
from shards.decode import read_frames
from shards.probe import probe_audio, probe_video


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    return out, ensure_demo_media(out)


@pytest.fixture(scope="module")
def decoded(built) -> list[np.ndarray]:
    info = probe_video(built[1].video)
    return list(read_frames(info, 0, info.frame_count))


def faces(image: np.ndarray) -> list[tuple[int, int, int, int]]:
    cascade = cv2.CascadeClassifier(cv2.data.haarcascades + "haarcascade_frontalface_default.xml")
    assert not cascade.empty()
    gray = cv2.cvtColor(image, cv2.COLOR_BGR2GRAY)
    return [tuple(int(v) for v in box) for box in cascade.detectMultiScale(gray, 1.1, 5, minSize=(40, 40))]


def test_layout_rate_and_length(built):
    out, demo = built
    assert sorted(p.name for p in out.iterdir() if not p.name.startswith(".")) == [
        "demo.mp4", "demo.wav", "demo_2997.mp4", "demo_2997.wav",
    ]  # fmt: skip
    assert (demo.video, demo.audio, demo.fps, demo.frames) == (
        out / "demo.mp4",
        out / "demo.wav",
        Fraction(25),
        100,
    )
    info = probe_video(demo.video)
    assert (info.fps, info.frame_count, info.width, info.height, info.vfr) == (
        Fraction(25),
        100,
        256,
        256,
        False,
    )
    ntsc = probe_video(out / "demo_2997.mp4")
    assert (ntsc.fps, ntsc.frame_count) == (DEMO_2997_FPS, 120)
    assert sorted(demo.face_frames + demo.no_face_frames) == list(range(100))
    assert demo.no_face_frames == tuple(range(38, 63))  # one second in the middle


def test_haar_finds_the_face_in_face_frames_and_nothing_in_the_cutaway(built, decoded):
    demo = built[1]
    for i in demo.face_frames[::3] + (demo.face_frames[-1],):
        found = faces(decoded[i])
        assert len(found) == 1, i
        assert found[0][3] >= 100, (i, found)  # the face is large enough to crop
    for i in demo.no_face_frames:
        assert faces(decoded[i]) == [], i


def test_audio_is_speech_like_and_covers_the_video(built):
    out, demo = built
    for wav, video in [(demo.audio, demo.video), (out / "demo_2997.wav", out / "demo_2997.mp4")]:
        info, duration = probe_audio(wav), probe_video(video).duration
        assert (info.sample_rate, info.channels, info.codec) == (16000, 1, "pcm_s16le")
        assert duration <= info.duration < duration + 0.05
    with wave.open(str(demo.audio)) as w:
        samples = np.frombuffer(w.readframes(w.getnframes()), "<i2").astype(np.float64) / 32768
    rms = np.sqrt(
        np.mean(samples[: len(samples) // 800 * 800].reshape(-1, 800) ** 2, axis=1)
    )  # 50 ms windows
    silent = rms < 0.01
    assert 0.15 < silent.mean() < 0.6  # pauses between syllables and words, but mostly voiced
    assert np.abs(samples).max() > 0.5
    loud = int(np.argmax(rms)) * 800
    window = samples[loud : loud + 1600] - samples[loud : loud + 1600].mean()
    corr = np.correlate(window, window, "full")[len(window) - 1 :]
    lag = 16000 // 250 + int(np.argmax(corr[16000 // 250 : 16000 // 90]))  # search 90-250 Hz
    assert 115 <= 16000 / lag <= 190


def test_generation_is_deterministic(built, decoded, tmp_path):
    again = make_demo_media(tmp_path)
    info = probe_video(again.video)
    assert info.frame_count == len(decoded)
    assert all(
        np.array_equal(a, b) for a, b in zip(read_frames(info, 0, info.frame_count), decoded, strict=True)
    )
    assert again.audio.read_bytes() == built[1].audio.read_bytes()
    assert np.array_equal(demo_frame(1.23, 4.0, (256, 256)), demo_frame(1.23, 4.0, (256, 256)))
    assert np.array_equal(speech_like(1.0, seed=3), speech_like(1.0, seed=3))


def test_ensure_is_idempotent_and_repairs(tmp_path):
    first = ensure_demo_media(tmp_path)
    stamp = first.video.stat().st_mtime_ns
    assert ensure_demo_media(tmp_path) == first and first.video.stat().st_mtime_ns == stamp
    (tmp_path / "demo_2997.mp4").unlink()
    ensure_demo_media(tmp_path)
    assert probe_video(tmp_path / "demo_2997.mp4").frame_count == 120
    leftovers = [p.name for p in tmp_path.iterdir() if p.name.startswith(".") and p.name != ".demo-media"]
    assert leftovers == []  # no temporaries


def test_refuses_a_users_directory_and_keeps_their_demo(tmp_path):
    from shards.errors import ConfigError

    (tmp_path / "demo.mp4").write_bytes(b"my own clip")
    for call in (ensure_demo_media, make_demo_media):
        with pytest.raises(ConfigError, match=f"make_demo_media refuses to write into {tmp_path}"):
            call(tmp_path)
    assert [p.name for p in tmp_path.iterdir()] == ["demo.mp4"]
    assert (tmp_path / "demo.mp4").read_bytes() == b"my own clip"


def test_builds_beside_other_files_it_would_not_replace(tmp_path):
    """An unmarked directory holding only other things (here the benchmark clips' folder and a note) is
    used; those stay as they were."""
    (tmp_path / "bench").mkdir()
    (tmp_path / "bench" / "clip.mp4").write_bytes(b"bench clip")
    (tmp_path / "notes.txt").write_text("mine")
    demo = ensure_demo_media(tmp_path)
    assert probe_video(demo.video).frame_count == 100
    assert (tmp_path / "bench" / "clip.mp4").read_bytes() == b"bench clip"
    assert (tmp_path / "notes.txt").read_text() == "mine"
