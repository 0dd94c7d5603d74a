"""The serial renderer as it was before the pipelined worker (main at 087c94c), kept as the test oracle.

Each step ran over the whole shard in turn (decode into a list, detect, VAE-encode, parse, audio, then per
batch generate -> [enhance] -> paste -> encode). The pipelined ``FramePipeline.render_shard`` must write
the same frames, bit for bit with the lossless codec.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from musetalk.audio import audio_span, frame_windows, positional_encoding
from musetalk.boxes import crop_box, crop_face, smooth_boxes
from musetalk.pipeline import FramePipeline
from shards.decode import read_frames, read_pictures
from shards.plan import Plan, Shard
from shards.probe import VideoInfo
from shards.segment import EncodeSettings, SegmentWriter


def render_shard_serial(
    pipeline: FramePipeline,
    *,
    video: VideoInfo,
    samples: np.ndarray,
    plan: Plan,
    shard: Shard,
    out_path: Path,
    encode: EncodeSettings,
) -> int:
    """Render ``shard`` the old way; returns the number of frames written."""
    m, cfg = pipeline.models, pipeline.cfg
    shown = sorted({plan.source_index(t) for t in range(shard.start, shard.end)})
    # the shown frames and the smoothing radius of context on each side, clipped to the video
    r = cfg.face.smooth_radius
    lo, hi = max(0, shown[0] - r), min(plan.source_frames, shown[-1] + 1 + r)
    frames = list(read_frames(video, lo, hi))
    height, width = frames[0].shape[:2]
    detections = m.analyzer.detect(list(read_pictures(video, lo, hi)))  # decoded pictures, as the units
    raw = [crop_box(d, (height, width), cfg.face) for d in detections]
    boxes = smooth_boxes(raw, r)
    face_src = [s for s in shown if boxes[s - lo] is not None]
    row = {s: i for i, s in enumerate(face_src)}
    latents = materials = None
    if face_src:
        crops = np.stack([crop_face(frames[s - lo], boxes[s - lo]) for s in face_src])
        latents = m.generator.encode(crops)
        materials = m.blender.prepare([frames[s - lo] for s in face_src], [boxes[s - lo] for s in face_src])
    face_ts = [t for t in range(shard.start, shard.end) if plan.source_index(t) in row]
    windows = None
    if face_ts:
        span = audio_span(plan.total_samples, plan.fps, shard.start, shard.end)
        features = m.audio.encode(samples[span.sample_start : span.sample_end], span.first_segment)
        windows = positional_encoding(
            frame_windows(
                features, span.first_step, span.total_steps, plan.fps, range(shard.start, shard.end)
            )
        )
    batch = cfg.batch_size
    with SegmentWriter(out_path, width, height, plan.fps, encode) as writer:
        for block_start in range(shard.start, shard.end, batch):
            block = range(block_start, min(block_start + batch, shard.end))
            faces_t = [t for t in block if plan.source_index(t) in row]
            generated: dict[int, np.ndarray] = {}
            if faces_t:
                idx = [row[plan.source_index(t)] for t in faces_t]
                out = m.generator.generate(latents[idx], windows[[t - shard.start for t in faces_t]])
                if m.enhancer is not None:
                    out, _ = m.enhancer.enhance(out)
                generated = dict(zip(faces_t, out, strict=True))
            for t in block:
                src = plan.source_index(t)
                frame = frames[src - lo]
                if t in generated:
                    frame = m.blender.paste(frame, generated[t], boxes[src - lo], materials[row[src]])
                writer.write(frame)
        return writer.close()
