"""Lip-sync scores (SyncNet LSE-C / LSE-D / offset) of a rendered job, Ray-free.

Facts from the reference implementation (``joonson/syncnet_python``: ``run_pipeline.py``,
``SyncNetInstance.py``), re-implemented here:

- video at 25 fps (:func:`sample_frames` picks the output frame shown at each 25 fps instant);
- the crop from the raw face-detector box (:func:`crop_rects`): half-size ``bs = max(w, h) / 2`` and the
  centre, each median-filtered over 13 frames of a face track (zero-padded at the track's ends, as
  ``scipy.signal.medfilt``); rows ``[cy - bs, cy + 1.8 bs)``, columns ``[cx - 1.4 bs, cx + 1.4 bs)`` of
  the frame padded with value 110, resized to 224x224 (:func:`crop`);
- audio: 13 MFCC at 100 Hz with ``python_speech_features.mfcc``'s defaults on int16-scale 16 kHz samples
  (:func:`mfcc`); window ``k`` (25 fps frames ``k..k+4``) pairs with MFCC columns ``[4k, 4k + 20)``;
- ``min(frames, samples // 640) - 5`` windows (the reference's count: it leaves the last full window out);
- for each offset ``-15..15``, the distance of every lip window to the audio window that far away (audio
  embeddings zero outside the job), averaged over windows; LSE-D = the minimum over offsets, LSE-C = the
  median over offsets minus that minimum, offset = 15 - argmin (:func:`scores`).

Scores are computed on the rendered frames before H.264 encoding (the worker crops them as it
composites), not on the decoded output file.
"""

from __future__ import annotations

import bisect
import io
import math
from dataclasses import dataclass
from fractions import Fraction

import cv2
import numpy as np
from scipy.fft import dct

RATE = 16000  # audio samples per second
FPS = 25  # SyncNet's video rate
WINDOW = 5  # video frames per window
MFCC_PER_FRAME = 4  # 100 Hz MFCC columns per 25 fps frame
MFCC_WINDOW = 20
VSHIFT = 15  # offsets -15..15 frames
SMOOTH = 13  # median filter length over a face track
CROP_SCALE = 0.40
CROP_SIZE = 224
PAD_VALUE = 110
EPS = 1e-6  # torch.nn.functional.pairwise_distance adds it to the difference


# Audio -----------------------------------------------------------------------------------------------
def _mel(hz):
    return 2595 * np.log10(1 + hz / 700.0)


def _hz(mel):
    return 700 * (10 ** (mel / 2595.0) - 1)


def filterbank(nfilt: int = 26, nfft: int = 512, rate: int = RATE) -> np.ndarray:
    """(nfilt, nfft // 2 + 1) triangular mel filters on FFT bins ``floor((nfft + 1) * hz / rate)``."""
    points = _hz(np.linspace(_mel(0.0), _mel(rate / 2), nfilt + 2))
    bins = np.floor((nfft + 1) * points / rate)
    fb = np.zeros((nfilt, nfft // 2 + 1))
    for j in range(nfilt):
        lo, mid, hi = bins[j], bins[j + 1], bins[j + 2]
        for i in range(int(lo), int(mid)):
            fb[j, i] = (i - lo) / (mid - lo)
        for i in range(int(mid), int(hi)):
            fb[j, i] = (hi - i) / (hi - mid)
    return fb


def mfcc(signal: np.ndarray, rate: int = RATE) -> np.ndarray:
    """(N,) samples (int16 scale) -> (frames, 13) float64 MFCC, as ``python_speech_features.mfcc`` 0.6 with
    its defaults: pre-emphasis 0.97, 25 ms frames every 10 ms (the last zero-padded), 512-point power
    spectrum / 512, 26 mel filters, log, orthonormal DCT-II, lifter 22, c0 replaced by the log energy."""
    x = np.asarray(signal, np.float64)
    x = np.append(x[:1], x[1:] - 0.97 * x[:-1])
    flen, step = int(math.floor(0.025 * rate + 0.5)), int(math.floor(0.01 * rate + 0.5))
    n = 1 if len(x) <= flen else 1 + math.ceil((len(x) - flen) / step)
    padded = np.concatenate([x, np.zeros((n - 1) * step + flen - len(x))])
    frames = padded[np.arange(flen)[None, :] + step * np.arange(n)[:, None]]
    power = np.square(np.abs(np.fft.rfft(frames, 512))) / 512
    eps = np.finfo(float).eps
    energy = power.sum(1)
    energy = np.where(energy == 0, eps, energy)
    feat = power @ filterbank(26, 512, rate).T
    feat = np.where(feat == 0, eps, feat)
    feat = dct(np.log(feat), type=2, axis=1, norm="ortho")[:, :13]
    feat *= 1 + 11.0 * np.sin(np.pi * np.arange(13) / 22)
    feat[:, 0] = np.log(energy)
    return feat


def int16_scale(samples: np.ndarray) -> np.ndarray:
    """(N,) float32 in [-1, 1] -> (N,) float64 on the int16 scale the reference reads from its WAV."""
    return np.clip(np.round(np.asarray(samples, np.float64) * 32768), -32768, 32767)


def audio_windows(samples: np.ndarray, n_windows: int) -> np.ndarray:
    """The job's (N,) float32 16 kHz samples -> (n_windows, 13, 20) MFCC windows."""
    if not n_windows:
        return np.zeros((0, 13, MFCC_WINDOW), np.float32)
    feat = mfcc(int16_scale(samples)).T  # (13, frames)
    steps = [feat[:, MFCC_PER_FRAME * k : MFCC_PER_FRAME * k + MFCC_WINDOW] for k in range(n_windows)]
    return np.stack(steps).astype(np.float32)


# Video -----------------------------------------------------------------------------------------------
def sample_frames(output_frames: int, fps: Fraction) -> list[int]:
    """The output frame shown at each 25 fps instant ``k / 25`` (the nearest frame, ties to the earlier)
    over the output's duration: ``floor(output_frames * 25 / fps)`` samples."""
    fps = Fraction(fps)
    count = math.floor(output_frames * FPS / fps)
    out = []
    for k in range(count):
        t = Fraction(k) * fps / FPS
        out.append(min(output_frames - 1, math.ceil(t - Fraction(1, 2))))
    return out


def window_count(frames: int, samples: int) -> int:
    """Windows the reference scores: ``min(frames, samples // 640) - 5`` (at least 0)."""
    return max(0, min(frames, samples // (RATE // FPS)) - WINDOW)


@dataclass(frozen=True)
class CropRect:
    """A smoothed SyncNet crop: centre ``(cx, cy)`` and half-size ``bs``, full-frame pixels."""

    cx: float
    cy: float
    bs: float


def _track_median(values: list[float | None], k: int) -> float:
    """Median over 13 values centred on ``k`` inside ``k``'s track (a run without gaps), zeros outside."""
    half, window = SMOOTH // 2, []
    for j in range(-half, half + 1):
        i, inside = k + j, True
        step = 1 if j > 0 else -1
        for m in range(k, i + step, step) if j else ():
            if not 0 <= m < len(values) or values[m] is None:
                inside = False
                break
        window.append(values[i] if inside else 0.0)
    return float(np.median(window))


def crop_rects(boxes: list[tuple[float, float, float, float] | None]) -> list[CropRect | None]:
    """Raw detector boxes ``(x1, y1, x2, y2)`` of consecutive 25 fps frames (None: no face) -> crops.

    A crop at ``k`` reads boxes ``k - 6 .. k + 6`` only, so a slice of frames gets the same crops as the
    whole sequence as long as it carries 6 frames of context on each side."""
    s = [None if b is None else max(b[3] - b[1], b[2] - b[0]) / 2 for b in boxes]
    x = [None if b is None else (b[0] + b[2]) / 2 for b in boxes]
    y = [None if b is None else (b[1] + b[3]) / 2 for b in boxes]
    return [
        None if b is None else CropRect(_track_median(x, k), _track_median(y, k), _track_median(s, k))
        for k, b in enumerate(boxes)
    ]


def crop(frame: np.ndarray, rect: CropRect) -> np.ndarray | None:
    """(H, W, 3) uint8 BGR frame -> (224, 224, 3) uint8 BGR SyncNet crop (None when the crop is empty).

    As the reference: the frame padded by ``bsi = int(1.8 bs)`` with 110 on every side, rows
    ``int(cy + bsi - bs) : int(cy + bsi + 1.8 bs)``, columns ``int(cx + bsi - 1.4 bs) : int(cx + bsi +
    1.4 bs)`` of the padded frame, bilinear resize. Only the crop is padded, never the whole frame."""
    h, w = frame.shape[:2]
    bs = rect.bs
    bsi = int(bs * (1 + 2 * CROP_SCALE))
    my, mx = rect.cy + bsi, rect.cx + bsi
    r0, r1 = max(0, int(my - bs)), min(h + 2 * bsi, int(my + bs * (1 + 2 * CROP_SCALE)))
    c0, c1 = max(0, int(mx - bs * (1 + CROP_SCALE))), min(w + 2 * bsi, int(mx + bs * (1 + CROP_SCALE)))
    if r1 <= r0 or c1 <= c0:
        return None
    out = np.full((r1 - r0, c1 - c0, 3), PAD_VALUE, np.uint8)
    # padded coordinates -> frame coordinates (subtract bsi), intersected with the frame
    fr0, fr1 = max(r0 - bsi, 0), min(r1 - bsi, h)
    fc0, fc1 = max(c0 - bsi, 0), min(c1 - bsi, w)
    if fr1 > fr0 and fc1 > fc0:
        out[fr0 + bsi - r0 : fr1 + bsi - r0, fc0 + bsi - c0 : fc1 + bsi - c0] = frame[fr0:fr1, fc0:fc1]
    return cv2.resize(out, (CROP_SIZE, CROP_SIZE))


# Scores ----------------------------------------------------------------------------------------------
def distances(lips: np.ndarray, windows: np.ndarray, audio: np.ndarray, vshift: int = VSHIFT) -> np.ndarray:
    """(M, 31) distances: lip embedding ``i`` (of window ``windows[i]``) against the audio embedding of
    window ``windows[i] + j - vshift``, zero outside ``[0, len(audio))`` (the reference's padding)."""
    lips = np.asarray(lips, np.float64)
    audio = np.asarray(audio, np.float64)
    padded = np.concatenate([np.zeros((vshift, audio.shape[1])), audio, np.zeros((vshift, audio.shape[1]))])
    out = np.empty((len(lips), 2 * vshift + 1))
    for i, (k, v) in enumerate(zip(windows, lips, strict=True)):
        out[i] = np.linalg.norm(v[None] - padded[k : k + 2 * vshift + 1] + EPS, axis=1)
    return out


@dataclass(frozen=True)
class SyncScores:
    """LSE-C (``confidence``), LSE-D (``distance``) and the offset in 25 fps frames over ``windows``
    scored windows. ``offset = vshift - argmin`` as the reference prints it: positive when the best audio
    window for lip window ``k`` is ``k - offset`` (the picture lags the sound)."""

    confidence: float
    distance: float
    offset: int
    windows: int


def scores(dist: np.ndarray, vshift: int = VSHIFT) -> SyncScores | None:
    """Scores of (M, 2 vshift + 1) distances (None when M is 0): per offset the mean over windows, then
    LSE-D = min, LSE-C = median - min, offset = vshift - argmin (the first minimum)."""
    if len(dist) == 0:
        return None
    mean = dist.mean(0)
    j = int(np.argmin(mean))
    return SyncScores(float(np.median(mean) - mean[j]), float(mean[j]), vshift - j, len(dist))


def per_second(dist: np.ndarray, windows: np.ndarray, seconds: int) -> list[SyncScores | None]:
    """Scores of the windows starting in each second ``[25 s, 25 s + 25)`` of the 25 fps timeline."""
    windows = np.asarray(windows)
    return [scores(dist[(windows // FPS) == s]) for s in range(seconds)]


# Per job, independent of sharding ----------------------------------------------------------------------
@dataclass(frozen=True)
class ShardSyncPlan:
    """What a shard's worker crops: 25 fps samples ``k`` in ``[k_lo, k_hi)`` shown by output frames
    ``frames[k - k_lo]``, with their crop rects (None: no face); ``inner`` windows (all 5 frames in the
    shard, all with a face) get their lip embeddings there; the first and last 4 crops go back whole."""

    k_lo: int
    k_hi: int
    frames: tuple[int, ...]
    rects: tuple[CropRect | None, ...]
    inner: tuple[int, ...]

    def edges(self) -> list[int]:
        n = self.k_hi - self.k_lo
        return sorted({*range(self.k_lo, self.k_lo + min(4, n)), *range(self.k_hi - min(4, n), self.k_hi)})


class SyncPlan:
    """One job's sampling: 25 fps samples -> output frames, window count, and each shard's part."""

    def __init__(self, output_frames: int, fps: Fraction, samples: int) -> None:
        self.frames = sample_frames(output_frames, fps)
        self.n_windows = window_count(len(self.frames), samples)
        self.fps = Fraction(fps)

    def span(self, start: int, end: int) -> tuple[int, int]:
        """25 fps samples ``[k_lo, k_hi)`` shown by output frames ``[start, end)``."""
        return bisect.bisect_left(self.frames, start), bisect.bisect_left(self.frames, end)

    def context(self, start: int, end: int) -> range:
        """Samples whose boxes the crops of output frames ``[start, end)`` read (6 either side)."""
        k_lo, k_hi = self.span(start, end)
        half = SMOOTH // 2
        return range(max(0, k_lo - half), min(len(self.frames), k_hi + half))

    def shard(self, start: int, end: int, boxes: dict[int, tuple | None]) -> ShardSyncPlan:
        """The part of output frames ``[start, end)``, from ``boxes`` (sample -> raw box) over its context."""
        k_lo, k_hi = self.span(start, end)
        ctx = self.context(start, end)
        rects = crop_rects([boxes[k] for k in ctx])
        mine = tuple(rects[k - ctx.start] for k in range(k_lo, k_hi))
        inner = tuple(
            k
            for k in range(k_lo, min(k_hi - WINDOW + 1, self.n_windows))
            if all(r is not None for r in mine[k - k_lo : k - k_lo + WINDOW])
        )
        return ShardSyncPlan(k_lo, k_hi, tuple(self.frames[k_lo:k_hi]), mine, inner)


class ShardCropper:
    """The ``on_frame(t, frame)`` callback a shard's compositor calls with every finished frame: keeps the
    SyncNet crops of the frames at 25 fps instants."""

    def __init__(self, plan: ShardSyncPlan) -> None:
        self.plan = plan
        self._want: dict[int, list[int]] = {}
        for k, (t, r) in enumerate(zip(plan.frames, plan.rects, strict=True), start=plan.k_lo):
            if r is not None:
                self._want.setdefault(t, []).append(k)
        self.crops: dict[int, np.ndarray] = {}

    def __call__(self, t: int, frame: np.ndarray) -> None:
        for k in self._want.get(t, ()):
            c = crop(frame, self.plan.rects[k - self.plan.k_lo])
            if c is not None:
                self.crops[k] = c


@dataclass(frozen=True)
class ShardSync:
    """A shard's sync data, all a job's scores need of it (kept beside its segment for a resumed render):
    its samples ``[k_lo, k_hi)`` and which have a face (``faces``, bool (k_hi - k_lo,)); its ``inner``
    windows (M,) and their lip embeddings ``lips`` (M, E) float32; its edge crops ``edge_crops``
    (N, 224, 224, 3) uint8 BGR of samples ``edge_ks`` (N,)."""

    k_lo: int
    k_hi: int
    faces: np.ndarray
    windows: np.ndarray
    lips: np.ndarray
    edge_ks: np.ndarray
    edge_crops: np.ndarray

    def to_bytes(self) -> bytes:
        buf = io.BytesIO()
        np.savez(
            buf,
            span=np.array([self.k_lo, self.k_hi]),
            faces=self.faces,
            windows=self.windows,
            lips=self.lips,
            edge_ks=self.edge_ks,
            edge_crops=self.edge_crops,
        )
        return buf.getvalue()

    @classmethod
    def from_bytes(cls, data: bytes) -> ShardSync:
        with np.load(io.BytesIO(data)) as z:
            k_lo, k_hi = (int(v) for v in z["span"])
            return cls(k_lo, k_hi, z["faces"], z["windows"], z["lips"], z["edge_ks"], z["edge_crops"])


@dataclass(frozen=True)
class SyncedSegment:
    """What a worker returns for a shard when the job is scored: the segment's bytes and its
    :class:`ShardSync` as bytes."""

    segment: bytes
    sync: bytes


def window_stack(crops: dict[int, np.ndarray], k: int) -> np.ndarray | None:
    """(5, 224, 224, 3) crops of samples ``k..k+4``, or None when one is missing."""
    if any(k + i not in crops for i in range(WINDOW)):
        return None
    return np.stack([crops[k + i] for i in range(WINDOW)])


def shard_sync(plan: ShardSyncPlan, crops: dict[int, np.ndarray], lips) -> ShardSync:
    """A shard's :class:`ShardSync` from its crops; ``lips`` maps (N, 5, 224, 224, 3) windows to (N, E)."""
    ks = [k for k in plan.inner if window_stack(crops, k) is not None]
    emb = np.asarray(lips(np.stack([window_stack(crops, k) for k in ks])), np.float32) if ks else None
    edge = [k for k in plan.edges() if k in crops]
    return ShardSync(
        plan.k_lo,
        plan.k_hi,
        np.array([k in crops for k in range(plan.k_lo, plan.k_hi)], bool),
        np.asarray(ks, np.int64),
        emb if emb is not None else np.zeros((0, 1), np.float32),
        np.asarray(edge, np.int64),
        np.stack([crops[k] for k in edge]) if edge else np.zeros((0, CROP_SIZE, CROP_SIZE, 3), np.uint8),
    )


@dataclass(frozen=True)
class JobScores:
    """A job's sync scores: over every scored window, and per second (None: no window scored there)."""

    job: SyncScores | None
    seconds: list[SyncScores | None]


def job_scores(plan: SyncPlan, shards: list[ShardSync], lips, audio_embeddings: np.ndarray) -> JobScores:
    """Merge the shards' inner windows with the windows across shard edges (embedded here with ``lips``
    from the edge crops) and score them against ``audio_embeddings`` (n_windows, 1024)."""
    found: dict[int, np.ndarray] = {}
    edge: dict[int, np.ndarray] = {}
    with_face: set[int] = set()
    inside: set[int] = set()  # windows whose 5 samples all lie in one shard: that shard embedded them
    for sync in shards:
        inside.update(range(sync.k_lo, sync.k_hi - WINDOW + 1))
        for k, v in zip(sync.windows.tolist(), sync.lips, strict=True):
            found[k] = v
        for k, c in zip(sync.edge_ks.tolist(), sync.edge_crops, strict=True):
            edge[k] = c
        with_face.update(k for k, f in zip(range(sync.k_lo, sync.k_hi), sync.faces, strict=True) if f)
    across = [
        k for k in range(plan.n_windows) if k not in inside and all(k + i in with_face for i in range(WINDOW))
    ]
    ks = [k for k in across if window_stack(edge, k) is not None]
    if ks:
        # float32 as the shards' embeddings: which side computed a window never changes its value
        emb = np.asarray(lips(np.stack([window_stack(edge, k) for k in ks])), np.float32)
        for k, v in zip(ks, emb, strict=True):
            found[k] = v
    windows = np.asarray(sorted(found), np.int64)
    if not len(windows):
        return JobScores(None, [None] * math.ceil(len(plan.frames) / FPS))
    dist = distances(np.stack([found[k] for k in windows]), windows, audio_embeddings)
    return JobScores(scores(dist), per_second(dist, windows, math.ceil(len(plan.frames) / FPS)))
