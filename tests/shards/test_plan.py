import json
from fractions import Fraction

import pytest

from shards.errors import ConfigError, InputError
from shards.plan import (
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


def _plan(source_frames=50, seconds=4, fps=Fraction(25), shard_frames=30):
    return plan_shards(
        source_frames=source_frames,
        total_samples=16000 * seconds,
        sample_rate=16000,
        fps=fps,
        shard_frames=shard_frames,
    )


@pytest.mark.parametrize("shard_frames", [1, 7, 30, 99, 100, 1000])
def test_every_output_frame_in_exactly_one_shard(shard_frames):
    plan = _plan(shard_frames=shard_frames)
    covered = [t for s in plan.shards for t in range(s.start, s.end)]
    assert covered == list(range(plan.output_frames))
    assert plan.output_frames == 100
    assert [s.index for s in plan.shards] == list(range(len(plan.shards)))


def test_shown_frames_follow_ping_pong():
    # 100 output frames over a 50-frame video: 0..49 then 49..0.
    plan = _plan(source_frames=50, shard_frames=30)
    table = [(s.start, s.end, plan.shown_frames(s.start, s.end)) for s in plan.shards]
    assert table == [
        (0, 30, list(range(0, 30))),
        (30, 60, list(range(30, 50))),  # 30..49, then 49..40 again
        (60, 90, list(range(10, 40))),  # 39..10
        (90, 100, list(range(0, 10))),  # 9..0
    ]


def test_a_shard_longer_than_a_ping_pong_period_shows_every_frame():
    plan = _plan(source_frames=5, shard_frames=100)
    assert plan.shown_frames(0, 100) == [0, 1, 2, 3, 4]
    assert plan.shown_frames(3, 8) == [2, 3, 4]  # 3, 4, 4, 3, 2


def test_audio_shorter_than_a_frame_is_an_input_error():
    with pytest.raises(InputError, match="shorter than one video frame"):
        plan_shards(
            source_frames=10,
            total_samples=100,
            sample_rate=16000,
            fps=Fraction(25),
            shard_frames=10,
        )


def test_plan_json_names_every_shard_and_dispatch_order():
    plan = _plan(fps=Fraction(30000, 1001), shard_frames=40)
    assert plan.fps == Fraction(30000, 1001)
    assert plan.to_json() != _plan(fps=Fraction(30000, 1001), shard_frames=41).to_json()
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
