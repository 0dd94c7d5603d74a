"""shards.stitch: concatenation by stream copy, audio mux, verification, nothing left on failure."""

from __future__ import annotations

from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import pytest

import shards.stitch as stitch
from shards.decode import count_frames, read_frames
from shards.errors import FFmpegError, InputError
from shards.probe import load_audio, probe_video
from shards.segment import EncodeSettings, encode_segment
from shards.stitch import concat_and_mux
from tests.shards.media_clips import same_frames, sine_audio

LOSSLESS = EncodeSettings(lossless=True, gop=12)
LOSSY = EncodeSettings(crf=18, gop=12)
SEGMENT_SIZES = (7, 13, 1, 2, 27)  # 50 frames; includes one- and two-frame segments


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
    real_count = stitch.count_packets
    monkeypatch.setattr(
        stitch, "count_packets", lambda path: 49 if Path(path).name == "output.mp4" else real_count(path)
    )
    with pytest.raises(FFmpegError, match="holds 49 frames"):
        concat_and_mux([segment], clips["tone"], out, Fraction(25), 50)
    assert not out.exists()
    assert list(out_dir.iterdir()) == [] if out_dir.exists() else True
