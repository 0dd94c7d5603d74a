"""One family of keys for reusable work: what a result depends on, hashed.

Every key is built from the same parts, each computed in one place here:

- the **compute identity** (:class:`musetalk.device.ComputeIdentity`, reported by the workers: device
  type and model, dtype, threads, torch and CUDA versions): what changes rounding;
- the **inputs' contents** (:func:`content_digest`, a full sha256 of a file, memoised per file version);
- the **weights' identity** (:func:`weights_identity`: per file its name, size and first and last MiB when
  local, its size and ETag under a URI; never a download);
- the **settings** that change pixels (:func:`pixel_settings`), less those the identity already holds.

Keys: :func:`shard_key` (a generation shard's segment in an output's kept segments,
:class:`cluster.rundir.RunDir`: what its pixels depend on, from :func:`render_parts` and
:func:`shard_parts`), :func:`detect_key` and :func:`prepare_key` (the avatar cache's raw detections and
prepared entries of a video).
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
from collections.abc import Callable, Iterable
from dataclasses import asdict, replace
from pathlib import Path
from typing import TYPE_CHECKING

from cluster import storage
from musetalk.config import PACING_FIELDS, FaceConfig, PipelineConfig
from musetalk.layout import ModelLayout
from musetalk.tracks import VERSION as TRACKS_VERSION
from musetalk.tracks import is_track
from shards.plan import Plan, Shard
from shards.ranges import parse_select
from shards.segment import EncodeSettings

if TYPE_CHECKING:  # torch: keep this module cheap for the pre-flight checks
    from musetalk.device import ComputeIdentity

_CHUNK = 1 << 20
_FINGERPRINT_BYTES = 1 << 20
# Bump when the avatar cache's entry format or any preparation rule changes: old entries are never read.
CACHE_FORMAT = 2


def _face_choice(face: FaceConfig) -> dict:
    """The face settings prepared entries depend on, less the face choice: it is each chunk's own part of
    the key (:func:`choice_digest`), so a job choosing the largest face keeps the keys entries had before
    choices existed, and two choices share every chunk where they agree."""
    values = asdict(face)
    del values["select"]
    return values


def choice_digest(choices: Iterable[str | int | None]) -> str:
    """The key part of an entry chunk made for the face ``choices`` of its frames (None: passed
    through): the choices, and the tracker's version where one names a track (ids come from it)."""
    values = [None if c is None else str(parse_select(c)) for c in choices]
    tracked = any(v is not None and is_track(v) for v in values)
    return _hash({"choices": values, "tracks": TRACKS_VERSION if tracked else None})[:12]


def _hash(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


def content_digest(path: str | Path) -> str:
    """sha256 of a file's contents, streamed; remembered per file version (path, inode, size, mtime), so
    a job hashes its video once for its resume key and its avatar cache key."""
    st = os.stat(path)
    return _content_digest(str(Path(path).resolve()), st.st_ino, st.st_size, st.st_mtime_ns)


@functools.lru_cache(maxsize=64)
def _content_digest(path: str, inode: int, size: int, mtime_ns: int) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def file_fingerprint(path: str | Path) -> str:
    """A weight file's identity that holds across machines: name, size and the first and last MiB
    (cheap for gigabytes, and random test weights of equal size still differ); read once per version."""
    st = os.stat(path)
    return _file_fingerprint(str(Path(path).resolve()), st.st_ino, st.st_size, st.st_mtime_ns)


@functools.lru_cache(maxsize=256)
def _file_fingerprint(path: str, inode: int, size: int, mtime_ns: int) -> str:
    h = hashlib.sha256(f"{Path(path).name}:{size}".encode())
    with open(path, "rb") as f:
        h.update(f.read(_FINGERPRINT_BYTES))
        if size > _FINGERPRINT_BYTES:
            f.seek(max(_FINGERPRINT_BYTES, size - _FINGERPRINT_BYTES))
            h.update(f.read())
    return h.hexdigest()


def weights_identity(pipeline: PipelineConfig, *, preparation: bool = False) -> str:
    """The identity of the weight files ``pipeline`` loads (with ``preparation``: only those the
    preparation phase reads: detector, landmarks, VAE, face parsing). Local files by
    :func:`file_fingerprint`, files under a URI ``models.dir`` by size and ETag."""
    from cluster.weights import weight_files  # imports torch: only when a key is made

    layout = ModelLayout.at(pipeline.models_dir, tiny=pipeline.tiny)
    files = [rel for rel, _ in weight_files(pipeline)]
    if not storage.is_remote(pipeline.models_dir):  # the models loaded as directories, whole
        for d in (layout.vae_dir, layout.whisper_dir):
            files += [p.relative_to(layout.root).as_posix() for p in d.iterdir() if p.is_file()]
    if preparation:
        skip = {
            p.relative_to(layout.root).as_posix()
            for p in (layout.unet_config, layout.unet_weights, layout.gfpgan, layout.syncnet)
        }
        whisper = layout.whisper_dir.relative_to(layout.root).as_posix() + "/"
        files = [f for f in files if f not in skip and not f.startswith(whisper)]
    ids = []
    for rel in sorted(set(files)):
        if storage.is_remote(pipeline.models_dir):
            ids.append(f"{rel}:{storage.identity(storage.info(storage.join(pipeline.models_dir, rel)))}")
        else:
            ids.append(f"{rel}:{file_fingerprint(layout.root / rel)}")
    return _hash(ids)


def pixel_settings(pipeline: PipelineConfig) -> dict:
    """The pipeline settings that change pixels, less where the weights live (their identity is keyed
    instead), what the compute identity holds (device, dtype, threads) and the queue depths (pacing
    only). ``render.channels_last`` and ``render.compile`` change rounding: they stay in."""
    p = replace(pipeline, models_dir="", tiny=False, device="", dtype="", threads=None)
    settings = asdict(p)
    for name in PACING_FIELDS:
        del settings[name]
    return settings


def render_parts(
    video: str | Path, plan: Plan, pipeline: PipelineConfig, encode: EncodeSettings, compute: str
) -> dict[str, object]:
    """What every generation shard of a job depends on, part by part (a changed part is named when a
    shard renders again): the compute identity's key, the encoder, the pixel settings, the weights, the
    video's contents and the timeline (rate, source frames, audio length: the last Whisper segment and
    the windows near the end depend on it)."""
    return {
        "compute": compute,
        "encode": _hash(asdict(encode)),
        "settings": _hash(pixel_settings(pipeline)),
        "weights": weights_identity(pipeline),
        "video": content_digest(video),
        "timeline": [plan.fps_num, plan.fps_den, plan.source_frames, plan.total_samples, plan.sample_rate],
    }


def audio_digests(samples) -> list[str]:
    """sha256 of each 30 s Whisper segment's 16 kHz float32 samples (the last one partial). Whisper
    encodes each segment as a whole, so a changed sample changes its segment's digest and no other."""
    import numpy as np

    from musetalk.audio import SEGMENT_SAMPLES  # imports torch: only when a key is made

    samples = np.ascontiguousarray(samples, dtype=np.float32)
    return [
        hashlib.sha256(samples[i : i + SEGMENT_SAMPLES].tobytes()).hexdigest()
        for i in range(0, max(1, len(samples)), SEGMENT_SAMPLES)
    ]


def shard_parts(
    base: dict[str, object],
    plan: Plan,
    shard: Shard,
    choice: Callable[[int], str | None],
    audio: list[str],
) -> dict[str, object]:
    """What one shard's pixels depend on: ``base`` (:func:`render_parts`), its output range, each frame's
    source index and face choice (``choice(src)``, None: the frame passes through), and the digests of
    the Whisper segments its lip-synced frames read (none when they all pass through)."""
    from musetalk.audio import audio_span

    frames = [(plan.source_index(t), choice(plan.source_index(t))) for t in range(shard.start, shard.end)]
    read: set[int] = set()
    run_start = None
    for i, (_, chosen) in enumerate([*frames, (None, None)]):  # runs of lip-synced frames
        if chosen is not None and run_start is None:
            run_start = i
        elif chosen is None and run_start is not None:
            span = audio_span(plan.total_samples, plan.fps, shard.start + run_start, shard.start + i)
            read.update(range(span.first_segment, span.end_segment))
            run_start = None
    tracked = any(c is not None and is_track(c) for _, c in frames)  # ids come from the tracker's version
    return {
        **base,
        "range": [shard.start, shard.end],
        "frames": _hash([frames, TRACKS_VERSION]) if tracked else _hash(frames),
        "audio": {str(k): audio[k] for k in sorted(read)},
    }


def shard_key(parts: dict[str, object]) -> str:
    """A shard's segment's name in the kept segments: the hash of its :func:`shard_parts`."""
    return _hash(parts)[:32]


def detect_key(pipeline: PipelineConfig, identity: ComputeIdentity, weights: str) -> str:
    """What raw detections depend on: detector, landmarks or not, detection size and batch, weights,
    the compute identity."""
    from musetalk.entries import DETECTIONS_FORMAT

    f = pipeline.face
    return (
        "d"
        + _hash(
            {
                "format": CACHE_FORMAT,
                "detector": f.detector,
                "crop": f.crop,
                "detections": DETECTIONS_FORMAT,
                "detect_max_side": f.detect_max_side,
                "batch_size": f.batch_size,
                "compute": identity.key(),
                "weights": weights,
            }
        )[:16]
    )


def prepare_key(pipeline: PipelineConfig, identity: ComputeIdentity, weights: str) -> str:
    """What prepared entries depend on besides each frame's face choice (``cluster.cache.AvatarCache
    .chunk_key`` adds it per chunk): every other face and blend setting, the VAE and parser batches,
    weights, the compute identity."""
    from musetalk.parsing import parse_batch

    return (
        "p"
        + _hash(
            {
                "format": CACHE_FORMAT,
                "face": _face_choice(pipeline.face),
                "blend": asdict(pipeline.blend),
                "batch_size": pipeline.batch_size,
                "parse_batch": parse_batch(identity.device),
                "compute": identity.key(),
                "weights": weights,
            }
        )[:16]
    )
