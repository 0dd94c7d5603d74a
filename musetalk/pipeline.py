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
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
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
from musetalk.blending import Blender, Box
from musetalk.composite import DeviceCompositor, active_rect, paste_numpy
from musetalk.config import PipelineConfig
from musetalk.device import resolve_device, resolve_dtype
from musetalk.enhance import FaceEnhancer, load_gfpgan
from musetalk.faces import FaceAnalyzer, crop_box, crop_face, load_face_analyzer, smooth_boxes
from musetalk.generation import LatentGenerator, load_unet, load_vae
from musetalk.layout import ModelLayout
from musetalk.parsing import load_face_parser
from musetalk.stages import END, Channel, PipelineTuning, StageClock, Stopped, ThreadGroup
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

# ShardStats.frame_kinds, one character per output frame.
FACE, PASSTHROUGH, PARSING_FALLBACK, ENHANCE_FALLBACK = "F", "P", "p", "e"


@dataclass(frozen=True)
class ShardStats:
    """What one shard cost and produced; plain data (travels back from Ray workers as is, and is stored
    as JSON in a resume manifest: ``ShardStats(**json.loads(json.dumps(asdict(stats))))`` round-trips).

    ``seconds`` sums each stage over the worker's threads (stages overlap: the sum may exceed
    ``wall_seconds``, the shard's own wall time). ``frame_kinds``: one character per output frame, in
    order: ``F`` face rendered, ``P`` passthrough (no face), ``p`` face rendered with the parsing
    fallback mask, ``e`` face rendered but GFPGAN fell back (``e`` wins over ``p``).
    """

    shard: int
    frames: int
    face_frames: int
    decoded_frames: int
    seconds: dict[str, float] = field(default_factory=dict)
    enhance_fallbacks: int = 0
    parsing_fallbacks: int = 0
    worker: str = ""
    frame_kinds: str = ""
    wall_seconds: float = 0.0

    @property
    def total_seconds(self) -> float:
        return sum(self.seconds.values())


def stage_totals(stats: list[ShardStats] | tuple[ShardStats, ...]) -> dict[str, float]:
    """Seconds per stage summed over shards, in pipeline order."""
    return {k: sum(s.seconds.get(k, 0.0) for s in stats) for k in STAGES}


@dataclass
class Models:
    """Every loaded model the pipeline needs."""

    analyzer: FaceAnalyzer
    audio: WhisperAudioEncoder
    generator: LatentGenerator
    blender: Blender
    enhancer: FaceEnhancer | None
    device: torch.device


def load_models(cfg: PipelineConfig, tuning: PipelineTuning | None = None) -> Models:
    """Load every model named by ``cfg`` from ``cfg.models_dir`` (WeightsError names any missing file)."""
    tuning = tuning or PipelineTuning()
    layout = ModelLayout.at(cfg.models_dir, tiny=cfg.tiny)
    device = resolve_device(cfg.device)
    dtype = resolve_dtype(cfg.dtype, device)
    logger.info("loading models from %s on %s (%s)", layout.root, device, dtype)
    analyzer = load_face_analyzer(layout, cfg.face, device)
    audio = load_whisper(layout, device, dtype)
    unet, vae = load_unet(layout, device, dtype), load_vae(layout, device, dtype)
    if device.type == "cuda" and tuning.channels_last:  # GPU only, not measured: changes rounding
        unet = unet.to(memory_format=torch.channels_last)
        vae = vae.to(memory_format=torch.channels_last)
    generator = LatentGenerator(unet, vae, device, dtype, cfg.batch_size)
    if device.type == "cuda" and tuning.compile:  # GPU only, not measured: changes rounding
        generator.unet = torch.compile(unet)
    parser = load_face_parser(layout, device) if cfg.blend.parsing else None
    blender = Blender(parser, cfg.blend)
    enhancer = load_gfpgan(layout, device, cfg.enhance.upscale) if cfg.enhance.enabled else None
    return Models(analyzer, audio, generator, blender, enhancer, device)


@dataclass(eq=False)
class Prepared:
    """One shown source frame, ready to render: its pixels and, with a face, box, latents and mask."""

    src: int
    frame: np.ndarray  # (H, W, 3) uint8 BGR
    box: Box | None = None
    latents: torch.Tensor | None = None  # (8, 32, 32) float32 CPU
    material: Future | None = None  # -> (BlendMaterial, active Rect | None), built in the mask pool


@dataclass
class ShardContext:
    """One shard's inputs and the index maps every step shares (built by step 0)."""

    video: VideoInfo
    samples: np.ndarray
    plan: Plan
    shard: Shard
    clock: StageClock
    shown: frozenset[int]  # source frames some output frame of the shard shows
    last_use: dict[int, int]  # source frame -> the last output frame that shows it
    progress: Callable[[int], None] | None
    on_stage: Callable[[str], None] | None
    decoded: int = 0
    kinds: list[str] = field(default_factory=list)
    windows: Callable[[list[int]], torch.Tensor] | None = None


class FramePipeline:
    """Renders shards with models loaded once, as a bounded producer/consumer pipeline per shard."""

    def __init__(
        self, cfg: PipelineConfig, models: Models | None = None, tuning: PipelineTuning | None = None
    ) -> None:
        self.cfg = cfg
        self.tuning = tuning or PipelineTuning()
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        self.models = models or load_models(cfg, self.tuning)
        self._device_composite = self.tuning.device_composite(self.models.device)
        self._compositor = DeviceCompositor(self.models.device) if self._device_composite else None

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
        shard's windows touch are encoded. ``progress(n)`` is called per batch of ``n`` frames written,
        ``on_stage(text)`` per batch of source frames prepared ("prepare 40/130") and once rendering starts.

        Threads (bounded channels between them, depths from :class:`PipelineTuning`):
        1. decode: source frames in order -> ``decoded``;
        2. prepare: detection in padded batches, box smoothing with ``smooth_radius`` frames of look-ahead,
           crop + VAE encode and face parsing per batch of shown face frames, mask building handed to a
           thread pool -> ``prepared`` (shown frames only, in source order);
        3. this thread: output frames in order, UNet + VAE decode per batch of faces, [GFPGAN], compositing
           -> ``finished``;
        4. encode: ``finished`` -> the ffmpeg encoder.
        An exception in any thread stops them all and is raised here; the encoder is killed and the partial
        segment removed.
        """
        wall = time.perf_counter()
        ctx = self._context(video, samples, plan, shard, progress, on_stage)  # 0. what the shard shows
        with ThreadGroup(shard.name) as group:
            masks = ThreadPoolExecutor(self.tuning.mask_workers, thread_name_prefix=f"{shard.name}-mask")
            group.on_exit(lambda: masks.shutdown(wait=True, cancel_futures=True))
            decoded = group.channel(self.tuning.decode_depth)
            prepared = group.channel(self.tuning.prepared_depth)
            finished = group.channel(self.tuning.encode_depth)
            writer = SegmentWriter(out_path, video.width, video.height, plan.fps, encode)
            group.on_exit(writer.abort, on_error_only=True)  # kills ffmpeg, removes the partial file
            group.start("decode", self._decode_step, ctx, decoded)  # 1.
            group.start("prepare", self._prepare_step, ctx, decoded, prepared, masks)  # 2.
            encoder = group.start("encode", self._encode_step, ctx, finished, writer)  # 4.
            self._render_step(ctx, prepared, finished)  # 3.
            while encoder.is_alive():
                encoder.join(0.1)
                if group.stop.is_set():
                    raise Stopped
        if len(ctx.kinds) != shard.frames:
            raise RuntimeError(f"{shard.name}: wrote {len(ctx.kinds)} frames, expected {shard.frames}")
        kinds = "".join(ctx.kinds)
        return ShardStats(
            shard=shard.index,
            frames=shard.frames,
            face_frames=shard.frames - kinds.count(PASSTHROUGH),
            decoded_frames=ctx.decoded,
            seconds=ctx.clock.totals(),
            enhance_fallbacks=kinds.count(ENHANCE_FALLBACK),
            parsing_fallbacks=kinds.count(PARSING_FALLBACK),
            frame_kinds=kinds,
            wall_seconds=time.perf_counter() - wall,
        )

    # Step 0 --------------------------------------------------------------------------------------
    def _context(self, video, samples, plan, shard, progress, on_stage) -> ShardContext:
        last_use: dict[int, int] = {}
        for t in range(shard.start, shard.end):
            last_use[plan.source_index(t)] = t
        return ShardContext(
            video=video,
            samples=samples,
            plan=plan,
            shard=shard,
            clock=StageClock(self.models.device),
            shown=frozenset(last_use),
            last_use=last_use,
            progress=progress,
            on_stage=on_stage,
        )

    # Step 1: decode thread ------------------------------------------------------------------------
    def _decode_step(self, ctx: ShardContext, decoded: Channel) -> None:
        shard = ctx.shard
        frames = read_frames(ctx.video, shard.src_start, shard.src_end)
        src = shard.src_start
        while True:
            with ctx.clock.stage("decode"):
                frame = next(frames, None)
            if frame is None:
                break
            decoded.put((src, frame))
            src += 1
        ctx.decoded = src - shard.src_start
        if src != shard.src_end:
            raise RuntimeError(
                f"{shard.name}: decoded {src - shard.src_start} frames, expected {shard.src_end - shard.src_start}"
            )
        decoded.put(END)

    # Step 2: prepare thread -----------------------------------------------------------------------
    def _prepare_step(
        self, ctx: ShardContext, decoded: Channel, prepared: Channel, masks: ThreadPoolExecutor
    ) -> None:
        """Detect in padded batches, smooth boxes as soon as their look-ahead is decoded, then encode and
        parse the shown face frames in batches. Each result is a pure function of its source frame and
        the raw boxes within ``smooth_radius`` of it (clipped to the shard's decoded range), so the
        grouping into batches changes nothing."""
        m, cfg = self.models, self.cfg
        shard, radius = ctx.shard, cfg.face.smooth_radius
        lo, hi = shard.src_start, shard.src_end
        shape = (ctx.video.height, ctx.video.width)
        raw: dict[int, Box | None] = {}
        frames: dict[int, np.ndarray] = {}
        to_detect: list[int] = []
        ready: list[Prepared] = []  # smoothed, in source order, waiting for their batch
        next_final = lo  # the next source frame to smooth
        detected = 0

        def detect() -> None:
            nonlocal detected
            if not to_detect:
                return
            with ctx.clock.stage("detect"):
                found = m.analyzer.detect([frames[s] for s in to_detect])
                for s, det in zip(to_detect, found, strict=True):
                    raw[s] = crop_box(det, shape, cfg.face)
            detected += len(to_detect)
            to_detect.clear()
            if ctx.on_stage is not None:
                ctx.on_stage(f"prepare {detected}/{hi - lo}")

        def finalise(upto: int) -> None:
            """Smooth source frames [next_final, upto), whose windows are complete."""
            nonlocal next_final
            for s in range(next_final, upto):
                a, b = max(lo, s - radius), min(hi, s + radius + 1)
                box = smooth_boxes([raw[k] for k in range(a, b)], radius)[s - a]
                raw.pop(s - radius - 1, None)
                frame = frames.pop(s)
                if s in ctx.shown:
                    ready.append(Prepared(s, frame, box))
                    if (
                        sum(p.box is not None for p in ready) >= cfg.batch_size
                        or len(ready) >= 2 * cfg.batch_size
                    ):
                        flush()
            next_final = max(next_final, upto)

        def flush() -> None:
            faces = [p for p in ready if p.box is not None]
            if faces:
                with ctx.clock.stage("vae_encode", device=True):
                    crops = np.stack([crop_face(p.frame, p.box) for p in faces])
                    latents = m.generator.encode(crops)
                with ctx.clock.stage("blend_prepare", device=True):
                    regions = m.blender.parse([p.frame for p in faces], [p.box for p in faces])
                for p, lat, region in zip(faces, latents, regions, strict=True):
                    p.latents = lat
                    p.material = masks.submit(self._material_job, ctx, region, p.box)
            for p in ready:
                prepared.put(p)
            ready.clear()

        for src, frame in decoded:
            frames[src] = frame
            to_detect.append(src)
            if len(to_detect) == cfg.face.batch_size:
                detect()
                finalise(max(lo, src + 1 - radius))
        detect()
        finalise(hi)
        flush()
        prepared.put(END)

    def _material_job(self, ctx: ShardContext, region: np.ndarray | None, box: Box):
        with ctx.clock.stage("blend_prepare"):
            material = self.models.blender.material(region, box)
            rect = active_rect(box, material.square, material.mask, (ctx.video.height, ctx.video.width))
        return material, rect

    # Step 3: this thread --------------------------------------------------------------------------
    def _render_step(self, ctx: ShardContext, prepared: Channel, finished: Channel) -> None:
        """Output frames in order: passthrough, or a generated face composited into its source frame."""
        plan, shard = ctx.plan, ctx.shard
        store: dict[int, Prepared] = {}
        incoming = iter(prepared)
        pending: list[tuple[int, Prepared]] = []
        if ctx.on_stage is not None:
            ctx.on_stage("render")

        def need(src: int) -> Prepared:
            while src not in store:
                item = next(incoming, None)
                if item is None:
                    raise RuntimeError(f"{shard.name}: source frame {src} was never prepared")
                store[item.src] = item
            return store[src]

        for t in range(shard.start, shard.end):
            pending.append((t, need(plan.source_index(t))))
            faces = sum(p.box is not None for _, p in pending)
            if faces >= self.cfg.batch_size or len(pending) >= 2 * self.cfg.batch_size or t == shard.end - 1:
                self._render_batch(ctx, pending, finished)
                for done_t, item in pending:
                    if ctx.last_use[item.src] == done_t:
                        store.pop(item.src, None)
                pending.clear()
        if next(incoming, None) is not None:
            raise RuntimeError(f"{shard.name}: prepared frames left over")
        finished.put(END)

    def _audio_windows(self, ctx: ShardContext) -> Callable[[list[int]], torch.Tensor]:
        """Whisper features of the shard's audio span (encoded once, at the first face) -> a function
        from output frames to (n, 50, 384) prompts."""
        plan, shard = ctx.plan, ctx.shard
        with ctx.clock.stage("audio"):
            span = audio_span(plan.total_samples, plan.fps, shard.start, shard.end)
            features = self.models.audio.encode(
                ctx.samples[span.sample_start : span.sample_end], span.first_segment
            )

        def windows(ts: list[int]) -> torch.Tensor:
            return positional_encoding(
                frame_windows(features, span.first_step, span.total_steps, plan.fps, ts)
            )

        return windows

    def _render_batch(
        self, ctx: ShardContext, pending: list[tuple[int, Prepared]], finished: Channel
    ) -> None:
        m = self.models
        faces = [(t, p) for t, p in pending if p.box is not None]
        generated: dict[int, np.ndarray] = {}
        failed: set[int] = set()
        if faces:
            if ctx.windows is None:
                ctx.windows = self._audio_windows(ctx)
            ts = [t for t, _ in faces]
            with ctx.clock.stage("generate", device=True):
                out = m.generator.generate(torch.stack([p.latents for _, p in faces]), ctx.windows(ts))
            if m.enhancer is not None:
                with ctx.clock.stage("enhance", device=True):
                    enhanced = []
                    for t, face in zip(ts, out, strict=True):  # one call per face: which fell back
                        one, fell = m.enhancer.enhance(face[None])
                        enhanced.append(one[0])
                        if fell:
                            failed.add(t)
                    out = enhanced
            generated = dict(zip(ts, out, strict=True))
        for t, p in pending:
            if t not in generated:
                ctx.kinds.append(PASSTHROUGH)
                finished.put(p.frame)
                continue
            material, rect = p.material.result()
            own = ctx.last_use[p.src] == t  # no later output shows this source frame: paste in place
            with ctx.clock.stage("blend", device=self._device_composite):
                frame = self._paste(p.frame if own else p.frame.copy(), generated[t], p.box, material, rect)
            parsing_fell = self.cfg.blend.parsing and not material.parsed
            ctx.kinds.append(ENHANCE_FALLBACK if t in failed else PARSING_FALLBACK if parsing_fell else FACE)
            finished.put(frame)

    def _paste(self, frame: np.ndarray, face: np.ndarray, box: Box, material, rect) -> np.ndarray:
        if self._compositor is None:
            return paste_numpy(frame, face, box, material.square, material.mask, rect)
        dev = self.models.device
        host = torch.from_numpy(frame)
        if dev.type == "cuda" and self.tuning.pin_memory:
            host = host.pin_memory()
        on_dev = host.to(dev, non_blocking=True)
        mask = torch.from_numpy(material.mask.copy()).to(dev)  # the material's mask is read-only
        out = self._compositor.paste(on_dev, torch.from_numpy(face).to(dev), box, material.square, mask, rect)
        return out.cpu().numpy() if dev.type != "cpu" else out.numpy()

    # Step 4: encode thread ------------------------------------------------------------------------
    def _encode_step(self, ctx: ShardContext, finished: Channel, writer: SegmentWriter) -> None:
        batch, written, reported = self.cfg.batch_size, 0, 0
        for frame in finished:
            with ctx.clock.stage("encode"):
                writer.write(frame)
            written += 1
            if ctx.progress is not None and written - reported >= batch:
                ctx.progress(written - reported)
                reported = written
        with ctx.clock.stage("encode"):
            writer.close()
        if ctx.progress is not None and written > reported:
            ctx.progress(written - reported)


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
