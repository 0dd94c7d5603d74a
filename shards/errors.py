"""Domain exceptions shared by every layer.

Each carries a one-line message that names the problem and the fix; the CLI prints
``str(err)`` and exits non-zero. Nothing here imports anything heavy.
"""

from __future__ import annotations


class FarmError(Exception):
    """Base class: an expected failure with a user-facing one-line message."""

    exit_code = 1


class InputError(FarmError):
    """A bad input file or value (missing, not media, no video/audio stream, ...)."""

    exit_code = 2


class ConfigError(FarmError):
    """An invalid configuration; the message lists every problem found."""

    exit_code = 2


class WeightsError(FarmError):
    """Missing or malformed model weights; the message names file, path and the fetch command."""

    exit_code = 3


class FFmpegError(FarmError):
    """An ffmpeg/codec failure; carries the argv and the tail of stderr."""

    exit_code = 4

    def __init__(self, message: str, cmd: list[str] | None = None, stderr: str = "") -> None:
        self.cmd = list(cmd or [])
        self.stderr = stderr
        tail = stderr.strip().splitlines()[-5:] if stderr else []
        detail = f" (command: {' '.join(self.cmd)})" if self.cmd else ""
        detail += f": {' | '.join(tail)}" if tail else ""
        super().__init__(message + detail)


class RenderError(FarmError):
    """A shard or job failed after its retries."""

    exit_code = 5


class Flagged(FarmError):
    """``qa.fail_on_flag``: a job (or some job of a batch or sweep) was flagged by the quality gate; its
    output was written all the same."""

    exit_code = 6


class Interrupted(FarmError):
    """The user stopped a render (Ctrl-C / SIGINT); finished work is kept for resume."""

    exit_code = 130


class StorageError(FarmError):
    """An object store could not be read or written (missing object or bucket, no credentials, a
    protocol whose fsspec package is not installed); the message names the URI and the fix."""

    exit_code = 2


class ClusterError(FarmError):
    """The Ray cluster to join could not be reached or joined in time; the message names the address,
    where it came from (``cluster.address`` or ``RAY_ADDRESS``) and what to check."""

    exit_code = 2
