"""Avatar entries, their store and the preparation plan: pure rules with hand-computed expectations."""

from __future__ import annotations

from fractions import Fraction

import numpy as np
import pytest

from cluster.phases import JobPhases
from musetalk.avatar import AvatarStore, JobPrep, block_ranges, fetch
from musetalk.config import FaceConfig, PipelineConfig
from musetalk.entries import (
    ChunkReader,
    Entry,
    EntrySource,
    detections_from_json,
    detections_to_json,
    pack_chunk,
)
from musetalk.faces import Detection
from shards.plan import plan_shards


@pytest.mark.parametrize(
    "frames, block, expected",
    [
        ([], 4, []),
        ([0, 1, 2, 3, 4, 5], 4, [(0, 4), (4, 6)]),
        ([5, 3, 4, 4], 4, [(3, 4), (4, 6)]),  # split at the block boundary 4, duplicates once
        ([0, 2, 3, 9], 64, [(0, 1), (2, 4), (9, 10)]),
    ],
)
def test_block_ranges(frames, block, expected):
    assert block_ranges(frames, block) == expected


def _plan(source_frames: int, seconds: float, shard_frames: int):
    return plan_shards(
        source_frames=source_frames,
        total_samples=int(seconds * 16000),
        sample_rate=16000,
        fps=Fraction(25),
        shard_frames=shard_frames,
        overlap=2,
        min_overlap=2,
    )


def test_job_prep_counts_distinct_source_frames_whatever_the_sharding():
    # 10 source frames, 1.0 s at 25 fps = 25 output frames: 0..9, 9..0, 0..4 (ping-pong)
    for shard_frames in (1, 3, 25):
        prep = JobPrep(_plan(10, 1.0, shard_frames), chunk=4, smooth_radius=2)
        assert prep.shown == list(range(10)) and prep.detections_needed == list(range(10))
        assert prep.prepare_ranges() == [(0, 4), (4, 8), (8, 10)]
        assert prep.audio_segments() == [0]


def test_job_prep_context_and_what_is_already_there():
    plan = _plan(100, 0.4, 5)  # 10 output frames: source 0..9
    prep = JobPrep(plan, chunk=64, smooth_radius=2)
    assert prep.detections_needed == list(range(12))  # smoothing reads 2 frames beyond the last shown
    cached = JobPrep(plan, chunk=64, smooth_radius=2, have_entries=range(0, 6), have_detections=range(0, 5))
    assert cached.entries_needed == [6, 7, 8, 9]
    assert cached.detections_needed == [5, 6, 7, 8, 9, 10, 11]  # 4..11 read, 0..4 known
    only = JobPrep(plan, chunk=64, smooth_radius=2, shards=plan.shards[1:])
    assert only.shown == [5, 6, 7, 8, 9] and only.detections_needed == list(range(3, 12))


def _entry(src: int, face: bool) -> Entry:
    if not face:
        return Entry(src)
    rng = np.random.default_rng(src)
    return Entry(
        src=src,
        box=(10, 20, 110, 140),
        latents=rng.standard_normal((8, 32, 32)).astype(np.float32),
        square=(0, 5, 120, 125),
        mask=rng.integers(0, 256, (120, 120), dtype=np.uint8),
        parsed=src % 2 == 0,
        rect=(12, 30, 100, 140),
    )


def test_chunk_round_trips_bit_exact_and_reads_single_frames():
    entries = [_entry(s, s != 7) for s in range(5, 9)]
    reader = ChunkReader(pack_chunk(entries))
    assert reader.frames == [5, 6, 7, 8] and 9 not in reader
    for e in entries:
        got = reader.get(e.src)
        assert (got.src, got.box, got.square, got.parsed, got.rect) == (
            e.src,
            e.box,
            e.square,
            e.parsed,
            e.rect,
        )
        if e.box is not None:
            assert np.array_equal(got.latents, e.latents) and got.latents.dtype == np.float32
            assert np.array_equal(got.mask, e.mask) and not got.mask.flags.writeable


def test_detections_round_trip_exactly():
    marks = (np.random.default_rng(0).random((68, 2)) * 500).astype(np.float32)
    found = {
        3: None,
        4: Detection((1.5, 2.25, 300.125, 410.0), 0.987654321, marks),
        5: Detection((0, 0, 9, 9), 3.0),
    }
    back = detections_from_json(detections_to_json(found))
    assert back[3] is None and back[5].landmarks is None and back[5].box == (0, 0, 9, 9)
    assert back[4].box == found[4].box and back[4].score == found[4].score
    assert np.array_equal(back[4].landmarks, marks) and back[4].landmarks.dtype == np.float32


@pytest.mark.parametrize("root", ["local", "memory://avatars-test"])
def test_store_lists_reads_and_writes_whole_files(root, tmp_path):
    store = AvatarStore(str(tmp_path / "cache") if root == "local" else root)
    assert store.ranges("v", "p1") == []
    store.write("v", "p1", 64, 128, "npz", b"second")
    store.write("v", "p1", 0, 64, "npz", b"first")
    store.write("v", "d1", 0, 64, "json", b"{}")
    assert store.ranges("v", "p1") == [(0, 64), (64, 128)]
    assert store.read("v", "p1", 0, 64, "npz") == b"first"
    if root == "local":
        assert not list((tmp_path / "cache").rglob("*.partial")), "no temporary file is left"


def test_phases_release_shards_as_their_chunks_and_segments_land():
    plan = _plan(10, 1.0, 10)  # shards: out 0..9 (src 0..9), 10..19 (9..0), 20..24 (0..4)
    cfg = PipelineConfig(face=FaceConfig(smooth_radius=1))
    phases = JobPhases(plan, list(plan.shards), cfg, (100, 100), chunk=5)
    units = phases.initial_units()
    assert [(u.kind, u.start, u.end) for u in units] == [("detect", 0, 5), ("detect", 5, 10), ("audio", 0, 1)]
    assert phases.ready_shards() == []
    det = Detection((10.0, 10.0, 60.0, 70.0), 1.0)
    assert phases.detected(units[0], dict.fromkeys(range(5), det)) == []
    prepare = phases.detected(units[1], dict.fromkeys(range(5, 10), det))
    assert [(u.kind, u.start, u.end) for u in prepare] == [("prepare", 0, 5), ("prepare", 5, 10)]
    assert phases.boxes_for(prepare[0])[0] == (10, 10, 60, 80)  # the detector box, extra_margin 10 below
    phases.add_segment(0, "seg0")
    phases.add_chunk(0, 5, "chunk0")
    assert [s.index for s in phases.ready_shards()] == [2]  # 20..24 shows 0..4 only
    phases.add_chunk(5, 10, "chunk1")
    assert [s.index for s in phases.ready_shards()] == [0, 1]
    chunks, segments = phases.inputs_of(plan.shards[2])
    assert chunks == ((0, 5, ["chunk0"]),) and segments == ((0, ["seg0"]),)


def test_phases_let_go_of_chunks_and_segments_once_every_shard_reading_them_landed():
    plan = _plan(10, 1.0, 10)  # shards: out 0..9 (src 0..9), 10..19 (9..0), 20..24 (0..4)
    cfg = PipelineConfig(face=FaceConfig(smooth_radius=1))
    phases = JobPhases(plan, list(plan.shards), cfg, (100, 100), chunk=5)
    phases.add_segment(0, "seg0")
    phases.add_chunk(0, 5, "chunk0")
    phases.add_chunk(5, 10, "chunk1")
    first, bounce, tail = plan.shards
    phases.landed(tail)
    assert set(phases.chunks) == {(0, 5), (5, 10)}  # chunk0 is still read by the first two shards
    phases.landed(first)
    assert phases.inputs_of(bounce) == (((0, 5, ["chunk0"]), (5, 10, ["chunk1"])), ((0, ["seg0"]),))
    phases.landed(bounce)  # the last reader: both chunks and the segment go
    assert phases.chunks == {} and phases.segments == {}
    assert phases.landed(bounce) == []  # a duplicate report
    phases.add_chunk(0, 5, "late")  # nothing still to land shows these frames: not kept
    assert phases.chunks == {}


def test_phases_prepare_only_for_the_next_shards_still_to_land():
    plan = _plan(30, 1.2, 5)  # six shards of 5 frames, source frames 0..29 in order
    phases = JobPhases(
        plan, list(plan.shards), PipelineConfig(face=FaceConfig(smooth_radius=0)), (9, 9), chunk=5, lead=2
    )
    detect = [u for u in phases.initial_units() if u.kind == "detect"]
    det = Detection((1.0, 1.0, 6.0, 7.0), 1.0)
    first = phases.detected(detect[0], dict.fromkeys(range(15), det))
    assert [(u.start, u.end) for u in first] == [(0, 5), (5, 10)]  # for shards 0 and 1; 10..14 waits
    assert phases.detected(detect[0], {}) == []
    rest = [u for d in detect[1:] for u in phases.detected(d, {k: det for k in range(d.start, d.end)})]
    assert rest == []  # detected, but beyond the look-ahead
    phases.add_segment(0, "s")
    for k, unit in enumerate(first):
        phases.add_chunk(unit.start, unit.end, f"c{k}")
    assert [s.index for s in phases.ready_shards()] == [0, 1]
    assert [(u.start, u.end) for u in phases.landed(plan.shards[1])] == [(10, 15)]  # shard 0 still counts
    assert [(u.start, u.end) for u in phases.landed(plan.shards[0])] == [(15, 20)]
    assert set(phases.chunks) == set()  # what landed shards read is let go


def test_phases_keep_a_cached_chunk_until_its_readers_landed_and_release_all_at_the_end():
    plan = _plan(10, 0.4, 5)  # two shards: src 0..4 and 5..9
    phases = JobPhases(plan, list(plan.shards), PipelineConfig(), (100, 100), chunk=64, cached={(0, 64): "c"})
    phases.add_segment(0, "s")
    phases.landed(plan.shards[0])
    assert phases.inputs_of(plan.shards[1])[0] == ((0, 64, ["c"]),)
    phases.release()
    assert phases.chunks == {} and phases.segments == {}


def test_phases_release_each_prepare_unit_once_the_detections_it_reads_are_in():
    plan = _plan(15, 0.6, 15)  # one shard showing source frames 0..14
    cfg = PipelineConfig(face=FaceConfig(smooth_radius=1))
    phases = JobPhases(plan, list(plan.shards), cfg, (100, 100), chunk=5)
    detect = [u for u in phases.initial_units() if u.kind == "detect"]
    assert [(u.start, u.end) for u in detect] == [(0, 5), (5, 10), (10, 15)]
    det = Detection((10.0, 10.0, 60.0, 70.0), 1.0)
    # prepare 0..4 reads raw boxes 0..5: it waits for the second detect unit, not for the last one
    assert phases.detected(detect[1], dict.fromkeys(range(5, 10), det)) == []
    first = phases.detected(detect[0], dict.fromkeys(range(5), det))
    assert [(u.kind, u.start, u.end) for u in first] == [("prepare", 0, 5)]
    assert phases.detected(detect[0], dict.fromkeys(range(5), det)) == []  # a duplicate report
    rest = phases.detected(detect[2], dict.fromkeys(range(10, 15), det))
    assert [(u.start, u.end) for u in rest] == [(5, 10), (10, 15)]
    assert len({u.name for u in [*detect, *first, *rest]}) == 6


def test_phases_with_everything_cached_release_every_shard_at_once():
    plan = _plan(10, 0.4, 5)
    cfg = PipelineConfig()
    phases = JobPhases(plan, list(plan.shards), cfg, (100, 100), chunk=64, cached={(0, 64): "c"})
    assert phases.cache_hits == 10
    assert [u.kind for u in phases.initial_units()] == ["audio"]
    phases.add_segment(0, "s")
    assert len(phases.ready_shards()) == 2


def test_entry_source_fetches_only_chunks_it_reads_and_holds_few():
    blobs = {k: pack_chunk([_entry(s, True) for s in range(k * 4, k * 4 + 4)]) for k in range(5)}
    fetched = []

    def fetch(k):
        fetched.append(k)
        return blobs[k]

    source = EntrySource([(k * 4, k * 4 + 4, k) for k in range(5)], fetch, keep=2)
    for src in [*range(4, 12), *reversed(range(4, 12))]:  # a ping-pong bounce over chunks 1 and 2
        assert source(src).src == src
    assert fetched == [1, 2]  # chunks 0, 3 and 4 never fetched; 1 and 2 once each
    source(0), source(16), source(4)
    assert fetched == [1, 2, 0, 4, 1]  # at most 2 held: chunk 1 was dropped and is fetched again
    with pytest.raises(KeyError, match="source frame 99"):
        source(99)


def test_a_shared_store_serves_chunks_by_uri_to_any_process():
    store = AvatarStore("memory://avatars-uri-test")
    blob = pack_chunk([_entry(s, s % 3 != 0) for s in range(10, 14)])
    store.write("v", "p1", 10, 14, "npz", blob)
    uri = store.uri("v", "p1", 10, 14, "npz")
    assert uri.startswith("memory://") and fetch(uri) == blob
    source = EntrySource([(10, 14, uri)], fetch)
    assert source(11).box is not None and source(12).box is None


def test_a_failed_local_write_leaves_no_file_behind(tmp_path, monkeypatch):
    import musetalk.avatar as avatar

    store = AvatarStore(str(tmp_path / "cache"))

    def full_disk(src, dst):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(avatar.os, "replace", full_disk)
    with pytest.raises(OSError, match="No space left"):
        store.write("v", "p1", 0, 64, "npz", b"entries")
    assert [p for p in (tmp_path / "cache").rglob("*") if p.is_file()] == []
    assert store.ranges("v", "p1") == []
