"""Write random-weight stand-ins for every model, in the official on-disk formats.

``python -m scripts.make_tiny_models --dir models/tiny [--seed 0] [--full-size]``. Deterministic from the
seed. The files load through the same loaders as the real weights; tests and the offline demo use the
tiny set. ``--full-size`` writes the real architectures instead (a ~4 GB set, mostly the 3.4 GB UNet):
random weights with the real per-frame compute, for benchmarks on machines that cannot download weights.
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import sys
import tempfile
from pathlib import Path

from musetalk.layout import ModelLayout
from scripts.owned import check_owned, remove_owned
from shards.errors import FarmError

logger = logging.getLogger(__name__)

# Bump when the stand-ins change shape, so stale directories are rebuilt.
TINY_VERSION = "1"
MARKER = ".tiny-models"  # in every directory this tool makes; it replaces no directory without it
TOOL = "make_tiny_models"
FIX = "point models.dir (or --dir) at a new or empty directory"


def marker_text(seed: int, full_size: bool) -> str:
    """What the marker file holds for a complete set (full_size recorded: a tiny set never passes for full)."""
    return f"version={TINY_VERSION} seed={seed} full_size={int(full_size)}"


def make_tiny_models(root: Path, seed: int = 0, full_size: bool = False) -> Path:
    """Write every stand-in under ``root`` (built in a temporary sibling, then renamed into place).

    ``root`` must be absent, empty, or an earlier set (it carries the marker): a directory holding anything
    else is refused with a ConfigError before any file is written, and is never deleted.
    """
    root = Path(root)
    check_owned(root, MARKER, TOOL, FIX)
    # The writers import torch, diffusers and transformers (seconds): only once the directory is ours.
    from scripts.tiny_audio import write_tiny_whisper
    from scripts.tiny_blend import write_tiny_blend_models
    from scripts.tiny_faces import write_tiny_face_models
    from scripts.tiny_generation import write_tiny_unet, write_tiny_vae

    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{root.name}-", dir=root.parent))
    try:
        (tmp / MARKER).write_text("incomplete\n")  # a crash leaves a directory recognisably ours
        layout = ModelLayout.at(tmp, tiny=True)
        for write in (
            write_tiny_unet,
            write_tiny_vae,
            write_tiny_whisper,
            write_tiny_face_models,
            write_tiny_blend_models,
        ):
            logger.info("writing %s%s", write.__name__.removeprefix("write_"), " (full size)" * full_size)
            write(layout, seed, full_size=full_size)
        (tmp / MARKER).write_text(marker_text(seed, full_size) + "\n")
        remove_owned(root, MARKER, TOOL, FIX)  # checked again: only an earlier set (or nothing) goes
        os.replace(tmp, root)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return root


def ensure_tiny_models(root: Path, seed: int = 0, full_size: bool = False) -> Path:
    """Make the stand-ins unless ``root`` already holds a complete set of this version, seed and size."""
    marker = Path(root) / MARKER
    if marker.exists() and marker.read_text().strip() == marker_text(seed, full_size):
        return Path(root)
    logger.info("generating %s stand-in models in %s", "full-size" if full_size else "tiny", root)
    return make_tiny_models(root, seed, full_size)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dir", type=Path, default=Path("models/tiny"))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--full-size", action="store_true", help="the real architectures (~4 GB), for benchmarks"
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        print(make_tiny_models(args.dir, args.seed, args.full_size))
    except FarmError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(err.exit_code)


if __name__ == "__main__":
    main()
