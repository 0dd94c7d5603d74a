"""cluster.faults: a named hold point, without Ray (the render tests use it to stop workers mid-shard)."""

import os
import threading

from cluster import faults
from tests.helpers import held, wait_for


def test_a_hold_point_is_a_no_op_unless_a_hold_directory_is_set(monkeypatch):
    monkeypatch.delenv(faults.HOLD_ENV, raising=False)
    faults.hold("shard_00000")  # returns at once
    assert faults.env() == {}


def test_a_held_point_waits_for_its_own_release_and_says_who_is_held(monkeypatch, tmp_path):
    monkeypatch.setenv(faults.HOLD_ENV, str(tmp_path))
    assert faults.env() == {faults.HOLD_ENV: str(tmp_path)}
    passed = threading.Event()

    def unit():
        faults.hold("shard_00002")
        passed.set()

    t = threading.Thread(target=unit, daemon=True)
    t.start()
    assert wait_for(lambda: held(tmp_path), timeout=30) == [("shard_00002", os.getpid())]
    (tmp_path / "release-shard_00001").touch()  # another point's release does not let it go
    assert not passed.wait(0.2)
    (tmp_path / "release-shard_00002").touch()
    assert passed.wait(30)
    t.join(30)
