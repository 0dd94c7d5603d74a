"""Write random-weight stand-ins for every model, in the official on-disk formats.

``python -m scripts.make_tiny_models --dir models/tiny [--seed 0] [--full-size]``. A command line over
:mod:`musetalk.testing.tiny_models`; ``--full-size`` writes the real architectures (a ~4 GB set) with
random weights, for benchmarks on machines that cannot download weights.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from musetalk.testing.tiny_models import make_tiny_models
from shards.errors import FarmError


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
