"""The QA sheet: a timeline strip coloured by frame kind, and sampled frames source | output."""

from __future__ import annotations

from types import SimpleNamespace

import cv2
import numpy as np

from cluster.qa import KINDS, STRIP_H, UNKNOWN, draw_sheet, kinds_of, sample_frames, timeline

# The demo clip: frames 38-62 are a cut-away without a face (passed through untouched).
DEMO = "F" * 38 + "P" * 25 + "F" * 30 + "p" * 4 + "e" * 3


def test_strip_colours_read_back_from_the_png(tmp_path):
    frames = len(DEMO)
    black = np.zeros((64, 48, 3), np.uint8)
    white = np.full((64, 48, 3), 255, np.uint8)
    red = np.zeros((64, 48, 3), np.uint8)
    red[..., 2] = 255
    width = 4 * frames
    sheet = draw_sheet(DEMO, frames, [(10, black, white), (50, red, black)], width=width)
    path = tmp_path / "qa.png"
    assert cv2.imwrite(str(path), sheet)
    png = cv2.imread(str(path))
    assert png.shape[1] == width
    strip_y = 22 + STRIP_H // 2  # below the title line
    colour = {k: np.array(c) for k, (c, _) in KINDS.items()}
    for t, kind in [(0, "F"), (37, "F"), (38, "P"), (50, "P"), (62, "P"), (63, "F"), (94, "p"), (99, "e")]:
        x = 4 * t + 2  # 4 pixels per frame
        assert np.array_equal(png[strip_y, x], colour[kind]), (t, kind, png[strip_y, x])
    # Two pairs side by side, each source | output, in quarters of the width.
    y = png.shape[0] - 10
    quarters = [png[y, q * width // 4 + width // 8].tolist() for q in range(4)]
    assert quarters == [[0, 0, 0], [255, 255, 255], [0, 0, 255], [0, 0, 0]]


def test_without_frame_kinds_the_strip_is_unknown():
    """A pipeline that does not report frame_kinds yet: the sheet is still drawn, all unknown."""
    stats = [SimpleNamespace(frames=10), SimpleNamespace(frames=10)]
    assert kinds_of(stats, 20) == ""
    strip = timeline("", 20, 40)
    assert (strip == np.array(UNKNOWN[0], np.uint8)).all()
    with_kinds = [SimpleNamespace(frame_kinds="F" * 10), SimpleNamespace(frame_kinds="P" * 10)]
    assert kinds_of(with_kinds, 20) == "F" * 10 + "P" * 10
    assert kinds_of(with_kinds, 21) == ""  # a count that disagrees is not trusted


def test_samples_move_to_rendered_faces():
    picks = sample_frames(len(DEMO), DEMO, count=4)
    assert all(DEMO[t] == "F" for t in picks) and len(picks) >= 3
    assert sample_frames(100, "", count=4) == [12, 37, 62, 87]


def test_dub_ranges_and_their_faces_under_the_timeline():
    """A dub job's ranges: a strip under the timeline, one colour per face, white (passthrough) between."""
    from cluster.qa import RANGE_COLOURS
    from shards.plan import DubRange

    frames, width = 100, 400
    ranges = (DubRange(5, 25, "left"), DubRange(40, 50, "3"), DubRange(70, 90, "left"))
    kinds = "P" * 5 + "F" * 20 + "P" * 15 + "F" * 10 + "P" * 20 + "F" * 20 + "P" * 10
    sheet = draw_sheet(kinds, frames, [], width=width, ranges=ranges)
    plain = draw_sheet(kinds, frames, [], width=width)
    assert sheet.shape[0] == plain.shape[0] + STRIP_H + 22  # the strip and its caption line
    y = 22 + STRIP_H + STRIP_H - 4  # below the title and the timeline, under the labels
    row = sheet[y]
    assert row[4 * 2].tolist() == [255, 255, 255]  # frame 2: outside every range
    for t, colour in [(6, RANGE_COLOURS[0]), (45, RANGE_COLOURS[1]), (88, RANGE_COLOURS[0])]:
        assert row[4 * t + 1].tolist() == list(colour), t
    assert row[4 * 60].tolist() == [255, 255, 255]
