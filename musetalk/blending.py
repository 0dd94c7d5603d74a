"""Paste a generated face back into its frame through a soft mask (upstream MuseTalk's blend, improved).

Upstream: a square of side ``2s`` around the face box (``s = int(max(w, h) // 2 * expand)``) is cut from
the ORIGINAL frame (black outside the frame, like a PIL crop) and parsed with BiSeNet at 512x512; the
parsing mask (see :func:`parsing_mask`) is resized back to the square, kept only inside the face box,
its top ``upper_boundary_ratio`` of the square zeroed, and Gaussian-blurred with kernel
``int(0.05 * side // 2 * 2) + 1``.

Our improvement: that mask is multiplied by a feathered ellipse inscribed in the face box
(:func:`ellipse_mask`: 1 inside ``r <= 1 - feather``, a smoothstep down to 0 on the box-inscribed
ellipse ``r = 1``), so no rectangular box edge can show. When parsing fails (an exception, or almost
nothing of the face box survives) the parsing mask is replaced by the whole box and the same top cut,
blur and ellipse apply: a pure feathered (half-)ellipse, ``parsed=False``.

Everything that depends only on the source frame and its box is a :class:`BlendMaterial`, computed once
per source frame by :meth:`Blender.prepare` and reused by every :meth:`Blender.paste` of that frame.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Sequence
from dataclasses import dataclass

import cv2
import numpy as np

from musetalk.config import BlendConfig
from musetalk.parsing import PARSE_SIZE, FaceParser
from shards.errors import ConfigError

log = logging.getLogger(__name__)

Box = tuple[int, int, int, int]  # x1, y1, x2, y2 with x2/y2 exclusive

MODES = ("jaw", "raw", "neck")
SKIN, NOSE, NECK = 1, 10, 14
MOUTH_AND_LIPS = (11, 12, 13)  # mouth interior, upper lip, lower lip
CHEEK_WIDTH = 90  # upstream v1.5 inference default (--left/right_cheek_width)
MIN_PARSED_FRACTION = 0.02  # below this share of the kept box area, parsing counts as failed


def blend_square(box: Box, expand: float) -> tuple[Box, int]:
    """Upstream ``get_crop_box``: a square of half-side ``s`` around the box centre (may leave the frame)."""
    x1, y1, x2, y2 = box
    cx, cy = (x1 + x2) // 2, (y1 + y2) // 2
    s = int(max(x2 - x1, y2 - y1) // 2 * expand)
    return (cx - s, cy - s, cx + s, cy + s), s


@functools.cache
def _jaw_kernels(cheek_width: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Upstream jaw-mode morphology: (cone dilation kernel 33x33, cheek erosion ellipse 35x3, cheek band mask 512x512)."""
    cone_height, tail_height = 21, 12
    size = cone_height + tail_height
    centre = size // 2
    cone = np.zeros((size, size), dtype=np.uint8)
    for row in range(cone_height // 2, cone_height):  # widening cone: 1, 3, ..., 21 pixels
        half = row - cone_height // 2
        cone[row, centre - half : centre + half + 1] = 1
    base_half = int(cone[cone_height - 1].sum()) // 2
    cone[cone_height:, max(0, centre - base_half) : min(size, centre + base_half + 1)] = 1
    cheek_kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (35, 3))
    # Outer cheek bands: columns [0, 256 - w] and [256 + w, 512) (inclusive rectangle corners upstream).
    cheeks = np.zeros((PARSE_SIZE, PARSE_SIZE), dtype=np.uint8)
    mid = PARSE_SIZE // 2
    cheeks[:, : mid - cheek_width + 1] = 255
    cheeks[:, mid + cheek_width :] = 255
    for array in (cone, cheek_kernel, cheeks):
        array.flags.writeable = False
    return cone, cheek_kernel, cheeks


def parsing_mask(labels: np.ndarray, mode: str, cheek_width: int = CHEEK_WIDTH) -> np.ndarray:
    """(512, 512) class ids -> (512, 512) uint8 {0, 255} blend region, by upstream mode.

    ``raw``: skin, mouth and lips. ``neck``: those plus the neck. ``jaw``: skin dilated with upstream's
    33x33 cone kernel (10 px sideways, 16 px up, a tapering 6 px down), that dilation eroded again by a
    35x3 ellipse (twice) in the outer cheek bands (columns <= 256 - width and >= 256 + width), the nose
    removed, mouth and lips added.
    """
    if labels.shape != (PARSE_SIZE, PARSE_SIZE):
        raise ValueError(f"parsing labels must be ({PARSE_SIZE}, {PARSE_SIZE}), got {labels.shape}")
    if mode == "raw":
        keep = np.isin(labels, (SKIN, *MOUTH_AND_LIPS))
    elif mode == "neck":
        keep = np.isin(labels, (SKIN, *MOUTH_AND_LIPS, NECK))
    elif mode == "jaw":
        cone, cheek_kernel, cheeks = _jaw_kernels(cheek_width)
        skin = np.where(labels == SKIN, 255, 0).astype(np.uint8)
        dilated = cv2.dilate(skin, cone, iterations=1)
        eroded = cv2.erode(dilated, cheek_kernel, iterations=2)
        face = (eroded & cheeks) | (dilated & ~cheeks)
        keep = ((face == 255) & (labels != NOSE)) | np.isin(labels, MOUTH_AND_LIPS)
    else:
        raise ConfigError(f"unknown blend mode {mode!r}; use one of {', '.join(MODES)}")
    return np.where(keep, 255, 0).astype(np.uint8)


def ellipse_mask(height: int, width: int, feather: float) -> np.ndarray:
    """(height, width) float32 in [0, 1]: the ellipse inscribed in the rectangle, 1 for normalised radius
    ``r <= 1 - feather``, a smoothstep down to 0 at ``r = 1`` (the rectangle's edge midpoints)."""
    if height < 1 or width < 1:
        raise ValueError(f"ellipse size must be positive, got {height}x{width}")
    if not 0.0 <= feather <= 1.0:
        raise ConfigError(f"ellipse_feather must be in [0, 1], got {feather}")
    ys = (np.arange(height, dtype=np.float64) + 0.5 - height / 2) / (height / 2)
    xs = (np.arange(width, dtype=np.float64) + 0.5 - width / 2) / (width / 2)
    r = np.sqrt(ys[:, None] ** 2 + xs[None, :] ** 2)
    if feather == 0.0:
        return (r <= 1.0).astype(np.float32)
    t = np.clip((1.0 - r) / feather, 0.0, 1.0)
    return (t * t * (3.0 - 2.0 * t)).astype(np.float32)


def crop_padded(frame: np.ndarray, box: Box) -> np.ndarray:
    """Crop ``box`` from (H, W, C) ``frame``; parts outside the frame are black (as PIL's crop)."""
    x1, y1, x2, y2 = box
    h, w = frame.shape[:2]
    out = np.zeros((y2 - y1, x2 - x1, *frame.shape[2:]), dtype=frame.dtype)
    fx1, fy1, fx2, fy2 = max(x1, 0), max(y1, 0), min(x2, w), min(y2, h)
    if fx2 > fx1 and fy2 > fy1:
        out[fy1 - y1 : fy2 - y1, fx1 - x1 : fx2 - x1] = frame[fy1:fy2, fx1:fx2]
    return out


def _place(canvas: np.ndarray, patch: np.ndarray, x: int, y: int) -> None:
    """Write ``patch`` into ``canvas`` with its top-left at (x, y), clipping whatever falls outside."""
    ph, pw = patch.shape[:2]
    ch, cw = canvas.shape[:2]
    cx1, cy1, cx2, cy2 = max(x, 0), max(y, 0), min(x + pw, cw), min(y + ph, ch)
    if cx2 > cx1 and cy2 > cy1:
        canvas[cy1:cy2, cx1:cx2] = patch[cy1 - y : cy2 - y, cx1 - x : cx2 - x]


@dataclass(frozen=True, eq=False)
class BlendMaterial:
    """Everything that depends only on the source frame and its box (cacheable per source frame)."""

    square: Box  # blend square in frame coordinates (possibly partly outside the frame)
    mask: np.ndarray  # (side, side) float32 in [0, 1], read-only: the final feathered mask
    parsed: bool  # False when the pure-ellipse fallback was used


class Blender:
    """Builds blend masks (:meth:`prepare`) and composites generated faces (:meth:`paste`)."""

    def __init__(self, parser: FaceParser | None, cfg: BlendConfig) -> None:
        problems = []
        if cfg.mode not in MODES:
            problems.append(f"blend.mode={cfg.mode!r} is not one of {', '.join(MODES)}")
        if not 0.0 <= cfg.upper_boundary_ratio < 1.0:
            problems.append(f"blend.upper_boundary_ratio={cfg.upper_boundary_ratio} is not in [0, 1)")
        if cfg.expand < 1.0:
            problems.append(f"blend.expand={cfg.expand} must be >= 1 (the square must hold the face box)")
        if not 0.0 <= cfg.ellipse_feather <= 1.0:
            problems.append(f"blend.ellipse_feather={cfg.ellipse_feather} is not in [0, 1]")
        if problems:
            raise ConfigError("invalid blend config: " + "; ".join(problems))
        self.cfg = cfg
        self.parser = parser if cfg.parsing else None

    def prepare(self, frames: Sequence[np.ndarray], boxes: Sequence[Box]) -> list[BlendMaterial]:
        """Masks for (H, W, 3) uint8 BGR source frames and their face boxes, one material per pair."""
        if len(frames) != len(boxes):
            raise ValueError(f"prepare got {len(frames)} frames but {len(boxes)} boxes")
        for box in boxes:
            if box[2] <= box[0] or box[3] <= box[1]:
                raise ValueError(f"empty face box {box}")
        squares = [blend_square(box, self.cfg.expand)[0] for box in boxes]
        regions: list[np.ndarray | None] = [None] * len(boxes)
        todo = [i for i, square in enumerate(squares) if square[2] > square[0]]  # a 1-pixel box has no square
        if self.parser is not None and todo:
            crops = [crop_padded(frames[i], squares[i]) for i in todo]
            try:
                labels = self.parser(crops)
            except (RuntimeError, ValueError, cv2.error) as err:
                log.warning("face parsing failed on %d frames, using the ellipse mask: %s", len(crops), err)
            else:
                for i, label_map in zip(todo, labels, strict=True):
                    regions[i] = parsing_mask(label_map, self.cfg.mode)
        materials = [
            self._material(box, square, region)
            for box, square, region in zip(boxes, squares, regions, strict=True)
        ]
        fallbacks = sum(not m.parsed for m in materials)
        if self.parser is not None and fallbacks:
            log.info("blend: %d of %d masks fell back to the pure ellipse", fallbacks, len(materials))
        return materials

    def _material(self, box: Box, square: Box, region: np.ndarray | None) -> BlendMaterial:
        """Mask of one square from its (512, 512) uint8 parsing mask, or the fallback when ``region`` is None."""
        sx, sy = square[0], square[1]
        side = square[2] - sx
        if side == 0:
            return BlendMaterial(square=square, mask=np.zeros((0, 0), dtype=np.float32), parsed=False)
        bx1, by1, bx2, by2 = box[0] - sx, box[1] - sy, box[2] - sx, box[3] - sy
        top = int(side * self.cfg.upper_boundary_ratio)
        in_box = np.zeros((side, side), dtype=np.float32)
        _place(in_box, np.ones((by2 - by1, bx2 - bx1), dtype=np.float32), bx1, by1)
        in_box[:top] = 0.0

        keep = in_box
        parsed = False
        if region is not None:
            resized = cv2.resize(region, (side, side), interpolation=cv2.INTER_LINEAR)
            candidate = resized.astype(np.float32) / 255.0 * in_box
            area = float(in_box.sum())
            if area > 0 and float((candidate > 0.5).sum()) >= MIN_PARSED_FRACTION * area:
                keep, parsed = candidate, True

        ksize = int(0.05 * side // 2 * 2) + 1
        blurred = cv2.GaussianBlur(keep, (ksize, ksize), 0)
        ellipse = np.zeros((side, side), dtype=np.float32)
        _place(ellipse, ellipse_mask(by2 - by1, bx2 - bx1, self.cfg.ellipse_feather), bx1, by1)
        mask = np.clip(blurred * ellipse, 0.0, 1.0).astype(np.float32)
        mask.flags.writeable = False
        return BlendMaterial(square=square, mask=mask, parsed=parsed)

    def paste(self, frame: np.ndarray, face: np.ndarray, box: Box, material: BlendMaterial) -> np.ndarray:
        """Composite a generated face into a NEW copy of ``frame``.

        frame: (H, W, 3) uint8 BGR; face: (h, w, 3) uint8 BGR of any size, resized to the box
        (area filter when shrinking, bilinear when growing); ``out = frame * (1 - m) + face * m`` rounded.
        Pixels where the mask is 0 (everything outside the blend square in particular) are unchanged.
        """
        if frame.ndim != 3 or frame.shape[2] != 3 or frame.dtype != np.uint8:
            raise ValueError(f"frame must be (H, W, 3) uint8 BGR, got {frame.shape} {frame.dtype}")
        if face.ndim != 3 or face.shape[2] != 3 or face.dtype != np.uint8:
            raise ValueError(f"face must be (h, w, 3) uint8 BGR, got {face.shape} {face.dtype}")
        square = blend_square(box, self.cfg.expand)[0]
        if tuple(material.square) != square:
            raise ValueError(
                f"blend material was prepared for square {material.square}, box {box} needs {square}"
            )
        out = frame.copy()
        h, w = frame.shape[:2]
        sx, sy, sx2, sy2 = square
        fx1, fy1, fx2, fy2 = max(sx, 0), max(sy, 0), min(sx2, w), min(sy2, h)
        if fx2 <= fx1 or fy2 <= fy1:
            return out

        x1, y1, x2, y2 = box
        bw, bh = x2 - x1, y2 - y1
        interp = cv2.INTER_AREA if face.shape[0] > bh and face.shape[1] > bw else cv2.INTER_LINEAR
        face_box = cv2.resize(face, (bw, bh), interpolation=interp)

        base = frame[fy1:fy2, fx1:fx2].astype(np.float32)
        layer = base.copy()
        _place(layer, face_box.astype(np.float32), x1 - fx1, y1 - fy1)
        m = material.mask[fy1 - sy : fy2 - sy, fx1 - sx : fx2 - sx, None]
        blended = base * (1.0 - m) + layer * m
        out[fy1:fy2, fx1:fx2] = np.clip(np.rint(blended), 0, 255).astype(np.uint8)
        return out
