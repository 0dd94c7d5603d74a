"""Fetch every real weight file into the models layout (``python -m scripts.download_models --dir models``).

A command line over :func:`musetalk.download.download`: files already present with the right size are
skipped, so running it again is cheap and resumes an interrupted run.
"""

from __future__ import annotations

import argparse
import logging
import sys

from musetalk.download import GROUPS, download
from musetalk.layout import ModelLayout
from shards.errors import FarmError

log = logging.getLogger(__name__)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dir", default="models", help="models directory (default: models)")
    parser.add_argument("--only", default=None, help=f"comma-separated groups: {','.join(GROUPS)}")
    parser.add_argument("--dry-run", action="store_true", help="list what would be fetched and exit")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    only = [g.strip() for g in args.only.split(",") if g.strip()] if args.only else None
    try:
        download(ModelLayout.at(args.dir), only, dry_run=args.dry_run)
    except FarmError as err:
        log.error("error: %s", err)
        return err.exit_code
    return 0


if __name__ == "__main__":
    sys.exit(main())
