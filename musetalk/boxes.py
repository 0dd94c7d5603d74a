"""Crop boxes of source frames: the detector's or the landmarks' box (upstream v1.5's rules), temporal
smoothing over a fixed window along the chosen face's track, and the 256x256 face crop.

A box reads only its own smoothing window (:func:`smoothing_window`), so it is the same however the video
is sharded; which face a frame's box follows is its face choice (``face.select``, a dub range's face).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterable, Mapping, Sequence

import numpy as np

from musetalk.config import FaceConfig
from musetalk.faces import CROP_MODES, Detection, FrameFaces, as_faces
from musetalk.resample import resize_lanczos4
from musetalk.tracks import Tracks, follow, is_track, link_frames
from shards.errors import ConfigError

logger = logging.getLogger(__name__)

Box = tuple[int, int, int, int]  # x1, y1, x2, y2 in full-frame pixels, x2/y2 exclusive

CROP_SIZE = 256
MIN_SIDE = 8  # a crop box narrower or shorter than this is unusable
NOSE_LANDMARK = 29  # upstream v1.5: face_land_mark[29] (0-based, 68-point scheme) is the box's mid line


def crop_box(det: Detection | None, frame_shape: tuple[int, int], cfg: FaceConfig) -> Box | None:
    """The crop box of a detection in a frame of shape (H, W[, C]); None when there is no usable face.

    ``landmarks`` (upstream v1.5 ``get_landmark_and_bbox``): landmarks truncated toward zero (int32),
    landmark 29's y moved by ``bbox_shift``; x from the landmarks' min/max, bottom = max y, top =
    ``max(0, y29 - (bottom - y29))``, so the top moves by twice the shift. When that box is empty or
    has x1 < 0 (or there are no landmarks) the detector box is used, unshifted, as upstream does.
    ``box``: the detector box, top moved down by ``bbox_shift``. Then ``extra_margin`` is added below.

    Beyond upstream, the box is clipped to the frame (upstream lets x2 and the landmark bottom leave it,
    which stretches the pasted face), and a landmark box narrower or shorter than ``MIN_SIDE`` once
    clipped gives way to the detector box; if that is too small as well there is no face.
    """
    if det is None:
        return None
    if cfg.crop not in CROP_MODES:
        raise ConfigError(
            f"invalid face config: face.crop must be one of {', '.join(CROP_MODES)}, got {cfg.crop!r}"
        )
    height, width = int(frame_shape[0]), int(frame_shape[1])
    box = None
    if cfg.crop == "landmarks":
        if det.landmarks is None:
            logger.debug("no landmarks for the face at %s; using the detector box", det.box)
        else:
            box = landmark_box(det.landmarks, cfg.bbox_shift)
            if box is None:
                logger.debug(
                    "landmark box empty or left of the frame for the face at %s; using the detector box",
                    det.box,
                )
            else:
                box = _clipped(*box, width, height)
                if box is None:
                    logger.debug(
                        "landmark box too small in the frame for the face at %s; using the detector box",
                        det.box,
                    )
        shift = 0
    else:
        shift = cfg.bbox_shift
    if box is None:
        box = _detector_box(det.box, shift, width, height)
        if box is None:
            logger.debug("degenerate detector box %s (bbox_shift %d); no crop", det.box, shift)
            return None
    x1, y1, x2, y2 = box
    return (x1, y1, x2, min(y2 + cfg.extra_margin, height))


def landmark_box(landmarks: np.ndarray, bbox_shift: int = 0) -> Box | None:
    """Upstream v1.5's box from (68, 2) (x, y) landmarks, before any clipping; None where upstream
    falls back to the detector box (an empty box, or x1 < 0).

    Coordinates are truncated toward zero (upstream's ``astype(np.int32)``); ``bbox_shift`` is added
    to landmark 29's y before the bottom (max y over all landmarks, the moved one included) is taken.
    """
    points = np.asarray(landmarks, dtype=np.float64)
    if points.shape != (68, 2):
        raise ValueError(f"landmarks must be (68, 2) (x, y), got {points.shape}")
    points = np.trunc(points).astype(np.int64)
    points[NOSE_LANDMARK, 1] += bbox_shift
    x1, x2 = int(points[:, 0].min()), int(points[:, 0].max())
    y2 = int(points[:, 1].max())
    nose_y = int(points[NOSE_LANDMARK, 1])
    y1 = max(0, nose_y - (y2 - nose_y))
    if y2 - y1 <= 0 or x2 - x1 <= 0 or x1 < 0:
        return None
    return (x1, y1, x2, y2)


def _detector_box(box: Sequence[float], bbox_shift: int, width: int, height: int) -> Box | None:
    """Upstream's detector box: negative coordinates clipped to 0, then truncated; top moved by ``bbox_shift``."""
    x1, y1, x2, y2 = (int(max(v, 0.0)) for v in box)
    return _clipped(x1, y1 + bbox_shift, x2, y2, width, height)


def _clipped(x1: int, y1: int, x2: int, y2: int, width: int, height: int) -> Box | None:
    """The box clipped to a width x height frame; None when narrower or shorter than ``MIN_SIDE``."""
    x1, x2 = min(max(x1, 0), width), min(max(x2, 0), width)
    y1, y2 = min(max(y1, 0), height), min(max(y2, 0), height)
    if x2 - x1 < MIN_SIDE or y2 - y1 < MIN_SIDE:
        return None
    return (x1, y1, x2, y2)


def smoothing_window(src: int, radius: int, source_frames: int) -> range:
    """The source frames whose raw boxes source frame ``src``'s smoothed box reads: ``[src - radius,
    src + radius]`` clipped to the video. The one definition of the smoothing context."""
    return range(max(0, src - radius), min(source_frames, src + radius + 1))


def smooth_boxes(boxes: Sequence[Box | None], radius: int) -> list[Box | None]:
    """Per-coordinate median of the non-None boxes in ``[i - radius, i + radius]``; None stays None.

    A median, not a mean: one wrong box in the window (a misdetection, a landmark fallback) does not move
    the crop at all, and a real step in position is followed without blur, while steady jitter still
    shrinks. Each result reads only its own window, so it is the same for any list holding that window.
    """
    if radius < 0:
        raise ValueError(f"smoothing radius must be >= 0, got {radius}")
    result: list[Box | None] = []
    for i, box in enumerate(boxes):
        if box is None or radius == 0:
            result.append(box if box is None else tuple(int(v) for v in box))
            continue
        window = [b for b in boxes[max(0, i - radius) : i + radius + 1] if b is not None]
        median = np.median(np.asarray(window, dtype=np.float64), axis=0)
        x1, y1, x2, y2 = (math.floor(v + 0.5) for v in median)
        result.append((x1, y1, x2, y2))
    return result


def crop_face(frame: np.ndarray, box: Box) -> np.ndarray:
    """The box of an (H, W, 3) uint8 BGR frame resized to (256, 256, 3) uint8 BGR with OpenCV's Lanczos
    (upstream), through :func:`musetalk.resample.resize_lanczos4`."""
    x1, y1, x2, y2 = box
    height, width = frame.shape[:2]
    if not (0 <= x1 < x2 <= width and 0 <= y1 < y2 <= height):
        raise ValueError(f"crop box {box} is empty or outside the {width}x{height} frame")
    return resize_lanczos4(frame[y1:y2, x1:x2], (CROP_SIZE, CROP_SIZE))  # OpenCV's pixels, exactly


def boxes_from_detections(
    detections: Mapping[int, FrameFaces | Detection | None],
    frames: Iterable[int],
    frame_shape: tuple[int, int],
    cfg: FaceConfig,
    source_frames: int,
    choice: Callable[[int], str | int | None] | None = None,
    tracks: Tracks | None = None,
) -> dict[int, Box | None]:
    """Smoothed crop boxes of source ``frames``: each reads the raw boxes of its
    :func:`smoothing_window` (``detections`` must hold them), so a box is a pure function of its frame.
    ``choice(src)``: which face of frame ``src`` (a ``face.select`` value, default ``cfg.select``; None:
    no box, the frame passes through). The window follows the chosen face's track
    (:func:`musetalk.tracks.follow`); a frame whose chosen face is absent gets no box. A track id needs
    the whole video's ``tracks`` (or every frame's ``detections``, to link them here)."""
    r = cfg.smooth_radius
    raw: dict[tuple[int, int], Box | None] = {}

    def raw_box(k: int, i: int) -> Box | None:
        if (k, i) not in raw:
            raw[(k, i)] = crop_box(as_faces(detections[k]).faces[i], frame_shape, cfg)
        return raw[(k, i)]

    out = {}
    for s in frames:
        spec = cfg.select if choice is None else choice(s)
        if spec is None:
            out[s] = None
            continue
        if tracks is None and is_track(spec):
            tracks = link_frames([as_faces(detections[k]) for k in range(source_frames)])
        window = smoothing_window(s, r, source_frames)
        faces = [as_faces(detections[k]) for k in window]
        picked = follow(spec, s, window, faces, int(frame_shape[1]), tracks)
        boxes = [None if i is None else raw_box(k, i) for k, i in zip(window, picked, strict=True)]
        out[s] = smooth_boxes(boxes, r)[s - window.start]
    return out
