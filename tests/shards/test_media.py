"""shards.media against real ffmpeg/PyAV: frame-exact decode, exact rates, VFR, rotation, encode, concat, mux."""

from __future__ import annotations

import subprocess
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import pytest

import shards.media as media
from shards.errors import FFmpegError, InputError
from shards.media import (
    EncodeSettings,
    SegmentWriter,
    concat_and_mux,
    count_frames,
    encode_segment,
    ffmpeg_exe,
    load_audio,
    probe_audio,
    probe_video,
    read_frames,
    run_ffmpeg,
)

LOSSLESS = EncodeSettings(lossless=True, gop=12)
LOSSY = EncodeSettings(crf=18, gop=12)
SEGMENT_SIZES = (7, 13, 1, 2, 27)  # 50 frames; includes one- and two-frame segments


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


@pytest.fixture(scope="module")
def clips(tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("clips")
    cfr = lavfi_video(d / "cfr.mp4")
    ntsc = lavfi_video(d / "ntsc.mp4", size="64x48", rate="30000/1001", seconds=1.5)
    vfr = lavfi_video(
        d / "vfr.mp4",
        extra=["-vf", r"select='not(eq(mod(n\,5)\,2))',settb=1/90000,setpts='(N+0.35*sin(N))/25/TB'",
               "-fps_mode", "passthrough", "-enc_time_base", "1/90000"],
    )  # fmt: skip
    text = d / "notes.mp4"
    text.write_text("this is a text file, not a video\n")
    return {
        "cfr": cfr,
        "cfr_mkv": remux(cfr, d / "cfr.mkv"),
        "cfr_ts": remux(cfr, d / "cfr.ts"),
        "cfr_h264": remux(cfr, d / "cfr.h264"),  # a raw bitstream: no timestamps at all
        "ntsc": ntsc,
        "ntsc_mkv": remux(ntsc, d / "ntsc.mkv"),
        "vfr": vfr,
        "vfr_mkv": remux(vfr, d / "vfr.mkv"),
        "rot_ccw90": remux(cfr, d / "rot_ccw90.mp4", "-display_rotation", "90"),
        "rot_cw90": remux(cfr, d / "rot_cw90.mp4", "-display_rotation", "-90"),
        "rot_180": remux(cfr, d / "rot_180.mp4", "-display_rotation", "180"),
        "tone": sine_audio(d / "tone.wav", 1.3),
        "text": text,
    }


@pytest.fixture(scope="module")
def source_frames(clips) -> list[np.ndarray]:
    info = probe_video(clips["cfr"])
    return list(read_frames(info, 0, info.frame_count))


# --------------------------------------------------------------------------- probing and decoding


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


@pytest.mark.parametrize("name", ["ntsc", "ntsc_mkv"])
def test_2997_probes_to_an_exact_fraction(clips, name):
    info = probe_video(clips[name])
    assert info.fps == Fraction(30000, 1001) and isinstance(info.fps, Fraction)
    assert not info.vfr  # Matroska's 1 ms timestamps are rounded, not variable
    assert info.frame_count == count_frames(clips[name]) == 45
    assert info.duration == pytest.approx(45 * 1001 / 30000)
    full = list(read_frames(info, 0, info.frame_count))
    assert same_frames(list(read_frames(info, 17, 31)), full[17:31])


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


def test_audio_probe_and_load(clips):
    info = probe_audio(clips["tone"])
    assert (info.sample_rate, info.channels, info.codec) == (22050, 2, "pcm_s16le")
    assert info.duration == pytest.approx(1.3) == media.audio_duration(clips["tone"])
    samples = load_audio(clips["tone"], 16000)
    assert samples.dtype == np.float32 and samples.ndim == 1
    assert abs(len(samples) - 1.3 * 16000) <= 2 and np.abs(samples).max() <= 1.0
    spectrum = np.abs(np.fft.rfft(samples))
    assert np.argmax(spectrum) * 16000 / len(samples) == pytest.approx(440, abs=2)


# --------------------------------------------------------------------------- bad inputs


@pytest.mark.parametrize(
    ("call", "name", "needle"),
    [
        (probe_video, "missing", "video input not found"),
        (probe_video, "text", "video input is not a media file"),
        (probe_video, "tone", "video input has no video stream"),
        (probe_audio, "missing", "audio input not found"),
        (probe_audio, "text", "audio input is not a media file"),
        (probe_audio, "cfr", "audio input has no audio stream"),
        (load_audio, "cfr", "audio input has no audio stream"),
        (count_frames, "tone", "has no video stream"),
    ],
)
def test_bad_inputs_raise_one_line_input_errors(clips, tmp_path, call, name, needle):
    path = tmp_path / "nowhere.mp4" if name == "missing" else clips[name]
    with pytest.raises(InputError) as err:
        call(path)
    message = str(err.value)
    assert needle in message and str(path) in message and "\n" not in message


def test_ffmpeg_failures_carry_command_and_stderr(tmp_path, monkeypatch):
    with pytest.raises(FFmpegError) as err:
        run_ffmpeg(["-i", str(tmp_path / "absent.wav"), "-f", "null", "-"], what="reading a missing file")
    assert err.value.cmd[0] == ffmpeg_exe() and "absent.wav" in err.value.stderr
    monkeypatch.setenv(media.FFMPEG_ENV, str(tmp_path / "no-such-ffmpeg"))
    media.ffmpeg_exe.cache_clear()
    try:
        with pytest.raises(FFmpegError, match="MUSETALK_FFMPEG"):
            ffmpeg_exe()
    finally:
        monkeypatch.delenv(media.FFMPEG_ENV)
        media.ffmpeg_exe.cache_clear()


# --------------------------------------------------------------------------- encoding and stitching


def _segments(frames: list[np.ndarray], d: Path, settings: EncodeSettings, suffix: str) -> list[Path]:
    paths, at = [], 0
    for n, size in enumerate(SEGMENT_SIZES):
        path = d / f"seg{n:02d}{suffix}"
        assert encode_segment(frames[at : at + size], path, Fraction(25), settings) == size
        paths.append(path)
        at += size
    assert at == len(frames)
    return paths


def _coded_pictures(path: Path) -> list[list[bytes]]:
    """Per packet, its H.264 NAL units (4-byte length-prefixed) other than SPS/PPS.

    The concat demuxer re-inserts the parameter sets in-band at keyframes (its auto_convert); everything
    else must be the segments' bytes unchanged.
    """
    pictures = []
    with av.open(str(path)) as container:
        for packet in container.demux(video=0):
            data, nals, at = bytes(packet), [], 0
            while at < len(data):
                size = int.from_bytes(data[at : at + 4], "big")
                nal = data[at + 4 : at + 4 + size]
                if nal[0] & 0x1F not in (7, 8):
                    nals.append(nal)
                at += 4 + size
            if packet.size:
                pictures.append(nals)
    return pictures


@pytest.mark.parametrize("suffix", [".mkv", ".mp4"])
def test_lossless_segments_concatenate_bit_exactly(clips, source_frames, tmp_path, suffix):
    segments = _segments(source_frames, tmp_path, LOSSLESS, suffix)
    first = probe_video(segments[1])
    assert same_frames(list(read_frames(first, 0, first.frame_count)), source_frames[7:20])
    out = concat_and_mux(segments, clips["tone"], tmp_path / "out" / "final.mp4", Fraction(25), 50)
    assert out == tmp_path / "out" / "final.mp4"
    info = probe_video(out)
    assert (info.fps, info.frame_count, info.vfr, count_frames(out)) == (Fraction(25), 50, False, 50)
    assert same_frames(list(read_frames(info, 0, 50)), source_frames)
    assert [a.codec for a in info.audio] == ["aac"]
    assert sorted(p.name for p in out.parent.iterdir()) == ["final.mp4"]  # no temporary left behind


def test_lossy_segments_concatenate_by_stream_copy(clips, source_frames, tmp_path):
    segments = _segments(source_frames, tmp_path, LOSSY, ".mkv")
    out = concat_and_mux(segments, clips["tone"], tmp_path / "final.mp4", Fraction(25), 50)
    assert count_frames(out) == 50
    # Stream copy: the output's packets are the segments' packets, byte for byte.
    assert _coded_pictures(out) == [p for seg in segments for p in _coded_pictures(seg)]
    with av.open(str(out)) as container:
        stream = container.streams.video[0]
        pts = [p.pts for p in container.demux(stream) if p.size]
        assert stream.codec_context.pix_fmt == "yuv420p"
    assert len(set(np.diff(pts))) == 1  # an exact constant-rate grid across segment boundaries
    info = probe_video(out)
    decoded = list(read_frames(info, 0, 50))
    errors = [np.abs(a.astype(np.int16) - b).mean() for a, b in zip(decoded, source_frames, strict=True)]
    assert max(errors) < 6.0


@pytest.mark.parametrize(("audio_seconds", "frames"), [(1.3, 50), (3.0, 50), (2.0, 50)])
def test_muxed_audio_matches_video_length(clips, source_frames, tmp_path, audio_seconds, frames):
    tone = sine_audio(tmp_path / "tone.wav", audio_seconds, rate=44100, channels=1)
    segment = tmp_path / "all.mkv"
    encode_segment(source_frames, segment, Fraction(25), LOSSY)
    out = concat_and_mux([segment], tone, tmp_path / "final.mp4", Fraction(25), frames)
    with av.open(str(out)) as container:
        video, audio = container.streams.video[0], container.streams.audio[0]
        video_s = float(video.duration * video.time_base)
        audio_s = float(audio.duration * audio.time_base)
    assert video_s == pytest.approx(frames / 25)
    assert abs(audio_s - video_s) <= 1 / 25
    samples = load_audio(out, 16000)
    assert abs(len(samples) - frames / 25 * 16000) <= 16000 / 25
    if audio_seconds < frames / 25:  # padded with silence after the tone ends
        assert np.abs(samples[int((audio_seconds + 0.1) * 16000) :]).max() < 1e-3
        assert np.abs(samples[: int((audio_seconds - 0.1) * 16000)]).max() > 0.1


def test_video_only_output(source_frames, tmp_path):
    segment = tmp_path / "all.mkv"
    encode_segment(source_frames, segment, Fraction(25), LOSSY)
    out = concat_and_mux([segment], None, tmp_path / "final.mp4", Fraction(25), 50)
    info = probe_video(out)
    assert info.audio == () and info.frame_count == 50


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


def test_failing_concat_and_mux_leaves_nothing(clips, source_frames, tmp_path, monkeypatch):
    segment = tmp_path / "all.mkv"
    encode_segment(source_frames, segment, Fraction(25), LOSSY)
    out_dir = tmp_path / "out"
    out = out_dir / "final.mp4"
    with pytest.raises(FFmpegError, match="expected 51"):
        concat_and_mux([segment], clips["tone"], out, Fraction(25), 51)
    with pytest.raises(InputError, match="segment is not a media file"):
        concat_and_mux([segment, clips["text"]], clips["tone"], out, Fraction(25), 50)
    with pytest.raises(InputError, match="audio input has no audio stream"):
        concat_and_mux([segment], clips["cfr"], out, Fraction(25), 50)
    # A failure after ffmpeg has written the file (verification disagrees) removes it too.
    real_count = media.count_packets
    monkeypatch.setattr(
        media, "count_packets", lambda path: 49 if Path(path).name == "output.mp4" else real_count(path)
    )
    with pytest.raises(FFmpegError, match="holds 49 frames"):
        concat_and_mux([segment], clips["tone"], out, Fraction(25), 50)
    assert not out.exists()
    assert list(out_dir.iterdir()) == [] if out_dir.exists() else True
