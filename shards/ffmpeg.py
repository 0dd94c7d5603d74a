"""The ffmpeg binary: where it is, and running it with an argv list.

Every ffmpeg subprocess in the project goes through here (segments build their argv with ``ffmpeg_cmd``
and stream into it themselves). Failures raise FFmpegError carrying the argv and the tail of stderr.
There is no ffprobe on this machine: probing and decoding are PyAV's (``shards.probe``, ``shards.decode``).
"""

from __future__ import annotations

import functools
import logging
import os
import shutil
import subprocess
from fractions import Fraction

from shards.errors import FFmpegError

logger = logging.getLogger(__name__)

FFMPEG_ENV = "MUSETALK_FFMPEG"


@functools.cache
def ffmpeg_exe() -> str:
    """The ffmpeg binary: ``$MUSETALK_FFMPEG``, else ``ffmpeg`` on PATH, else imageio-ffmpeg's bundled one."""
    override = os.environ.get(FFMPEG_ENV)
    if override:
        found = shutil.which(override)
        if found is None:
            raise FFmpegError(
                f"{FFMPEG_ENV}={override} is not an executable; unset it or point it at an ffmpeg binary"
            )
        return found
    found = shutil.which("ffmpeg")
    if found is not None:
        return found
    import imageio_ffmpeg

    return imageio_ffmpeg.get_ffmpeg_exe()


def ffmpeg_cmd(args: list[str]) -> list[str]:
    """The full argv for ``args``: the binary and ``-nostdin -hide_banner -loglevel error`` prepended."""
    return [ffmpeg_exe(), "-nostdin", "-hide_banner", "-loglevel", "error", *args]


def rate_arg(rate: Fraction) -> str:
    """A rate or time base as ffmpeg's exact ``num/den`` argument."""
    rate = Fraction(rate)
    return f"{rate.numerator}/{rate.denominator}"


def _run(args: list[str], *, what: str, capture_stdout: bool) -> bytes:
    cmd = ffmpeg_cmd(args)
    logger.debug("running %s", cmd)
    try:
        proc = subprocess.run(
            cmd,
            stdout=subprocess.PIPE if capture_stdout else subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            check=False,
        )
    except OSError as err:
        raise FFmpegError(f"{what}: cannot run ffmpeg ({err})", cmd) from err
    if proc.returncode != 0:
        raise FFmpegError(
            f"{what} failed (exit {proc.returncode})", cmd, proc.stderr.decode(errors="replace")
        )
    return proc.stdout if capture_stdout else b""


def run_ffmpeg(args: list[str], *, what: str) -> None:
    """Run ffmpeg with ``args`` (see ``ffmpeg_cmd``); ``what`` names the step in error messages.

    Raises FFmpegError carrying the argv and the tail of stderr when it exits non-zero.
    """
    _run(args, what=what, capture_stdout=False)


def ffmpeg_stdout(args: list[str], *, what: str) -> bytes:
    """Like ``run_ffmpeg``, returning what ffmpeg wrote to stdout (e.g. ``-f f32le pipe:1``)."""
    return _run(args, what=what, capture_stdout=True)
