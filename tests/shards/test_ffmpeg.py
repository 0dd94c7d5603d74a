"""shards.ffmpeg: the binary lookup and the argv runner against the real ffmpeg."""

from __future__ import annotations

import pytest

from shards.errors import FFmpegError
from shards.ffmpeg import FFMPEG_ENV, ffmpeg_exe, run_ffmpeg


def test_ffmpeg_failures_carry_command_and_stderr(tmp_path, monkeypatch):
    with pytest.raises(FFmpegError) as err:
        run_ffmpeg(["-i", str(tmp_path / "absent.wav"), "-f", "null", "-"], what="reading a missing file")
    assert err.value.cmd[0] == ffmpeg_exe() and "absent.wav" in err.value.stderr
    monkeypatch.setenv(FFMPEG_ENV, str(tmp_path / "no-such-ffmpeg"))
    ffmpeg_exe.cache_clear()
    try:
        with pytest.raises(FFmpegError, match="MUSETALK_FFMPEG"):
            ffmpeg_exe()
    finally:
        monkeypatch.delenv(FFMPEG_ENV)
        ffmpeg_exe.cache_clear()
