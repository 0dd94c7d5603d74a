"""Session fixtures: tiny models and demo media are built once per test run (never downloaded)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
torch.set_num_threads(2)


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory) -> Path:
    from scripts.make_tiny_models import make_tiny_models

    return make_tiny_models(tmp_path_factory.mktemp("models") / "tiny", seed=0)


@pytest.fixture(scope="session")
def demo_media(tmp_path_factory):
    from scripts.make_demo_media import ensure_demo_media

    return ensure_demo_media(tmp_path_factory.mktemp("media"))


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
