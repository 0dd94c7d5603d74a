"""The tiny-model generator replaces only a directory it made (marked) and never a user's files."""

from __future__ import annotations

import subprocess
import sys

import pytest

from cluster.config import REPO_ROOT
from scripts.make_tiny_models import MARKER, ensure_tiny_models, make_tiny_models, marker_text
from shards.errors import ConfigError


def test_refuses_a_users_directory_and_deletes_nothing(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "more.txt").write_text("also mine")
    for call in (make_tiny_models, ensure_tiny_models):
        with pytest.raises(
            ConfigError, match=f"make_tiny_models refuses to write into {tmp_path}.*models.dir"
        ):
            call(tmp_path)
    assert sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*")) == [
        "notes.txt",
        "sub",
        "sub/more.txt",
    ]
    assert [p.name for p in tmp_path.parent.iterdir() if p.name.startswith(f".{tmp_path.name}-")] == []


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


def test_replaces_a_stale_marked_set_and_fills_an_empty_directory(tmp_path):
    stale = tmp_path / "stale"
    stale.mkdir()
    (stale / MARKER).write_text("version=0 seed=0 full_size=0\n")
    (stale / "old.bin").write_bytes(b"old")
    ensure_tiny_models(stale)
    assert (stale / MARKER).read_text().strip() == marker_text(0, False)
    assert not (stale / "old.bin").exists()
    empty = tmp_path / "empty"
    empty.mkdir()
    make_tiny_models(empty)
    assert (empty / MARKER).read_text().strip() == marker_text(0, False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty", "stale"]  # no temporaries left
