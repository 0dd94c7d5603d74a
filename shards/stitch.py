"""Stitching: concatenate segments by stream copy, encode the audio once, mux, verify, rename into place."""

from __future__ import annotations

import logging
import os
import tempfile
from fractions import Fraction
from pathlib import Path

from shards.errors import FFmpegError, InputError
from shards.ffmpeg import rate_arg, run_ffmpeg
from shards.probe import open_input, probe_audio, video_stream

logger = logging.getLogger(__name__)

# Sample rates the AAC encoder takes as they are; anything else is resampled to 48 kHz.
_AAC_RATES = (8000, 11025, 12000, 16000, 22050, 24000, 32000, 44100, 48000, 88200, 96000)


def _quote_concat(path: Path) -> str:
    return "'" + str(path).replace("'", "'\\''") + "'"


def count_packets(path: str | Path) -> int:
    """Video packets in ``path`` (demux only, no decode). H.264 here is one packet per frame, so for
    our segments and stream-copied outputs this is the frame count at a fraction of a decode's cost."""
    p = Path(path)
    with open_input(p, "video", "pass a video file") as container:
        stream = video_stream(container)
        if stream is None:
            raise InputError(f"video has no video stream: {p}; re-render it")
        return sum(1 for packet in container.demux(stream) if packet.size and not packet.is_discard)


def _check_segments(segments: list[Path]) -> int:
    """Every segment exists and shares the first one's codec and size; returns the total frame count."""
    if not segments:
        raise ValueError("concat_and_mux needs at least one segment")
    reference = None
    total = 0
    for seg in segments:
        with open_input(seg, "segment", "re-render this shard") as container:
            if not container.streams.video:
                raise InputError(f"segment has no video stream: {seg}; re-render this shard")
            stream = container.streams.video[0]
            params = (stream.codec_context.name, stream.codec_context.width, stream.codec_context.height)
            if reference is None:
                reference = params
            elif params != reference:
                raise InputError(
                    f"segment {seg} is {params}, the first segment is {reference}; "
                    "re-render every shard with the same encode settings"
                )
        total += count_packets(seg)
    return total


def concat_and_mux(
    segments: list[Path],
    audio: Path | None,
    output: Path,
    fps: Fraction,
    frame_count: int,
) -> Path:
    """Concatenate ``segments`` by stream copy, add ``audio`` (AAC, encoded once), verify, move to ``output``.

    The audio is trimmed or padded with silence to exactly ``frame_count / fps`` seconds. Video timestamps
    are rewritten to a clean constant ``fps`` grid. The result goes to a temporary name beside ``output`` and
    is renamed into place only after the frame count and the stream durations check out; on any failure
    nothing is left at ``output`` (a file already there is not touched). Segments are copied, never
    re-encoded, so they must share one encoder configuration.
    """
    fps = Fraction(fps)
    output = Path(output)
    segments = [Path(s) for s in segments]
    packets = _check_segments(segments)
    if packets != frame_count:
        raise FFmpegError(
            f"segments hold {packets} frames, expected {frame_count}; re-render the missing shards"
        )
    audio_args: list[str] = []
    inputs: list[str] = []
    if audio is not None:
        info = probe_audio(audio)
        rate = info.sample_rate if info.sample_rate in _AAC_RATES else 48000
        channels = min(max(info.channels, 1), 2)
        samples = round(frame_count * rate / fps)
        chain = (
            f"[1:a:0]aresample={rate},asetpts=N/SR/TB,apad=whole_len={samples},atrim=end_sample={samples},"
            f"asetpts=N/SR/TB[a]"
        )
        inputs = ["-i", str(audio)]
        audio_args = ["-filter_complex", chain, "-map", "[a]", "-c:a", "aac", "-b:a", "192k",
                      "-ac", str(channels)]  # fmt: skip
    output.parent.mkdir(parents=True, exist_ok=True)
    tb = 1 / fps
    with tempfile.TemporaryDirectory(prefix=f".{output.stem}.", dir=output.parent) as tmp:
        listing = Path(tmp) / "segments.ffconcat"
        listing.write_text(
            "ffconcat version 1.0\n" + "".join(f"file {_quote_concat(s.resolve())}\n" for s in segments)
        )
        partial = Path(tmp) / "output.mp4"
        run_ffmpeg(
            ["-y", "-f", "concat", "-safe", "0", "-i", str(listing), *inputs,
             "-map", "0:v:0", "-c:v", "copy", "-bsf:v", f"setts=pts=N:dts=N:duration=1:time_base={rate_arg(tb)}",
             "-time_base:v", rate_arg(tb), *audio_args, "-map_metadata", "-1", "-movflags", "+faststart",
             "-f", "mp4", str(partial)],
            what=f"concatenating {len(segments)} segments into {output}",
        )  # fmt: skip
        _verify_output(partial, fps, frame_count, with_audio=audio is not None)
        os.replace(partial, output)
    logger.info("wrote %s (%d frames at %s fps)", output, frame_count, fps)
    return output


def _verify_output(path: Path, fps: Fraction, frame_count: int, *, with_audio: bool) -> None:
    """Frame count == ``frame_count``; audio and video durations agree within one frame."""
    frames = count_packets(path)
    if frames != frame_count:
        raise FFmpegError(f"muxed output {path} holds {frames} frames, expected {frame_count}")
    with open_input(path, "output", "re-run the stitch") as container:
        video = container.streams.video[0]
        video_s = float(video.duration * video.time_base) if video.duration else frame_count / fps
        if abs(video_s - float(frame_count / fps)) > float(1 / (2 * fps)):
            raise FFmpegError(f"muxed video lasts {video_s:.4f} s, expected {float(frame_count / fps):.4f} s")
        if with_audio:
            if not container.streams.audio:
                raise FFmpegError(f"muxed output {path} lost its audio track")
            stream = container.streams.audio[0]
            audio_s = float(stream.duration * stream.time_base) if stream.duration else 0.0
            if abs(audio_s - video_s) > float(1 / fps):
                raise FFmpegError(f"muxed audio lasts {audio_s:.4f} s but the video {video_s:.4f} s")
