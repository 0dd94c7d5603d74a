"""cluster.inputs without Ray: job inputs materialised once per job and lazily, a slow job never blocking
another, eviction, forget, Whisper segments and the dead-process scratch sweep. Threads and plain callables
stand in for the actor's unit threads and ``ray.get``; threads synchronise on events, never on sleeps."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import wave
from collections import Counter
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest

from cluster.inputs import JobInputs, WorkerInputs, scratch_root, sweep_dead_scratch
from shards.probe import VideoInfo

WAIT = 10  # seconds an event may take before the test fails (a bound, never a delay)


class Store:
    """A stand-in object store: ``fetch(ref)`` counts calls; a ref in ``blocked`` waits for its event
    (after setting ``entered[ref]``)."""

    def __init__(self) -> None:
        self.objects: dict[str, object] = {}
        self.calls: Counter[str] = Counter()
        self.blocked: dict[str, threading.Event] = {}
        self.entered: dict[str, threading.Event] = {}
        self._lock = threading.Lock()

    def fetch(self, ref: str) -> object:
        with self._lock:
            self.calls[ref] += 1
        if ref in self.blocked:
            self.entered[ref].set()
            assert self.blocked[ref].wait(4 * WAIT), f"{ref} was never released"  # outlasts any WAIT
        return self.objects[ref]

    def block(self, ref: str) -> tuple[threading.Event, threading.Event]:
        """(entered, release) events of a fetch of ``ref`` that waits until released."""
        self.entered[ref], self.blocked[ref] = threading.Event(), threading.Event()
        return self.entered[ref], self.blocked[ref]


def _info() -> VideoInfo:
    f = Fraction(25)
    return VideoInfo("probed-on-the-driver.mp4", 64, 48, f, f, f, 10, 0.4, 0, False, ())


def _job(store: Store, tmp: Path, job_id: str) -> JobInputs:
    store.objects[f"{job_id}/video"] = np.frombuffer(f"video of {job_id}".encode(), dtype=np.uint8)
    store.objects[f"{job_id}/audio"] = np.full(8, 0.5, dtype=np.float32)
    return JobInputs(
        job_id,
        ".mp4",
        _info(),
        video_ref=[f"{job_id}/video"],
        audio_ref=[f"{job_id}/audio"],
        scratch=str(tmp / f"musetalk-job-{job_id}"),
    )


def _in_thread(fn) -> threading.Thread:
    t = threading.Thread(target=fn, daemon=True)
    t.start()
    return t


def test_a_job_is_materialised_once_however_many_units_want_it_at_once(tmp_path):
    store = Store()
    inputs = WorkerInputs(store.fetch, pid=1)
    job = _job(store, tmp_path, "a")
    entered, release = store.block("a/video")
    paths = []

    def unit():
        with inputs.use(job, video=True) as files:
            paths.append(files.video.path)

    first = _in_thread(unit)
    assert entered.wait(WAIT)  # the first unit is writing the video out; the others queue on its gate
    others = [_in_thread(unit) for _ in range(3)]
    release.set()
    for t in [first, *others]:
        t.join(WAIT)
    expected = str(tmp_path / "musetalk-job-a" / "1" / "a.mp4")
    assert paths == [expected] * 4 and store.calls["a/video"] == 1
    assert Path(expected).read_bytes() == b"video of a"


def test_a_slow_download_of_one_job_does_not_block_a_unit_of_another(tmp_path):
    store = Store()
    inputs = WorkerInputs(store.fetch, pid=1)
    slow, fast = _job(store, tmp_path, "slow"), _job(store, tmp_path, "fast")
    entered, release = store.block("slow/video")
    fast_done = threading.Event()

    def slow_unit():
        with inputs.use(slow, video=True):
            pass

    def fast_unit():
        with inputs.use(fast, video=True) as files:
            assert Path(files.video.path).read_bytes() == b"video of fast"
        fast_done.set()

    blocked = _in_thread(slow_unit)
    try:
        assert entered.wait(WAIT)
        _in_thread(fast_unit)
        assert fast_done.wait(WAIT), "a unit of another job waited for the slow job's download"
    finally:
        release.set()
        blocked.join(WAIT)
    assert store.calls == {"slow/video": 1, "fast/video": 1}


def test_units_materialise_only_what_they_read(tmp_path):
    store = Store()
    inputs = WorkerInputs(store.fetch, pid=1)
    job = _job(store, tmp_path, "a")
    with inputs.use(job, audio=True) as files:  # an audio unit: samples only
        assert files.video is None and files.samples.tolist() == [0.5] * 8
    assert store.calls == {"a/audio": 1} and not files.scratch.exists()
    with inputs.use(job, video=True) as files:  # a generation shard or a detect/prepare unit: video only
        assert files.samples is None and files.video.path.endswith("a.mp4")
        assert (files.video.width, files.video.frame_count) == (64, 10)  # the driver's probe, not redone
    with inputs.use(job, video=True, audio=True):
        pass
    assert store.calls == {"a/audio": 1, "a/video": 1}


def test_paths_every_node_reads_are_used_in_place(tmp_path):
    video, audio = tmp_path / "in.mp4", tmp_path / "in.wav"
    video.write_bytes(b"v")
    with wave.open(str(audio), "wb") as w:  # 0.1 s of 16 kHz mono silence
        w.setnchannels(1), w.setsampwidth(2), w.setframerate(16000)
        w.writeframes(bytes(2 * 1600))
    job = JobInputs(
        "p", ".mp4", _info(), video_path=str(video), audio_path=str(audio), scratch=str(tmp_path / "s")
    )
    inputs = WorkerInputs(Store().fetch, pid=1)
    with inputs.use(job, video=True, audio=True) as files:
        assert files.video.path == str(video)
        assert files.samples.dtype == np.float32 and files.samples.shape == (1600,)
    assert not (tmp_path / "s").exists()


def test_eviction_keeps_running_jobs_and_drops_the_oldest_idle_ones_with_their_scratch(tmp_path):
    store = Store()
    inputs = WorkerInputs(store.fetch, keep_jobs=3, pid=1)
    jobs = {j: _job(store, tmp_path, j) for j in "abcde"}
    inside, leave = threading.Event(), threading.Event()

    def running_unit():
        with inputs.use(jobs["a"], video=True):
            inside.set()
            assert leave.wait(WAIT)

    running = _in_thread(running_unit)
    try:
        assert inside.wait(WAIT)  # job a has a unit running all along
        for j in "bcde":
            with inputs.use(jobs[j], video=True):
                pass
        # b and c, the oldest idle jobs, went (with their scratch); a runs, d and e are the newest
        assert inputs.jobs() == ["a", "d", "e"]
        assert [(tmp_path / f"musetalk-job-{j}").exists() for j in "abcde"] == [
            True,
            False,
            False,
            True,
            True,
        ]
        with inputs.use(jobs["a"], video=True):  # still there: not fetched again
            pass
        assert store.calls["a/video"] == 1
    finally:
        leave.set()
        running.join(WAIT)
    with inputs.use(jobs["b"], video=True):  # d is now the oldest idle job
        pass
    assert inputs.jobs() == ["e", "a", "b"] and store.calls["b/video"] == 2
    assert not (tmp_path / "musetalk-job-d").exists()


def test_forget_removes_inputs_segments_and_scratch(tmp_path):
    store = Store()
    inputs = WorkerInputs(store.fetch, pid=1)
    job = _job(store, tmp_path, "a")
    store.objects["seg0"] = np.zeros((2, 3), dtype=np.float32)
    with inputs.use(job, video=True) as files:
        assert files.scratch.is_dir()
    inputs.segments("a", [(0, "seg0")])
    inputs.forget("a")
    assert inputs.jobs() == [] and not (tmp_path / "musetalk-job-a").exists()
    inputs.segments("a", [(0, "seg0")])
    assert store.calls["seg0"] == 2  # fetched again after forget
    inputs.forget("never-seen")  # nothing to do


def test_whisper_segments_are_fetched_once_and_only_the_last_few_kept():
    store = Store()
    inputs = WorkerInputs(store.fetch, keep_segments=2, pid=1)
    for k in range(3):
        store.objects[f"s{k}"] = np.full(2, k, dtype=np.float32)
    got = inputs.segments("a", [(0, "s0"), (1, "s1")])
    assert {k: v.tolist() for k, v in got.items()} == {0: [0, 0], 1: [1, 1]}
    got[0][0] = 7  # a writable copy, not the store's object
    assert store.objects["s0"][0] == 0
    inputs.segments("a", [(0, "s0"), (1, "s1")])
    assert store.calls == {"s0": 1, "s1": 1}
    inputs.segments("a", [(2, "s2")])  # s0 is the least recently used: dropped
    inputs.segments("a", [(1, "s1"), (0, "s0")])
    assert store.calls == {"s0": 2, "s1": 1, "s2": 1}


def test_close_forgets_every_job(tmp_path):
    store = Store()
    inputs = WorkerInputs(store.fetch, pid=1)
    for j in "ab":
        with inputs.use(_job(store, tmp_path, j), video=True):
            pass
    inputs.close()
    assert inputs.jobs() == [] and list(tmp_path.iterdir()) == []


def test_the_sweep_removes_only_scratch_of_dead_processes(tmp_path):
    done = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True)
    dead = int(done.stdout)  # that process has exited
    live = tmp_path / "musetalk-job-a" / str(os.getpid())
    gone = tmp_path / "musetalk-job-b" / str(dead)
    other = tmp_path / "musetalk-job-a" / "not-a-pid"
    unrelated = tmp_path / "something-else" / str(dead)
    for d in (live, gone, other, unrelated):
        d.mkdir(parents=True)
        (d / "f").write_bytes(b"x")
    assert sweep_dead_scratch(tmp_path) == 1
    assert not (tmp_path / "musetalk-job-b").exists()  # the job root went with its last worker's scratch
    assert live.is_dir() and other.is_dir() and unrelated.is_dir()


def test_the_scratch_root_is_per_job_under_the_temp_dir(monkeypatch, tmp_path):
    monkeypatch.setattr("tempfile.tempdir", str(tmp_path))
    assert scratch_root("j1") == tmp_path / "musetalk-job-j1"
    job = JobInputs("j1", ".mp4", _info())
    assert WorkerInputs(Store().fetch, pid=42).scratch(job) == tmp_path / "musetalk-job-j1" / "42"


@pytest.mark.parametrize("keep", [0, -1])
def test_a_worker_keeps_at_least_one_job(keep):
    with pytest.raises(ValueError, match="at least one"):
        WorkerInputs(Store().fetch, keep_jobs=keep)
