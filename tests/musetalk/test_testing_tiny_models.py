"""The tiny-model generator replaces only a directory it made (marked) and never a user's files."""

from __future__ import annotations

import pytest

from musetalk.testing.tiny_models import MARKER, ensure_tiny_models, make_tiny_models, marker_text
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
