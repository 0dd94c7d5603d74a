"""Real-world media corpus, built with the bundled ffmpeg: probe, frame-exact decode and an end-to-end render.

Every clip shows ``skimage.data.astronaut()`` with its frame number written as ten black/white blocks in
the top band, so the frame a decoder hands out can be read back even through lossy codecs.
"""

from __future__ import annotations

import math
import subprocess
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path

import av
import cv2
import numpy as np
import pytest
import soundfile as sf

from shards.decode import count_frames, read_frames
from shards.errors import InputError
from shards.ffmpeg import ffmpeg_cmd, run_ffmpeg
from shards.probe import probe_video
from shards.stitch import count_packets
from tests.shards.media_clips import plain_decode, same_frames

WIDTH, HEIGHT, BITS, BAND = 160, 128, 10, 16


def source_frame(n: int) -> np.ndarray:
    """(HEIGHT, WIDTH, 3) uint8 BGR: the astronaut, with ``n`` in binary as blocks across the top band."""
    from skimage import data

    image = cv2.resize(data.astronaut()[:, :, ::-1], (WIDTH, HEIGHT), interpolation=cv2.INTER_AREA)
    block = WIDTH // BITS
    for bit in range(BITS):
        image[:BAND, bit * block : (bit + 1) * block] = 255 if n >> bit & 1 else 0
    return np.ascontiguousarray(image)


def frame_code(image: np.ndarray, rotation: int = 0) -> int:
    """The frame number written by ``source_frame`` (undoing a display rotation first)."""
    upright = np.rot90(image, k=rotation // 90)
    block = WIDTH // BITS
    means = [upright[2 : BAND - 2, b * block + 2 : (b + 1) * block - 2].mean() for b in range(BITS)]
    return sum(1 << b for b, m in enumerate(means) if m > 128)


def encode(path: Path, frames: int, rate: str, *args: str) -> Path:
    """Encode ``frames`` source frames at ``rate`` with ffmpeg output ``args``."""
    raw = b"".join(source_frame(n).tobytes() for n in range(frames))
    cmd = ffmpeg_cmd(["-y", "-f", "rawvideo", "-pix_fmt", "bgr24", "-s", f"{WIDTH}x{HEIGHT}",
                      "-framerate", rate, "-i", "pipe:0", *args, str(path)])  # fmt: skip
    subprocess.run(cmd, input=raw, check=True, capture_output=True)
    return path


# --------------------------------------------------------------------------- DivX-style packed B-frames

_VOP = b"\x00\x00\x01\xb6"
# MPEG-4 user data as DivX 5 writes it; the trailing "p" tells decoders the B-frames are packed.
_DIVX_PACKED = b"\x00\x00\x01\xb2DivX503b1393p"


def _vop_type(data: bytes) -> str:
    at = data.find(_VOP)
    return "IPBS"[data[at + 4] >> 6]


def pack_bframes(src: Path, dst: Path) -> Path:
    """The inverse of ffmpeg's ``mpeg4_unpack_bframes``: an AVI as DivX 5 / Xvid wrote them.

    Each anchor frame shares its chunk with the first B-frame after it in coded order, later B-frames get
    their own chunk, and a small placeholder (an "N-VOP", which the decoder skips) keeps one chunk per frame.
    """
    with av.open(str(src)) as inp:
        stream = inp.streams.video[0]
        packets = [(bytes(p), p.is_keyframe) for p in inp.demux(stream) if p.size]
        chunks: list[tuple[bytes, bool]] = []
        i = 0
        while i < len(packets):
            data, key = packets[i]
            if key:
                at = data.find(_VOP)
                data = data[:at] + _DIVX_PACKED + data[at:]
            j = i + 1
            while j < len(packets) and _vop_type(packets[j][0]) == "B":
                j += 1
            bframes = [p for p, _ in packets[i + 1 : j]]
            if bframes:
                chunks += [
                    (data + bframes[0], key),
                    *((b, False) for b in bframes[1:]),
                    (_VOP + b"\x7f\xff", False),
                ]
            else:
                chunks.append((data, key))
            i = j
        with av.open(str(dst), "w", format="avi") as out:
            ostream = out.add_stream_from_template(stream)
            for n, (data, key) in enumerate(chunks):
                packet = av.Packet(data)
                packet.stream, packet.pts, packet.dts, packet.time_base = ostream, n, n, stream.time_base
                packet.is_keyframe = key
                out.mux(packet)
    return dst


# --------------------------------------------------------------------------- the corpus


@dataclass(frozen=True)
class Case:
    name: str
    rate: Fraction  # the exact input rate probe must report
    first_code: int = 0  # the source frame the first output frame shows
    rotation: int = 0
    vfr: bool = False
    max_error: float = 12.0  # mean absolute difference from the source frame it shows
    extra: dict = field(default_factory=dict)


def _decoded_pts(path: Path) -> list[int | None]:
    with av.open(str(path)) as container:
        return [f.pts for f in container.decode(video=0)]


def _build(d: Path) -> dict[str, tuple[Case, Path]]:
    n = 40
    x264 = [
        "-c:v",
        "libx264",
        "-preset",
        "ultrafast",
        "-crf",
        "20",
        "-g",
        "12",
        "-bf",
        "3",
        "-pix_fmt",
        "yuv420p",
    ]
    cases: dict[str, tuple[Case, Path]] = {}

    plain = encode(d / "xvid.avi", n, "2997/125", "-c:v", "mpeg4", "-q:v", "3", "-bf", "2", "-g", "12",
                   "-vtag", "XVID")  # fmt: skip
    cases["avi_mpeg4_packed_b"] = (
        Case("avi_mpeg4_packed_b", Fraction(2997, 125)),
        pack_bframes(plain, d / "packed.avi"),
    )
    cases["avi_mjpeg"] = (
        Case("avi_mjpeg", Fraction(25)),
        encode(d / "mjpeg.avi", n, "25", "-c:v", "mjpeg", "-q:v", "3", "-pix_fmt", "yuvj420p"),
    )
    cases["mkv_vfr"] = (
        Case("mkv_vfr", Fraction(25), vfr=True),
        encode(d / "vfr.mkv", 50, "25", "-vf",
               r"select='not(eq(mod(n\,5)\,2))',settb=1/90000,setpts='(N+0.35*sin(N))/25/TB'",
               "-fps_mode", "passthrough", "-enc_time_base", "1/90000", *x264),
    )  # fmt: skip
    upright = encode(d / "upright.mp4", n, "30000/1001", *x264)
    rotated = d / "rotated.mov"
    run_ffmpeg(
        ["-y", "-display_rotation", "90", "-i", str(upright), "-c", "copy", str(rotated)], what="rotating"
    )
    cases["mov_rotation"] = (Case("mov_rotation", Fraction(30000, 1001), rotation=270), rotated)
    cases["ts_start_offset"] = (
        Case("ts_start_offset", Fraction(25)),
        encode(d / "offset.ts", n, "25", *x264, "-output_ts_offset", "7.5"),
    )
    cases["webm_vp9"] = (
        Case("webm_vp9", Fraction(24)),
        encode(d / "vp9.webm", n, "24", "-c:v", "libvpx-vp9", "-deadline", "realtime", "-cpu-used", "8",
               "-b:v", "600k", "-g", "12"),
    )  # fmt: skip
    full = encode(d / "full.mp4", n, "25", *x264)
    edited = d / "edit_list.mp4"
    run_ffmpeg(
        ["-y", "-ss", "0.2", "-i", str(full), "-c", "copy", str(edited)], what="cutting with an edit list"
    )
    cases["mp4_edit_list"] = (Case("mp4_edit_list", Fraction(25), first_code=5), edited)
    whole = encode(d / "whole.avi", 60, "25", "-c:v", "mpeg4", "-q:v", "3", "-bf", "0", "-g", "10")
    cut = d / "truncated.avi"
    data = whole.read_bytes()
    cut.write_bytes(data[: int(len(data) * 0.6)])
    cases["avi_truncated"] = (Case("avi_truncated", Fraction(25), extra={"header_frames": 60}), cut)
    cases["mp4_full_range"] = (
        Case("mp4_full_range", Fraction(25)),
        encode(d / "full_range.mp4", n, "25", *x264[:-1], "yuvj420p"),
    )
    cases["mkv_10bit"] = (
        Case("mkv_10bit", Fraction(25)),
        encode(d / "10bit.mkv", n, "25", *x264[:-1], "yuv420p10le"),
    )
    return cases


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> dict[str, tuple[Case, Path]]:
    return _build(tmp_path_factory.mktemp("corpus"))


NAMES = [
    "avi_mpeg4_packed_b",
    "avi_mjpeg",
    "mkv_vfr",
    "mov_rotation",
    "ts_start_offset",
    "webm_vp9",
    "mp4_edit_list",
    "avi_truncated",
    "mp4_full_range",
    "mkv_10bit",
]


def test_each_case_really_has_its_quirk(corpus):
    """The corpus is what it claims: checked on the files themselves, not through the code under test."""
    pts = _decoded_pts(corpus["avi_mpeg4_packed_b"][1])
    assert any(b < a for a, b in zip(pts, pts[1:], strict=False)), pts  # decode-order timestamps
    with av.open(str(corpus["avi_mjpeg"][1])) as c:
        assert c.streams.video[0].codec_context.name == "mjpeg"
    vfr_pts = _decoded_pts(corpus["mkv_vfr"][1])
    assert len(set(np.diff(vfr_pts))) > 1
    with av.open(str(corpus["ts_start_offset"][1])) as c:
        assert c.start_time / av.time_base > 7
    with av.open(str(corpus["webm_vp9"][1])) as c:
        assert c.streams.video[0].codec_context.name == "vp9"
    with av.open(str(corpus["mp4_edit_list"][1])) as c:
        packets = [p for p in c.demux(video=0) if p.size]
        assert any(p.is_discard or (p.pts is not None and p.pts < 0) for p in packets)
    with av.open(str(corpus["avi_truncated"][1])) as c:
        assert c.streams.video[0].frames == 60  # the header still claims every frame
    assert count_frames(corpus["avi_truncated"][1]) < 60
    with av.open(str(corpus["mp4_full_range"][1])) as c:
        frame = next(c.decode(video=0))
        assert frame.color_range == 2  # JPEG / full range
    with av.open(str(corpus["mkv_10bit"][1])) as c:
        assert next(c.decode(video=0)).format.name.startswith("yuv420p10")


def _vfr_codes(path: Path, fps: Fraction, frame_count: int) -> list[int]:
    """Independent reference for VFR: output i shows the last decoded frame whose time is <= i / fps."""
    with av.open(str(path)) as c:
        time_base = Fraction(c.streams.video[0].time_base)
    decoded = plain_decode(path)
    t0 = decoded[0][0]
    tol = min(time_base, 1 / (2 * fps))
    times = [(pts - t0) * time_base for pts, _ in decoded]
    return [
        frame_code(decoded[max(k for k, t in enumerate(times) if t <= Fraction(i) / fps + tol)][1])
        for i in range(frame_count)
    ]


@pytest.mark.parametrize("name", NAMES)
def test_probe_and_decode(corpus, name):
    case, path = corpus[name]
    info = probe_video(path)
    assert info.fps == case.rate and isinstance(info.fps, Fraction)
    assert info.rotation == case.rotation and info.vfr == case.vfr
    full = list(read_frames(info, 0, info.frame_count))
    assert len(full) == info.frame_count
    codes = [frame_code(f, case.rotation) for f in full]
    if case.vfr:
        assert codes == _vfr_codes(path, info.fps, info.frame_count)
    else:
        assert info.frame_count == count_frames(path)
        assert codes == list(range(case.first_code, case.first_code + info.frame_count))
    if "header_frames" in case.extra:
        assert info.frame_count < case.extra["header_frames"]
    for image, code in zip(full, codes, strict=True):
        source = np.rot90(source_frame(code), k=-(case.rotation // 90))
        assert np.abs(image.astype(np.int16) - source).mean() < case.max_error
    # Mid-file seeks land on the same frames as the sequential decode, bit for bit.
    count = info.frame_count
    for start, end in [(count // 2 + 1, count), (count // 3, count // 3 + 5), (count - 1, count), (1, 3)]:
        assert same_frames(list(read_frames(info, start, end)), full[start:end]), (start, end)


def test_not_media_and_nothing_decodable_give_one_line_input_errors(tmp_path):
    text = tmp_path / "notes.avi"
    text.write_text("not a video\n")
    whole = encode(tmp_path / "whole.mkv", 10, "25", "-c:v", "libx264", "-preset", "ultrafast")
    data = whole.read_bytes()
    header_only = tmp_path / "header_only.mkv"  # headers and the start of the first cluster, no whole frame
    header_only.write_bytes(data[: data.find(b"\x1f\x43\xb6\x75") + 40])
    for path, needle in [(text, "not a media file"), (header_only, "no decodable frames")]:
        with pytest.raises(InputError) as err:
            probe_video(path)
        assert needle in str(err.value) and str(path) in str(err.value) and "\n" not in str(err.value)


# --------------------------------------------------------------------------- end to end


@pytest.fixture(scope="module")
def box_pipeline(tiny_models):
    from musetalk.config import FaceConfig, PipelineConfig
    from musetalk.pipeline import FramePipeline

    cfg = PipelineConfig(
        models_dir=str(tiny_models), tiny=True, batch_size=4, face=FaceConfig(detector="haar", crop="box")
    )
    return FramePipeline(cfg)


@pytest.fixture(scope="module")
def one_second_wav(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("audio") / "speech.wav"
    t = np.arange(16000) / 16000
    sf.write(
        path, (0.3 * np.sin(2 * np.pi * 220 * t) * (1 + np.sin(2 * np.pi * 3 * t))).astype(np.float32), 16000
    )
    return path


@pytest.mark.slow
@pytest.mark.parametrize("name", NAMES)
def test_renders_end_to_end(corpus, box_pipeline, one_second_wav, tmp_path, name):
    from musetalk.local import render_local

    case, path = corpus[name]
    out = tmp_path / "out.mp4"
    result = render_local(path, one_second_wav, out, box_pipeline.cfg, pipeline=box_pipeline)
    expected = math.floor(1 * case.rate)
    assert result.plan.output_frames == expected
    assert count_packets(out) == expected
    rendered = probe_video(out)
    assert rendered.fps == case.rate and rendered.frame_count == expected and not rendered.vfr
