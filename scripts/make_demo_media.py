"""Build the bundled demo clip from a photograph shipped in scikit-image (offline, deterministic).

``python -m scripts.make_demo_media --out media [--force]`` writes ``demo.mp4`` (25 fps) + ``demo.wav`` and the
29.97 fps variant ``demo_2997.mp4`` + ``demo_2997.wav``. A command line over :mod:`musetalk.testing.demo_media`.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from musetalk.testing.demo_media import ensure_demo_media
from shards.errors import FarmError

logger = logging.getLogger(__name__)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("media"), help="output directory (default: media)")
    parser.add_argument("--force", action="store_true", help="rebuild even when the files are present")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        demo = ensure_demo_media(args.out, force=args.force)
    except FarmError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(err.exit_code)
    logger.info("demo clip: %s + %s, %d frames at %s fps", demo.video, demo.audio, demo.frames, demo.fps)


if __name__ == "__main__":
    main()
