"""The ``scripts.download_models`` command line: a dry run lists the plan, a bad group is an exit code."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from scripts.download_models import main
from shards.errors import ConfigError


def test_dry_run_lists_the_plan_without_fetching(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO):
        assert main(["--dir", str(tmp_path), "--only", "gfpgan,unet", "--dry-run"]) == 0
    fetch_lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("would fetch")]
    assert len(fetch_lines) == 3 and any("GFPGANv1.4.pth" in line for line in fetch_lines)
    assert not any(tmp_path.iterdir())
    assert main(["--dir", str(tmp_path), "--only", "nope"]) == ConfigError.exit_code
