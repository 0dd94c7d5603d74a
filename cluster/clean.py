"""``python -m cluster.clean OUTPUT [OUTPUT ...] [--unused]``: remove the kept segments of outputs.

A render keeps its finished segments beside its output (:mod:`cluster.rundir`), so a later render after a
revision renders only what changed. This is the explicit way to let them go: every kept segment of each
output, or with ``--unused`` only those its last render did not use. Each output's lock is taken first,
so a render of it that is running is never touched. Prints what it freed.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from cluster.rundir import RunDir, output_lock, run_dir_path
from shards.errors import FarmError


def clean(output: Path, unused: bool = False) -> int:
    """Remove ``output``'s kept segments (``unused``: those its last render did not use); bytes freed."""
    if not run_dir_path(output).exists():
        return 0  # nothing kept (the lock is taken only where there is something to remove)
    with output_lock(output):
        if not run_dir_path(output).exists():
            return 0
        run = RunDir.open(output, resume=True)
        before = run.size_bytes()
        if unused:
            run.landed(limit_mb=0.0, last_only=True)
        else:
            run.remove()
            return before
        return before - run.size_bytes()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m cluster.clean", description=__doc__.split("\n\n")[0])
    parser.add_argument("outputs", nargs="+", type=Path, help="output files whose kept segments to remove")
    parser.add_argument("--unused", action="store_true", help="keep the segments the last render used")
    args = parser.parse_args(argv)
    for output in args.outputs:
        try:
            freed = clean(output.expanduser().resolve(), args.unused)
        except (FarmError, OSError) as err:
            print(f"error: {output}: {err}", file=sys.stderr)
            return 2
        print(f"{output}: {freed / 1e6:.1f} MB of kept segments removed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
