"""The lip-sync scoring maths (musetalk/syncscore.py) on hand-built inputs, and the SyncNet loader."""

from __future__ import annotations

from fractions import Fraction

import numpy as np
import pytest
import torch

from musetalk.layout import ModelLayout
from musetalk.syncnet import SyncNet, load_syncnet
from musetalk.syncscore import (
    CropRect,
    ShardCropper,
    ShardSync,
    SyncPlan,
    crop,
    crop_rects,
    distances,
    job_scores,
    mfcc,
    sample_frames,
    scores,
    shard_sync,
    window_count,
)
from musetalk.testing.tiny_syncnet import write_tiny_syncnet
from shards.errors import WeightsError


def test_scores_on_hand_built_embeddings_with_a_known_offset():
    # 10 windows, 2-d embeddings; lip window k matches audio window k - 2 exactly (the picture lags by 2).
    audio = np.array([[float(k), 1.0] for k in range(10)])
    windows = np.arange(2, 10)
    lips = audio[windows - 2]
    dist = distances(lips, windows, audio, vshift=3)
    # offset index j pairs lip k with audio k + j - 3; j = 1 is audio k - 2: distance 0 (+ the eps term)
    assert dist[:, 1] == pytest.approx(np.full(8, np.sqrt(2) * 1e-6))
    # j = 3 (no shift): |(k-2, 1) - (k, 1)| = 2 for every window
    assert dist[:, 3] == pytest.approx(np.full(8, 2.0), abs=1e-5)
    s = scores(dist, vshift=3)
    assert s.offset == 3 - 1 == 2
    assert s.distance == pytest.approx(np.sqrt(2) * 1e-6, abs=1e-9)
    # the mean over windows per offset; the median of the 7 offsets minus the minimum
    mean = dist.mean(0)
    assert s.confidence == pytest.approx(float(np.median(mean)) - s.distance)
    assert s.windows == 8


def test_distances_pad_audio_with_zeros_outside_the_job():
    audio = np.array([[1.0, 0.0], [0.0, 1.0]])
    dist = distances(np.array([[3.0, 4.0]]), np.array([0]), audio, vshift=1)
    # j = 0 -> audio -1 (zero vector): |(3, 4)| = 5; j = 1 -> audio 0; j = 2 -> audio 1
    assert dist[0] == pytest.approx([5.0, np.hypot(2, 4), np.hypot(3, 3)], abs=1e-5)
    s = scores(dist, vshift=1)
    assert s.offset == 1 - 2 == -1
    assert s.distance == pytest.approx(np.hypot(3, 3), abs=1e-5)
    assert s.confidence == pytest.approx(np.hypot(2, 4) - np.hypot(3, 3), abs=1e-5)


def test_mfcc_matches_python_speech_features():
    psf = pytest.importorskip("python_speech_features")
    t = np.arange(16000 * 2) / 16000
    rng = np.random.default_rng(0)
    signal = (
        8000 * np.sin(2 * np.pi * 220 * t) + 3000 * np.sin(2 * np.pi * 1234 * t) + rng.normal(0, 500, t.size)
    )
    signal = np.round(signal).astype(np.int16)
    ours, theirs = mfcc(signal), psf.mfcc(signal, 16000)
    assert ours.shape == theirs.shape == (199, 13)  # 1 + ceil((32000 - 400) / 160)
    np.testing.assert_allclose(ours, theirs, rtol=1e-9, atol=1e-9)
    silence = np.zeros(1000, np.int16)  # zero energy: the eps floor, as theirs
    np.testing.assert_allclose(mfcc(silence), psf.mfcc(silence, 16000), rtol=1e-9, atol=1e-9)


def test_25_fps_sampling():
    assert sample_frames(50, Fraction(25)) == list(range(50))
    # 50 fps: every other frame; 2 s of output -> 50 samples
    assert sample_frames(100, Fraction(50)) == list(range(0, 100, 2))
    # 30 fps: k / 25 s is frame 1.2 k, nearest (ties to the earlier)
    assert sample_frames(30, Fraction(30))[:6] == [0, 1, 2, 4, 5, 6]
    assert len(sample_frames(30, Fraction(30))) == 25
    assert window_count(100, 16000 * 2) == 45  # min(100, 32000 // 640 = 50) - 5


def test_crop_rule_on_a_hand_made_box():
    frame = np.arange(60 * 80 * 3, dtype=np.uint8).reshape(60, 80, 3)
    rect = CropRect(cx=20.0, cy=10.0, bs=10.0)
    # by hand: bsi = int(18.0) = 18; padded rows int(28 - 10) = 18 .. int(28 + 18) = 46, i.e. frame rows
    # 0..28; columns int(38 - 14) = 24 .. int(38 + 14) = 52, frame columns 6..34
    padded = np.pad(frame, ((18, 18), (18, 18), (0, 0)), constant_values=110)
    want = padded[18:46, 24:52]
    assert (want == frame[0:28, 6:34]).all()
    import cv2

    np.testing.assert_array_equal(crop(frame, rect), cv2.resize(want, (224, 224)))
    # a box at the corner reads the 110 padding
    corner = CropRect(cx=2.0, cy=2.0, bs=10.0)
    want = padded[int(20 - 10) : int(20 + 18.0), int(20 - 14.0) : int(20 + 14.0)]
    assert (want[:8] == 110).all()
    np.testing.assert_array_equal(crop(frame, corner), cv2.resize(want, (224, 224)))


def test_crop_rects_median_filter_over_tracks_like_scipy():
    signal = pytest.importorskip("scipy.signal")
    rng = np.random.default_rng(1)
    boxes = []
    for _ in range(40):
        x, y, s = rng.uniform(50, 60), rng.uniform(40, 50), rng.uniform(10, 20)
        boxes.append((x - s, y - s * 1.2, x + s, y + s * 0.8))
    track = boxes[:17] + [None] + boxes[18:]  # a gap splits two tracks
    rects = crop_rects(track)
    assert rects[17] is None
    for part in (slice(0, 17), slice(18, 40)):
        b = np.array(track[part])
        s = signal.medfilt(np.maximum(b[:, 3] - b[:, 1], b[:, 2] - b[:, 0]) / 2, 13)
        x = signal.medfilt((b[:, 0] + b[:, 2]) / 2, 13)
        y = signal.medfilt((b[:, 1] + b[:, 3]) / 2, 13)
        got = rects[part]
        np.testing.assert_allclose([r.bs for r in got], s)
        np.testing.assert_allclose([r.cx for r in got], x)
        np.testing.assert_allclose([r.cy for r in got], y)


def _lips(windows: np.ndarray) -> np.ndarray:
    """A deterministic stand-in embedding: the mean colour of each frame of the window."""
    return np.asarray(windows, np.float64).mean(axis=(2, 3)).reshape(len(windows), -1)


def test_job_scores_do_not_depend_on_sharding():
    frames, fps = 60, Fraction(25)
    plan = SyncPlan(frames, fps, samples=frames * 640)
    rng = np.random.default_rng(2)
    video = rng.integers(0, 255, (frames, 40, 40, 3), dtype=np.uint8)
    boxes = {k: (5.0, 5.0, 30.0, 30.0) if k not in (20, 21) else None for k in range(frames)}
    audio = rng.normal(size=(plan.n_windows, 15))

    def run(cuts: list[int]):
        parts = []
        for a, b in zip(cuts, cuts[1:], strict=False):
            sp = plan.shard(a, b, boxes)
            cropper = ShardCropper(sp)
            for t in range(a, b):  # the compositor's callback, every output frame of the shard
                cropper(t, video[t])
            sync = ShardSync.from_bytes(shard_sync(sp, cropper.crops, _lips).to_bytes())
            parts.append(sync)
        return job_scores(plan, parts, _lips, audio)

    whole, split, tiny = run([0, frames]), run([0, 7, 9, 30, 33, frames]), run(list(range(0, frames + 1, 2)))
    assert whole.job is not None and whole.job.windows == plan.n_windows - 6  # windows 16..21 lack a face
    assert split == whole
    assert tiny == whole
    assert len(whole.seconds) == 3


def test_tiny_syncnet_loads_strictly_and_the_missing_file_says_how_to_fetch(tmp_path):
    layout = ModelLayout.at(tmp_path)
    with pytest.raises(WeightsError, match=r"syncnet_v2\.model.*download_models"):
        load_syncnet(layout)
    write_tiny_syncnet(layout, seed=0)
    scorer = load_syncnet(layout)
    emb = scorer.lips(np.zeros((3, 5, 224, 224, 3), np.uint8))
    assert emb.shape == (3, 64)
    assert scorer.audio(np.zeros((2, 13, 20), np.float32)).shape == (2, 64)
    # the real widths: the reference's key names and 13.6 M parameters
    real = SyncNet()
    keys = {k.split(".")[0] for k in real.state_dict()}
    assert keys == {"netcnnaud", "netfcaud", "netcnnlip", "netfclip"}
    assert sum(p.numel() for p in real.parameters()) == pytest.approx(13.6e6, rel=0.01)
    state = real.state_dict()
    state.pop("netfclip.3.bias")
    torch.save(state, layout.syncnet)
    with pytest.raises(WeightsError, match="netfclip.3.bias"):
        load_syncnet(layout)
