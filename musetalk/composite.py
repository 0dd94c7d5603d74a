"""Fast compositing of generated faces: the same arithmetic as :mod:`musetalk.blending`, less work.

:func:`musetalk.blending.paste_face` (upstream-exact, the reference) copies the frame and composites the
whole blend square in int32. Two facts make most of that unnecessary, exactly:

* outside the face box the layer equals the base, and ``composite(x, x, m) == x`` for every uint8 ``x``
  and mask ``m``; where the mask is 0 the result is the base too. So only the mask's non-zero bounding
  rectangle intersected with the face box can change (:func:`active_rect`, computed once per source frame);
* Pillow's paste arithmetic fits in uint16: ``x * (255 - m) + y * m + 128 <= 65153`` and adding ``v >> 8``
  stays below 65536.

:func:`paste_into` does that in place with numpy on the CPU: bit-identical to ``paste_face``.
:class:`DeviceCompositor` does it with torch ops on the worker's device (the face resized to its box by a
pair of small resampling matrices, the blend in int32); :meth:`DeviceCompositor.paste_host` keeps the frame on
the host and sends only the changing rectangle across the bus, on a CUDA stream of the compositing thread.
Its resize is cv2's bilinear/area filter in float32 instead of cv2's 11-bit fixed point, so it stays within
one level of :func:`musetalk.blending.fit_face`; the blend itself is exact.
"""

from __future__ import annotations

import functools
import threading

import numpy as np
import torch

from musetalk.blending import FACE_SIZE, Box, fit_face
from musetalk.device import upload
from musetalk.stages import on_stream

Rect = tuple[int, int, int, int]  # x1, y1, x2, y2 in frame coordinates, exclusive ends


def active_rect(box: Box, square: Box, mask: np.ndarray, frame_hw: tuple[int, int]) -> Rect | None:
    """The frame rectangle a paste can change: the mask's non-zero rows/columns, inside the face box and
    the frame. None when nothing can change. ``mask`` is the (side, side) uint8 mask over ``square``."""
    h, w = frame_hw
    x1, y1 = max(box[0], square[0], 0), max(box[1], square[1], 0)
    x2, y2 = min(box[2], square[2], w), min(box[3], square[3], h)
    if x2 <= x1 or y2 <= y1:
        return None
    sub = mask[y1 - square[1] : y2 - square[1], x1 - square[0] : x2 - square[0]]
    rows = np.flatnonzero(sub.any(axis=1))
    if rows.size == 0:
        return None
    cols = np.flatnonzero(sub.any(axis=0))
    return (x1 + int(cols[0]), y1 + int(rows[0]), x1 + int(cols[-1]) + 1, y1 + int(rows[-1]) + 1)


def paste_into(
    frame: np.ndarray, face_box: np.ndarray, box: Box, square: Box, mask: np.ndarray, rect: Rect | None
) -> np.ndarray:
    """:func:`musetalk.blending.paste_face` computed IN PLACE on ``frame`` (returned), bit-identically.

    frame: (H, W, 3) uint8 BGR, writable; face_box: (y2 - y1, x2 - x1, 3) uint8, the face at the box size;
    mask: (side, side) uint8 over ``square``; rect: :func:`active_rect` of the same box, square and mask.
    """
    if rect is None:
        return frame
    rx1, ry1, rx2, ry2 = rect
    base = frame[ry1:ry2, rx1:rx2]
    layer = face_box[ry1 - box[1] : ry2 - box[1], rx1 - box[0] : rx2 - box[0]]
    m = mask[ry1 - square[1] : ry2 - square[1], rx1 - square[0] : rx2 - square[0], None]
    m16 = np.broadcast_to(m, base.shape).astype(np.uint16)
    v = base.astype(np.uint16)
    v *= 255 - m16
    m16 *= layer
    v += m16
    v += 128
    m16 = v >> 8
    v += m16
    v >>= 8
    base[...] = v
    return frame


@functools.lru_cache(maxsize=64)
def _resample_matrix(src: int, dst: int, area: bool) -> np.ndarray:
    """(dst, src) float32 weights: cv2's INTER_LINEAR (half-pixel centres, edge clamped) or, for a
    shrink, INTER_AREA (exact pixel-coverage averages)."""
    weights = np.zeros((dst, src), dtype=np.float64)
    scale = src / dst
    if area:
        for i in range(dst):
            lo, hi = i * scale, (i + 1) * scale
            for j in range(int(np.floor(lo)), min(int(np.ceil(hi)), src)):
                weights[i, j] = (min(hi, j + 1) - max(lo, j)) / scale
    else:
        for i in range(dst):
            x = (i + 0.5) * scale - 0.5
            j = int(np.floor(x))
            f = x - j
            if j < 0:
                j, f = 0, 0.0
            if j >= src - 1:
                j, f = src - 1, 0.0
            weights[i, j] += 1.0 - f
            if f > 0:
                weights[i, j + 1] += f
    return weights.astype(np.float32)


class DeviceCompositor:
    """Resize + paste on ``device`` with torch ops: the device twin of ``fit_face`` + ``paste_into``."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self._matrices: dict[tuple[int, int, bool], torch.Tensor] = {}
        self._lock = threading.Lock()  # units of one worker composite side by side, on streams of their own

    def _matrix(self, src: int, dst: int, area: bool) -> torch.Tensor:
        key = (src, dst, area)
        with self._lock:
            if key not in self._matrices:
                matrix = torch.from_numpy(_resample_matrix(src, dst, area)).to(self.device)
                if self.device.type == "cuda":  # other units' streams read it too: wait for its upload once
                    torch.cuda.current_stream(self.device).synchronize()
                self._matrices[key] = matrix
            return self._matrices[key]

    def fit(self, face: torch.Tensor, box: Box) -> torch.Tensor:
        """(h, w, 3) uint8 face on the device -> (y2 - y1, x2 - x1, 3) uint8, as :func:`fit_face`."""
        bw, bh = box[2] - box[0], box[3] - box[1]
        h, w = face.shape[:2]
        area = (h > FACE_SIZE or w > FACE_SIZE) and h > bh and w > bw
        wy = self._matrix(h, bh, area)
        wx = self._matrix(w, bw, area)
        x = face.to(torch.float32).permute(2, 0, 1)  # (3, h, w)
        x = wy @ x @ wx.T  # (3, bh, bw)
        return x.round_().clamp_(0, 255).to(torch.uint8).permute(1, 2, 0)

    def _blend(self, base: torch.Tensor, face: torch.Tensor, box: Box, mask: torch.Tensor, rect: Rect):
        """The composited ``rect``: ``base`` ((rh, rw, 3) uint8, the frame's rect), ``face`` (any size),
        ``mask`` ((rh, rw) uint8, the mask's rect) -> (rh, rw, 3) uint8, all on the device."""
        fitted = self.fit(face, box)
        rx1, ry1, rx2, ry2 = rect
        layer = fitted[ry1 - box[1] : ry2 - box[1], rx1 - box[0] : rx2 - box[0]].to(torch.int32)
        m = mask[..., None].to(torch.int32)
        v = base.to(torch.int32) * (255 - m) + layer * m + 128
        return (((v >> 8) + v) >> 8).to(torch.uint8)

    def paste(
        self,
        frame: torch.Tensor,
        face: torch.Tensor,
        box: Box,
        square: Box,
        mask: torch.Tensor,
        rect: Rect | None,
    ) -> torch.Tensor:
        """Composite ``face`` ((h, w, 3) uint8, any size) into ``frame`` ((H, W, 3) uint8) IN PLACE on the
        device; ``mask`` is the (side, side) uint8 mask over ``square`` on the device. Returns ``frame``."""
        if rect is None:
            return frame
        rx1, ry1, rx2, ry2 = rect
        base = frame[ry1:ry2, rx1:rx2]
        m = mask[ry1 - square[1] : ry2 - square[1], rx1 - square[0] : rx2 - square[0]]
        base.copy_(self._blend(base, face, box, m, rect))
        return frame

    def paste_host(
        self,
        frame: np.ndarray,
        face: np.ndarray,
        box: Box,
        square: Box,
        mask: np.ndarray,
        rect: Rect | None,
        stream=None,
    ) -> np.ndarray:
        """:meth:`paste` IN PLACE on a host ``frame`` ((H, W, 3) uint8, writable; returned): only the
        rectangle crosses the bus. The frame's and the mask's ``rect`` and the face go up (pinned,
        non-blocking), the blend runs on ``stream`` (a side stream of the compositing thread, so it never
        waits behind the UNet batches of the unit's own stream), the rectangle comes down and is written
        back. Off CUDA (``stream`` None) the same maths on the CPU."""
        if rect is None:
            return frame
        rx1, ry1, rx2, ry2 = rect
        base = frame[ry1:ry2, rx1:rx2]
        m = mask[ry1 - square[1] : ry2 - square[1], rx1 - square[0] : rx2 - square[0]]
        with on_stream(stream):
            out = self._blend(
                upload(torch.from_numpy(np.ascontiguousarray(base)), self.device),
                upload(torch.from_numpy(np.ascontiguousarray(face)), self.device),
                box,
                upload(
                    torch.from_numpy(np.array(m)), self.device
                ),  # a copy: the material's mask is read-only
                rect,
            )
            if self.device.type == "cuda":
                host = torch.empty(out.shape, dtype=torch.uint8, pin_memory=True)
                host.copy_(out, non_blocking=True)
                done = torch.cuda.Event()
                done.record()
                done.synchronize()  # this stream's work only: the unit's stream runs on
                out = host
        base[...] = out.cpu().numpy()
        return frame


def paste_numpy(
    frame: np.ndarray, face: np.ndarray, box: Box, square: Box, mask: np.ndarray, rect: Rect | None
) -> np.ndarray:
    """CPU path: ``fit_face`` (cv2, as upstream) then :func:`paste_into` in place on ``frame``."""
    if rect is None:
        return frame
    return paste_into(frame, fit_face(face, box), box, square, mask, rect)
