"""Avatar entries: everything the renderer derives from a source frame alone, as data and bytes.

Upstream's realtime "avatar" mode prepares a video once and then renders any audio over it. Here a job's
preparation (:mod:`musetalk.preparation`) makes, per source frame: raw detections (every face: box,
score, landmarks; the frame's cut signature: JSON, :func:`detections_to_json`), from which smoothed crop
boxes are a pure function of the frame and the face choice (:func:`musetalk.boxes.boxes_from_detections`), and an :class:`Entry` (the VAE latents of its crop and its
blend material), packed per chunk of consecutive source frames into one npz (:func:`pack_chunk`,
per-frame members, so a reader loads only the frames it shows: :class:`ChunkReader`,
:class:`EntrySource`). The avatar cache (:mod:`cluster.cache`) keeps both per video. A format other than
:data:`FORMAT` (:data:`DETECTIONS_FORMAT`) is refused, never read.
"""

from __future__ import annotations

import io
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from musetalk.blending import Box
from musetalk.faces import Detection, FrameFaces, as_faces
from musetalk.lru import LRU
from musetalk.tracks import SIGNATURE_SIDE

FORMAT = 1  # bump when the entry format changes: old files are never read
DETECTIONS_FORMAT = 3  # the same for detections (2: every face of a frame and its cut signature;
# 3: detection on copies shrunk from the decoder's YUV, the signature from the same copy)


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


def detections_to_json(detections: Mapping[int, FrameFaces | Detection | None]) -> str:
    """Every face of each source frame (box, score, landmarks) and its cut signature (hex bytes)."""

    def face(d: Detection) -> dict:
        marks = None if d.landmarks is None else np.asarray(d.landmarks).tolist()
        return {"box": list(d.box), "score": d.score, "landmarks": marks}

    frames = {}
    for s, found in sorted(detections.items()):
        f = as_faces(found)
        sig = None if f.signature is None else np.asarray(f.signature, dtype=np.uint8).tobytes().hex()
        frames[str(s)] = {"faces": [face(d) for d in f.faces], "signature": sig}
    return json.dumps({"format": DETECTIONS_FORMAT, "frames": frames})


def detections_from_json(text: str) -> dict[int, FrameFaces]:
    meta = json.loads(text)
    if meta.get("format") != DETECTIONS_FORMAT:
        raise ValueError(f"avatar detections format {meta.get('format')} is not {DETECTIONS_FORMAT}")
    out: dict[int, FrameFaces] = {}
    for s, f in meta["frames"].items():
        sig = f["signature"]
        out[int(s)] = FrameFaces(
            tuple(
                Detection(
                    box=tuple(d["box"]),
                    score=d["score"],
                    landmarks=None
                    if d["landmarks"] is None
                    else np.asarray(d["landmarks"], dtype=np.float32),
                )
                for d in f["faces"]
            ),
            None
            if sig is None
            else np.frombuffer(bytes.fromhex(sig), dtype=np.uint8).reshape(SIGNATURE_SIDE, -1),
        )
    return out
