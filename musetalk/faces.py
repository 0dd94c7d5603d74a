"""Face detection: every face of a frame (S3FD or Haar), 68-point landmarks, and a frame's cut signature.
Crop boxes, their smoothing and the face crop are :mod:`musetalk.boxes`.

Detectors: face-alignment's S3FD (``models/face-alignment/s3fd-*.pth``) or OpenCV's frontal-face Haar
cascade (no weight file). Landmarks: face-alignment's 2D FAN, run on the crop face-alignment itself uses.
A frame's result never depends on the other frames of the call: network batches are padded to a fixed
size, and smoothing reads a fixed window. That keeps the render identical however the video is sharded.
"""

from __future__ import annotations

import logging
import re
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from face_alignment.detection.sfd.bbox import decode, nms
from face_alignment.detection.sfd.net_s3fd import s3fd
from face_alignment.models import FAN
from face_alignment.utils import CENTER_Y_OFFSET, REFERENCE_SCALE, crop, get_preds_fromhm

from musetalk.config import FaceConfig
from musetalk.device import upload
from musetalk.layout import ModelLayout
from musetalk.stats import model_call
from musetalk.tracks import signature
from shards.decode import Picture, shrunk_size
from shards.errors import ConfigError, WeightsError
from shards.ranges import parse_select

logger = logging.getLogger(__name__)

DETECTORS = ("s3fd", "haar")
CROP_MODES = ("landmarks", "box")

# face-alignment's S3FD conventions (sfd/detect.py, sfd_detector.py): BGR input minus this mean, a
# candidate threshold on the softmax face score, NMS at IoU 0.3, then a final score threshold.
S3FD_MEAN_BGR = (104.0, 117.0, 123.0)
S3FD_VARIANCES = (0.1, 0.2)
S3FD_CANDIDATE_SCORE = 0.05
S3FD_NMS_IOU = 0.3
S3FD_MIN_SCORE = 0.5

HAAR_FILE = "haarcascade_frontalface_default.xml"
HAAR_SCALE_FACTOR = 1.1
HAAR_MIN_NEIGHBORS = 5
HAAR_MIN_SIZE = 24

_HOURGLASS_KEY = re.compile(r"^m(\d+)\.")


@dataclass(frozen=True)
class Detection:
    """One face of one frame."""

    box: tuple[float, float, float, float]  # detector box x1, y1, x2, y2, full-frame pixels (may exceed it)
    score: float  # S3FD: softmax face score; Haar: number of merged neighbour detections
    landmarks: np.ndarray | None = None  # (68, 2) float32 full-frame (x, y), when landmarks were computed


@dataclass(frozen=True, eq=False)
class FrameFaces:
    """Every face of one source frame, largest first (empty: no face), and the frame's signature
    (:func:`musetalk.tracks.signature`, for shot cuts; None where unknown)."""

    faces: tuple[Detection, ...] = ()
    signature: np.ndarray | None = None


def as_faces(found: FrameFaces | Detection | None) -> FrameFaces:
    """A frame's detections as :class:`FrameFaces` (a single Detection or None is read as one face or none)."""
    if isinstance(found, FrameFaces):
        return found
    return FrameFaces(() if found is None else (found,))


class FaceAnalyzer:
    """Finds every face per frame and, for ``crop == "landmarks"``, its 68 FAN landmarks.

    Built from already-loaded parts (see :func:`load_face_analyzer`): exactly one of ``s3fd_net`` /
    ``haar`` for ``cfg.detector``, and ``fan`` when ``cfg.crop == "landmarks"``.
    """

    def __init__(
        self,
        cfg: FaceConfig,
        device: torch.device,
        *,
        s3fd_net: torch.nn.Module | None = None,
        haar: cv2.CascadeClassifier | None = None,
        fan: torch.nn.Module | None = None,
    ) -> None:
        _validate(cfg)
        if cfg.detector == "s3fd" and s3fd_net is None:
            raise ValueError("detector s3fd needs s3fd_net")
        if cfg.detector == "haar" and haar is None:
            raise ValueError("detector haar needs a Haar cascade")
        if cfg.crop == "landmarks" and fan is None:
            raise ValueError("crop=landmarks needs a FAN")
        self.cfg = cfg
        self.device = device
        self.s3fd_net = s3fd_net.eval() if s3fd_net is not None and cfg.detector == "s3fd" else None
        self.haar = haar if cfg.detector == "haar" else None
        # OpenCV's cascade keeps the image pyramid of its current call in the object: one call at a time
        # (a worker may detect in two threads). The torch detectors are safe to share.
        self._haar_lock = threading.Lock()
        self.fan = fan.eval() if fan is not None and cfg.crop == "landmarks" else None

    def detect(self, frames: Sequence[np.ndarray | Picture]) -> list[Detection | None]:
        """The largest face per frame (:meth:`detect_all`'s first), or None where there is none."""
        return [found.faces[0] if found.faces else None for found in self.detect_all(frames)]

    def detect_all(self, frames: Sequence[np.ndarray | Picture]) -> list[FrameFaces]:
        """Every face per (H, W, 3) uint8 BGR frame (or decoded :class:`shards.decode.Picture`), largest
        first, and the frame's cut signature.

        Detection runs on copies shrunk to ``cfg.detect_max_side`` (a picture's own :meth:`shrunk`; an array
        by OpenCV's area filter), boxes come back in full-frame pixels;
        S3FD and FAN batches are padded to ``cfg.batch_size`` so no result depends on its batch-mates (FAN
        runs once per face: a face's landmarks do not depend on the other faces of its frame either).
        """
        for i, frame in enumerate(frames):
            if isinstance(frame, Picture):
                continue
            if frame.ndim != 3 or frame.shape[2] != 3 or frame.dtype != np.uint8:
                raise ValueError(f"frame {i}: expected (H, W, 3) uint8 BGR, got {frame.shape} {frame.dtype}")
        boxes: list[list[np.ndarray]] = [[] for _ in frames]  # (5,) x1, y1, x2, y2, score full-frame
        by_shape: dict[tuple[int, ...], list[int]] = {}
        for i, frame in enumerate(frames):
            by_shape.setdefault(frame.shape, []).append(i)
        signatures: list[np.ndarray | None] = [None] * len(frames)
        for indices in by_shape.values():
            for start in range(0, len(indices), self.cfg.batch_size):
                chunk = indices[start : start + self.cfg.batch_size]
                found, sigs = self._detect_chunk([frames[i] for i in chunk])
                for i, faces, sig in zip(chunk, found, sigs, strict=True):
                    boxes[i], signatures[i] = faces, sig
        faces = [(i, j) for i, found in enumerate(boxes) for j in range(len(found))]
        landmarks: dict[tuple[int, int], np.ndarray] = {}
        if self.fan is not None:
            whole: dict[int, np.ndarray] = {}  # FAN crops from the whole frame: a picture converted once
            for start in range(0, len(faces), self.cfg.batch_size):
                chunk = faces[start : start + self.cfg.batch_size]
                for i, _ in chunk:
                    if i not in whole:
                        frame = frames[i]
                        whole[i] = frame.bgr() if isinstance(frame, Picture) else frame
                found = self._landmarks([whole[i] for i, _ in chunk], [boxes[i][j] for i, j in chunk])
                landmarks.update(zip(chunk, found, strict=True))
        return [
            FrameFaces(
                tuple(
                    Detection(
                        box=(float(box[0]), float(box[1]), float(box[2]), float(box[3])),
                        score=float(box[4]),
                        landmarks=landmarks.get((i, j)),
                    )
                    for j, box in enumerate(found)
                ),
                signatures[i],
            )
            for i, found in enumerate(boxes)
        ]

    def _detect_chunk(
        self, frames: list[np.ndarray | Picture]
    ) -> tuple[list[list[np.ndarray]], list[np.ndarray]]:
        """Every face box (5,) [x1, y1, x2, y2, score] in full-frame pixels for same-size frames, largest
        first (ties: detector order, so the first is the face the largest-face rule always took), and each
        frame's cut signature, taken from the shrunk copy detection runs on (a 16x16 area average of the
        whole frame either way; from the copy it costs a tenth)."""
        height, width = frames[0].shape[:2]
        side = self.cfg.detect_max_side
        small = [f.shrunk(side) if isinstance(f, Picture) else _downscale(f, side) for f in frames]
        signatures = [signature(image) for image in small]
        sx, sy = width / small[0].shape[1], height / small[0].shape[0]
        if self.s3fd_net is not None:
            found = self._s3fd(small)
        else:
            found = [self._haar(image) for image in small]
        result: list[list[np.ndarray]] = []
        for dets in found:
            areas = (dets[:, 2] - dets[:, 0]) * (dets[:, 3] - dets[:, 1])
            faces = []
            for k in np.argsort(-areas, kind="stable"):
                box = dets[int(k)].astype(np.float64)
                box[[0, 2]] *= sx
                box[[1, 3]] *= sy
                faces.append(box)
            result.append(faces)
        return result, signatures

    @torch.inference_mode()
    def _s3fd(self, images: list[np.ndarray]) -> list[np.ndarray]:
        """S3FD boxes (N, 5) per (h, w, 3) uint8 BGR image, after NMS and the score threshold.

        The batch goes up pinned and non-blocking, the mean is a device tensor made once, and every
        level's scores and offsets come back in one download: one host sync per batch. The net may run
        in another dtype (``render.dtype`` on CUDA, :func:`musetalk.device.in_dtype`): its outputs are
        read back in float32."""
        n = len(images)
        batch = np.stack(images + [images[-1]] * (self.cfg.batch_size - n))  # padded: batch-mate invariance
        mean = getattr(self, "_s3fd_mean", None)
        if mean is None:
            mean = self._s3fd_mean = torch.tensor(S3FD_MEAN_BGR, device=self.device).view(1, 3, 1, 1)
        x = upload(torch.from_numpy(batch), self.device).permute(0, 3, 1, 2).float() - mean
        with model_call():
            outputs = self.s3fd_net(x)
        parts = []
        for k in range(0, len(outputs), 2):
            parts.append(F.softmax(outputs[k].float(), dim=1)[:n, 1].flatten(1))
            parts.append(outputs[k + 1][:n].float().flatten(1))
        flat = torch.cat(parts, dim=1).cpu().numpy()
        levels, at = [], 0
        for k in range(0, len(outputs), 2):
            (_, _, h, w) = outputs[k].shape
            scores = flat[:, at : at + h * w].reshape(n, h, w)
            offsets = flat[:, at + h * w : at + 5 * h * w].reshape(n, 4, h, w)
            levels.append((scores, offsets))
            at += 5 * h * w
        return [_s3fd_decode(levels, i) for i in range(n)]

    def _haar(self, image: np.ndarray) -> np.ndarray:
        """Haar cascade boxes (N, 5) [x1, y1, x2, y2, neighbours] for one (h, w, 3) uint8 BGR image."""
        gray = cv2.cvtColor(image, cv2.COLOR_BGR2GRAY)
        with self._haar_lock, model_call():
            rects, neighbours = self.haar.detectMultiScale2(
                gray,
                scaleFactor=HAAR_SCALE_FACTOR,
                minNeighbors=HAAR_MIN_NEIGHBORS,
                minSize=(HAAR_MIN_SIZE, HAAR_MIN_SIZE),
            )
        if len(rects) == 0:
            return np.zeros((0, 5))
        rects = np.asarray(rects, dtype=np.float64).reshape(-1, 4)
        rects[:, 2:] += rects[:, :2]
        return np.concatenate([rects, np.asarray(neighbours, dtype=np.float64).reshape(-1, 1)], axis=1)

    @torch.inference_mode()
    def _landmarks(self, frames: list[np.ndarray], boxes: list[np.ndarray]) -> list[np.ndarray]:
        """(68, 2) float32 full-frame landmarks per face, face-alignment's crop and heatmap decoding."""
        centers, scales, crops = [], [], []
        for frame, box in zip(frames, boxes, strict=True):
            x1, y1, x2, y2 = (float(v) for v in box[:4])
            center = np.array([x2 - (x2 - x1) / 2.0, y2 - (y2 - y1) / 2.0 - (y2 - y1) * CENTER_Y_OFFSET])
            scale = (x2 - x1 + y2 - y1) / REFERENCE_SCALE
            rgb = cv2.cvtColor(frame, cv2.COLOR_BGR2RGB)  # FAN was trained on RGB
            crops.append(crop(rgb, center, scale).transpose(2, 0, 1).astype(np.float32) / 255.0)
            centers.append(center)
            scales.append(scale)
        n = len(crops)
        batch = np.stack(crops + [crops[-1]] * (self.cfg.batch_size - n))  # padded like detection
        with model_call():
            heatmaps = self.fan(torch.from_numpy(batch).to(self.device))[-1][:n].float().cpu().numpy()
        result = []
        for i in range(n):
            _, points, _ = get_preds_fromhm(heatmaps[i : i + 1], centers[i], scales[i])
            result.append(points.reshape(-1, 2).astype(np.float32))
        return result


def _s3fd_decode(levels: list[tuple[np.ndarray, np.ndarray]], i: int) -> np.ndarray:
    """Boxes (N, 5) of image ``i`` from per-level (B, h, w) face scores and (B, 4, h, w) offsets."""
    found = []
    for level, (scores, offsets) in enumerate(levels):
        stride = 2 ** (level + 2)  # 4, 8, ..., 128; anchors are 4 strides wide
        ys, xs = np.nonzero(scores[i] > S3FD_CANDIDATE_SCORE)
        if len(ys) == 0:
            continue
        anchor = np.full(len(xs), stride * 4.0)
        priors = np.stack([stride / 2 + xs * stride, stride / 2 + ys * stride, anchor, anchor], axis=1)
        boxes = decode(offsets[i][:, ys, xs].T.astype(np.float64), priors, S3FD_VARIANCES)
        found.append(np.concatenate([boxes, scores[i][ys, xs, None].astype(np.float64)], axis=1))
    if not found:
        return np.zeros((0, 5))
    dets = np.concatenate(found)
    dets = dets[nms(dets, S3FD_NMS_IOU)]
    return dets[dets[:, 4] > S3FD_MIN_SCORE]


def _downscale(frame: np.ndarray, max_side: int) -> np.ndarray:
    """The frame shrunk (INTER_AREA) so its longer side is at most ``max_side``; unchanged if it already is.
    A decoded :class:`shards.decode.Picture` shrinks itself instead, from the decoder's YUV."""
    height, width = frame.shape[:2]
    size = shrunk_size(width, height, max_side)
    if size == (width, height):
        return frame
    return cv2.resize(frame, size, interpolation=cv2.INTER_AREA)


def _validate(cfg: FaceConfig) -> None:
    problems = []
    if cfg.detector not in DETECTORS:
        problems.append(f"face.detector must be one of {', '.join(DETECTORS)}, got {cfg.detector!r}")
    if cfg.crop not in CROP_MODES:
        problems.append(f"face.crop must be one of {', '.join(CROP_MODES)}, got {cfg.crop!r}")
    if cfg.detect_max_side < 32:
        problems.append(f"face.detect_max_side must be >= 32, got {cfg.detect_max_side}")
    if cfg.batch_size < 1:
        problems.append(f"face.batch_size must be >= 1, got {cfg.batch_size}")
    if cfg.smooth_radius < 0:
        problems.append(f"face.smooth_radius must be >= 0, got {cfg.smooth_radius}")
    if cfg.extra_margin < 0:
        problems.append(f"face.extra_margin must be >= 0, got {cfg.extra_margin}")
    try:
        parse_select(cfg.select)
    except ValueError as err:
        problems.append(str(err))
    if problems:
        raise ConfigError("invalid face config: " + "; ".join(problems))


def load_face_analyzer(layout: ModelLayout, cfg: FaceConfig, device: torch.device) -> FaceAnalyzer:
    """Load the detector named by ``cfg.detector`` and, for ``cfg.crop == "landmarks"``, the FAN."""
    _validate(cfg)
    s3fd_net = _load_s3fd(layout, device) if cfg.detector == "s3fd" else None
    haar = _load_haar() if cfg.detector == "haar" else None
    fan = _load_fan(layout, device) if cfg.crop == "landmarks" else None
    return FaceAnalyzer(cfg, device, s3fd_net=s3fd_net, haar=haar, fan=fan)


def _load_s3fd(layout: ModelLayout, device: torch.device) -> torch.nn.Module:
    what = "S3FD face detector"
    path = layout.require(layout.s3fd, what)
    net = s3fd()
    _load_strict(net, layout.load_torch_state(path, what), layout, path, what)
    return net.to(device).eval()


def _load_fan(layout: ModelLayout, device: torch.device) -> torch.nn.Module:
    """FAN with as many hourglass modules as the file has (the real 2DFAN4 has 4)."""
    what = "FAN landmark network"
    path = layout.require(layout.fan, what)
    state = layout.load_torch_state(path, what)
    modules = {int(m.group(1)) for key in state if (m := _HOURGLASS_KEY.match(key))}
    if not modules:
        raise layout.malformed(path, what, "no hourglass module keys (m0.*)")
    net = FAN(max(modules) + 1)
    _load_strict(net, state, layout, path, what)
    return net.to(device).eval()


def _load_haar() -> cv2.CascadeClassifier:
    path = Path(cv2.data.haarcascades) / HAAR_FILE
    cascade = cv2.CascadeClassifier(str(path))
    if cascade.empty():
        raise WeightsError(
            f"missing OpenCV Haar cascade: expected {path}; reinstall `opencv-python<5` (it ships the cascades)"
        )
    return cascade


def _load_strict(
    net: torch.nn.Module, state: Mapping[str, torch.Tensor], layout: ModelLayout, path: Path, what: str
) -> None:
    """Load ``state`` into ``net`` after checking its keys and shapes (one-line WeightsErrors).

    BatchNorm's ``num_batches_tracked`` may be absent (files older than the buffer); it keeps its default.
    """
    expected = net.state_dict()
    untracked = frozenset(k for k in expected if k.endswith("num_batches_tracked"))
    layout.check_state_dict(path, what, state, expected, optional=untracked)
    net.load_state_dict(state, strict=False)
