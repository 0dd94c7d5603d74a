"""One family of keys for reusable work: what a result depends on, hashed.

Every key is built from the same parts, each computed in one place here:

- the **compute identity** (:class:`musetalk.device.ComputeIdentity`, reported by the workers: device
  type and model, dtype, threads, torch and CUDA versions): what changes rounding;
- the **inputs' contents** (:func:`content_digest`, a full sha256 of a file, memoised per file version);
- the **weights' identity** (:func:`weights_identity`: per file its name, size and first and last MiB when
  local, its size and ETag under a URI; never a download);
- the **settings** that change pixels (:func:`pixel_settings`), less those the identity already holds.

Keys: :func:`resume_key` (a run directory's segments, together with the identity they were computed
with: :class:`cluster.rundir.RunDir`), :func:`detect_key` and :func:`prepare_key` (the avatar cache's raw
detections and prepared entries of a video).
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
from collections.abc import Iterable
from dataclasses import asdict, replace
from pathlib import Path
from typing import TYPE_CHECKING

from cluster import storage
from musetalk.config import PACING_FIELDS, FaceConfig, PipelineConfig
from musetalk.layout import ModelLayout
from musetalk.tracks import VERSION as TRACKS_VERSION
from musetalk.tracks import is_track, parse_select
from shards.plan import Plan
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


def resume_key(
    inputs: Iterable[str | Path], plan: Plan, pipeline: PipelineConfig, encode: EncodeSettings
) -> str:
    """What a run directory's segments depend on besides the compute identity (kept beside them):
    the inputs' contents, the plan (shard boundaries), the pixel settings, the encoder and the weights."""
    return _hash(
        {
            "inputs": [content_digest(p) for p in inputs],
            "plan": plan.to_json(),
            "pipeline": pixel_settings(pipeline),
            "encode": asdict(encode),
            "weights": weights_identity(pipeline),
        }
    )


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
    """What prepared entries depend on: every face and blend setting, the VAE and parser batches,
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
