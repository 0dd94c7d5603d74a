"""Dub mode end to end, in process (musetalk.local.render_local): the demo clip on its own timeline with a
segments file of two ranges, each with its own audio; tiny models, Haar, lossless output."""

from __future__ import annotations

import json

import numpy as np
import pytest
import soundfile as sf

from musetalk.config import FaceConfig, PipelineConfig
from musetalk.local import render_local
from shards.dub import DubSettings
from shards.probe import load_audio, probe_video
from shards.segment import EncodeSettings
from tests.helpers import decode_all, trimmed_audio

RATE = 16000


def _tone(path, hz: float, seconds: float):
    t = np.arange(int(seconds * RATE)) / RATE
    sf.write(path, (0.5 * np.sin(2 * np.pi * hz * t)).astype(np.float32), RATE, subtype="FLOAT")
    return path


def _peak_hz(samples: np.ndarray) -> float:
    spectrum = np.abs(np.fft.rfft(samples * np.hanning(len(samples))))
    return float(np.fft.rfftfreq(len(samples), 1 / RATE)[np.argmax(spectrum)])


@pytest.fixture(scope="module")
def dubbed(tiny_models, demo_media, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("dub")
    _tone(tmp / "first take.wav", 440, 1.0)
    _tone(tmp / "second.wav", 1000, 2.0)
    segments = tmp / "segments.json"
    segments.write_text(
        json.dumps([
            {"start": 0.2, "end": "00:00:01.000", "face": "largest", "audio": "first take.wav"},
            {"start": "00:00:02,800", "end": 3.6, "audio": "second.wav", "offset": 0.5},
        ])
    )  # fmt: skip
    job_audio = trimmed_audio(demo_media.audio, tmp / "job.wav", 3.0)  # shorter than the 4 s picture
    cfg = PipelineConfig(
        models_dir=str(tiny_models), tiny=True, batch_size=4, face=FaceConfig(detector="haar", crop="box")
    )
    out = tmp / "dubbed.mp4"
    result = render_local(
        demo_media.video,
        job_audio,
        out,
        cfg,
        encode=EncodeSettings(lossless=True),
        shard_frames=40,
        dub=DubSettings(segments=segments),
    )
    return result, out


def test_dub_keeps_the_picture_and_lip_syncs_only_inside_the_ranges(dubbed, demo_media):
    result, out = dubbed
    source = decode_all(demo_media.video)
    rendered = decode_all(out)
    assert len(rendered) == len(source) == probe_video(demo_media.video).frame_count == 100
    inside = set(range(5, 25)) | set(range(70, 90))  # [0.2 s, 1 s) and [2.8 s, 3.6 s) at 25 fps
    assert [(s.start, s.end) for s in result.plan.shards] == [
        (0, 5),
        (5, 25),
        (25, 40),
        (40, 70),
        (70, 80),
        (80, 90),
        (90, 100),
    ]
    for t in range(100):
        if t not in inside:
            assert np.array_equal(rendered[t], source[t]), (
                f"frame {t} is outside every range: must pass through"
            )
    changed = sum(not np.array_equal(rendered[t], source[t]) for t in inside)
    assert changed > len(inside) // 2, "frames inside the ranges must be lip-synced"
    assert sum(s.face_frames for s in result.stats) == len(inside)  # the demo's face is in all of them


def test_dub_audio_lasts_the_picture_with_each_ranges_audio_in_place(dubbed):
    _, out = dubbed
    audio = load_audio(out, RATE)
    assert abs(len(audio) / RATE - 4.0) <= 1 / 25, "the muxed audio must last the picture within a frame"
    assert _peak_hz(audio[int(0.4 * RATE) : int(0.9 * RATE)]) == pytest.approx(440, abs=4)
    assert _peak_hz(audio[int(2.9 * RATE) : int(3.5 * RATE)]) == pytest.approx(1000, abs=4)
    speech = audio[int(1.2 * RATE) : int(1.8 * RATE)]  # the job's audio between the ranges
    assert np.sqrt(np.mean(speech**2)) > 0.01 and abs(_peak_hz(speech) - 440) > 10
    tail = audio[int(3.7 * RATE) : int(3.95 * RATE)]  # past the job's 3 s: padded with silence
    assert np.sqrt(np.mean(tail**2)) < 1e-3
