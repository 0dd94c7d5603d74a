"""Face tracks and ``face.select``: the tracker on hand-made boxes, and in-process renders of the
two-faces clip (Haar, tiny models, lossless) choosing each track in turn."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest

from musetalk.boxes import boxes_from_detections
from musetalk.config import FaceConfig, PipelineConfig
from musetalk.faces import Detection, FrameFaces
from musetalk.local import render_local
from musetalk.pipeline import FramePipeline
from musetalk.testing.two_faces import make_two_faces
from musetalk.tracks import MAX_GAP, link, pick
from shards.errors import InputError
from shards.ranges import parse_select
from shards.segment import EncodeSettings
from tests.helpers import decode_all

LOSSLESS = EncodeSettings(lossless=True)
FLAT = np.zeros((16, 16), np.uint8)
BRIGHT = np.full((16, 16), 200, np.uint8)
A, B = (10.0, 10.0, 50.0, 50.0), (100.0, 10.0, 140.0, 50.0)


def test_link_ids_gaps_and_cuts():
    frames = [(0, [B, A], FLAT), (1, [A, B], FLAT)]  # ids: left to right on first appearance
    frames += [(k, [A], FLAT) for k in range(2, 2 + MAX_GAP)]  # B absent MAX_GAP frames: survives
    frames += [(2 + MAX_GAP, [B, A], FLAT), (3 + MAX_GAP, [A, B], BRIGHT)]  # then a cut
    tracks = link(frames)
    assert tracks.cuts == (3 + MAX_GAP,)
    assert [t.id for t in tracks.tracks] == [1, 2, 3, 4]
    one, two, three, four = tracks.tracks
    assert one.faces[:2] == ((0, 1), (1, 0)) and one.last == 2 + MAX_GAP
    assert two.faces == ((0, 0), (1, 1), (2 + MAX_GAP, 0))
    assert (three.first, three.faces[0][1], four.faces[0][1]) == (3 + MAX_GAP, 0, 1)
    assert one.summary() == {
        "id": 1,
        "first_frame": 0,
        "last_frame": 2 + MAX_GAP,
        "frames_seen": 3 + MAX_GAP,
        "mean_box": [10.0, 10.0, 50.0, 50.0],
    }
    gone = link([(0, [A], FLAT), *[(k, [], FLAT) for k in range(1, MAX_GAP + 2)], (MAX_GAP + 2, [A], FLAT)])
    assert [t.id for t in gone.tracks] == [1, 2]  # a longer absence ends the track


def test_rules_and_select_values():
    assert [pick([A, B], r, 150) for r in ("largest", "left", "right", "center")] == [0, 0, 1, 0]
    assert pick([], "left", 150) is None
    assert parse_select("2") == parse_select(2) == 2 and parse_select("center") == "center"
    for bad in ("biggest", "0", -1, True):
        with pytest.raises(ValueError, match="face.select"):
            parse_select(bad)


def test_largest_is_the_first_face_and_rules_follow_their_track():
    cfg = FaceConfig(detector="haar", crop="box", smooth_radius=1, extra_margin=0)

    def faces(*boxes):
        return FrameFaces(tuple(Detection(b, 1.0) for b in boxes), FLAT)

    dets = {0: faces(A, B), 1: faces(B, A), 2: faces(A, B)}
    largest = boxes_from_detections(dets, range(3), (60, 150), cfg, 3)
    assert largest[1] == (10, 10, 50, 50)  # per frame: the median of A, B, A; no tracks involved
    right = boxes_from_detections(dets, range(3), (60, 150), cfg, 3, lambda s: "right")
    assert right == {0: (100, 10, 140, 50), 1: (100, 10, 140, 50), 2: (100, 10, 140, 50)}
    none = boxes_from_detections(dets, range(3), (60, 150), cfg, 3, lambda s: None if s == 1 else "1")
    assert none == {0: (10, 10, 50, 50), 1: None, 2: (10, 10, 50, 50)}
    # smoothing stops at a cut: frame 2 is another shot, its face (moved by 4 px) is not averaged in
    moved = (104.0, 14.0, 144.0, 54.0)
    cut = {0: faces(A), 1: faces(A, B), 2: FrameFaces((Detection(moved, 1.0),), BRIGHT)}
    assert boxes_from_detections(cut, [1], (60, 150), cfg, 3, lambda s: "right") == {1: (100, 10, 140, 50)}
    no_cut = {**cut, 2: faces(moved)}
    assert boxes_from_detections(no_cut, [1], (60, 150), cfg, 3, lambda s: "right") == {1: (102, 12, 142, 52)}


@pytest.fixture(scope="module")
def clip(tmp_path_factory):
    return make_two_faces(tmp_path_factory.mktemp("two-faces"))


@pytest.fixture(scope="module")
def pipeline(tiny_models):
    face = FaceConfig(detector="haar", crop="box")
    return FramePipeline(PipelineConfig(models_dir=str(tiny_models), tiny=True, batch_size=4, face=face))


def _render(pipeline, clip, out, select):
    pipeline.cfg = replace(pipeline.cfg, face=replace(pipeline.cfg.face, select=select))
    return render_local(
        clip.video, clip.audio, out, pipeline.cfg, encode=LOSSLESS, pipeline=pipeline, chunk=8
    )


def test_select_each_track_keeps_the_other_face_untouched(pipeline, clip, tmp_path):
    source = decode_all(clip.video)
    assert len(source) == clip.frames
    # tracks 1 (left) and 2 (right) in shot 1; after the cut, with sides swapped, 3 (left) and 4 (right)
    for track, side, shot in (
        (1, "left", range(clip.cut)),
        (2, "right", range(clip.cut)),
        (4, "right", None),
    ):
        out = tmp_path / f"track{track}.mkv"
        _render(pipeline, clip, out, str(track))
        rendered = decode_all(out)
        assert len(rendered) == len(source)
        other = "right" if side == "left" else "left"
        changed = set()
        for t, (a, b) in enumerate(zip(source, rendered, strict=True)):
            x1, y1, x2, y2 = clip.region(other, t)
            assert np.array_equal(a[y1:y2, x1:x2], b[y1:y2, x1:x2]), f"track {track}: frame {t}, {other} face"
            x1, y1, x2, y2 = clip.region(side, t)
            if not np.array_equal(a[y1:y2, x1:x2], b[y1:y2, x1:x2]):
                changed.add(t)
        expected = set(shot if shot is not None else range(clip.cut, clip.frames))
        if track == 2:
            expected -= set(clip.absent)  # the right face is hidden there: those frames pass through
        assert changed == expected, f"track {track}"


def test_unknown_track_is_an_input_error_before_any_output(pipeline, clip, tmp_path):
    out = tmp_path / "nine.mkv"
    with pytest.raises(
        InputError, match=r"face.select=9: the video has no track 9 \(its tracks: 1, 2, 3, 4\)"
    ):
        _render(pipeline, clip, out, "9")
    assert not out.exists()


def test_a_dub_with_two_ranges_on_two_faces_each_with_its_own_audio(pipeline, clip, tmp_path):
    """Range 1 dubs the left face of the first shot (track 1) with its own take, range 2 the right face
    after the cut (track 4) with another: outside the ranges every frame passes through, inside each only
    its face's half changes; the output has the video's frames and its audio lasts the picture."""
    import json

    import soundfile as sf

    from shards.dub import DubSettings
    from shards.probe import load_audio

    rate = 16000
    for name, hz in (("anna.wav", 440), ("ben.wav", 1000)):
        t = np.arange(rate) / rate
        sf.write(
            tmp_path / name, (0.5 * np.sin(2 * np.pi * hz * t)).astype(np.float32), rate, subtype="PCM_16"
        )
    segments = tmp_path / "segments.json"
    segments.write_text(
        json.dumps([
            {"start": 0.0, "end": 0.4, "face": "1", "audio": "anna.wav"},
            {"start": 0.8, "end": 1.2, "face": "4", "audio": "ben.wav"},
        ])
    )  # fmt: skip
    pipeline.cfg = replace(pipeline.cfg, face=replace(pipeline.cfg.face, select="largest"))
    out = tmp_path / "dub.mkv"
    render_local(
        clip.video, clip.audio, out, pipeline.cfg, encode=LOSSLESS, pipeline=pipeline, chunk=8,
        dub=DubSettings(segments=segments),
    )  # fmt: skip
    source, rendered = decode_all(clip.video), decode_all(out)
    assert len(rendered) == len(source) == clip.frames
    ranges = {"left": range(0, 10), "right": range(20, 30)}
    for t, (a, b) in enumerate(zip(source, rendered, strict=True)):
        dubbed = [side for side, frames in ranges.items() if t in frames]
        for side in ("left", "right"):
            x1, y1, x2, y2 = clip.region(side, t)
            same = np.array_equal(a[y1:y2, x1:x2], b[y1:y2, x1:x2])
            assert same != (side in dubbed), f"frame {t}, {side} face: {'dubbed' if dubbed else 'outside'}"
    audio = load_audio(out, rate)
    assert abs(len(audio) / rate - clip.frames / 25) <= 1 / 25
