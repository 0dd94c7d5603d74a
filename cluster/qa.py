"""A QA sheet per job: ``<output>.qa.png`` beside the summary, for a look before anyone watches the video.

Top: a timeline strip over every output frame, coloured by what happened to it (``KINDS``). Below: a
few sampled output frames, each as source | output. With lip-sync scores (``qa.sync``), a curve of the
per-second SyncNet confidence sits under the timeline. A dub job with ranges (``Plan.ranges``) gets a
strip of its ranges under the timeline, each labelled with the face it dubbed (outside them: passthrough). The kinds come from the workers' stats
(``ShardStats.frame_kinds``: one character per output frame); a pipeline that does not report them yet
gives an empty string, and the strip is then drawn in the "unknown" colour with a note saying so.
"""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np

from shards.decode import read_frames
from shards.plan import Plan
from shards.probe import VideoInfo, probe_video

# Kind character -> (BGR colour, legend). Anything else is drawn as unknown.
KINDS: dict[str, tuple[tuple[int, int, int], str]] = {
    "F": ((80, 175, 76), "face rendered"),
    "P": ((170, 170, 170), "passthrough (no face)"),
    "p": ((0, 152, 255), "parsing fallback"),
    "e": ((54, 67, 244), "GFPGAN fallback"),
}
UNKNOWN = ((255, 200, 220), "unknown")
STRIP_H = 28
CURVE_H = 48
CURVE_COLOUR = (180, 90, 30)
_TEXT = 22
# Colours of the ranges' faces, one per distinct face spec in order of first use (BGR)
RANGE_COLOURS = ((180, 119, 31), (14, 127, 255), (44, 160, 44), (40, 39, 214), (189, 103, 148))


def kinds_of(stats: list, frames: int) -> str:
    """The job's kinds string from its shards' stats (in shard order), or "" when any shard lacks it."""
    kinds = "".join(getattr(s, "frame_kinds", "") or "" for s in stats)
    return kinds if len(kinds) == frames else ""


def timeline(kinds: str, frames: int, width: int) -> np.ndarray:
    """(STRIP_H, width, 3) uint8 BGR: pixel column x shows output frame ``x * frames // width``."""
    strip = np.empty((STRIP_H, width, 3), np.uint8)
    for x in range(width):
        t = x * frames // width
        strip[:, x] = KINDS.get(kinds[t], UNKNOWN)[0] if kinds else UNKNOWN[0]
    return strip


def ranges_strip(ranges, frames: int, width: int) -> np.ndarray:
    """(STRIP_H, width, 3) uint8 BGR: each dub range (``start``, ``end`` frames, ``face``) as a band over
    the columns of its frames (at least one column), coloured per face and labelled with it."""
    strip = np.full((STRIP_H, width, 3), 255, np.uint8)
    colours: dict[str, tuple[int, int, int]] = {}
    for r in ranges:
        colour = colours.setdefault(r.face, RANGE_COLOURS[len(colours) % len(RANGE_COLOURS)])
        x0 = r.start * width // frames
        x1 = max(x0 + 1, r.end * width // frames)
        strip[2:-2, x0:x1] = colour
        label = f"face {r.face}"
        if x1 - x0 >= 7 * len(label):
            cv2.putText(
                strip, label, (x0 + 3, 18), cv2.FONT_HERSHEY_SIMPLEX, 0.4, (255, 255, 255), 1, cv2.LINE_AA
            )
    return strip


def sample_frames(frames: int, kinds: str, count: int = 4) -> list[int]:
    """``count`` output frames spread over the job, each moved to the nearest rendered face when there is one."""
    if frames <= 0:
        return []
    picks = [min(frames - 1, (2 * i + 1) * frames // (2 * count)) for i in range(count)]
    faces = [t for t, k in enumerate(kinds) if k == "F"]
    if faces:
        picks = [min(faces, key=lambda f, t=t: abs(f - t)) for t in picks]
    return sorted(set(picks))


def sync_curve(values: list[float | None], width: int, height: int = CURVE_H) -> np.ndarray:
    """(height, width, 3) uint8 BGR: per-second lip-sync confidence under the timeline (second ``s`` spans
    columns ``s * width / len(values)`` onwards), scaled to the largest value (at least 1); seconds
    without a score are left blank."""
    img = np.full((height, width, 3), 255, np.uint8)
    cv2.line(img, (0, height - 1), (width - 1, height - 1), (200, 200, 200), 1)
    known = [v for v in values if v is not None]
    if not known:
        return img
    top = max(1.0, max(known))
    points = []
    for s, v in enumerate(values):
        if v is None:
            points.append(None)
            continue
        x = int((s + 0.5) * width / len(values))
        points.append((x, int(round((height - 3) * (1 - v / top))) + 1))
    for a, b in zip(points, points[1:], strict=False):
        if a is not None and b is not None:
            cv2.line(img, a, b, CURVE_COLOUR, 2, cv2.LINE_AA)
    for p in points:
        if p is not None:
            cv2.circle(img, p, 2, CURVE_COLOUR, -1)
    return img


def draw_sheet(
    kinds: str,
    frames: int,
    pairs: list[tuple[int, np.ndarray, np.ndarray]],
    width: int = 960,
    sync: list[float | None] | None = None,
    ranges: tuple = (),
) -> np.ndarray:
    """The sheet as (H, width, 3) uint8 BGR: title line, timeline strip, [a dub job's ``ranges``
    (``shards.plan.DubRange``) and the faces they dubbed], [the per-second lip-sync confidence curve when
    ``sync`` is given], legend, then the (output frame, source (h, w, 3) BGR,
    output (h, w, 3) BGR) pairs two to a row, each as source | output."""
    rows = [_line(f"{frames} output frames" + ("" if kinds else ": frame kinds unavailable"), width)]
    rows.append(timeline(kinds, frames, width))
    if ranges:
        rows.append(ranges_strip(ranges, frames, width))
        spans = ", ".join(f"{r.start}-{r.end - 1}: {r.face}" for r in ranges[:6]) + (
            " ..." if len(ranges) > 6 else ""
        )
        rows.append(_line(f"dub ranges (frames: face), passthrough outside: {spans}", width))
    if sync:
        rows.append(sync_curve(sync, width))
        known = [v for v in sync if v is not None]
        peak = f"max {max(known):.2f}" if known else "no second scored"
        rows.append(_line(f"lip-sync confidence per second (SyncNet, frames before encoding; {peak})", width))
    rows.append(_legend(kinds, width))
    cell = width // 2
    for i in range(0, len(pairs), 2):
        cells = []
        for t, src, out in pairs[i : i + 2]:
            kind = KINDS.get(kinds[t], UNKNOWN)[1] if kinds else UNKNOWN[1]
            images = np.hstack([_fit(src, cell // 2), _fit(out, cell - cell // 2)])
            cells.append(np.vstack([_line(f"frame {t}: {kind} (source | output)", cell), images]))
        height = max(c.shape[0] for c in cells)
        cells = [np.pad(c, ((0, height - c.shape[0]), (0, 0), (0, 0)), constant_values=255) for c in cells]
        row = np.full((height, width, 3), 255, np.uint8)
        for j, c in enumerate(cells):
            row[:, j * cell : j * cell + cell] = c
        rows.append(row)
    return np.vstack(rows)


def write_qa_sheet(
    path: Path, output: Path, source: VideoInfo, plan: Plan, kinds: str, sync: list | None = None
) -> Path:
    """Decode the sampled frames of ``output`` and their source frames, draw the sheet (with the per-second
    lip-sync confidence ``sync``, when given), write a PNG."""
    out_info = probe_video(output)
    pairs = []
    for t in sample_frames(plan.output_frames, kinds):
        s = plan.source_index(t)
        src = next(iter(read_frames(source, s, s + 1)))
        out = next(iter(read_frames(out_info, t, t + 1)))
        pairs.append((t, src, out))
    sheet = draw_sheet(kinds, plan.output_frames, pairs, sync=sync, ranges=plan.ranges if plan.dub else ())
    if not cv2.imwrite(str(path), sheet):
        raise OSError(f"could not write {path}")
    return path


def _fit(img: np.ndarray, width: int) -> np.ndarray:
    h, w = img.shape[:2]
    height = max(1, round(h * width / w))
    return cv2.resize(img, (width, height), interpolation=cv2.INTER_AREA if w > width else cv2.INTER_LINEAR)


def _line(text: str, width: int) -> np.ndarray:
    row = np.full((_TEXT, width, 3), 255, np.uint8)
    cv2.putText(row, text, (6, 16), cv2.FONT_HERSHEY_SIMPLEX, 0.45, (0, 0, 0), 1, cv2.LINE_AA)
    return row


def _legend(kinds: str, width: int) -> np.ndarray:
    row = np.full((_TEXT, width, 3), 255, np.uint8)
    x = 6
    for char, (colour, name) in [*KINDS.items(), ("?", UNKNOWN)]:
        n = kinds.count(char) if char != "?" else sum(1 for k in kinds if k not in KINDS)
        if char == "?" and kinds and not n:
            continue
        cv2.rectangle(row, (x, 5), (x + 12, 17), colour, -1)
        label = f"{name} {n}" if kinds else name
        cv2.putText(row, label, (x + 16, 16), cv2.FONT_HERSHEY_SIMPLEX, 0.4, (0, 0, 0), 1, cv2.LINE_AA)
        x += 24 + 8 * len(label)
    return row
