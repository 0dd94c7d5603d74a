"""shards.segment: encoding BGR frames into lossless and lossy segments."""

from __future__ import annotations

from fractions import Fraction

import numpy as np
import pytest

from shards.decode import count_frames, read_frames
from shards.probe import probe_video
from shards.segment import AVSegmentWriter, EncodeSettings, SegmentWriter, encode_segment
from tests.shards.media_clips import same_frames

LOSSLESS = EncodeSettings(lossless=True, gop=12)
LOSSY = EncodeSettings(crf=18, gop=12)


def test_odd_sizes_pad_for_yuv420p_and_stay_exact_when_lossless(tmp_path):
    rng = np.random.default_rng(0)
    frames = [rng.integers(0, 256, (47, 65, 3), dtype=np.uint8) for _ in range(4)]
    encode_segment(frames, tmp_path / "lossless.mkv", Fraction(25), LOSSLESS)
    info = probe_video(tmp_path / "lossless.mkv")
    assert same_frames(list(read_frames(info, 0, 4)), frames)
    yy, xx = np.mgrid[0:47, 0:65]
    smooth = [
        np.stack([xx * 3, yy * 4, np.full_like(xx, 60 + 40 * i)], axis=-1).astype(np.uint8) for i in range(4)
    ]
    encode_segment(smooth, tmp_path / "lossy.mkv", Fraction(25), LOSSY)
    info = probe_video(tmp_path / "lossy.mkv")
    assert (info.width, info.height) == (66, 48)  # padded by one replicated column and row
    for decoded, frame in zip(read_frames(info, 0, 4), smooth, strict=True):
        assert np.abs(decoded[:47, :65].astype(np.int16) - frame).mean() < 4
        assert np.abs(decoded[47, :65].astype(np.int16) - frame[46]).mean() < 5
        assert np.abs(decoded[:47, 65].astype(np.int16) - frame[:, 64]).mean() < 5


def test_segment_writer_validates_and_cleans_up(tmp_path):
    path = tmp_path / "seg.mkv"
    writer = SegmentWriter(path, 32, 24, Fraction(25), LOSSY)
    with pytest.raises(ValueError, match="uint8 BGR"):
        writer.write(np.zeros((24, 32, 3), np.float32))
    with pytest.raises(ValueError, match="uint8 BGR"):
        writer.write(np.zeros((32, 24, 3), np.uint8))
    writer.abort()
    assert not path.exists()
    with pytest.raises(RuntimeError, match="boom"), SegmentWriter(path, 32, 24, Fraction(25), LOSSY) as w:
        w.write(np.zeros((24, 32, 3), np.uint8))
        raise RuntimeError("boom")
    assert not path.exists()
    with SegmentWriter(path, 32, 24, Fraction(30000, 1001), LOSSY) as w:
        for _ in range(3):
            w.write(np.zeros((24, 32, 3), np.uint8))
        assert w.close() == 3
    assert probe_video(path).fps == Fraction(30000, 1001) and count_frames(path) == 3


@pytest.mark.parametrize("writer", [SegmentWriter, AVSegmentWriter], ids=["ffmpeg", "pyav"])
def test_both_writers_keep_lossless_frames_exact_and_check_their_input(writer, tmp_path):
    """The ffmpeg-pipe writer and the in-process PyAV one (machines without an ffmpeg binary) share one
    frame check and padding rule, and both keep lossless frames bit-exact."""
    rng = np.random.default_rng(1)
    frames = [rng.integers(0, 256, (47, 65, 3), dtype=np.uint8) for _ in range(3)]
    path = tmp_path / f"{writer.__name__}.mkv"
    with writer(path, 65, 47, Fraction(25), LOSSLESS) as w:
        for frame in frames:
            w.write(frame)
        with pytest.raises(ValueError, match="uint8 BGR"):
            w.write(np.zeros((47, 65, 3), np.float32))
    assert same_frames(list(read_frames(probe_video(path), 0, 3)), frames)
    with pytest.raises(RuntimeError, match="boom"), writer(path, 65, 47, Fraction(25), LOSSY) as w:
        w.write(frames[0])
        raise RuntimeError("boom")
    assert not path.exists()
