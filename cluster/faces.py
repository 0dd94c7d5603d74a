"""Entry point: ``python -m cluster.faces VIDEO --out DIR [overrides]``: list a video's face tracks.

Detection and tracking only (no generation, no audio): writes ``DIR/tracks.json`` (per track: id, first
and last frame, frames seen, mean box; the shot cuts) and ``DIR/tracks.png`` (per track: a thumbnail, the
id and a time strip marking the frames it is seen in), so a person picks ``face.select=<id>`` by looking.
Overrides are the render's (``face.detector=haar``, ``models=tiny``, ...): the ids match a render with
the same face settings. With the avatar cache on (``cache.*``), the detections and the tracks are read
from and written to it (keyed like a render's on this machine's compute identity), so listing again
costs nothing.

In-process, not on the Ray pool: it loads only the face detector (and FAN for ``crop=landmarks``),
never the VAE, UNet or Whisper, so it starts in seconds where a pool would start workers that load
every model; a person lists a video once, before its renders. Bad input: one ``error:`` line, exit
non-zero, nothing written.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import tempfile
from pathlib import Path

import cv2
import numpy as np

from shards.errors import FarmError, InputError

logger = logging.getLogger("cluster.faces")

THUMB = 96  # thumbnail side (px)
STRIP = 480  # time strip width (px)


def detect_video(analyzer, info, start: int, end: int) -> dict:
    """Source frame -> :class:`musetalk.faces.FrameFaces` for frames ``[start, end)``, detected in batches."""
    from shards.decode import read_pictures

    found, batch = {}, []

    def flush() -> None:
        first = start + len(found)
        found.update(zip(range(first, first + len(batch)), analyzer.detect_all(batch), strict=True))
        batch.clear()

    for picture in read_pictures(info, start, end):  # as the render's detect units see them
        batch.append(picture)
        if len(batch) == analyzer.cfg.batch_size:
            flush()
    if batch:
        flush()
    return found


def video_tracks(job, info, label: str):
    """The tracks of ``job.video``: from the avatar cache if it holds them, else linked from every frame's
    detections (those in the cache read, the rest detected here and written there, chunk by chunk)."""
    import torch

    from cluster.cache import AvatarCache
    from musetalk.device import compute_identity, resolve_device, resolve_dtype
    from musetalk.entries import detections_to_json
    from musetalk.faces import load_face_analyzer
    from musetalk.layout import ModelLayout
    from musetalk.preparation import block_ranges
    from musetalk.tracks import link_frames
    from shards.plan import PrepUnit, UnitKind

    pipeline, n = job.pipeline, info.frame_count
    device = resolve_device(pipeline.device)
    if pipeline.threads is not None:
        torch.set_num_threads(pipeline.threads)
    identity = compute_identity(device, resolve_dtype(pipeline.dtype, device))
    cache = AvatarCache.open(job.cache, job.video, pipeline, identity, label)
    if cache is not None and (tracks := cache.tracks(n)) is not None:
        logger.info("face tracks of %s from the avatar cache", label)
        return tracks
    found = cache.detections(list(range(n))) if cache is not None else {}
    missing = [k for k in range(n) if k not in found]
    if missing:
        analyzer = load_face_analyzer(
            ModelLayout.at(pipeline.models_dir, pipeline.tiny), pipeline.face, device
        )
        for a, b in block_ranges(missing, job.shards.prep_length):
            block = detect_video(analyzer, info, a, b)
            found.update(block)
            if cache is not None:
                cache.remember(PrepUnit(UnitKind.DETECT, 0, a, b), detections_to_json(block).encode())
    logger.info("%s: %d of %d frames detected here", label, len(missing), n)
    tracks = link_frames([found[k] for k in range(n)])
    if cache is not None:
        cache.remember_tracks(tracks, n)
    return tracks


def tracks_sheet(tracks, info) -> np.ndarray:
    """(rows * THUMB, THUMB + STRIP, 3) uint8 BGR: per track its face at its middle frame, id and time strip."""
    from shards.decode import read_frames

    rows = []
    for t in tracks.tracks:
        src, _ = t.faces[len(t.faces) // 2]
        frame = next(read_frames(info, src, src + 1))
        x1, y1, x2, y2 = (int(round(v)) for v in t.boxes[len(t.faces) // 2])
        h, w = frame.shape[:2]
        face = frame[max(0, y1) : min(h, y2), max(0, x1) : min(w, x2)]
        row = np.full((THUMB, THUMB + STRIP, 3), 32, np.uint8)
        if face.size:
            row[:, :THUMB] = cv2.resize(face, (THUMB, THUMB), interpolation=cv2.INTER_AREA)
        n = max(1, info.frame_count)
        for k, _ in t.faces:
            row[THUMB // 2 :, THUMB + k * STRIP // n : THUMB + (k + 1) * STRIP // n + 1] = (80, 200, 80)
        for cut in tracks.cuts:
            row[:, THUMB + cut * STRIP // n] = (0, 0, 255)
        cv2.putText(row, f"track {t.id}", (THUMB + 8, 30), cv2.FONT_HERSHEY_SIMPLEX, 0.8, (255, 255, 255), 2)
        rows.append(row)
    if not rows:
        row = np.full((THUMB, THUMB + STRIP, 3), 32, np.uint8)
        cv2.putText(row, "no face found", (8, 55), cv2.FONT_HERSHEY_SIMPLEX, 0.8, (255, 255, 255), 2)
        rows.append(row)
    return np.concatenate(rows)


def list_faces(video: Path, out_dir: Path, overrides: list[str]):
    """Detect every face of ``video``, link the tracks, write ``tracks.json`` and ``tracks.png`` into
    ``out_dir`` (both or neither); returns the :class:`musetalk.tracks.Tracks`."""
    from dataclasses import replace

    from cluster.config import compose_job
    from cluster.weights import local_models
    from musetalk.testing.tiny_models import ensure_tiny_models
    from shards.probe import probe_video

    if not video.is_file():
        raise InputError(f"{video} not found: give the video to list as the first argument")
    # the render's config, composed as a render would (the audio and output are never touched here)
    task = [f"task.video={video}", f"task.audio={video}", f"task.output={out_dir.resolve() / 'unused.mp4'}"]
    job = compose_job([*task, *overrides])
    job = replace(job, pipeline=local_models(job.pipeline))
    if job.pipeline.tiny:
        ensure_tiny_models(Path(job.pipeline.models_dir))
    info = probe_video(video)
    tracks = video_tracks(job, info, str(video))
    listing = {
        "video": str(video),
        "frames": info.frame_count,
        "fps": float(info.fps),
        "tracks_version": tracks.version,
        "cuts": list(tracks.cuts),
        "tracks": [t.summary() for t in tracks.tracks],
    }
    sheet = tracks_sheet(tracks, info)
    out_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out_dir, prefix=".tracks-") as tmp:
        (Path(tmp) / "tracks.json").write_text(json.dumps(listing, indent=1))
        if not cv2.imwrite(str(Path(tmp) / "tracks.png"), sheet):
            raise OSError(f"could not write {out_dir / 'tracks.png'}")
        for name in ("tracks.json", "tracks.png"):
            os.replace(Path(tmp) / name, out_dir / name)
    logger.info("%s: %d tracks, %d cuts; wrote %s", video, len(tracks.tracks), len(tracks.cuts), out_dir)
    return tracks


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m cluster.faces", description=__doc__.splitlines()[0])
    parser.add_argument("video", type=Path)
    parser.add_argument("--out", type=Path, required=True, help="directory for tracks.json and tracks.png")
    parser.add_argument("overrides", nargs="*", help="render config overrides (face.detector=haar ...)")
    args = parser.parse_intermixed_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        tracks = list_faces(args.video, args.out, args.overrides)
    except FarmError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(err.exit_code)
    for t in tracks.tracks:
        s = t.summary()
        print(f"track {s['id']}: frames {s['first_frame']}-{s['last_frame']}, seen {s['frames_seen']}")


if __name__ == "__main__":
    main()
