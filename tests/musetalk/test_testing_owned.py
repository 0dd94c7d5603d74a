"""Generators write only into directories they made (marked) or empty ones, and delete only those."""

from __future__ import annotations

import pytest

from musetalk.testing.owned import check_owned, claim, remove_owned
from shards.errors import ConfigError

MARK = ".tool-made"


def _args(path):
    return path, MARK, "tool", "use another directory"


def test_claim_creates_and_marks_then_is_idempotent(tmp_path):
    target = tmp_path / "a" / "b"
    assert claim(*_args(target)) == target and (target / MARK).is_file()
    (target / MARK).write_text("version=1\n")
    claim(*_args(target))
    assert (target / MARK).read_text() == "version=1\n"  # an existing stamp is kept


def test_claim_adopts_an_empty_directory(tmp_path):
    claim(*_args(tmp_path))
    assert [p.name for p in tmp_path.iterdir()] == [MARK]


def test_users_directory_is_refused_and_untouched(tmp_path):
    (tmp_path / "demo.mp4").write_bytes(b"mine")
    for call in (check_owned, claim, remove_owned):
        with pytest.raises(ConfigError) as err:
            call(*_args(tmp_path))
        assert str(err.value) == (
            f"tool refuses to write into {tmp_path}: it holds files tool did not make "
            f"(no {MARK} marker); use another directory"
        )
    assert [p.name for p in tmp_path.iterdir()] == ["demo.mp4"]
    assert (tmp_path / "demo.mp4").read_bytes() == b"mine"


def test_a_file_is_refused(tmp_path):
    path = tmp_path / "file"
    path.write_text("mine")
    with pytest.raises(ConfigError, match="needs a directory but .* is a file; use another directory"):
        claim(*_args(path))
    assert path.read_text() == "mine"


def test_remove_deletes_marked_and_empty_directories_only(tmp_path):
    marked = claim(*_args(tmp_path / "marked"))
    (marked / "weights.bin").write_bytes(b"x")
    remove_owned(*_args(marked))
    (tmp_path / "empty").mkdir()
    remove_owned(*_args(tmp_path / "empty"))
    remove_owned(*_args(tmp_path / "absent"))
    assert list(tmp_path.iterdir()) == []


def test_remove_refuses_a_symlink_and_keeps_its_target(tmp_path):
    target = claim(*_args(tmp_path / "target"))
    (tmp_path / "link").symlink_to(target)
    with pytest.raises(ConfigError, match="will not replace the symlink"):
        remove_owned(*_args(tmp_path / "link"))
    assert (target / MARK).exists()
