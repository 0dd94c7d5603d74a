"""The per-frame MuseTalk 1.5 pipeline: one shard of source frames + audio in, one encoded segment out.

Free of Ray and Hydra: the Ray worker, the tests and the benchmarks all call :class:`FramePipeline`;
:func:`render_local` renders a whole job in one process. Stages (each timed separately):

decode -> detect (+ landmarks) -> crop boxes, temporal smoothing -> VAE-encode crops (once per source
frame) -> blend material (face parsing, once per source frame) -> Whisper features for the shard's
audio span -> per-frame windows -> UNet + VAE decode in fixed-size batches -> [GFPGAN] -> blend -> encode.
"""

from __future__ import annotations

import logging
import tempfile
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from musetalk.audio import (
    SAMPLE_RATE,
    WhisperAudioEncoder,
    audio_span,
    frame_windows,
    load_whisper,
    positional_encoding,
)
from musetalk.blending import Blender
from musetalk.config import PipelineConfig
from musetalk.device import resolve_device, resolve_dtype
from musetalk.enhance import FaceEnhancer, load_gfpgan
from musetalk.faces import FaceAnalyzer, crop_box, crop_face, load_face_analyzer, smooth_boxes
from musetalk.generation import LatentGenerator, load_unet, load_vae
from musetalk.layout import ModelLayout
from musetalk.parsing import load_face_parser
from shards.decode import read_frames
from shards.errors import WeightsError
from shards.plan import Plan, Shard, plan_shards, shard_length_frames
from shards.probe import VideoInfo, load_audio, probe_video
from shards.segment import EncodeSettings, SegmentWriter
from shards.stitch import concat_and_mux

logger = logging.getLogger(__name__)

STAGES = (
    "decode",
    "detect",
    "vae_encode",
    "blend_prepare",
    "audio",
    "generate",
    "enhance",
    "blend",
    "encode",
)


@dataclass(frozen=True)
class ShardStats:
    """What one shard cost and produced; plain data (travels back from Ray workers as is)."""

    shard: int
    frames: int
    face_frames: int
    decoded_frames: int
    seconds: dict[str, float] = field(default_factory=dict)
    enhance_fallbacks: int = 0
    parsing_fallbacks: int = 0
    worker: str = ""

    @property
    def total_seconds(self) -> float:
        return sum(self.seconds.values())


def stage_totals(stats: list[ShardStats] | tuple[ShardStats, ...]) -> dict[str, float]:
    """Seconds per stage summed over shards, in pipeline order."""
    return {k: sum(s.seconds.get(k, 0.0) for s in stats) for k in STAGES}


class StageTimer:
    """Accumulates wall time per stage; synchronises CUDA so GPU stages are timed honestly."""

    def __init__(self, device: torch.device, on_stage: Callable[[str], None] | None = None) -> None:
        self.seconds: dict[str, float] = defaultdict(float)
        self._cuda = device.type == "cuda"
        self._on_stage = on_stage
        self._current = ""

    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        if self._on_stage is not None and name != self._current:
            self._current = name
            self._on_stage(name)
        start = time.perf_counter()
        try:
            yield
        finally:
            if self._cuda:
                torch.cuda.synchronize()
            self.seconds[name] += time.perf_counter() - start


@dataclass
class Models:
    """Every loaded model the pipeline needs."""

    analyzer: FaceAnalyzer
    audio: WhisperAudioEncoder
    generator: LatentGenerator
    blender: Blender
    enhancer: FaceEnhancer | None
    device: torch.device


def load_models(cfg: PipelineConfig) -> Models:
    """Load every model named by ``cfg`` from ``cfg.models_dir`` (WeightsError names any missing file)."""
    layout = ModelLayout.at(cfg.models_dir, tiny=cfg.tiny)
    device = resolve_device(cfg.device)
    dtype = resolve_dtype(cfg.dtype, device)
    logger.info("loading models from %s on %s (%s)", layout.root, device, dtype)
    analyzer = load_face_analyzer(layout, cfg.face, device)
    audio = load_whisper(layout, device, dtype)
    generator = LatentGenerator(
        load_unet(layout, device, dtype), load_vae(layout, device, dtype), device, dtype, cfg.batch_size
    )
    parser = load_face_parser(layout, device) if cfg.blend.parsing else None
    blender = Blender(parser, cfg.blend)
    enhancer = load_gfpgan(layout, device, cfg.enhance.upscale) if cfg.enhance.enabled else None
    return Models(analyzer, audio, generator, blender, enhancer, device)


class FramePipeline:
    """Renders shards with models loaded once."""

    def __init__(self, cfg: PipelineConfig, models: Models | None = None) -> None:
        self.cfg = cfg
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        self.models = models or load_models(cfg)

    def render_shard(
        self,
        *,
        video: VideoInfo,
        samples: np.ndarray,
        plan: Plan,
        shard: Shard,
        out_path: Path,
        encode: EncodeSettings,
        progress: Callable[[int], None] | None = None,
        on_stage: Callable[[str], None] | None = None,
    ) -> ShardStats:
        """Render output frames ``[shard.start, shard.end)`` into a video-only segment at ``out_path``.

        ``samples`` is the whole audio track, (N,) float32 mono 16 kHz; only the 30 s Whisper segments the
        shard's windows touch are encoded. ``progress(n)`` is called as frames are written and
        ``on_stage(name)`` as the shard enters each stage. Returns the shard's stats.
        """
        m = self.models
        timer = StageTimer(m.device, on_stage)
        lo = shard.src_start
        with timer.stage("decode"):
            frames = list(read_frames(video, shard.src_start, shard.src_end))
        if len(frames) != shard.src_end - shard.src_start:
            raise RuntimeError(
                f"{shard.name}: decoded {len(frames)} frames, expected {shard.src_end - shard.src_start}"
            )
        height, width = frames[0].shape[:2]

        with timer.stage("detect"):
            detections = m.analyzer.detect(frames)
            raw = [crop_box(d, (height, width), self.cfg.face) for d in detections]
            boxes = smooth_boxes(raw, self.cfg.face.smooth_radius)
        shown = sorted({plan.source_index(t) for t in range(shard.start, shard.end)})
        face_src = [s for s in shown if boxes[s - lo] is not None]
        row = {s: i for i, s in enumerate(face_src)}

        latents = materials = None
        if face_src:
            with timer.stage("vae_encode"):
                crops = np.stack([crop_face(frames[s - lo], boxes[s - lo]) for s in face_src])
                latents = m.generator.encode(crops)
            with timer.stage("blend_prepare"):
                materials = m.blender.prepare(
                    [frames[s - lo] for s in face_src], [boxes[s - lo] for s in face_src]
                )

        face_ts = [t for t in range(shard.start, shard.end) if plan.source_index(t) in row]
        windows = None
        if face_ts:
            with timer.stage("audio"):
                span = audio_span(plan.total_samples, plan.fps, shard.start, shard.end)
                features = m.audio.encode(samples[span.sample_start : span.sample_end], span.first_segment)
                windows = positional_encoding(
                    frame_windows(
                        features, span.first_step, span.total_steps, plan.fps, range(shard.start, shard.end)
                    )
                )

        enhance_fallbacks = 0
        batch = self.cfg.batch_size
        with SegmentWriter(out_path, width, height, plan.fps, encode) as writer:
            for block_start in range(shard.start, shard.end, batch):
                block = range(block_start, min(block_start + batch, shard.end))
                faces_t = [t for t in block if plan.source_index(t) in row]
                generated: dict[int, np.ndarray] = {}
                if faces_t:
                    idx = [row[plan.source_index(t)] for t in faces_t]
                    with timer.stage("generate"):
                        out = m.generator.generate(latents[idx], windows[[t - shard.start for t in faces_t]])
                    if m.enhancer is not None:
                        with timer.stage("enhance"):
                            out, failed = m.enhancer.enhance(out)
                            enhance_fallbacks += failed
                    generated = dict(zip(faces_t, out, strict=True))
                for t in block:
                    src = plan.source_index(t)
                    frame = frames[src - lo]
                    if t in generated:
                        with timer.stage("blend"):
                            frame = m.blender.paste(frame, generated[t], boxes[src - lo], materials[row[src]])
                    with timer.stage("encode"):
                        writer.write(frame)
                if progress is not None:
                    progress(len(block))
            with timer.stage("encode"):
                written = writer.close()
        if written != shard.frames:
            raise RuntimeError(f"{shard.name}: wrote {written} frames, expected {shard.frames}")
        parsing_fallbacks = (
            sum(1 for mat in materials or [] if not mat.parsed) if self.cfg.blend.parsing else 0
        )
        return ShardStats(
            shard=shard.index,
            frames=shard.frames,
            face_frames=len(face_ts),
            decoded_frames=len(frames),
            seconds=dict(timer.seconds),
            enhance_fallbacks=enhance_fallbacks,
            parsing_fallbacks=parsing_fallbacks,
        )


def plan_job(
    video: str | Path,
    audio: str | Path,
    *,
    overlap: int,
    smooth_radius: int,
    shard_frames: int | None = None,
    shard_seconds: float | None = None,
) -> tuple[VideoInfo, np.ndarray, Plan]:
    """Probe both inputs (InputError on bad ones), load the audio at 16 kHz and plan the shards
    (``shard_frames`` output frames each, or ``shard_seconds`` of output)."""
    info = probe_video(video)
    samples = load_audio(audio, SAMPLE_RATE)  # probes first: InputError for a file without audio
    plan = plan_shards(
        source_frames=info.frame_count,
        total_samples=len(samples),
        sample_rate=SAMPLE_RATE,
        fps=info.fps,
        shard_frames=shard_length_frames(shard_frames, shard_seconds, info.fps),
        overlap=overlap,
        min_overlap=smooth_radius,
    )
    return info, samples, plan


@dataclass(frozen=True)
class LocalResult:
    output: Path
    plan: Plan
    stats: tuple[ShardStats, ...]


def render_local(
    video: str | Path,
    audio: str | Path,
    output: str | Path,
    cfg: PipelineConfig,
    *,
    shard_frames: int = 250,
    overlap: int | None = None,
    encode: EncodeSettings | None = None,
    pipeline: FramePipeline | None = None,
) -> LocalResult:
    """Render a whole job in this process (no Ray): probe, plan, render every shard, stitch, mux.

    Shards bound memory (a shard's source frames are held while it renders); the output does not
    depend on ``shard_frames`` or ``overlap``.
    """
    encode = encode or EncodeSettings()
    overlap = cfg.face.smooth_radius if overlap is None else overlap
    info, samples, plan = plan_job(
        video, audio, overlap=overlap, smooth_radius=cfg.face.smooth_radius, shard_frames=shard_frames
    )
    pipeline = pipeline or FramePipeline(cfg)
    stats = []
    with tempfile.TemporaryDirectory(prefix="musetalk-local-") as tmp:
        segments = []
        for shard in plan.shards:
            path = Path(tmp) / f"{shard.name}.mkv"
            stats.append(
                pipeline.render_shard(
                    video=info, samples=samples, plan=plan, shard=shard, out_path=path, encode=encode
                )
            )
            segments.append(path)
        concat_and_mux(segments, Path(audio), Path(output), plan.fps, plan.output_frames)
    return LocalResult(Path(output), plan, tuple(stats))


def required_weights(cfg: PipelineConfig) -> list[tuple[Path, str]]:
    """Every weight file ``cfg`` needs, as (path, description); checked before any worker starts."""
    layout = ModelLayout.at(cfg.models_dir, tiny=cfg.tiny)
    need = [
        (layout.unet_config, "MuseTalk UNet config"),
        (layout.unet_weights, "MuseTalk UNet weights"),
        (layout.vae_dir / "config.json", "VAE config"),
        (layout.whisper_dir / "config.json", "Whisper config"),
        (layout.whisper_dir / "preprocessor_config.json", "Whisper feature extractor config"),
    ]
    if cfg.face.detector == "s3fd":
        need.append((layout.s3fd, "S3FD face detector"))
    if cfg.face.crop == "landmarks":
        need.append((layout.fan, "FAN landmark network"))
    if cfg.blend.parsing:
        need += [
            (layout.resnet18, "ResNet18 (face parsing backbone)"),
            (layout.face_parse, "BiSeNet face parsing"),
        ]
    if cfg.enhance.enabled:
        need.append((layout.gfpgan, "GFPGAN v1.4"))
    return need


def check_weights(cfg: PipelineConfig) -> None:
    """Raise one WeightsError naming every missing file and the command that fetches them."""
    layout = ModelLayout.at(cfg.models_dir, tiny=cfg.tiny)
    missing = [(p, what) for p, what in required_weights(cfg) if not p.exists()]
    if missing:
        names = ", ".join(f"{what} at {p}" for p, what in missing)
        hint = layout.fetch_hint.format(root=layout.root)
        raise WeightsError(f"missing model weights: {names}; fetch them with `{hint}`")
