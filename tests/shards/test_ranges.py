"""The segments file (shards.ranges) and its frames and audio (shards.dub): pure table tests, no media
beyond a few WAVs written here."""

from __future__ import annotations

import json
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from shards.dub import dub_track, frame_ranges, track_samples
from shards.errors import InputError
from shards.plan import DubRange, output_frame_count, plan_shards
from shards.ranges import check_within, face_problem, load_ranges, parse_time


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("1.5", Fraction(3, 2)),
        ("12", Fraction(12)),
        ("00:00:01,000", Fraction(1)),
        ("00:00:03.500", Fraction(7, 2)),
        ("01:02:03.25", Fraction(3723) + Fraction(1, 4)),
        ("2:03", Fraction(123)),
        ("0:00:00,007", Fraction(7, 1000)),
    ],
)
def test_times(text, seconds):
    assert parse_time(text) == seconds


@pytest.mark.parametrize("text", ["", "1,5", "abc", "00:61", "1:00:60", "-1", "00:00:01.0001"])
def test_bad_times(text):
    with pytest.raises(ValueError):
        parse_time(text)


@pytest.mark.parametrize(("spec", "ok"), [("largest", True), ("left", True), ("right", True),
                                          ("center", True), ("3", True), ("0", False), ("Left", False), ("-1", False),
                                          ("track3", False)])  # fmt: skip
def test_face_specs(spec, ok):
    assert (face_problem(spec) is None) is ok


def _wav(path: Path, seconds: float = 1.0) -> Path:
    sf.write(path, np.zeros(int(16000 * seconds), np.float32), 16000, subtype="PCM_16")
    return path


def _formats(tmp_path: Path) -> list[Path]:
    _wav(tmp_path / "a.wav")
    _wav(tmp_path / "b take.wav")
    (tmp_path / "s.json").write_text(
        json.dumps([
            {"start": "00:00:02.5", "end": 3, "face": "right", "audio": "b take.wav", "offset": 0.25},
            {"start": 0.2, "end": "00:00:01,000", "audio": "a.wav"},
        ])
    )  # fmt: skip
    (tmp_path / "s.csv").write_text(
        "start,end,face,audio,offset\n0.2,00:00:01.000,,a.wav,\n2.5,3,right,b take.wav,0.25\n"
    )
    (tmp_path / "s.srt").write_text(
        "1\n00:00:00,200 --> 00:00:01,000\naudio=a.wav\nHello there.\n\n"
        "2\n00:00:02,500 --> 00:00:03,000\nface=right audio='b take.wav' offset=0.25\n"
    )
    return [tmp_path / f"s.{ext}" for ext in ("json", "csv", "srt")]


def test_the_three_formats_give_the_same_ranges(tmp_path):
    parsed = [
        [(r.start, r.end, r.face, r.audio, r.offset) for r in load_ranges(p)] for p in _formats(tmp_path)
    ]
    assert parsed[0] == [
        (Fraction(1, 5), Fraction(1), None, tmp_path / "a.wav", Fraction(0)),
        (Fraction(5, 2), Fraction(3), "right", tmp_path / "b take.wav", Fraction(1, 4)),
    ]
    assert parsed[0] == parsed[1] == parsed[2]


@pytest.mark.parametrize(
    ("name", "text", "needle"),
    [
        ("overlap.json", '[{"start": 0, "end": 2}, {"start": 1.5, "end": 3}]',
         "entry 2 overlaps entry 1 (starts at 1.5 s, before 2 s); make the ranges disjoint"),
        ("time.csv", "start,end\n0,1\n1.5,soon\n", "line 3: end 'soon' is not a time; write seconds (1.5) or HH:MM:SS.mmm"),
        ("order.srt", "00:00:02,000 --> 00:00:01,000\n", "line 1: end 1 s is not after start 2 s"),
        ("audio.json", '[{"start": 0, "end": 1, "audio": "gone.wav"}]', "entry 1: audio file not found:"),
        ("face.csv", "start,end,face\n0,1,biggest\n", "line 2: face 'biggest' is not a face spec"),
        ("field.json", '[{"start": 0, "end": 1, "speaker": 2}]', "entry 1: unknown field speaker"),
        ("header.csv", "from,to\n0,1\n", "line 1: the header must name start,end"),
        ("arrow.srt", "1\n00:00:01 -> 00:00:02\n", "line 2: expected 'start --> end'"),
        ("empty.json", "[]", "holds no range"),
        ("bad.json", "[{", "is not valid JSON"),
        ("s.txt", "0,1", "unknown format; name it .json, .csv or .srt"),
    ],
)  # fmt: skip
def test_bad_segments_files_are_one_line_naming_file_place_and_fix(tmp_path, name, text, needle):
    path = tmp_path / name
    path.write_text(text)
    with pytest.raises(InputError) as err:
        load_ranges(path)
    message = str(err.value)
    assert "\n" not in message
    assert message.startswith(f"segments file {path}: ")
    assert needle in message, message


def test_a_range_past_the_picture_is_refused(tmp_path):
    path = tmp_path / "s.json"
    path.write_text('[{"start": 1, "end": 4.5}]')
    ranges = load_ranges(path)
    check_within(ranges, Fraction(125, 25), path)  # within a 5 s picture
    with pytest.raises(
        InputError, match=r"entry 1 ends at 4.5 s, past the picture's end \(4 s\); end it at 4 s"
    ):
        check_within(ranges, Fraction(4), path)


def test_ranges_as_frames_and_the_shard_grid_cuts_at_their_edges(tmp_path):
    path = tmp_path / "s.json"
    path.write_text('[{"start": 0.2, "end": 1.0, "face": "left"}, {"start": 2.81, "end": 3.6}]')
    frames = frame_ranges(load_ranges(path), Fraction(25), 100, "largest")
    assert frames == (DubRange(5, 25, "left"), DubRange(71, 90, "largest"))
    fps = Fraction(25)
    samples = track_samples(100, fps, 16000)
    assert output_frame_count(samples, 16000, fps) == 100
    plan = plan_shards(source_frames=100, total_samples=samples, sample_rate=16000, fps=fps, shard_frames=40,
                       dub=True, face="largest", ranges=frames)  # fmt: skip
    assert [(s.start, s.end) for s in plan.shards] == [
        (0, 5),
        (5, 25),
        (25, 40),
        (40, 71),
        (71, 80),
        (80, 90),
        (90, 100),
    ]
    assert [plan.source_index(t) for t in range(100)] == list(range(100))
    assert [plan.face_choice(s) for s in (4, 5, 24, 25, 70, 71, 89, 90)] == [
        None, "left", "left", None, None, "largest", "largest", None
    ]  # fmt: skip
    # keys: the ranges are in the plan's JSON (each entry chunk's key holds its frames' choices)
    assert "left" in plan.to_json() and plan.faces == {"largest", "left"}
    whole = plan_shards(source_frames=100, total_samples=samples, sample_rate=16000, fps=fps, shard_frames=40,
                        dub=True)  # fmt: skip
    assert whole.face_choice(99) == "largest" and whole.faces == {"largest"}


def test_a_range_without_a_frame_is_refused(tmp_path):
    path = tmp_path / "s.json"
    path.write_text('[{"start": 0.01, "end": 0.03}]')
    with pytest.raises(InputError, match="entry 1 holds no frame at 25 fps; widen it"):
        frame_ranges(load_ranges(path), Fraction(25), 100, "largest", path)


def test_the_dub_track_lasts_the_picture_with_each_ranges_audio_in_place(tmp_path):
    rate, fps = 16000, Fraction(25)
    ramp = np.linspace(-0.5, 0.5, 2 * rate, dtype=np.float32)  # 2 s whose samples say where they came from
    sf.write(tmp_path / "own.wav", ramp, rate, subtype="FLOAT")
    sf.write(tmp_path / "short.wav", np.full(rate // 10, 0.25, np.float32), rate, subtype="FLOAT")
    path = tmp_path / "s.json"
    path.write_text(
        '[{"start": 0.5, "end": 1.0, "audio": "own.wav", "offset": 0.25},'
        ' {"start": 2, "end": 3, "audio": "short.wav"}, {"start": 3.5, "end": 3.75}]'
    )
    job = np.full(3 * rate, 0.1, np.float32)  # 3 s: shorter than the 4 s picture
    track = dub_track(job, load_ranges(path), 100, fps, rate)
    assert len(track) == 4 * rate
    np.testing.assert_array_equal(track[: rate // 2], np.float32(0.1))
    np.testing.assert_array_equal(track[rate // 2 : rate], ramp[rate // 4 : rate // 4 + rate // 2])
    np.testing.assert_array_equal(track[rate : 2 * rate], np.float32(0.1))
    np.testing.assert_array_equal(track[2 * rate : 2 * rate + rate // 10], np.float32(0.25))
    np.testing.assert_array_equal(track[2 * rate + rate // 10 : 3 * rate], 0.0)  # silence after a short take
    np.testing.assert_array_equal(track[3 * rate :], 0.0)  # the job's audio padded with silence
    longer = dub_track(np.full(5 * rate, 0.1, np.float32), (), 100, fps, rate)
    assert len(longer) == 4 * rate  # trimmed to the picture


def test_an_offset_past_the_ranges_audio_is_refused(tmp_path):
    _wav(tmp_path / "a.wav", 1.0)
    path = tmp_path / "s.json"
    path.write_text('[{"start": 0, "end": 1, "audio": "a.wav", "offset": 2}]')
    with pytest.raises(
        InputError, match=r"entry 1: offset 2 s is past the end of .*a.wav \(1.000 s\); lower the offset"
    ):
        dub_track(np.zeros(16000), load_ranges(path), 100, Fraction(25), 16000, path)
