"""The avatar: everything the renderer derives from a source frame alone, computed once per frame.

Upstream's realtime "avatar" mode (and its ``--use_saved_coord``) prepares a video once and then renders
any audio over it. Here a job's preparation is split from its generation:

1. **detect**: raw detections (detector box, score, landmarks) per source frame;
2. **smooth**: crop boxes from the raw detections with temporal smoothing (pure, over the whole video:
   :func:`boxes_from_detections`), so a box is a pure function of its source frame;
3. **prepare**: per source frame with a face, the VAE latents of its crop (masked + reference, (8, 32, 32)
   float32) and its blend material (square, mask, the mask's active rect).

Step 3's results are :class:`~musetalk.entries.Entry` objects, packed per chunk of consecutive source
frames (:func:`~musetalk.entries.pack_chunk`, an npz whose members are per frame, so a reader loads only
the frames it shows); step 1's are JSON (:mod:`musetalk.entries` holds both formats). Both can be kept in
an :class:`AvatarStore`: a directory or any fsspec URI (``s3://``, ``gs://``, ``file://``), keyed by the
video's content hash and by the settings and weights each step depends on, so a later render of the same
video with any audio reuses them. Entries are written whole or not at all.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import logging
import os
import re
import uuid
from collections.abc import Iterable
from dataclasses import asdict
from pathlib import Path

from musetalk.audio import audio_span
from musetalk.blending import Box
from musetalk.config import PipelineConfig
from musetalk.faces import Detection, crop_box, smooth_boxes
from musetalk.parsing import parse_batch

logger = logging.getLogger(__name__)

FORMAT = 1  # bump when the entry format or any preparation rule changes: old entries are never read
_FINGERPRINT_BYTES = 1 << 20
_RANGE = re.compile(r"^(\d{6})-(\d{6})\.(json|npz)$")


# ---------------------------------------------------------------------------------------------- smoothing


def boxes_from_detections(
    detections: dict[int, Detection | None],
    frames: Iterable[int],
    frame_shape: tuple[int, int],
    cfg: PipelineConfig,
    source_frames: int,
) -> dict[int, Box | None]:
    """Smoothed crop boxes of ``frames``: each reads the raw boxes of source frames ``[s - r, s + r]``
    clipped to the video (``detections`` must hold them), exactly as one shard holding the whole video
    would compute them."""
    r = cfg.face.smooth_radius
    raw: dict[int, Box | None] = {}

    def raw_box(k: int) -> Box | None:
        if k not in raw:
            raw[k] = crop_box(detections[k], frame_shape, cfg.face)
        return raw[k]

    out = {}
    for s in frames:
        a, b = max(0, s - r), min(source_frames, s + r + 1)
        out[s] = smooth_boxes([raw_box(k) for k in range(a, b)], r)[s - a]
    return out


# ---------------------------------------------------------------------------------------------- keys


def weights_fingerprint(paths: Iterable[str | Path]) -> str:
    """Identity of weight files that holds across machines: name, size and the first and last MiB of
    each (cheap for gigabytes, and random test weights of equal size still differ). Each file is read
    once per version (path, inode, size, mtime) in a process: a batch of jobs does not read it again."""
    h = hashlib.sha256()
    for p in paths:
        st = os.stat(p)
        h.update(_file_fingerprint(str(Path(p).resolve()), st.st_ino, st.st_size, st.st_mtime_ns).encode())
    return h.hexdigest()


@functools.lru_cache(maxsize=256)
def _file_fingerprint(path: str, inode: int, size: int, mtime_ns: int) -> str:
    h = hashlib.sha256(f"{Path(path).name}:{size}".encode())
    with open(path, "rb") as f:
        h.update(f.read(_FINGERPRINT_BYTES))
        if size > _FINGERPRINT_BYTES:
            f.seek(max(_FINGERPRINT_BYTES, size - _FINGERPRINT_BYTES))
            h.update(f.read())
    return h.hexdigest()


def _digest(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def compute_settings(cfg: PipelineConfig, device_type: str) -> dict:
    """How results are computed, beyond the weights: device type, dtype and CPU threads change rounding."""
    return {
        "device": device_type,
        "dtype": cfg.dtype if device_type != "cpu" else "float32",
        "threads": cfg.threads,
    }


def detect_key(cfg: PipelineConfig, device_type: str, weights: str) -> str:
    """What raw detections depend on: detector, landmarks or not, detection size and batch, weights."""
    f = cfg.face
    return "d" + _digest(
        {
            "format": FORMAT,
            "detector": f.detector,
            "crop": f.crop,
            "detect_max_side": f.detect_max_side,
            "batch_size": f.batch_size,
            "compute": compute_settings(cfg, device_type),
            "weights": weights,
        }
    )


def prepare_key(cfg: PipelineConfig, device_type: str, weights: str) -> str:
    """What prepared entries depend on: every face and blend setting, the VAE and parser batches, weights."""
    return "p" + _digest(
        {
            "format": FORMAT,
            "face": asdict(cfg.face),
            "blend": asdict(cfg.blend),
            "batch_size": cfg.batch_size,
            "parse_batch": parse_batch(device_type),
            "compute": compute_settings(cfg, device_type),
            "weights": weights,
        }
    )


# ---------------------------------------------------------------------------------------------- store


def fetch(uri: str) -> bytes:
    """The bytes of one stored file, by its full URI (see :meth:`AvatarStore.uri`)."""
    import fsspec

    fs, path = fsspec.core.url_to_fs(uri)
    return fs.cat_file(path)


def chunk_name(start: int, end: int, suffix: str) -> str:
    return f"{start:06d}-{end:06d}.{suffix}"


class AvatarStore:
    """Avatar entries of many videos under one root (a local directory or an fsspec URI).

    Layout: ``<root>/<video sha256>/<key>/<start>-<end>.{json,npz}``: detections (``d...`` keys) as JSON,
    prepared entries (``p...`` keys) as npz, one file per range of source frames ``[start, end)``. A file
    is written under a temporary name and renamed (or, on object stores, put in one request), so a
    reader never sees half of one; unreadable files are skipped and logged, never trusted.
    """

    def __init__(self, root: str) -> None:
        import fsspec  # imported here: only renders with a cache need it

        self.root = root
        self.fs, path = fsspec.core.url_to_fs(os.path.expanduser(root))
        self.path = path.rstrip("/")
        self.local = "file" in (
            self.fs.protocol if isinstance(self.fs.protocol, tuple) else (self.fs.protocol,)
        )

    def _dir(self, video: str, key: str) -> str:
        return f"{self.path}/{video}/{key}"

    def ranges(self, video: str, key: str) -> list[tuple[int, int]]:
        """The ``[start, end)`` ranges stored under ``key`` for ``video``."""
        d = self._dir(video, key)
        try:
            names = [p.rsplit("/", 1)[-1] for p in self.fs.ls(d, detail=False)]
        except FileNotFoundError:
            return []
        out = []
        for name in names:
            m = _RANGE.match(name)
            if m:
                out.append((int(m.group(1)), int(m.group(2))))
        return sorted(out)

    def uri(self, video: str, key: str, start: int, end: int, suffix: str) -> str:
        """The full URI of one file (with its protocol), for :func:`fetch` on any node."""
        return self.fs.unstrip_protocol(f"{self._dir(video, key)}/{chunk_name(start, end, suffix)}")

    def read(self, video: str, key: str, start: int, end: int, suffix: str) -> bytes:
        return self.fs.cat_file(f"{self._dir(video, key)}/{chunk_name(start, end, suffix)}")

    def write(self, video: str, key: str, start: int, end: int, suffix: str, data: bytes) -> None:
        d = self._dir(video, key)
        final = f"{d}/{chunk_name(start, end, suffix)}"
        if not self.local:
            self.fs.pipe_file(final, data)  # one PUT: the object appears whole or not at all
            return
        self.fs.makedirs(d, exist_ok=True)
        tmp = f"{d}/.{uuid.uuid4().hex}.partial"
        try:
            with open(tmp, "wb") as f:
                f.write(data)
            os.replace(tmp, final)
        finally:  # a failed write (a full disk) leaves nothing behind, not even the temporary file
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)


# ---------------------------------------------------------------------------------------------- planning


def block_ranges(frames: Iterable[int], block: int) -> list[tuple[int, int]]:
    """Sorted distinct ``frames`` as ``[start, end)`` runs of consecutive frames, split at multiples of
    ``block`` (so ranges, and the cache files named after them, line up across jobs on one video)."""
    if block < 1:
        raise ValueError(f"block must be >= 1, got {block}")
    out: list[tuple[int, int]] = []
    for s in sorted(set(frames)):
        if out and out[-1][1] == s and s % block:
            out[-1] = (out[-1][0], s + 1)
        else:
            out.append((s, s + 1))
    return out


class JobPrep:
    """What a job must prepare (pure): the source frames its shards show, the detections their smoothed
    boxes read (``smooth_radius`` frames each side, clipped to the video), the Whisper segments their
    windows read; less what is already there (``have_detections``, ``have_entries``: source frames)."""

    def __init__(
        self,
        plan,
        chunk: int,
        smooth_radius: int,
        shards=None,
        have_detections: Iterable[int] = (),
        have_entries: Iterable[int] = (),
    ) -> None:
        shards = plan.shards if shards is None else shards
        self.chunk = chunk
        self.shown = sorted({plan.source_index(t) for s in shards for t in range(s.start, s.end)})
        entries = set(have_entries)
        self.entries_needed = [s for s in self.shown if s not in entries]
        context = set()
        n, r = plan.source_frames, smooth_radius
        for s in self.entries_needed:
            context.update(range(max(0, s - r), min(n, s + r + 1)))
        detections = set(have_detections)
        self.context = sorted(context)
        self.detections_needed = [s for s in self.context if s not in detections]
        self.shard_segments: dict[str, range] = {}  # shard name -> the Whisper segments its windows read
        for s in shards:
            span = audio_span(plan.total_samples, plan.fps, s.start, s.end)
            self.shard_segments[s.name] = range(span.first_segment, span.end_segment)
        self.segments = sorted({k for r in self.shard_segments.values() for k in r})

    def detect_ranges(self) -> list[tuple[int, int]]:
        return block_ranges(self.detections_needed, self.chunk)

    def prepare_ranges(self) -> list[tuple[int, int]]:
        return block_ranges(self.entries_needed, self.chunk)

    def audio_segments(self) -> list[int]:
        return list(self.segments)
