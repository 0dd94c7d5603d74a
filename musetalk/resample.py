"""Pillow's convolution resize of square uint8 images, bit for bit, over any window of the output.

Upstream MuseTalk resizes with Pillow twice per face frame: the blend square to BiSeNet's 512x512 input
(``BILINEAR``) and the 512x512 parsing mask back to the square (``BICUBIC``). Pillow's C loops are
scalar; this module computes the same fixed-point sums with compiled loops that vectorise, and only
over the part of the output a caller needs (the mask is only ever kept inside the face box, below its
top cut).

What is mirrored (Pillow ``src/libImaging/Resample.c``): the per-output-pixel coefficients (``precompute_coeffs``
in double precision, normalised to 22-bit integers by ``normalize_coeffs_8bpc``), the 8-bit passes
(``1 << 21`` rounding term, arithmetic shift, clip to 0..255) and their order: the horizontal pass first
(over the input rows the vertical pass reads, rounded to 8 bits), then the vertical pass. Pillow 13 runs
the vertical pass first for some shapes whose height shrinks more than their width; for square images
(both axes scaled alike) it always runs the horizontal pass first, so :func:`resize_square` takes square
images only. Pillow's antialiasing (a wider support when shrinking) is part of the coefficients.

The face crop upstream takes with OpenCV's ``INTER_LANCZOS4`` is mirrored the same way
(:func:`resize_lanczos4`). ``tests/musetalk/test_resample.py`` compares both against the installed
Pillow and OpenCV: every side 1..700, windows, random shapes.
"""

from __future__ import annotations

import functools
import math

import cv2
import numba
import numpy as np

PRECISION_BITS = 22  # Pillow: 32 - 8 (the pixel) - 2 (headroom for negative lobes and overshoot)
BILINEAR = "bilinear"
BICUBIC = "bicubic"
_SUPPORT = {BILINEAR: 1.0, BICUBIC: 2.0}

Window = tuple[int, int, int, int]  # x1, y1, x2, y2 of the output, x2/y2 exclusive


def _filter(kind: str, x: np.ndarray) -> np.ndarray:
    """Pillow's filter functions, in the same double-precision operations."""
    x = np.abs(x)
    if kind == BILINEAR:
        return np.where(x < 1.0, 1.0 - x, 0.0)
    a = -0.5
    near = ((a + 2.0) * x - (a + 3.0)) * x * x + 1
    far = (((x - 5) * x + 8) * x - 4) * a
    return np.where(x < 1.0, near, np.where(x < 2.0, far, 0.0))


@functools.lru_cache(maxsize=128)
def coefficients(in_size: int, out_size: int, kind: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Pillow's resampling coefficients for one axis: per output pixel its first input pixel (int32),
    how many input pixels it reads (int32) and their 22-bit integer weights ((out_size, taps) int32).
    Read-only (cached)."""
    if kind not in _SUPPORT:
        raise ValueError(f"unknown filter {kind!r}; use {BILINEAR!r} or {BICUBIC!r}")
    if in_size < 1 or out_size < 1:
        raise ValueError(f"sizes must be positive, got {in_size} -> {out_size}")
    scale = float(in_size) / out_size
    filterscale = max(scale, 1.0)
    support = _SUPPORT[kind] * filterscale
    taps = math.ceil(support) * 2 + 1
    center = (np.arange(out_size, dtype=np.float64) + 0.5) * scale
    first = np.maximum(np.trunc(center - support + 0.5), 0).astype(np.int64)  # C's (int) truncates
    count = np.minimum(np.trunc(center + support + 0.5).astype(np.int64), in_size) - first
    j = np.arange(taps)
    w = _filter(kind, (j[None, :] + first[:, None] - center[:, None] + 0.5) * (1.0 / filterscale))
    w = np.where(j[None, :] < count[:, None], w, 0.0)
    total = np.zeros(out_size)
    for k in range(taps):  # summed in Pillow's order (numpy's sum is pairwise)
        total = total + w[:, k]
    w = np.where(total[:, None] != 0.0, w / np.where(total == 0.0, 1.0, total)[:, None], w)
    one = float(1 << PRECISION_BITS)
    weights = np.where(w < 0, np.trunc(-0.5 + w * one), np.trunc(0.5 + w * one)).astype(np.int32)
    out = first.astype(np.int32), count.astype(np.int32), weights
    for array in out:
        array.flags.writeable = False
    return out


@numba.njit(cache=True, nogil=True)
def _pass(src, first, count, weights, out):  # pragma: no cover - compiled
    """out[y] = clip8((sum_j weights[y, j] * src[first[y] + j] + 2^21) >> 22): one resampling pass along
    the first axis of 2-D uint8 arrays (each row a contiguous vector, so the inner loop vectorises)."""
    n, length = out.shape
    acc = np.empty(length, np.int32)
    for y in range(n):
        acc[:] = 1 << (PRECISION_BITS - 1)
        for j in range(count[y]):
            w = weights[y, j]
            row = src[first[y] + j]
            for x in range(length):
                acc[x] += np.int32(row[x]) * w
        for x in range(length):
            v = acc[x] >> PRECISION_BITS
            out[y, x] = 0 if v < 0 else (255 if v > 255 else v)


def resize_square(image: np.ndarray, side: int, kind: str, window: Window | None = None) -> np.ndarray:
    """Pillow's ``Image.fromarray(image).resize((side, side), filter)`` of a square (n, n) or (n, n, c)
    uint8 array, bit for bit; with ``window`` only that part of the output, ``out[y1:y2, x1:x2]``."""
    if image.dtype != np.uint8 or image.ndim not in (2, 3) or image.shape[0] != image.shape[1]:
        raise ValueError(f"resize_square needs a square uint8 image, got {image.shape} {image.dtype}")
    n = image.shape[0]
    x1, y1, x2, y2 = (0, 0, side, side) if window is None else window
    if not (0 <= x1 < x2 <= side and 0 <= y1 < y2 <= side):
        raise ValueError(f"window {window} is empty or outside the {side}x{side} output")
    if side == n:  # Pillow returns a copy
        return image[y1:y2, x1:x2].copy()
    channels = 1 if image.ndim == 2 else image.shape[2]
    v_first, v_count, v_weights = coefficients(n, side, kind)
    h_first, h_count, h_weights = coefficients(n, side, kind)
    r1, r2 = int(v_first[y1]), int(v_first[y2 - 1] + v_count[y2 - 1])  # input rows the window reads
    # Horizontal pass over those rows: transposed, it is a pass along the first axis.
    columns = cv2.transpose(image[r1:r2]).reshape(n, -1)  # rows of a frame view need no copy first
    across = np.empty((x2 - x1, (r2 - r1) * channels), np.uint8)
    _pass(columns, h_first[x1:x2], h_count[x1:x2], h_weights[x1:x2], across)
    across = across.reshape(x2 - x1, r2 - r1, channels) if channels > 1 else across
    rows = cv2.transpose(across).reshape(r2 - r1, -1)
    out = np.empty((y2 - y1, (x2 - x1) * channels), np.uint8)
    _pass(rows, v_first[y1:y2] - r1, v_count[y1:y2], v_weights[y1:y2], out)
    return out.reshape(y2 - y1, x2 - x1, channels) if image.ndim == 3 else out


def warm_up() -> None:
    """Compile (or load from numba's cache) every specialisation :func:`resize_square` uses: a one-off
    cost (about half a second) that belongs with loading the models, not with the first frame."""
    resize_square(np.zeros((4, 4, 3), np.uint8), 2, BILINEAR)
    resize_square(np.zeros((2, 2), np.uint8), 4, BICUBIC, (1, 1, 3, 3))
    resize_lanczos4(np.zeros((4, 4, 3), np.uint8), (2, 2))


# OpenCV's INTER_LANCZOS4 resize of 8-bit images (cv::resize, resizeGeneric_ with HResizeLanczos4 and
# VResizeLanczos4): per output pixel a float32 phase, 8 float32 Lanczos weights (interpolateLanczos4,
# double-precision sin/cos) rounded to 11-bit shorts; the horizontal sums kept as ints, the vertical sums
# rounded by (v + 2^21) >> 22 and saturated; source pixels past an edge are the edge pixel. Upstream crops
# the face with it; OpenCV's loops are scalar, these vectorise (the integer sums do not depend on order).
_S45 = 0.70710678118654752440084436210485
_LANCZOS_CS = np.array(
    [[1, 0], [-_S45, -_S45], [0, 1], [_S45, -_S45], [-1, 0], [_S45, _S45], [0, -1], [-_S45, _S45]]
)
_CV_PI = 3.1415926535897932384626433832795


@numba.njit(cache=True, nogil=True)
def _lanczos_axis(src, dst, cs, first, weights):  # pragma: no cover - compiled
    scale = 1.0 / (dst / src)  # cv::resize: scale = 1 / inv_scale, inv_scale = dst / src
    c = np.empty(8, np.float32)
    for d in range(dst):
        fx = np.float32((d + 0.5) * scale - 0.5)
        sx = int(math.floor(fx))
        fx = np.float32(fx - np.float32(sx))
        first[d] = sx - 3
        y0 = np.float64(-(fx + np.float32(3.0))) * _CV_PI * 0.25
        s0, c0 = math.sin(y0), math.cos(y0)
        total = np.float32(0.0)
        for i in range(8):
            yi = np.float32(fx + np.float32(3.0)) - np.float32(i)
            if abs(yi) >= np.float32(1e-6):
                y = np.float64(-yi) * _CV_PI * 0.25
                c[i] = np.float32((cs[i, 0] * s0 + cs[i, 1] * c0) / (y * y))
            else:
                c[i] = np.float32(1e30)
            total = np.float32(total + c[i])
        total = np.float32(np.float32(1.0) / total)
        for i in range(8):
            r = np.rint(np.float32(np.float32(c[i] * total) * np.float32(2048.0)))
            weights[d, i] = np.int32(min(max(r, -32768.0), 32767.0))


@numba.njit(cache=True, nogil=True)
def _lanczos_sums(src, first, weights, start, out):  # pragma: no cover - compiled
    """out[d] = start + sum_j weights[d, j] * src[clamp(first[d] + j)]: int32 sums along the first axis."""
    n, length = out.shape
    last = src.shape[0] - 1
    for d in range(n):
        out[d, :] = start
        for j in range(8):
            r = first[d] + j
            r = 0 if r < 0 else (last if r > last else r)
            w = weights[d, j]
            row = src[r]
            for x in range(length):
                out[d, x] += np.int32(row[x]) * w


@functools.lru_cache(maxsize=256)
def lanczos_coefficients(in_size: int, out_size: int) -> tuple[np.ndarray, np.ndarray]:
    """OpenCV's INTER_LANCZOS4 taps for one axis: per output pixel its first source pixel (may lie before
    0; past either edge the edge pixel is read) and 8 int32 weights scaled by 2048. Read-only (cached)."""
    if in_size < 1 or out_size < 1:
        raise ValueError(f"sizes must be positive, got {in_size} -> {out_size}")
    first, weights = np.empty(out_size, np.int32), np.empty((out_size, 8), np.int32)
    _lanczos_axis(in_size, out_size, _LANCZOS_CS, first, weights)
    first.flags.writeable = weights.flags.writeable = False
    return first, weights


def resize_lanczos4(image: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """``cv2.resize(image, size, interpolation=cv2.INTER_LANCZOS4)`` of an (h, w, c) uint8 image (a view
    of a frame is fine), bit for bit; ``size`` is (width, height) as OpenCV takes it."""
    if image.dtype != np.uint8 or image.ndim != 3 or min(image.shape) < 1:
        raise ValueError(f"resize_lanczos4 needs an (h, w, c) uint8 image, got {image.shape} {image.dtype}")
    (h, w, channels), (ow, oh) = image.shape, size
    x_first, x_weights = lanczos_coefficients(w, ow)
    y_first, y_weights = lanczos_coefficients(h, oh)
    # OpenCV sums along each row first, then down the columns, and rounds once; integer sums do not depend
    # on the order, so the vertical sums go first here (fewer rows to carry), each pass along the first
    # axis of an array
    sums = np.empty((oh, w * channels), np.int32)
    _lanczos_sums(np.ascontiguousarray(image).reshape(h, w * channels), y_first, y_weights, 0, sums)
    columns = cv2.transpose(sums.reshape(oh, w, channels)).reshape(w, oh * channels)
    totals = np.empty((ow, oh * channels), np.int32)
    _lanczos_sums(columns, x_first, x_weights, 1 << 21, totals)  # with the rounding term
    out = np.clip(totals >> 22, 0, 255).astype(np.uint8)  # OpenCV's FixedPtCast, saturated
    return cv2.transpose(out.reshape(ow, oh, channels)).reshape(oh, ow, channels)
