"""Face tracks: every face of every frame linked over a video, shot cuts, and the face choice rules.

Pure and Ray-free, over boxes only (no model): :func:`link` takes per source frame the detector boxes of
its faces and a cheap picture signature (:func:`signature`, a 16x16 grey thumbnail the detect units keep
beside the detections) and returns :class:`Tracks`. A face joins the track whose last box overlaps it
most (IoU, or a close centre when a fast move leaves little overlap); a track survives ``MAX_GAP``
frames without its face; a shot cut (a big change of signature, :func:`is_cut`) ends every track. Ids
are numbered from 1 in order of first appearance (faces appearing in the same frame: left to right), so
they are deterministic: the same detections give the same ids. :data:`VERSION` changes when the rule
does (it is part of every cached track result and every prepared-entry key that depends on tracks).

Face choices (``face.select``, :func:`parse_select`): ``largest`` (the default, per frame, exactly the
pre-track behaviour), a track id, or a rule ``left`` / ``right`` / ``center``. Rules pick per frame (the
face whose centre is leftmost / rightmost / nearest the frame's vertical mid line): a rule needs no
whole-video step, so it costs nothing over ``largest``, and "the person on the left" stays right when
people move or a shot changes; the crop box of the chosen face is then smoothed along its track.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property

import cv2
import numpy as np

from shards.errors import InputError
from shards.ranges import FACE_RULES as RULES
from shards.ranges import parse_select

VERSION = 1
SIGNATURE_SIDE = 16
CUT_DIFF = 40.0  # mean absolute difference of two signatures (0..255) above which a cut is declared
LINK_IOU = 0.3  # a face joins a track whose last box overlaps it at least this much
LINK_CENTRE = 0.5  # ... or whose last centre is within this share of that box's larger side
MAX_GAP = 5  # frames a track waits for its face before it ends


FBox = tuple[float, float, float, float]  # x1, y1, x2, y2 (full-frame pixels)


def is_track(spec: object) -> bool:
    """Whether a face choice names a track (and so needs every frame's detections first)."""
    return spec is not None and isinstance(parse_select(spec), int)


def signature(frame: np.ndarray) -> np.ndarray:
    """A (16, 16) uint8 grey thumbnail of an (H, W, 3) uint8 BGR frame: cheap to keep, enough for cuts.

    Area averages in two steps: first by a whole factor (OpenCV's fast path; the few edge rows and
    columns that do not fill a block are left out), then to 16x16 from a picture of about 32 rows."""
    grey = cv2.cvtColor(frame, cv2.COLOR_BGR2GRAY)
    k = max(1, min(grey.shape) // (2 * SIGNATURE_SIDE))
    h, w = grey.shape[0] // k, grey.shape[1] // k
    if k > 1:
        grey = cv2.resize(grey[: h * k, : w * k], (w, h), interpolation=cv2.INTER_AREA)
    return cv2.resize(grey, (SIGNATURE_SIDE, SIGNATURE_SIDE), interpolation=cv2.INTER_AREA)


def is_cut(before: np.ndarray | None, after: np.ndarray | None) -> bool:
    """Whether a shot cut lies between two consecutive frames' signatures (None: unknown, no cut)."""
    if before is None or after is None:
        return False
    return float(np.mean(np.abs(before.astype(np.int16) - after.astype(np.int16)))) > CUT_DIFF


def pick(boxes: Sequence[FBox], rule: str, width: int) -> int | None:
    """The index of the face a per-frame ``rule`` chooses among ``boxes`` (ties: the lower index);
    ``largest`` expects boxes already ordered largest first (:meth:`musetalk.faces.FaceAnalyzer.detect_all`)."""
    if not boxes:
        return None
    if rule == "largest":
        return 0
    centres = [(b[0] + b[2]) / 2 for b in boxes]
    if rule == "left":
        key = centres
    elif rule == "right":
        key = [-c for c in centres]
    elif rule == "center":
        key = [abs(c - width / 2) for c in centres]
    else:
        raise ValueError(f"unknown face rule {rule!r}; use one of {', '.join(RULES)}")
    return min(range(len(boxes)), key=lambda i: (key[i], i))


@dataclass(frozen=True)
class Track:
    """One face followed through one shot: ``faces`` are (source frame, face index in that frame)."""

    id: int
    faces: tuple[tuple[int, int], ...]
    boxes: tuple[FBox, ...]

    @property
    def first(self) -> int:
        return self.faces[0][0]

    @property
    def last(self) -> int:
        return self.faces[-1][0]

    @property
    def mean_box(self) -> FBox:
        x1, y1, x2, y2 = np.mean(np.asarray(self.boxes, dtype=np.float64), axis=0)
        return (round(float(x1), 1), round(float(y1), 1), round(float(x2), 1), round(float(y2), 1))

    def summary(self) -> dict:
        """The listing's view: id, first and last frame, mean box, frames seen."""
        return {
            "id": self.id,
            "first_frame": self.first,
            "last_frame": self.last,
            "frames_seen": len(self.faces),
            "mean_box": list(self.mean_box),
        }


@dataclass(frozen=True)
class Tracks:
    """Every track of a run of source frames, and the frames that start a new shot."""

    tracks: tuple[Track, ...]
    cuts: tuple[int, ...] = ()
    version: int = VERSION

    @cached_property
    def _where(self) -> dict[tuple[int, int], int]:
        return {(t.id, src): i for t in self.tracks for src, i in t.faces}

    @property
    def ids(self) -> list[int]:
        return [t.id for t in self.tracks]

    def face(self, track: int, src: int) -> int | None:
        """The index of track ``track``'s face in source frame ``src``, None where it is not seen."""
        return self._where.get((track, src))

    def track_of(self, src: int, index: int) -> int | None:
        """The id of the track holding face ``index`` of frame ``src``."""
        for t in self.tracks:
            if (src, index) in t.faces:
                return t.id
        return None

    def to_json(self) -> str:
        return json.dumps(
            {
                "version": self.version,
                "cuts": list(self.cuts),
                "tracks": [{"id": t.id, "faces": t.faces, "boxes": t.boxes} for t in self.tracks],
            }
        )

    @classmethod
    def from_json(cls, text: str) -> Tracks:
        meta = json.loads(text)
        if meta.get("version") != VERSION:
            raise ValueError(f"face tracks version {meta.get('version')} is not {VERSION}")
        return cls(
            tuple(
                Track(t["id"], tuple(tuple(f) for f in t["faces"]), tuple(tuple(b) for b in t["boxes"]))
                for t in meta["tracks"]
            ),
            tuple(meta["cuts"]),
        )


def link(frames: Sequence[tuple[int, Sequence[FBox], np.ndarray | None]]) -> Tracks:
    """Tracks over ``frames``: (source frame, its faces' boxes, its signature or None), consecutive and
    in order. Deterministic: a greedy match of faces to open tracks, best overlap first."""
    closed: list[dict] = []
    open_: list[dict] = []  # {"id", "faces", "boxes", "seen"}
    cuts: list[int] = []
    next_id, before = 1, None
    for n, (src, boxes, sig) in enumerate(frames):
        if n and is_cut(before, sig):
            cuts.append(src)
            closed += open_
            open_ = []
        before = sig
        for t in [t for t in open_ if src - t["seen"] > MAX_GAP + 1]:
            open_.remove(t)
            closed.append(t)
        pairs = []
        for ti, t in enumerate(open_):
            for fi, box in enumerate(boxes):
                score = _link_score(t["boxes"][-1], box)
                if score is not None:
                    pairs.append((score, t["id"], fi, ti))
        pairs.sort(key=lambda p: (-p[0][0], p[0][1], p[1], p[2]))
        used_t, used_f = set(), set()
        for _, _, fi, ti in pairs:
            if ti in used_t or fi in used_f:
                continue
            used_t.add(ti)
            used_f.add(fi)
            t = open_[ti]
            t["faces"].append((src, fi))
            t["boxes"].append(tuple(float(v) for v in boxes[fi]))
            t["seen"] = src
        for fi in sorted(set(range(len(boxes))) - used_f, key=lambda i: (boxes[i][0], boxes[i][1], i)):
            box = tuple(float(v) for v in boxes[fi])
            open_.append({"id": next_id, "faces": [(src, fi)], "boxes": [box], "seen": src})
            next_id += 1
    every = sorted(closed + open_, key=lambda t: t["id"])
    return Tracks(tuple(Track(t["id"], tuple(t["faces"]), tuple(t["boxes"])) for t in every), tuple(cuts))


def link_frames(found: Sequence) -> Tracks:
    """The tracks of consecutive source frames 0, 1, ... from their
    :class:`musetalk.faces.FrameFaces` (every face's ``box``, the ``signature``)."""
    return link([(k, [d.box for d in f.faces], f.signature) for k, f in enumerate(found)])


def _link_score(last: FBox, box: Sequence[float]) -> tuple[float, float] | None:
    """(IoU, centre distance) when ``box`` may continue a track whose last box is ``last``, else None."""
    ix = max(0.0, min(last[2], box[2]) - max(last[0], box[0]))
    iy = max(0.0, min(last[3], box[3]) - max(last[1], box[1]))
    inter = ix * iy
    union = _area(last) + _area(box) - inter
    iou = inter / union if union > 0 else 0.0
    dist = math.hypot((last[0] + last[2] - box[0] - box[2]) / 2, (last[1] + last[3] - box[1] - box[3]) / 2)
    side = max(last[2] - last[0], last[3] - last[1])
    if iou >= LINK_IOU or dist <= LINK_CENTRE * side:
        return iou, dist
    return None


def _area(b: Sequence[float]) -> float:
    return max(0.0, b[2] - b[0]) * max(0.0, b[3] - b[1])


def chosen(spec: object, src: int, boxes: Sequence[FBox], width: int, tracks: Tracks | None) -> int | None:
    """The index of the face ``spec`` chooses among frame ``src``'s ``boxes`` (largest first), unsmoothed."""
    rule = parse_select(spec)
    if isinstance(rule, int):
        return None if tracks is None else tracks.face(rule, src)
    return pick(boxes, rule, width)


def follow(
    spec: object, src: int, window: range, found: Sequence, width: int, tracks: Tracks | None = None
) -> list[int | None]:
    """Per frame of ``window`` (around ``src``; ``found``: their :class:`musetalk.faces.FrameFaces`), the
    index of the face that ``spec`` chooses at ``src`` (None where that face is not seen): what the box
    smoothing of ``src`` reads.

    ``largest``: each frame's own largest face, as before tracks existed (no cut stops it). A track id:
    that track's faces (``tracks``, over the whole video). A rule: the track, linked over ``window``
    only, of the face the rule picks at ``src``, so the result is a pure function of the window."""
    rule = parse_select(spec)
    if rule == "largest":
        return [0 if f.faces else None for f in found]
    if isinstance(rule, int):
        if tracks is None:
            raise ValueError(f"face.select={rule} names a track: the whole video's tracks are needed")
        if rule not in tracks.ids:
            raise InputError(
                f"face.select={rule}: the video has no track {rule} (its tracks: "
                f"{', '.join(map(str, tracks.ids)) or 'none'}); list them with `python -m cluster.faces VIDEO`"
            )
        return [tracks.face(rule, k) for k in window]
    boxes = [[d.box for d in f.faces] for f in found]
    local = link([(k, b, f.signature) for k, b, f in zip(window, boxes, found, strict=True)])
    chosen = pick(boxes[src - window.start], rule, width)
    if chosen is None:
        return [None] * len(window)
    track = local.track_of(src, chosen)
    return [local.face(track, k) for k in window]
