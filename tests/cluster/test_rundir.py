"""The run directory: the output lock, the manifest, resume and start-over rules."""

from __future__ import annotations

import hashlib
import json
import multiprocessing
import os

import pytest

from cluster.rundir import RunDir, file_digest, job_key, output_lock
from musetalk.stats import ShardStats
from shards.errors import InputError
from shards.plan import plan_shards


@pytest.fixture
def plan():
    from fractions import Fraction

    return plan_shards(
        source_frames=10, total_samples=16000, sample_rate=16000, fps=Fraction(25), shard_frames=10, overlap=2
    )


def test_file_digest_is_sha256_of_the_contents(tmp_path):
    f = tmp_path / "x.bin"
    f.write_bytes(b"abc" * 1000)
    assert file_digest(f) == hashlib.sha256(b"abc" * 1000).hexdigest()


def test_job_key_changes_with_contents_settings_and_weights(tmp_path):
    video, weights = tmp_path / "v.mp4", tmp_path / "w.pth"
    video.write_bytes(b"video")
    weights.write_bytes(b"weights")
    base = job_key([video], {"a": 1}, [weights])
    assert job_key([video], {"a": 1}, [weights]) == base
    assert job_key([video], {"a": 2}, [weights]) != base
    video.write_bytes(b"videO")
    assert job_key([video], {"a": 1}, [weights]) != base
    video.write_bytes(b"video")
    weights.write_bytes(b"weights, retrained")
    assert job_key([video], {"a": 1}, [weights]) != base


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


def _stats(i: int) -> ShardStats:
    return ShardStats(shard=i, frames=10, face_frames=3, decoded_frames=12, seconds={"generate": 1.5})


def test_finished_segments_are_reused_under_the_same_key(tmp_path, plan):
    out = tmp_path / "out.mp4"
    run = RunDir.open(out, "k1", plan, resume=True)
    run.add(plan.shards[0], b"segment zero", _stats(0))
    (run.segments / "shard_00001.partial").write_bytes(b"half a segme")  # a write cut by a crash

    again = RunDir.open(out, "k1", plan, resume=True)
    assert again.has(plan.shards[0]) and not again.has(plan.shards[1])
    assert again.stats(plan.shards[0]) == _stats(0)
    assert again.segment("shard_00000").read_bytes() == b"segment zero"
    assert sorted(p.name for p in again.segments.iterdir()) == ["shard_00000.mkv"]


@pytest.mark.parametrize(("key", "resume"), [("k2", True), ("k1", False)])
def test_changed_key_or_fresh_run_starts_over(tmp_path, plan, key, resume):
    out = tmp_path / "out.mp4"
    RunDir.open(out, "k1", plan, resume=True).add(plan.shards[0], b"old", _stats(0))
    run = RunDir.open(out, key, plan, resume=resume)
    assert run.done_count == 0 and list(run.segments.iterdir()) == []
    assert json.loads((run.root / "manifest.json").read_text())["key"] == key


def test_an_altered_segment_is_rendered_again(tmp_path, plan):
    out = tmp_path / "out.mp4"
    run = RunDir.open(out, "k1", plan, resume=True)
    run.add(plan.shards[0], b"segment zero", _stats(0))
    run.segment("shard_00000").write_bytes(b"segment 0ero")
    assert RunDir.open(out, "k1", plan, resume=True).done_count == 0


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
    run = RunDir.open(out, "k1", plan, resume=True)
    run.add(plan.shards[0], b"x", _stats(0))
    run.remove()
    assert list(tmp_path.iterdir()) == []
