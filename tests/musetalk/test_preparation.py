"""The preparation plan (musetalk.preparation.PrepPlan): table tests with hand-computed frame sets."""

from __future__ import annotations

from fractions import Fraction

import pytest

from musetalk.boxes import boxes_from_detections
from musetalk.config import FaceConfig, PipelineConfig
from musetalk.faces import Detection
from musetalk.preparation import PrepPlan, block_ranges
from shards.plan import plan_shards

DET = Detection((10.0, 10.0, 60.0, 70.0), 1.0)
RADIUS_1 = PipelineConfig(face=FaceConfig(smooth_radius=1))


def _plan(source_frames: int, seconds: float, shard_frames: int):
    return plan_shards(
        source_frames=source_frames,
        total_samples=int(seconds * 16000),
        sample_rate=16000,
        fps=Fraction(25),
        shard_frames=shard_frames,
    )


def _spans(units, kind=None):
    return [(u.kind, u.start, u.end) for u in units if kind is None or u.kind == kind]


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


# (source frames, seconds, shard frames, radius, shards planned) -> shown, detections needed, prepare ranges
@pytest.mark.parametrize(
    "n, seconds, shard, radius, which, shown, detect, prepare",
    [
        # 25 output frames over 10 source frames: 0..9, 9..0, 0..4 (ping-pong): each frame once, any sharding
        (10, 1.0, 1, 2, None, range(10), range(10), [(0, 4), (4, 8), (8, 10)]),
        (10, 1.0, 3, 2, None, range(10), range(10), [(0, 4), (4, 8), (8, 10)]),
        (10, 1.0, 25, 2, None, range(10), range(10), [(0, 4), (4, 8), (8, 10)]),
        # the tail shard after the bounce shows 0..4 only; its context reaches 6 (radius 2), clipped at 0
        (10, 1.0, 10, 2, [2], range(5), range(7), [(0, 4), (4, 5)]),
        # smoothing context at the far end: 10 output frames showing 0..9 of 100 read raw boxes 0..11
        (100, 0.4, 5, 2, None, range(10), range(12), [(0, 4), (4, 8), (8, 10)]),
        # only the second shard (5..9): context 3..11
        (100, 0.4, 5, 2, [1], range(5, 10), range(3, 12), [(5, 8), (8, 10)]),
        # the last frames of a video: context clipped at its end
        (12, 0.48, 12, 3, None, range(12), range(12), [(0, 4), (4, 8), (8, 12)]),
    ],
)
def test_frame_sets(n, seconds, shard, radius, which, shown, detect, prepare):
    plan = _plan(n, seconds, shard)
    shards = plan.shards if which is None else [plan.shards[i] for i in which]
    prep = PrepPlan(plan, shards, chunk=4, smooth_radius=radius)
    units = prep.start()
    assert prep.shown == list(shown)
    assert prep.detections_needed == list(detect)
    assert _spans(prep.units_of("prepare")) == [("prepare", a, b) for a, b in prepare]
    assert _spans(units, "audio") == [("audio", 0, 1)]
    assert len({u.name for u in prep.units}) == len(prep.units)


# what a cache holds -> what the plan reads from it and what it still does
@pytest.mark.parametrize(
    "chunks, known, wanted, entries, detect",
    [
        ({}, {}, list(range(12)), list(range(10)), list(range(12))),
        # entries of 0..5 cached: only 6..9 are prepared, reading raw boxes 4..11
        ({(0, 6): "c"}, {}, list(range(4, 12)), [6, 7, 8, 9], list(range(4, 12))),
        # ... and raw boxes 0..4 known: 5..11 detected
        ({(0, 6): "c"}, dict.fromkeys(range(5), DET), list(range(4, 12)), [6, 7, 8, 9], list(range(5, 12))),
        # everything cached: nothing to detect, nothing to prepare
        ({(0, 64): "c"}, {}, [], [], []),
    ],
)
def test_partial_cache_coverage(chunks, known, wanted, entries, detect):
    plan = _plan(100, 0.4, 5)  # 10 output frames: source 0..9
    prep = PrepPlan(plan, plan.shards, chunk=64, smooth_radius=2)
    assert prep.wanted(0, 6) and not prep.wanted(10, 64)
    assert prep.detections_wanted(chunks) == wanted
    units = prep.start(chunks, known)
    assert prep.entries_needed == entries and prep.detections_needed == detect
    assert prep.cache_hits == 10 - len(entries)
    if not entries:
        assert _spans(units) == [("audio", 0, 1)]


def test_shards_are_released_as_their_chunks_and_segments_land():
    plan = _plan(10, 1.0, 10)  # shards: out 0..9 (src 0..9), 10..19 (9..0), 20..24 (0..4)
    prep = PrepPlan(plan, plan.shards, chunk=5, smooth_radius=1)
    units = prep.start()
    assert _spans(units) == [("detect", 0, 5), ("detect", 5, 10), ("audio", 0, 1)]
    assert prep.ready_shards() == []
    assert prep.detected(units[0], dict.fromkeys(range(5), DET)) == []  # prepare 0..4 reads raw box 5
    prepare = prep.detected(units[1], dict.fromkeys(range(5, 10), DET))
    assert _spans(prepare) == [("prepare", 0, 5), ("prepare", 5, 10)]
    boxes = boxes_from_detections(
        prep.detections_for(prepare[0]), range(0, 5), (100, 100), RADIUS_1.face, plan.source_frames
    )
    assert boxes[0] == (10, 10, 60, 80)  # the detector box, extra_margin 10 below
    prep.add_segment(0, "seg0")
    prep.add_chunk(0, 5, "chunk0")
    assert [s.index for s in prep.ready_shards()] == [2]  # 20..24 shows 0..4 only
    prep.add_chunk(5, 10, "chunk1")
    assert [s.index for s in prep.ready_shards()] == [0, 1]
    assert prep.ready_shards() == []  # each released once
    assert prep.inputs_of(plan.shards[2]) == ([(0, 5, "chunk0")], [(0, "seg0")])


def test_each_prepare_unit_waits_only_for_the_detections_it_reads():
    plan = _plan(15, 0.6, 15)  # one shard showing source frames 0..14
    prep = PrepPlan(plan, plan.shards, chunk=5, smooth_radius=1)
    detect = [u for u in prep.start() if u.kind == "detect"]
    assert [(u.start, u.end) for u in detect] == [(0, 5), (5, 10), (10, 15)]
    # prepare 0..4 reads raw boxes 0..5: it waits for the second detect unit, not for the last one
    assert prep.detected(detect[1], dict.fromkeys(range(5, 10), DET)) == []
    first = prep.detected(detect[0], dict.fromkeys(range(5), DET))
    assert _spans(first) == [("prepare", 0, 5)]
    assert prep.detected(detect[0], dict.fromkeys(range(5), DET)) == []  # a duplicate report
    rest = prep.detected(detect[2], dict.fromkeys(range(10, 15), DET))
    assert [(u.start, u.end) for u in rest] == [(5, 10), (10, 15)]


# release order: which prepare units each landing lets run, with a look-ahead of two shards
def test_preparation_follows_the_shards_still_to_land():
    plan = _plan(30, 1.2, 5)  # six shards of 5 frames, source frames 0..29 in order
    prep = PrepPlan(plan, plan.shards, chunk=5, smooth_radius=0, lead=2)
    detect = [u for u in prep.start() if u.kind == "detect"]
    first = prep.detected(detect[0], dict.fromkeys(range(15), DET))
    assert [(u.start, u.end) for u in first] == [(0, 5), (5, 10)]  # for shards 0 and 1; 10..14 waits
    rest = [u for d in detect[1:] for u in prep.detected(d, {k: DET for k in range(d.start, d.end)})]
    assert rest == []  # detected, but beyond the look-ahead
    prep.add_segment(0, "s")
    for k, unit in enumerate(first):
        prep.add_chunk(unit.start, unit.end, f"c{k}")
    assert [s.index for s in prep.ready_shards()] == [0, 1]
    table = [
        (1, [(10, 15)]),  # shard 0 still counts: the window is shards 0 and 2
        (0, [(15, 20)]),
        (2, [(20, 25)]),
        (3, [(25, 30)]),
        (4, []),
        (5, []),
    ]
    for index, released in table:
        assert [(u.start, u.end) for u in prep.landed(plan.shards[index])] == released
    assert prep.chunks == {} and prep.segments == {}  # what landed shards read is let go


# chunk release: (shard landing) -> chunks still held
def test_chunks_and_segments_are_let_go_once_every_reader_landed():
    plan = _plan(10, 1.0, 10)  # shards: out 0..9 (src 0..9), 10..19 (9..0), 20..24 (0..4)
    prep = PrepPlan(plan, plan.shards, chunk=5, smooth_radius=1)
    prep.start()
    prep.add_segment(0, "seg0")
    prep.add_chunk(0, 5, "chunk0")
    prep.add_chunk(5, 10, "chunk1")
    first, bounce, tail = plan.shards
    table = [
        (tail, {(0, 5), (5, 10)}, {0}),  # chunk0 is still read by the first two shards
        (first, {(0, 5), (5, 10)}, {0}),  # the bounce shows all ten frames again
        (bounce, set(), set()),  # the last reader: both chunks and the segment go
    ]
    for shard, chunks, segments in table:
        prep.landed(shard)
        assert set(prep.chunks) == chunks and set(prep.segments) == segments
    assert prep.landed(bounce) == []  # a duplicate report
    prep.add_chunk(0, 5, "late")  # nothing still to land shows these frames: not kept
    assert prep.chunks == {}


def test_a_cached_chunk_is_kept_until_its_readers_landed_and_released_at_the_end():
    plan = _plan(10, 0.4, 5)  # two shards: src 0..4 and 5..9
    prep = PrepPlan(plan, plan.shards, chunk=64, smooth_radius=2)
    assert _spans(prep.start({(0, 64): "c"})) == [("audio", 0, 1)]
    prep.add_segment(0, "s")
    assert len(prep.ready_shards()) == 2  # everything cached: every shard at once
    prep.landed(plan.shards[0])
    assert prep.inputs_of(plan.shards[1])[0] == [(0, 64, "c")]
    prep.release()
    assert prep.chunks == {} and prep.segments == {}


def test_smoothing_radius_comes_from_the_face_settings_of_the_boxes():
    cfg = PipelineConfig(face=FaceConfig(smooth_radius=1))
    plan = _plan(3, 0.12, 3)
    prep = PrepPlan(plan, plan.shards, chunk=64, smooth_radius=cfg.face.smooth_radius)
    unit = prep.start()[0]
    prep.detected(unit, {0: DET, 1: None, 2: DET})
    (prepare,) = prep.units_of("prepare")
    assert sorted(prep.detections_for(prepare)) == [0, 1, 2]


def test_a_shard_waits_for_the_extra_detections_it_reads():
    """``also_detect`` (the lip-sync crops' raw boxes): those frames are detected too, and a shard is
    released only once its own are in, even with its entries cached."""
    plan = _plan(20, 0.4, 5)  # two shards: src 0..4 and 5..9
    first, second = plan.shards
    prep = PrepPlan(
        plan, plan.shards, chunk=64, smooth_radius=0, also_detect={first.name: [0, 12], second.name: [14]}
    )
    assert prep.detections_wanted([(0, 64)]) == [0, 12, 14]
    units = prep.start({(0, 64): "c"}, {0: DET})
    assert prep.detections_needed == [12, 14]
    assert _spans(units) == [("detect", 12, 13), ("detect", 14, 15), ("audio", 0, 1)]
    prep.add_segment(0, "s")
    assert prep.ready_shards() == []  # entries and audio in, 12 and 14 not detected yet
    prep.detected(units[1], {14: None})
    assert [s.index for s in prep.ready_shards()] == [1]  # the first still waits for frame 12
    prep.detected(units[0], {12: DET})
    assert [s.index for s in prep.ready_shards()] == [0]


def test_whole_detects_every_frame_and_links_tracks_once_all_are_in():
    """A track choice (``whole``): 10 output frames show 0..9 of 100 source frames, yet every frame is
    detected and no prepare unit runs before the last detection lands; the tracks come after it."""
    from musetalk.faces import FrameFaces
    from shards.plan import UnitKind

    plan = _plan(100, 0.4, 5)
    prep = PrepPlan(plan, plan.shards, chunk=32, smooth_radius=2, whole=True)
    units = prep.start()
    assert prep.detections_needed == list(range(100))
    assert _spans(units, UnitKind.PREPARE) == [] and prep.tracks is None
    detect = prep.units_of(UnitKind.DETECT)
    assert _spans(detect) == [(UnitKind.DETECT, 0, 32), (UnitKind.DETECT, 32, 64), (UnitKind.DETECT, 64, 96), (UnitKind.DETECT, 96, 100)]  # fmt: skip
    face = FrameFaces((DET,))
    for unit in detect[:-1]:
        assert prep.detected(unit, {k: face for k in range(unit.start, unit.end)}) == []
    released = prep.detected(detect[-1], {k: face for k in range(96, 100)})
    assert _spans(released) == [(UnitKind.PREPARE, 0, 10)]
    assert [(t.id, t.first, t.last) for t in prep.tracks.tracks] == [(1, 0, 99)]
    assert sorted(prep.detections_for(released[0])) == list(range(100))
