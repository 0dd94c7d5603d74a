"""shards.decode against real files: frame-exact ranges equal a sequential decode, VFR, rotation."""

from __future__ import annotations

import subprocess
from fractions import Fraction

import av
import numpy as np
import pytest

from shards.decode import FrameStreams, count_frames, read_frames
from shards.ffmpeg import ffmpeg_exe
from shards.probe import probe_video
from tests.shards.media_clips import plain_decode, same_frames


@pytest.mark.parametrize("name", ["cfr", "cfr_mkv", "cfr_ts", "cfr_h264"])
def test_range_decode_equals_sequential_decode(clips, name):
    info = probe_video(clips[name])
    assert (info.width, info.height, info.fps, info.vfr, info.rotation) == (96, 64, Fraction(25), False, 0)
    assert info.frame_count == 50 == count_frames(clips[name])
    full = list(read_frames(info, 0, info.frame_count))
    assert same_frames(full, [img for _, img in plain_decode(clips[name])])
    # GOP 12: 5, 13, 23 and 30 start mid-GOP; 12 and 24 on a keyframe; 49..50 is the last frame.
    for start, end in [(0, 5), (5, 17), (12, 24), (13, 14), (23, 50), (30, 31), (49, 50), (50, 50)]:
        assert same_frames(list(read_frames(info, start, end)), full[start:end]), (start, end)
    frame = full[7]
    assert frame.dtype == np.uint8 and frame.shape == (64, 96, 3) and frame.flags["C_CONTIGUOUS"]


def test_read_frames_rejects_bad_ranges(clips):
    info = probe_video(clips["cfr"])
    for start, end in [(-1, 3), (5, 4), (0, 51)]:
        with pytest.raises(ValueError, match="outside"):
            read_frames(info, start, end)


@pytest.mark.parametrize("name", ["vfr", "vfr_mkv"])
def test_vfr_is_normalised_consistently(clips, name):
    info = probe_video(clips[name])
    assert info.vfr and info.fps == Fraction(25)
    decoded = plain_decode(clips[name])
    assert len(decoded) == 40  # every fifth frame of 50 dropped
    # Independent reference: output i shows the last frame whose time is <= i / fps (one-tick tolerance).
    with av.open(str(clips[name])) as c:
        time_base = Fraction(c.streams.video[0].time_base)
        last_duration = max((p.pts, p.duration) for p in c.demux(video=0) if p.size)[1] * time_base
    t0 = decoded[0][0]
    tol = min(time_base, 1 / (2 * info.fps))
    times = [(pts - t0) * time_base for pts, _ in decoded]
    assert info.frame_count == round((times[-1] + last_duration) * info.fps)
    mapping = [
        max(k for k, t in enumerate(times) if t <= Fraction(i) / info.fps + tol)
        for i in range(info.frame_count)
    ]
    assert len(set(mapping)) < len(mapping)  # the normalisation really repeats frames
    full = list(read_frames(info, 0, info.frame_count))
    assert same_frames(full, [decoded[k][1] for k in mapping])
    for start, end in [(3, 9), (14, 15), (20, info.frame_count), (info.frame_count - 3, info.frame_count)]:
        assert same_frames(list(read_frames(info, start, end)), full[start:end]), (start, end)


@pytest.mark.parametrize(
    ("name", "rotation", "k"), [("rot_ccw90", 270, 1), ("rot_cw90", 90, -1), ("rot_180", 180, 2)]
)
def test_rotated_video_decodes_upright(clips, source_frames, name, rotation, k):
    info = probe_video(clips[name])
    assert info.rotation == rotation
    assert (info.width, info.height) == ((64, 96) if rotation in (90, 270) else (96, 64))
    frames = list(read_frames(info, 0, info.frame_count))
    assert same_frames(frames, [np.ascontiguousarray(np.rot90(f, k=k)) for f in source_frames])
    assert same_frames(list(read_frames(info, 13, 20)), frames[13:20])
    # ffmpeg's own autorotation agrees on the orientation.
    raw = subprocess.run(
        [
            ffmpeg_exe(),
            "-v",
            "error",
            "-i",
            str(clips[name]),
            "-f",
            "rawvideo",
            "-pix_fmt",
            "bgr24",
            "pipe:1",
        ],
        capture_output=True,
        check=True,
    ).stdout
    reference = np.frombuffer(raw, np.uint8).reshape(-1, info.height, info.width, 3)
    assert len(reference) == len(frames)
    assert np.abs(reference.astype(np.int16) - np.stack(frames)).mean() < 1.0


@pytest.mark.parametrize("name", ["cfr", "cfr_h264", "vfr"])
def test_frame_streams_continue_a_decoder_across_consecutive_ranges(clips, name):
    """Consecutive ranges (mid-GOP boundaries included) continue one decoder and give read_frames' frames;
    a gap, an abandoned read or the end of the file opens a new one."""
    info = probe_video(clips[name])
    full = list(read_frames(info, 0, info.frame_count))
    streams = FrameStreams()
    got = []
    for start, end in [(0, 5), (5, 17), (17, 17), (17, 30)]:
        got += list(streams.read(info, start, end))
    assert streams.opened == 1 and same_frames(got, full[:30])
    assert same_frames(list(streams.read(info, 33, 36)), full[33:36]) and streams.opened == 2
    partial = streams.read(info, 36, 39)
    assert same_frames([next(partial)], full[36:37])
    partial.close()  # a reader that stopped early: its decoder is closed, not kept
    assert same_frames(list(streams.read(info, 37, info.frame_count)), full[37:]) and streams.opened == 3
    assert same_frames(list(streams.read(info, 30, 33)), full[30:33]) and streams.opened == 3  # kept at 30
    with pytest.raises(ValueError, match="outside"):
        streams.read(info, 0, info.frame_count + 1)
    streams.close()


def test_frame_streams_keep_a_bounded_number_of_idle_decoders(clips):
    info = probe_video(clips["cfr"])
    streams = FrameStreams(keep=2)
    for start in (0, 10, 20):
        list(streams.read(info, start, start + 2))
    assert streams.opened == 3
    list(streams.read(info, 2, 4))  # the oldest idle decoder (at 2) was closed when the third was kept
    assert streams.opened == 4
    list(streams.read(info, 22, 24))  # the newest is still there
    assert streams.opened == 4
    streams.close()
