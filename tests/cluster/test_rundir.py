"""The run directory: the output lock, the manifest, resume and start-over rules."""

from __future__ import annotations

import json
import multiprocessing
import os

import pytest

from cluster.rundir import RunDir, output_lock
from musetalk.device import ComputeIdentity
from musetalk.stats import ShardStats
from shards.errors import InputError
from shards.plan import plan_shards


@pytest.fixture
def plan():
    from fractions import Fraction

    return plan_shards(
        source_frames=10, total_samples=16000, sample_rate=16000, fps=Fraction(25), shard_frames=10
    )


def _try_lock(output, queue):
    try:
        with output_lock(output):
            queue.put("locked")
    except InputError as err:
        queue.put(str(err))


def test_second_render_of_one_output_is_refused(tmp_path):
    out = tmp_path / "out.mp4"
    ctx = multiprocessing.get_context("spawn")
    queue = ctx.Queue()
    with output_lock(out) as lock:
        assert lock.read_text().strip() == str(os.getpid())
        p = ctx.Process(target=_try_lock, args=(out, queue))
        p.start()
        message = queue.get(timeout=120)
        p.join(timeout=120)
    assert message.startswith(f"another render is writing {out} (process {os.getpid()})")
    assert not lock.exists()
    p = ctx.Process(target=_try_lock, args=(out, queue))
    p.start()
    assert queue.get(timeout=120) == "locked"  # free again once released
    p.join(timeout=120)


CPU1 = ComputeIdentity("cpu", "x86_64 AVX2", "float32", 1, "2.13.0")
CPU2 = ComputeIdentity("cpu", "x86_64 AVX2", "float32", 2, "2.13.0")


def _stats(i: int) -> ShardStats:
    return ShardStats(shard=i, frames=10, face_frames=3, decoded_frames=12, seconds={"generate": 1.5})


def _open(out, key, plan, resume=True, identity=CPU1) -> RunDir:
    run = RunDir.open(out, key, plan, resume=resume)
    run.adopt(identity)
    return run


def test_nothing_is_written_before_the_first_segment(tmp_path, plan):
    out = tmp_path / "out.mp4"
    run = _open(out, "k1", plan)
    assert not run.root.exists()
    run.add(plan.shards[0], b"segment zero", _stats(0))
    assert run.segment("shard_00000").read_bytes() == b"segment zero"


def test_finished_segments_are_reused_under_the_same_key(tmp_path, plan):
    out = tmp_path / "out.mp4"
    run = _open(out, "k1", plan)
    run.add(plan.shards[0], b"segment zero", _stats(0))
    (run.segments / "shard_00001.partial").write_bytes(b"half a segme")  # a write cut by a crash

    again = _open(out, "k1", plan)
    assert again.has(plan.shards[0]) and not again.has(plan.shards[1])
    assert again.stats(plan.shards[0]) == _stats(0)
    assert again.segment("shard_00000").read_bytes() == b"segment zero"
    assert sorted(p.name for p in again.segments.iterdir()) == ["shard_00000.mkv"]


def test_segments_of_another_compute_identity_are_dropped(tmp_path, plan):
    out = tmp_path / "out.mp4"
    _open(out, "k1", plan).add(plan.shards[0], b"one thread", _stats(0))
    run = RunDir.open(out, "k1", plan, resume=True)
    assert run.has(plan.shards[0])  # a job with nothing left to render stitches without a pool
    run.adopt(CPU2)
    assert run.done_count == 0 and not run.root.exists()
    run.add(plan.shards[1], b"two threads", _stats(1))
    assert json.loads((run.root / "manifest.json").read_text())["compute"] == CPU2.key()
    assert _open(out, "k1", plan, identity=CPU2).has(plan.shards[1])


@pytest.mark.parametrize(("key", "resume"), [("k2", True), ("k1", False)])
def test_changed_key_or_fresh_run_starts_over(tmp_path, plan, key, resume):
    out = tmp_path / "out.mp4"
    _open(out, "k1", plan).add(plan.shards[0], b"old", _stats(0))
    run = _open(out, key, plan, resume=resume)
    assert run.done_count == 0 and not run.root.exists()
    run.add(plan.shards[1], b"new", _stats(1))
    assert json.loads((run.root / "manifest.json").read_text())["key"] == key
    assert [p.name for p in run.segments.iterdir()] == ["shard_00001.mkv"]


def test_an_altered_segment_is_rendered_again(tmp_path, plan):
    out = tmp_path / "out.mp4"
    run = _open(out, "k1", plan)
    run.add(plan.shards[0], b"segment zero", _stats(0))
    run.segment("shard_00000").write_bytes(b"segment 0ero")
    assert _open(out, "k1", plan).done_count == 0


def test_a_foreign_directory_at_the_run_path_is_never_deleted(tmp_path, plan):
    out = tmp_path / "out.mp4"
    foreign = tmp_path / ".out.mp4.run"
    foreign.mkdir()
    (foreign / "holiday.jpg").write_bytes(b"precious")
    with pytest.raises(InputError, match="is not a run directory of this renderer"):
        RunDir.open(out, "k1", plan, resume=False)
    assert (foreign / "holiday.jpg").read_bytes() == b"precious"


def test_remove_leaves_nothing(tmp_path, plan):
    out = tmp_path / "out.mp4"
    run = _open(out, "k1", plan)
    run.add(plan.shards[0], b"x", _stats(0))
    run.remove()
    assert list(tmp_path.iterdir()) == []
