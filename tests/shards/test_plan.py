import json
from fractions import Fraction

import pytest

from shards.errors import ConfigError, InputError
from shards.plan import (
    Plan,
    PrepUnit,
    UnitKind,
    dispatch_order,
    output_frame_count,
    plan_shards,
    shard_length_frames,
    source_index,
)


@pytest.mark.parametrize(
    ("n", "expected"),
    [
        (1, [0, 0, 0, 0, 0]),
        (2, [0, 1, 1, 0, 0, 1, 1, 0]),
        (3, [0, 1, 2, 2, 1, 0, 0, 1, 2, 2]),
    ],
)
def test_source_index_ping_pong(n, expected):
    assert [source_index(t, n) for t in range(len(expected))] == expected


@pytest.mark.parametrize(
    ("samples", "rate", "fps", "frames"),
    [
        (16000 * 4, 16000, Fraction(25), 100),
        (16000 * 10, 16000, Fraction(30000, 1001), 299),  # 299.7 -> 299, not 290 (upstream's int(29.97))
        (16000 * 60, 16000, Fraction(30000, 1001), 1798),
        (639, 16000, Fraction(25), 0),
        (640, 16000, Fraction(25), 1),
    ],
)
def test_output_frame_count_exact(samples, rate, fps, frames):
    assert output_frame_count(samples, rate, fps) == frames


def _plan(source_frames=50, seconds=4, fps=Fraction(25), shard_frames=30, overlap=2, min_overlap=2):
    return plan_shards(
        source_frames=source_frames,
        total_samples=16000 * seconds,
        sample_rate=16000,
        fps=fps,
        shard_frames=shard_frames,
        overlap=overlap,
        min_overlap=min_overlap,
    )


@pytest.mark.parametrize("shard_frames", [1, 7, 30, 99, 100, 1000])
def test_every_output_frame_in_exactly_one_shard(shard_frames):
    plan = _plan(shard_frames=shard_frames)
    covered = [t for s in plan.shards for t in range(s.start, s.end)]
    assert covered == list(range(plan.output_frames))
    assert plan.output_frames == 100
    assert [s.index for s in plan.shards] == list(range(len(plan.shards)))


def test_context_covers_shown_frames_and_smoothing_window():
    # 100 output frames over a 50-frame video: 0..49 then 49..0.
    plan = _plan(source_frames=50, shard_frames=30, overlap=3, min_overlap=3)
    table = [(s.start, s.end, s.src_start, s.src_end) for s in plan.shards]
    assert table == [
        (0, 30, 0, 33),  # shows 0..29, +3 context after, clipped at 0
        (30, 60, 27, 50),  # shows 30..49 and 49..40 -> 30..49, context 27.. clipped at 50
        (60, 90, 7, 43),  # shows 39..10 -> 10..39
        (90, 100, 0, 13),  # shows 9..0
    ]
    for s in plan.shards:
        for t in range(s.start, s.end):
            src = plan.source_index(t)
            assert max(0, src - 3) >= s.src_start and min(49, src + 3) < s.src_end


def test_long_shard_over_short_video_decodes_whole_video():
    plan = _plan(source_frames=5, shard_frames=100, overlap=2)
    assert [(s.src_start, s.src_end) for s in plan.shards] == [(0, 5)]


def test_overlap_below_smoothing_need_is_rejected():
    with pytest.raises(ConfigError, match="shards.overlap=1 .* set shards.overlap>=2"):
        _plan(overlap=1, min_overlap=2)


def test_audio_shorter_than_a_frame_is_an_input_error():
    with pytest.raises(InputError, match="shorter than one video frame"):
        plan_shards(
            source_frames=10,
            total_samples=100,
            sample_rate=16000,
            fps=Fraction(25),
            shard_frames=10,
            overlap=0,
        )


def test_plan_json_round_trip_and_dispatch_order():
    plan = _plan(fps=Fraction(30000, 1001), shard_frames=40)
    again = Plan.from_json(plan.to_json())
    assert again == plan and again.fps == Fraction(30000, 1001)
    order = dispatch_order(plan)
    assert [s.frames for s in order] == sorted((s.frames for s in plan.shards), reverse=True)
    assert order[-1] is plan.shards[-1]


def test_shard_length_in_seconds_or_frames():
    assert shard_length_frames(50, None, Fraction(25)) == 50
    assert shard_length_frames(None, 2.0, Fraction(30000, 1001)) == 59
    with pytest.raises(ConfigError):
        shard_length_frames(10, 2.0, Fraction(25))
    with pytest.raises(ConfigError):
        shard_length_frames(0, None, Fraction(25))


def test_unit_kinds_are_typed_and_still_compare_print_and_serialise_as_strings():
    unit = PrepUnit("detect", 3, 0, 10)  # a plain string is converted
    assert unit.kind is UnitKind.DETECT and unit.kind == "detect"
    assert unit.name == "detect_00003" and json.dumps(unit.kind) == '"detect"'
    assert [k.reads_video for k in UnitKind] == [True, True, False]
    assert [k.reads_audio for k in UnitKind] == [False, False, True]
    with pytest.raises(ValueError, match="'render'"):
        PrepUnit("render", 0, 0, 1)
