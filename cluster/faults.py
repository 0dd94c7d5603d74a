"""Named fault-injection points: where tests stop a worker at a known point, to kill it, take its node
away or interrupt the driver there.

A point does nothing unless :data:`HOLD_ENV` names a directory. The variable is read where the point is
reached (in the worker), so it must be in the worker's environment: :func:`cluster.session.worker_env`
carries it from the driver to workers started after it was set. It changes no result, so it is not part
of any key (a warm pool started without it keeps running without it: a test that sets it discards the
warm pool first).
"""

from __future__ import annotations

import os
import time
from pathlib import Path

# With this set to a directory, a worker reaching point P creates ``held-P-<pid>`` there and waits until
# ``release-P`` or ``release-all`` appears (tests/helpers.py ``held`` lists who is held).
HOLD_ENV = "MUSETALK_HOLD_DIR"

_POLL_SECONDS = 0.05


def env() -> dict[str, str]:
    """The fault-injection settings of this process that workers need in their environment."""
    hold = os.environ.get(HOLD_ENV)
    return {HOLD_ENV: hold} if hold else {}


def hold(point: str) -> None:
    """Wait at ``point`` (a unit's name, e.g. ``shard_00002``) while the hold directory says so."""
    root = os.environ.get(HOLD_ENV)
    if not root:
        return
    d = Path(root)
    (d / f"held-{point}-{os.getpid()}").touch()
    while not ((d / f"release-{point}").exists() or (d / "release-all").exists()):
        time.sleep(_POLL_SECONDS)
