"""Paste a generated face back into its frame through a soft mask: upstream MuseTalk 1.5's blend.

Upstream (``get_image``, v1.5 inference): a square of side ``2s`` around the face box
(``s = int(max(w, h) // 2 * expand)``) is cut from the ORIGINAL frame (black outside the frame, like a
PIL crop) and parsed with BiSeNet at 512x512 (Pillow bilinear, see :func:`musetalk.parsing.parse_input`);
the parsing mask (:func:`parsing_mask`) is resized back to the square with Pillow's bicubic filter
(:func:`region_to_square`), kept only inside the face box, its top ``upper_boundary_ratio`` of the square
zeroed, and Gaussian-blurred as uint8 with kernel ``int(0.05 * side // 2 * 2) + 1`` (:func:`upstream_mask`).
The generated face goes to the box with ``cv2.INTER_LINEAR`` (:func:`fit_face`) and is composited with
Pillow's paste arithmetic (:func:`composite`, :func:`paste_face`).

``blend.ellipse=false`` gives exactly that mask. By default (``true``) the mask is also multiplied by a
feathered ellipse inscribed in the face box (:func:`ellipse_mask`: 1 inside ``r <= 1 - feather``, a
smoothstep down to 0 on the box-inscribed ellipse ``r = 1``), so no rectangular box edge can show, and
when parsing fails (an exception, or almost nothing of the face box survives) the parsing mask is
replaced by the whole box, with the same top cut, blur and ellipse: a pure feathered (half-)ellipse,
``parsed=False``.

Everything that depends only on the source frame and its box is a :class:`BlendMaterial`, computed once
per source frame by :meth:`Blender.prepare` and reused by every :meth:`Blender.paste` of that frame.
"""

from __future__ import annotations

import functools
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass

import cv2
import numba
import numpy as np

from musetalk.config import BlendConfig
from musetalk.device import is_device_failure
from musetalk.parsing import PARSE_SIZE, FaceParser, parse_input
from musetalk.resample import BICUBIC, coefficients, resize_square
from musetalk.resample import warm_up as warm_up_resample
from musetalk.stats import model_call
from shards.errors import ConfigError

log = logging.getLogger(__name__)

Box = tuple[int, int, int, int]  # x1, y1, x2, y2 with x2/y2 exclusive

MODES = ("jaw", "raw", "neck")
SKIN, NOSE, NECK = 1, 10, 14
MOUTH_AND_LIPS = (11, 12, 13)  # mouth interior, upper lip, lower lip
CHEEK_WIDTH = 90  # upstream v1.5 inference default (--left/right_cheek_width)
FACE_SIZE = 256  # side of a generated face (the UNet crop)
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


def parsing_mask(
    labels: np.ndarray, mode: str, cheek_width: int = CHEEK_WIDTH, window: Box | None = None
) -> np.ndarray:
    """(512, 512) class ids -> (512, 512) uint8 {0, 255} blend region, by upstream mode.

    ``raw``: skin, mouth and lips. ``neck``: those plus the neck. ``jaw``: skin dilated with upstream's
    33x33 cone kernel (10 px sideways, 16 px up, a tapering 6 px down), that dilation eroded again by a
    35x3 ellipse (twice) in the outer cheek bands (columns <= 256 - width and >= 256 + width), the nose
    removed, mouth and lips added.

    ``window`` (x1, y1, x2, y2): only those pixels are computed (the same values as the whole map's), the
    rest is 0. The morphology runs over the window widened by its kernels' reach, so every computed pixel
    sees what it sees in the whole map (the map's own edges are edges of the widened window too).
    """
    if labels.shape != (PARSE_SIZE, PARSE_SIZE):
        raise ValueError(f"parsing labels must be ({PARSE_SIZE}, {PARSE_SIZE}), got {labels.shape}")
    if window is not None:
        x1, y1, x2, y2 = window
        reach_x, reach_y = _morphology_reach(mode, cheek_width)
        wx1, wy1 = max(x1 - reach_x, 0), max(y1 - reach_y, 0)
        wx2, wy2 = min(x2 + reach_x, PARSE_SIZE), min(y2 + reach_y, PARSE_SIZE)
        out = np.zeros((PARSE_SIZE, PARSE_SIZE), dtype=np.uint8)
        part = _parsing_mask(labels[wy1:wy2, wx1:wx2], mode, cheek_width, wx1)
        out[y1:y2, x1:x2] = part[y1 - wy1 : y2 - wy1, x1 - wx1 : x2 - wx1]
        return out
    return _parsing_mask(labels, mode, cheek_width, 0)


def _morphology_reach(mode: str, cheek_width: int) -> tuple[int, int]:
    """How far (columns, rows) a pixel of :func:`parsing_mask` looks: jaw's dilation, then erosion twice."""
    if mode != "jaw":
        return 0, 0
    cone, cheek_kernel, _ = _jaw_kernels(cheek_width)
    return (
        cone.shape[1] // 2 + 2 * (cheek_kernel.shape[1] // 2),
        cone.shape[0] // 2 + 2 * (cheek_kernel.shape[0] // 2),
    )


def _parsing_mask(labels: np.ndarray, mode: str, cheek_width: int, column: int) -> np.ndarray:
    """:func:`parsing_mask` of a part of the map whose first column is map column ``column``."""
    if mode == "raw":
        keep = np.isin(labels, (SKIN, *MOUTH_AND_LIPS))
    elif mode == "neck":
        keep = np.isin(labels, (SKIN, *MOUTH_AND_LIPS, NECK))
    elif mode == "jaw":
        cone, cheek_kernel, cheeks = _jaw_kernels(cheek_width)
        cheeks = cheeks[: labels.shape[0], column : column + labels.shape[1]]
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
    return _ellipse_rows(height, width, feather, 0, height)


def _ellipse_rows(height: int, width: int, feather: float, start: int, stop: int) -> np.ndarray:
    """Rows ``[start, stop)`` of :func:`ellipse_mask` (the same values: every pixel is computed alone)."""
    if height < 1 or width < 1:
        raise ValueError(f"ellipse size must be positive, got {height}x{width}")
    if not 0.0 <= feather <= 1.0:
        raise ConfigError(f"ellipse_feather must be in [0, 1], got {feather}")
    out = np.empty((max(stop - start, 0), width), dtype=np.float32)
    _ellipse_kernel(height, width, float(feather), start, out)
    return out


@numba.njit(cache=True, nogil=True)
def _ellipse_kernel(height, width, feather, start, out):  # pragma: no cover - compiled
    """In double precision, operation for operation: ys = (y + 0.5 - h / 2) / (h / 2), likewise xs,
    r = sqrt(ys * ys + xs * xs), then 1 inside ``r <= 1`` (no feather) or the smoothstep of
    clip((1 - r) / feather, 0, 1); rounded to float32 once."""
    hh, hw = height / 2, width / 2
    for i in range(out.shape[0]):
        ys = (float(start + i) + 0.5 - hh) / hh
        for j in range(width):
            xs = (float(j) + 0.5 - hw) / hw
            r = math.sqrt(ys * ys + xs * xs)
            if feather == 0.0:
                out[i, j] = 1.0 if r <= 1.0 else 0.0
            else:
                t = min(max((1.0 - r) / feather, 0.0), 1.0)
                out[i, j] = t * t * (3.0 - 2.0 * t)


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


def blur_kernel_size(side: int) -> int:
    """Upstream ``get_image``'s Gaussian kernel for a blend square of ``side`` pixels: ``int(0.05 * side // 2 * 2) + 1``."""
    return int(0.05 * side // 2 * 2) + 1


def region_to_square(region: np.ndarray, side: int, window: Box | None = None) -> np.ndarray:
    """(512, 512) uint8 parsing mask -> (side, side) uint8, with Pillow's default filter for "L" images
    (bicubic, antialiased when shrinking), as upstream's ``face_seg`` does; with ``window`` (x1, y1, x2, y2
    in the square) only that part (:func:`musetalk.resample.resize_square`, Pillow's pixels exactly)."""
    return resize_square(region, side, BICUBIC, window)


def upstream_mask(square_mask: np.ndarray, box: Box, square: Box, upper_boundary_ratio: float) -> np.ndarray:
    """Upstream v1.5 ``get_image`` mask from a (side, side) uint8 mask already at the square's size.

    Kept only inside the face box, rows above ``int(side * upper_boundary_ratio)`` zeroed, then
    ``cv2.GaussianBlur`` on the uint8 image (kernel :func:`blur_kernel_size`, sigma from the kernel).
    Returns (side, side) uint8.
    """
    side = square[2] - square[0]
    if square_mask.shape != (side, side) or square_mask.dtype != np.uint8:
        raise ValueError(f"mask must be ({side}, {side}) uint8, got {square_mask.shape} {square_mask.dtype}")
    kept = np.zeros((side, side), dtype=np.uint8)
    bx1, by1, bx2, by2 = box[0] - square[0], box[1] - square[1], box[2] - square[0], box[3] - square[1]
    cx1, cy1, cx2, cy2 = max(bx1, 0), max(by1, 0), min(bx2, side), min(by2, side)
    if cx2 > cx1 and cy2 > cy1:
        kept[cy1:cy2, cx1:cx2] = square_mask[cy1:cy2, cx1:cx2]
    kept[: int(side * upper_boundary_ratio)] = 0
    ksize = blur_kernel_size(side)
    return cv2.GaussianBlur(kept, (ksize, ksize), 0)


def fit_face(face: np.ndarray, box: Box) -> np.ndarray:
    """(h, w, 3) uint8 BGR generated face -> (y2 - y1, x2 - x1, 3) uint8, the size of ``box``.

    ``cv2.INTER_LINEAR`` as upstream's ``cv2.resize(face, (w, h))``. The one exception is a face larger
    than 256 x 256 (GFPGAN's ``enhance.upscale`` output, which upstream does not have) shrunk in both
    axes: that uses ``cv2.INTER_AREA``, since a bilinear shrink by 2x or more aliases.
    """
    x1, y1, x2, y2 = box
    bw, bh = x2 - x1, y2 - y1
    shrinking = face.shape[0] > bh and face.shape[1] > bw
    upscaled = face.shape[0] > FACE_SIZE or face.shape[1] > FACE_SIZE
    interp = cv2.INTER_AREA if upscaled and shrinking else cv2.INTER_LINEAR
    return cv2.resize(face, (bw, bh), interpolation=interp)


def composite(base: np.ndarray, layer: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Blend two (h, w, 3) uint8 images through an (h, w) uint8 mask: PIL's ``Image.paste(layer, mask)``.

    ``out = round((base * (255 - m) + layer * m) / 255)``, computed exactly in integers as Pillow does
    (``t = v + 128; ((t >> 8) + t) >> 8``, which equals ``floor(v / 255 + 0.5)`` for every reachable
    ``v``). ``v / 255`` is never within ``0.5 / 255`` of a tie, so a float32 implementation of the same
    formula (on a GPU, say) rounds to the same values. Returns (h, w, 3) uint8.
    """
    if base.shape != layer.shape or base.shape[:2] != mask.shape:
        raise ValueError(
            f"composite shapes differ: base {base.shape}, layer {layer.shape}, mask {mask.shape}"
        )
    m = mask.astype(np.int32)[..., None]
    v = base.astype(np.int32) * (255 - m) + layer.astype(np.int32) * m + 128
    return (((v >> 8) + v) >> 8).astype(np.uint8)


def paste_face(
    frame: np.ndarray, face_box: np.ndarray, box: Box, square: Box, mask: np.ndarray
) -> np.ndarray:
    """Upstream's paste as a pure function: a NEW (H, W, 3) uint8 BGR frame.

    frame: (H, W, 3) uint8; face_box: (y2 - y1, x2 - x1, 3) uint8, the face already at the box size
    (:func:`fit_face`); square: the blend square (may leave the frame); mask: (side, side) uint8 over
    the square. Inside the square the face replaces the box, then :func:`composite` blends that with
    the frame through the mask; pixels outside the square or the frame are never written.
    """
    x1, y1, x2, y2 = box
    if face_box.shape != (y2 - y1, x2 - x1, 3):
        raise ValueError(f"face must be {(y2 - y1, x2 - x1, 3)} for box {box}, got {face_box.shape}")
    sx, sy, sx2, sy2 = square
    if mask.shape != (sy2 - sy, sx2 - sx):
        raise ValueError(f"mask {mask.shape} does not cover square {square}")
    out = frame.copy()
    h, w = frame.shape[:2]
    fx1, fy1, fx2, fy2 = max(sx, 0), max(sy, 0), min(sx2, w), min(sy2, h)
    if fx2 <= fx1 or fy2 <= fy1:
        return out
    base = frame[fy1:fy2, fx1:fx2]
    layer = base.copy()
    _place(layer, face_box, x1 - fx1, y1 - fy1)
    out[fy1:fy2, fx1:fx2] = composite(base, layer, mask[fy1 - sy : fy2 - sy, fx1 - sx : fx2 - sx])
    return out


@dataclass(frozen=True, eq=False)
class BlendMaterial:
    """Everything that depends only on the source frame and its box (cacheable per source frame)."""

    square: Box  # blend square in frame coordinates (possibly partly outside the frame)
    mask: np.ndarray  # (side, side) uint8, read-only: the final mask (255 = the generated face)
    parsed: bool  # False when the pure-ellipse fallback was used


def kept_window(box: Box, square: Box, upper_boundary_ratio: float) -> Box:
    """Where upstream keeps the parsing mask, in square coordinates: the face box inside the square, below
    the top cut (rows ``< int(side * upper_boundary_ratio)`` are zeroed). May be empty (x2 <= x1 or y2 <= y1)."""
    side = square[2] - square[0]
    x1, y1, x2, y2 = box[0] - square[0], box[1] - square[1], box[2] - square[0], box[3] - square[1]
    return max(x1, 0), max(y1, 0, int(side * upper_boundary_ratio)), min(x2, side), min(y2, side)


def region_window(box: Box, square: Box, upper_boundary_ratio: float) -> Box:
    """The pixels of the (512, 512) parsing region that :func:`make_material` (ellipse on) reads: those the
    bicubic resize of :func:`kept_window` reads (x1, y1, x2, y2; empty when the kept window is)."""
    side = square[2] - square[0]
    x1, y1, x2, y2 = kept_window(box, square, upper_boundary_ratio)
    if x2 <= x1 or y2 <= y1:
        return 0, 0, 0, 0
    first, count, _ = coefficients(PARSE_SIZE, side, BICUBIC)
    return (
        int(first[x1]),
        int(first[y1]),
        int(first[x2 - 1] + count[x2 - 1]),
        int(first[y2 - 1] + count[y2 - 1]),
    )


def make_material(region: np.ndarray | None, box: Box, square: Box, cfg: BlendConfig) -> BlendMaterial:
    """The material of one face box from its (512, 512) uint8 {0, 255} parsing mask (:func:`parsing_mask`),
    or the fallback when ``region`` is None; ``square`` is ``blend_square(box, cfg.expand)[0]``.

    ``blend.ellipse=false``: upstream's mask exactly (:func:`region_to_square`, then
    :func:`upstream_mask`), however little of it survives. Otherwise that mask (or, when parsing
    failed or kept under ``MIN_PARSED_FRACTION`` of the box below the top cut, the same steps on the
    whole box) times the feathered ellipse inscribed in the box, rounded to uint8.
    """
    side = square[2] - square[0]
    if side == 0:
        return BlendMaterial(square=square, mask=np.zeros((0, 0), dtype=np.uint8), parsed=False)
    ratio = cfg.upper_boundary_ratio
    if not cfg.ellipse and region is not None:
        mask = upstream_mask(region_to_square(region, side), box, square, ratio)
        mask.flags.writeable = False
        return BlendMaterial(square=square, mask=mask, parsed=True)

    # Only the kept window of the parsing mask can survive upstream's steps, and the ellipse is 0 outside
    # the face box: the resize, the blur and the weighting run over that window alone (plus the blur's
    # reach), bit-identical to whole-square arrays (Pillow's resampler and the uint8 Gaussian are
    # position-independent filters; see the tests).
    keep = kept_window(box, square, ratio)
    kx1, ky1, kx2, ky2 = keep
    kept = None
    if region is not None and kx2 > kx1 and ky2 > ky1:
        kept = region_to_square(region, side, keep)
    parsed = kept is not None and int((kept >= 128).sum()) >= MIN_PARSED_FRACTION * kept.size
    mask = np.zeros((side, side), dtype=np.uint8)
    x1, y1, x2, y2 = box[0] - square[0], box[1] - square[1], box[2] - square[0], box[3] - square[1]
    if kx2 > kx1 and ky2 > ky1:
        top, blurred = _blurred_band(kept if parsed else None, keep, side)
        ellipse = _ellipse_band(y2 - y1, x2 - x1, cfg.ellipse_feather, top - y1, ky2 - y1)
        mask[top:ky2, kx1:kx2] = np.rint(blurred.astype(np.float32) * ellipse[:, kx1 - x1 : kx2 - x1])
    mask.flags.writeable = False
    return BlendMaterial(square=square, mask=mask, parsed=parsed)


@functools.lru_cache(maxsize=64)
def _ellipse_band(height: int, width: int, feather: float, start: int, stop: int) -> np.ndarray:
    """Rows ``[start, stop)`` of :func:`ellipse_mask`, read-only and kept for the next box of the same
    geometry (boxes move slowly)."""
    out = _ellipse_rows(height, width, feather, start, stop)
    out.flags.writeable = False
    return out


def _blurred_band(kept: np.ndarray | None, keep: Box, side: int) -> tuple[int, np.ndarray]:
    """:func:`upstream_mask`'s blur of a mask that is ``kept`` over the non-empty window ``keep`` (None: 255
    there) and 0 elsewhere, over the rows of ``keep``'s columns it can reach: ``(top, band)`` with
    ``band = blurred[top:keep.y2, keep.x1:keep.x2]``; above ``top`` (``keep.y1`` less the kernel's
    reach) the blur is 0. Computed over the band widened by the reach only: every output pixel reads the
    same input as in the whole square (the square's own edges, with their reflection, are edges here too)."""
    x1, y1, x2, y2 = keep
    ksize = blur_kernel_size(side)
    reach = ksize // 2
    top = max(y1 - reach, 0)
    wx1, wy1, wx2, wy2 = max(x1 - reach, 0), max(top - reach, 0), min(x2 + reach, side), min(y2 + reach, side)
    window = np.zeros((wy2 - wy1, wx2 - wx1), dtype=np.uint8)
    window[y1 - wy1 : y2 - wy1, x1 - wx1 : x2 - wx1] = 255 if kept is None else kept
    blurred = cv2.GaussianBlur(window, (ksize, ksize), 0)
    return top, blurred[top - wy1 : y2 - wy1, x1 - wx1 : x2 - wx1]


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
        if not cfg.ellipse and not cfg.parsing:
            problems.append(
                "blend.ellipse=false needs blend.parsing=true (without parsing the mask is the ellipse)"
            )
        if problems:
            raise ConfigError("invalid blend config: " + "; ".join(problems))
        self.cfg = cfg
        self.parser = parser if cfg.parsing else None

    def prepare(self, frames: Sequence[np.ndarray], boxes: Sequence[Box]) -> list[BlendMaterial]:
        """Masks for (H, W, 3) uint8 BGR source frames and their face boxes, one material per pair."""
        labels = self.parse(frames, boxes)
        materials = [self.material(found, box) for box, found in zip(boxes, labels, strict=True)]
        fallbacks = sum(not m.parsed for m in materials)
        if self.parser is not None and fallbacks:
            log.info("blend: %d of %d masks fell back to the pure ellipse", fallbacks, len(materials))
        return materials

    def parse(self, frames: Sequence[np.ndarray], boxes: Sequence[Box]) -> list[np.ndarray | None]:
        """The model half of :meth:`prepare`: (512, 512) uint8 class ids per frame, None where there is no
        parser, no square, or parsing failed. Batched by the parser."""
        if len(frames) != len(boxes):
            raise ValueError(f"prepare got {len(frames)} frames but {len(boxes)} boxes")
        return self.parse_inputs(
            [self.parse_input(frame, box) for frame, box in zip(frames, boxes, strict=True)]
        )

    def parse_input(self, frame: np.ndarray, box: Box) -> np.ndarray | None:
        """What :meth:`parse_inputs` needs of one frame: its box's blend square at the parser's input size
        ((512, 512, 3) uint8 RGB, a small copy, so the frame can go before its batch is parsed); None when
        nothing is parsed (no parser, or a box too small to have a square)."""
        if box[2] <= box[0] or box[3] <= box[1]:
            raise ValueError(f"empty face box {box}")
        square = blend_square(box, self.cfg.expand)[0]
        if self.parser is None or square[2] <= square[0]:
            return None
        h, w = frame.shape[:2]
        inside = square[0] >= 0 and square[1] >= 0 and square[2] <= w and square[3] <= h
        crop = frame[square[1] : square[3], square[0] : square[2]] if inside else crop_padded(frame, square)
        return parse_input(crop)

    def parse_inputs(self, inputs: Sequence[np.ndarray | None]) -> list[np.ndarray | None]:
        """Class ids, as :meth:`parse`, from :meth:`parse_input` results: the whole list falls back to None
        (the ellipse) when the parser fails on it."""
        found: list[np.ndarray | None] = [None] * len(inputs)
        todo = [i for i, x in enumerate(inputs) if x is not None]
        if self.parser is not None and todo:
            try:
                with model_call():
                    labels = self.parser.labels([inputs[i] for i in todo])
            except (RuntimeError, ValueError, cv2.error) as err:
                if is_device_failure(err):
                    raise
                log.warning("face parsing failed on %d frames, using the ellipse mask: %s", len(todo), err)
            else:
                for i, label_map in zip(todo, labels, strict=True):
                    found[i] = label_map
        return found

    def material(self, labels: np.ndarray | None, box: Box) -> BlendMaterial:
        """The CPU half of :meth:`prepare` for one box, from its class ids (:meth:`parse_inputs`; None: the
        fallback): the parsing region (:func:`parsing_mask`, only where the mask can survive) and
        :func:`make_material`. Pure numpy/OpenCV: safe in a thread pool."""
        square = blend_square(box, self.cfg.expand)[0]
        region = None
        if labels is not None:
            window = (
                None if not self.cfg.ellipse else region_window(box, square, self.cfg.upper_boundary_ratio)
            )
            if window is None or (window[2] > window[0] and window[3] > window[1]):
                region = parsing_mask(labels, self.cfg.mode, window=window)
        return make_material(region, box, square, self.cfg)

    def paste(self, frame: np.ndarray, face: np.ndarray, box: Box, material: BlendMaterial) -> np.ndarray:
        """Composite a generated face into a NEW copy of ``frame`` (upstream's ``get_image`` paste).

        frame: (H, W, 3) uint8 BGR; face: (h, w, 3) uint8 BGR of any size, brought to the box by
        :func:`fit_face`, then :func:`paste_face` with the material's mask. Pixels where the mask is 0
        (everything outside the blend square in particular) are unchanged.
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
        if square[2] <= square[0]:
            return frame.copy()
        return paste_face(frame, fit_face(face, box), box, square, material.mask)


def warm_up() -> None:
    """Compile (or load from numba's cache) the blend's compiled loops: the resizes and the ellipse. A
    one-off cost per process (about half a second) that belongs with loading the models."""
    warm_up_resample()
    ellipse_mask(2, 2, 0.5)
