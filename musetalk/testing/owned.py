"""Directories a generator owns. A generator writes a marker file into every directory it creates and
only ever deletes or writes into a directory that is empty or carries its marker: a user's files are
never removed or overwritten, whatever path the generator is pointed at."""

from __future__ import annotations

import logging
import shutil
from collections.abc import Iterable
from pathlib import Path

from shards.errors import ConfigError

logger = logging.getLogger(__name__)


def check_owned(directory: Path, marker: str, tool: str, fix: str) -> None:
    """Raise ConfigError unless ``directory`` is absent, empty, or a directory carrying ``marker``.

    ``tool`` names the generator, ``fix`` says how to point it elsewhere (both go into the one-line message).
    """
    directory = Path(directory)
    if not directory.exists():
        return
    if not directory.is_dir():
        raise ConfigError(f"{tool} needs a directory but {directory} is a file; {fix}")
    if (directory / marker).is_file():
        return
    if any(directory.iterdir()):
        raise ConfigError(
            f"{tool} refuses to write into {directory}: it holds files {tool} did not make "
            f"(no {marker} marker); {fix}"
        )


def claim(directory: Path, marker: str, tool: str, fix: str, writes: Iterable[str] | None = None) -> Path:
    """Create ``directory`` (or adopt it when empty) and mark it as ``tool``'s; refuse a user's directory.

    ``writes``: for a generator that only adds files (it deletes nothing), the names it will write. An
    unmarked directory is then also adopted when none of those names is there (a benchmark clip beside
    the demo is no reason to refuse), and refused when one is (it would be replaced).
    """
    directory = Path(directory)
    if writes is not None and directory.is_dir() and not (directory / marker).is_file():
        taken = sorted(name for name in writes if (directory / name).exists())
        if taken:
            raise ConfigError(
                f"{tool} refuses to write into {directory}: it holds {', '.join(taken)}, which {tool} did not "
                f"make (no {marker} marker); {fix}"
            )
    else:
        check_owned(directory, marker, tool, fix)
    directory.mkdir(parents=True, exist_ok=True)
    mark = directory / marker
    if not mark.exists():
        mark.write_text("incomplete\n")  # replaced by the generator's own stamp once its files are complete
    return directory


def remove_owned(directory: Path, marker: str, tool: str, fix: str) -> None:
    """Delete ``directory`` if it is ``tool``'s (marked) or empty; refuse (and delete nothing) otherwise."""
    directory = Path(directory)
    if directory.is_symlink():
        raise ConfigError(f"{tool} will not replace the symlink {directory} (nor what it points to); {fix}")
    check_owned(directory, marker, tool, fix)
    if directory.exists():
        logger.info("removing %s (made by %s)", directory, tool)
        shutil.rmtree(directory)
