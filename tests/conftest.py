"""Session fixtures: tiny models and demo media are built once per test run (never downloaded)."""

from __future__ import annotations

import os
import shutil
import signal
import tempfile
from pathlib import Path

import pytest
import torch

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
torch.set_num_threads(2)

# Every test run gets its own temp root (short: Ray puts unix sockets under it): worker scratch, Ray's
# session files and processes of one run never mix with another run's on the same machine.
_SESSION_TMP = tempfile.mkdtemp(prefix="mt", dir="/tmp")
os.environ["TMPDIR"] = _SESSION_TMP
tempfile.tempdir = None
# Staged inputs, synced weights and URI outputs (cluster/storage.py) go here, never under the home directory.
os.environ["MUSETALK_STAGING_DIR"] = os.path.join(_SESSION_TMP, "staging")
# The avatar cache of every render in this run (never the user's ~/.cache).
os.environ["MUSETALK_CACHE_DIR"] = os.path.join(_SESSION_TMP, "avatars")


# A suite started in the background by a non-interactive shell (`make test &`, a CI runner) inherits
# SIGINT ignored, and so would every CLI a test starts (an ignored signal survives exec): the Ctrl-C
# tests would wait on a process that never sees it. A handler is reset to the default across exec, so
# with one installed here each CLI starts with Python's own KeyboardInterrupt.
if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)


def pytest_unconfigure(config):
    shutil.rmtree(_SESSION_TMP, ignore_errors=True)


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory) -> Path:
    from musetalk.testing.tiny_models import make_tiny_models

    return make_tiny_models(tmp_path_factory.mktemp("models") / "tiny", seed=0)


@pytest.fixture(scope="session")
def demo_media(tmp_path_factory):
    from musetalk.testing.demo_media import ensure_demo_media

    return ensure_demo_media(tmp_path_factory.mktemp("media"))


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
