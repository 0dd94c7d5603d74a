"""The run directory: the output lock, the manifest, resume and start-over rules."""

from __future__ import annotations

import json
import multiprocessing
import os

import pytest

from cluster.keys import shard_key
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


def _parts(plan, identity=CPU1, audio="a0", face="largest") -> dict[str, tuple[str, dict]]:
    """Each shard's key and parts as cluster.keys makes them, from a few named parts."""
    out = {}
    for s in plan.shards:
        parts = {"compute": identity.key(), "range": [s.start, s.end], "frames": face, "audio": audio}
        out[s.name] = (shard_key(parts), parts)
    return out


def _open(out, plan, resume=True, **parts) -> RunDir:
    run = RunDir.open(out, resume=resume)
    run.use(parts.get("identity", CPU1).key(), _parts(plan, **parts))
    return run


def test_nothing_is_written_before_the_first_segment(tmp_path, plan):
    out = tmp_path / "out.mp4"
    run = _open(out, plan)
    assert not run.root.exists()
    run.add(plan.shards[0], b"segment zero", _stats(0))
    assert run.segment("shard_00000").read_bytes() == b"segment zero"
    assert run.segment("shard_00000").name == f"{_parts(plan)['shard_00000'][0]}.mkv"  # named by its key


def test_finished_segments_are_reused_under_the_same_key(tmp_path, plan):
    out = tmp_path / "out.mp4"
    run = _open(out, plan)
    run.add(plan.shards[0], b"segment zero", _stats(0))
    (run.segments / "shard_00001.partial").write_bytes(b"half a segme")  # a write cut by a crash

    again = _open(out, plan)
    assert again.has(plan.shards[0]) and not again.has(plan.shards[1])
    assert again.stats(plan.shards[0]) == _stats(0)
    assert again.segment("shard_00000").read_bytes() == b"segment zero"
    assert sorted(p.name for p in again.segments.iterdir()) == [again.segment("shard_00000").name]


def test_segments_of_another_compute_identity_are_not_reused_and_stay(tmp_path, plan):
    out = tmp_path / "out.mp4"
    _open(out, plan).add(plan.shards[0], b"one thread", _stats(0))
    run = _open(out, plan, identity=CPU2)
    assert run.done_count == 0
    run.add(plan.shards[1], b"two threads", _stats(1))
    assert json.loads((run.root / "manifest.json").read_text())["compute"] == CPU2.key()
    back = _open(out, plan)  # the first identity's segment is still there for its renders
    assert back.has(plan.shards[0]) and not back.has(plan.shards[1])


def test_a_changed_part_renders_only_its_shards_and_says_why(tmp_path, plan):
    out = tmp_path / "out.mp4"
    first = _open(out, plan)
    for i, shard in enumerate(plan.shards):
        first.add(shard, f"segment {i}".encode(), _stats(i))
    first.landed()
    revised = _parts(plan)
    name = plan.shards[1].name
    parts = {**revised[name][1], "audio": "a1"}  # shard 1 reads a changed Whisper segment
    revised[name] = (shard_key(parts), parts)
    run = RunDir.open(out, resume=True)
    run.use(CPU1.key(), revised)
    assert [run.has(s) for s in plan.shards] == [True, False, True] and run.done_count == 2
    run.add(plan.shards[1], b"segment 1 again", _stats(1))
    assert run.changed() == {"audio": 1} and run.rendered_count == 1


def test_a_fresh_run_renders_everything_and_keeps_what_was_there(tmp_path, plan):
    out = tmp_path / "out.mp4"
    _open(out, plan).add(plan.shards[0], b"old", _stats(0))
    run = _open(out, plan, resume=False)
    assert run.done_count == 0
    run.add(plan.shards[0], b"new", _stats(0))
    assert run.has(plan.shards[0]) and run.segment("shard_00000").read_bytes() == b"new"


def test_an_altered_segment_is_rendered_again(tmp_path, plan):
    out = tmp_path / "out.mp4"
    run = _open(out, plan)
    run.add(plan.shards[0], b"segment zero", _stats(0))
    run.segment("shard_00000").write_bytes(b"segment 0ero")
    assert _open(out, plan).done_count == 0


def test_the_size_limit_removes_only_segments_the_last_render_did_not_use(tmp_path, plan):
    out = tmp_path / "out.mp4"
    old = _open(out, plan, audio="old")
    for i, shard in enumerate(plan.shards):
        old.add(shard, b"x" * 1000, _stats(i))
    old.landed()
    new = _open(out, plan, audio="new")
    for i, shard in enumerate(plan.shards[:2]):
        new.add(shard, b"y" * 1000, _stats(i))
    new.landed(limit_mb=0.0035)  # 5 segments of 1 kB, 3.5 kB allowed: the oldest two unused ones go
    assert new.size_bytes() == 3000
    assert _open(out, plan, audio="new").done_count == 2
    assert _open(out, plan, audio="old").done_count == 1  # its newest unused segment stayed


def test_a_foreign_directory_at_the_run_path_is_never_deleted(tmp_path, plan):
    out = tmp_path / "out.mp4"
    foreign = tmp_path / ".out.mp4.run"
    foreign.mkdir()
    (foreign / "holiday.jpg").write_bytes(b"precious")
    with pytest.raises(InputError, match="is not a run directory of this renderer"):
        RunDir.open(out, resume=False)
    assert (foreign / "holiday.jpg").read_bytes() == b"precious"


def test_clean_removes_the_kept_segments(tmp_path, plan):
    from cluster.clean import main

    out = tmp_path / "out.mp4"
    run = _open(out, plan)
    run.add(plan.shards[0], b"x", _stats(0))
    run.landed()
    assert main([str(out)]) == 0
    assert list(tmp_path.iterdir()) == []
    assert main([str(tmp_path / "never" / "rendered.mp4")]) == 0  # nothing kept: nothing to do
