"""Write random-weight stand-ins for every model, in the official on-disk formats.

``python -m scripts.make_tiny_models --dir models/tiny [--seed 0]``. Deterministic from the seed.
The files load through the same loaders as the real weights; tests and the offline demo use them.
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import tempfile
from pathlib import Path

from musetalk.layout import ModelLayout
from scripts.tiny_audio import write_tiny_whisper
from scripts.tiny_blend import write_tiny_blend_models
from scripts.tiny_faces import write_tiny_face_models
from scripts.tiny_generation import write_tiny_unet, write_tiny_vae

logger = logging.getLogger(__name__)

# Bump when the stand-ins change shape, so stale directories are rebuilt.
TINY_VERSION = "1"
MARKER = ".tiny-models"


def make_tiny_models(root: Path, seed: int = 0) -> Path:
    """Write every stand-in under ``root`` (built in a temporary sibling, then renamed into place)."""
    root = Path(root)
    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{root.name}-", dir=root.parent))
    try:
        layout = ModelLayout.at(tmp, tiny=True)
        for write in (
            write_tiny_unet,
            write_tiny_vae,
            write_tiny_whisper,
            write_tiny_face_models,
            write_tiny_blend_models,
        ):
            logger.info("writing %s", write.__name__.removeprefix("write_"))
            write(layout, seed)
        (tmp / MARKER).write_text(f"version={TINY_VERSION} seed={seed}\n")
        if root.exists():
            shutil.rmtree(root)
        os.replace(tmp, root)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return root


def ensure_tiny_models(root: Path, seed: int = 0) -> Path:
    """Make the stand-ins unless ``root`` already holds a complete set of this version and seed."""
    marker = Path(root) / MARKER
    if marker.exists() and marker.read_text().strip() == f"version={TINY_VERSION} seed={seed}":
        return Path(root)
    logger.info("generating tiny stand-in models in %s", root)
    return make_tiny_models(root, seed)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dir", type=Path, default=Path("models/tiny"))
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    print(make_tiny_models(args.dir, args.seed))


if __name__ == "__main__":
    main()
