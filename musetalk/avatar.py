"""The avatar: everything the renderer derives from a source frame alone, computed once per frame.

Upstream's realtime "avatar" mode (and its ``--use_saved_coord``) prepares a video once and then renders
any audio over it. Here a job's preparation is split from its generation:

1. **detect**: raw detections (detector box, score, landmarks) per source frame;
2. **smooth**: crop boxes from the raw detections with temporal smoothing (pure, over the whole video:
   :func:`boxes_from_detections`), so a box is a pure function of its source frame;
3. **prepare**: per source frame with a face, the VAE latents of its crop (masked + reference, (8, 32, 32)
   float32) and its blend material (square, mask, the mask's active rect).

Step 3's results are packed per chunk of consecutive source frames (:func:`pack_chunk`, an npz whose
members are per frame, so a reader loads only the frames it shows: :class:`ChunkReader`). Step 1's are
JSON. Both can be kept in an :class:`AvatarStore`: a directory or any fsspec URI (``s3://``, ``gs://``,
``file://``), keyed by the video's content hash and by the settings, weights and compute identity each
step depends on (:mod:`cluster.keys`), so a later render of the same video with any audio reuses them.
Entries are written whole or not at all. Which frames a job detects and prepares, and when, is
:mod:`musetalk.preparation`.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import re
import uuid
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np

from musetalk.blending import Box
from musetalk.config import PipelineConfig
from musetalk.faces import Detection, crop_box, smooth_boxes, smoothing_window
from musetalk.lru import LRU

logger = logging.getLogger(__name__)

FORMAT = 1  # bump when the entry format or any preparation rule changes: old entries are never read
_FINGERPRINT_BYTES = 1 << 20
_RANGE = re.compile(r"^(\d{6})-(\d{6})\.(json|npz)$")


# ---------------------------------------------------------------------------------------------- entries


@dataclass(frozen=True, eq=False)
class Entry:
    """One prepared source frame. Without a face only ``src`` is set (the frame passes through)."""

    src: int
    box: Box | None = None
    latents: np.ndarray | None = None  # (8, 32, 32) float32: masked + reference crop latents
    square: Box | None = None  # blend square in frame coordinates
    mask: np.ndarray | None = None  # (side, side) uint8 blend mask
    parsed: bool = False  # False: the parsing fallback mask was used
    rect: Box | None = None  # the part of the frame the mask touches (see musetalk.composite.active_rect)


def pack_chunk(entries: Sequence[Entry]) -> bytes:
    """Entries of consecutive source frames -> one npz (per-frame members, compressed: masks are mostly
    flat, so a 1080p frame's entry is tens of kB)."""
    index, arrays = [], {}
    for e in entries:
        index.append({"src": e.src, "box": e.box, "square": e.square, "parsed": e.parsed, "rect": e.rect})
        if e.box is not None:
            arrays[f"latents_{e.src}"] = np.ascontiguousarray(e.latents, dtype=np.float32)
            arrays[f"mask_{e.src}"] = np.ascontiguousarray(e.mask, dtype=np.uint8)
    arrays["index"] = np.frombuffer(json.dumps({"format": FORMAT, "frames": index}).encode(), dtype=np.uint8)
    buf = io.BytesIO()
    np.savez_compressed(buf, **arrays)
    return buf.getvalue()


class ChunkReader:
    """Reads single frames' entries out of a :func:`pack_chunk` blob (only the members asked for)."""

    def __init__(self, blob: bytes) -> None:
        self._npz = np.load(io.BytesIO(blob), allow_pickle=False)
        meta = json.loads(self._npz["index"].tobytes())
        if meta.get("format") != FORMAT:
            raise ValueError(f"avatar chunk format {meta.get('format')} is not {FORMAT}")
        self._index = {f["src"]: f for f in meta["frames"]}

    @property
    def frames(self) -> list[int]:
        return sorted(self._index)

    def __contains__(self, src: int) -> bool:
        return src in self._index

    def get(self, src: int) -> Entry:
        f = self._index[src]
        if f["box"] is None:
            return Entry(src)
        mask = self._npz[f"mask_{src}"]
        mask.flags.writeable = False
        return Entry(
            src=src,
            box=tuple(f["box"]),
            latents=self._npz[f"latents_{src}"],
            square=tuple(f["square"]),
            mask=mask,
            parsed=bool(f["parsed"]),
            rect=None if f["rect"] is None else tuple(f["rect"]),
        )


class EntrySource:
    """``src -> Entry`` over chunks ``(start, end, handle)`` fetched with ``fetch(handle) -> bytes`` on first
    use, at most ``keep`` held at a time (least recently used dropped): a shard holds one or two chunks
    however long it is, and never fetches a chunk none of its frames is in."""

    def __init__(self, chunks: Sequence[tuple[int, int, object]], fetch, keep: int = 4) -> None:
        self._chunks = list(chunks)
        self._fetch = fetch
        self._open: LRU[tuple[int, int], ChunkReader] = LRU(keep)
        self.fetched = 0

    def __call__(self, src: int) -> Entry:
        for start, end, handle in self._chunks:
            if start <= src < end:
                reader = self._open.get((start, end))
                if reader is None:
                    reader = ChunkReader(self._fetch(handle))
                    self.fetched += 1
                    self._open.put((start, end), reader)
                if src in reader:
                    return reader.get(src)
        raise KeyError(f"source frame {src} was never prepared")


def detections_to_json(detections: dict[int, Detection | None]) -> str:
    return json.dumps(
        {
            "format": FORMAT,
            "frames": {
                str(s): None
                if d is None
                else {
                    "box": list(d.box),
                    "score": d.score,
                    "landmarks": None if d.landmarks is None else np.asarray(d.landmarks).tolist(),
                }
                for s, d in sorted(detections.items())
            },
        }
    )


def detections_from_json(text: str) -> dict[int, Detection | None]:
    meta = json.loads(text)
    if meta.get("format") != FORMAT:
        raise ValueError(f"avatar detections format {meta.get('format')} is not {FORMAT}")
    out: dict[int, Detection | None] = {}
    for s, d in meta["frames"].items():
        out[int(s)] = (
            None
            if d is None
            else Detection(
                box=tuple(d["box"]),
                score=d["score"],
                landmarks=None if d["landmarks"] is None else np.asarray(d["landmarks"], dtype=np.float32),
            )
        )
    return out


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
        window = smoothing_window(s, r, source_frames)
        out[s] = smooth_boxes([raw_box(k) for k in window], r)[s - window.start]
    return out


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
