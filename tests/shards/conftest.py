"""Media fixtures for the shards tests: small clips built once per test run with the bundled ffmpeg."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from shards.decode import read_frames
from shards.probe import probe_video
from tests.shards.media_clips import lavfi_video, remux, sine_audio


@pytest.fixture(scope="session")
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


@pytest.fixture(scope="session")
def source_frames(clips) -> list[np.ndarray]:
    info = probe_video(clips["cfr"])
    return list(read_frames(info, 0, info.frame_count))
