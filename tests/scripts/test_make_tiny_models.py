"""The ``scripts.make_tiny_models`` command line: a refusal is one line and an exit code."""

from __future__ import annotations

import subprocess
import sys

from cluster.config import REPO_ROOT
from musetalk.testing.tiny_models import MARKER


def test_cli_refusal_is_one_line(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    proc = subprocess.run(
        [sys.executable, "-m", "scripts.make_tiny_models", "--dir", str(tmp_path)],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 2
    assert [line for line in proc.stderr.splitlines() if line.startswith("error: ")] == [
        f"error: make_tiny_models refuses to write into {tmp_path}: it holds files make_tiny_models did not "
        f"make (no {MARKER} marker); point models.dir (or --dir) at a new or empty directory"
    ]
    assert (tmp_path / "notes.txt").read_text() == "mine"
