"""Write random-weight stand-ins for every model, in the official on-disk formats.

Deterministic from the seed. The files load through the same loaders as the real weights; tests and the
offline demo use the tiny set. ``full_size=True`` writes the real architectures instead (a ~4 GB set,
mostly the 3.4 GB UNet): random weights with the real per-frame compute, for benchmarks on machines that
cannot download weights. Command line: ``python -m scripts.make_tiny_models``.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from pathlib import Path

from musetalk.layout import ModelLayout
from musetalk.testing.owned import check_owned, remove_owned

logger = logging.getLogger(__name__)

# Bump when the stand-ins change shape, so stale directories are rebuilt.
TINY_VERSION = "2"
MARKER = ".tiny-models"  # in every directory this tool makes; it replaces no directory without it
TOOL = "make_tiny_models"  # the command line's name, in refusals
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
    from musetalk.testing.tiny_audio import write_tiny_whisper
    from musetalk.testing.tiny_blend import write_tiny_blend_models
    from musetalk.testing.tiny_faces import write_tiny_face_models
    from musetalk.testing.tiny_generation import write_tiny_unet, write_tiny_vae
    from musetalk.testing.tiny_syncnet import write_tiny_syncnet

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
            write_tiny_syncnet,
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
