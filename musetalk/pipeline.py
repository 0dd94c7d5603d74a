"""The per-frame MuseTalk 1.5 pipeline: source frames and audio in, prepared entries and encoded segments out.

Free of Ray and Hydra: the Ray worker, the tests and the benchmarks all call :class:`FramePipeline` (a
whole job in one process: :func:`musetalk.local.render_local`). Stages (each timed separately, see
:mod:`musetalk.stats`):

decode -> detect (+ landmarks) -> crop boxes, temporal smoothing -> VAE-encode crops (once per source
frame) -> blend material (face parsing, once per source frame) -> Whisper features for the shard's
audio span -> per-frame windows -> UNet + VAE decode in fixed-size batches -> [GFPGAN] -> blend -> encode.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np
import torch

from musetalk.audio import SEGMENT_SAMPLES, AudioFeatures
from musetalk.blending import BlendMaterial, Box
from musetalk.boxes import boxes_from_detections, crop_face
from musetalk.composite import DeviceCompositor, active_rect, paste_numpy
from musetalk.config import PipelineConfig
from musetalk.device import compute_identity, resolve_dtype
from musetalk.entries import Entry
from musetalk.faces import FrameFaces
from musetalk.generation import generate_faces
from musetalk.models import Models, load_models
from musetalk.preparation import PrepPlan
from musetalk.stages import (
    END,
    Channel,
    PipelineTuning,
    StageClock,
    Stopped,
    ThreadGroup,
    current_stream,
    decode_thread,
    on_stream,
    side_stream,
)
from musetalk.stats import (
    ENHANCE_FALLBACK,
    FACE,
    PARSING_FALLBACK,
    PASSTHROUGH,
    PrepStats,
    ShardStats,
    model_call,
)
from musetalk.tracks import is_track
from shards.decode import FrameStreams, Picture
from shards.plan import Plan, Shard, ShardsConfig, UnitKind
from shards.probe import VideoInfo
from shards.segment import EncodeSettings, SegmentWriter

logger = logging.getLogger(__name__)


@dataclass
class ShardContext:
    """One shard's inputs and the index maps every step shares (built by step 0)."""

    video: VideoInfo
    plan: Plan
    shard: Shard
    clock: StageClock
    shown: frozenset[int]  # source frames some output frame of the shard shows
    last_use: dict[int, int]  # source frame -> the last output frame that shows it
    entries: Callable[[int], Entry]
    windows: Callable[[list[int]], torch.Tensor]
    progress: Callable[[int], None] | None
    on_stage: Callable[[str], None] | None
    kinds: list[str] = field(default_factory=list)
    on_frame: Callable[[int, np.ndarray], None] | None = None  # each finished frame, before encoding


class FramePipeline:
    """Prepares source frames and renders shards with models loaded once.

    Three calls, each a bounded producer/consumer pipeline over its frames:
    :meth:`detect_range` (raw detections), :meth:`prepare_range` (latents and blend masks per source frame
    from smoothed boxes, see :mod:`musetalk.entries`), :meth:`encode_audio` (Whisper features per 30 s
    segment), then :meth:`render_shard` (generation, compositing, encoding) reads their results.
    :meth:`prepare_job` runs the first two over a whole job in this process.
    """

    def __init__(
        self,
        cfg: PipelineConfig,
        models: Models | None = None,
        tuning: PipelineTuning | None = None,
        writer: Callable[..., SegmentWriter] = SegmentWriter,
    ) -> None:
        self.cfg = cfg
        # segments are written by ``writer(path, width, height, fps, encode)``: the ffmpeg pipe, or
        # shards.segment.AVSegmentWriter where there is no ffmpeg binary (scripts/gpu_check.py)
        self._writer = writer
        self.tuning = tuning or PipelineTuning.of(cfg)
        if cfg.threads:  # OpenCV too: its results do not depend on it, and stage CPU clocks then see it all
            torch.set_num_threads(cfg.threads)
            cv2.setNumThreads(cfg.threads)
        self.models = models or load_models(cfg, self.tuning)
        # what the rounding of this pipeline's results depends on (keys of reusable work include it)
        self.identity = compute_identity(self.models.device, resolve_dtype(cfg.dtype, self.models.device))
        self._device_composite = self.tuning.device_composite(self.models.device)
        self._compositor = DeviceCompositor(self.models.device) if self._device_composite else None
        self._streams = FrameStreams()  # a unit that starts where the last one ended continues its decoder

    # Preparation --------------------------------------------------------------------------------
    def _decoded(
        self, group: ThreadGroup, clock: StageClock, video: VideoInfo, start: int, end: int
    ) -> Channel:
        """Start a decode thread for source frames ``[start, end)`` -> a channel of (src, frame)."""
        return decode_thread(
            group, clock, self._streams.read(video, start, end), start, end, self.tuning.decode_depth
        )

    def _pictures(
        self, group: ThreadGroup, clock: StageClock, video: VideoInfo, start: int, end: int
    ) -> Channel:
        """:meth:`_decoded` for detection: (src, :class:`shards.decode.Picture`), each already shrunk for
        the detector in the decode thread (the whole frame is converted only if landmarks need it)."""
        side = self.cfg.face.detect_max_side

        def shrunk() -> Iterator[Picture]:
            for picture in self._streams.pictures(video, start, end):
                picture.shrunk(side)  # kept by the picture
                yield picture

        return decode_thread(group, clock, shrunk(), start, end, self.tuning.decode_depth)

    def detect_range(
        self,
        video: VideoInfo,
        start: int,
        end: int,
        on_stage: Callable[[str], None] | None = None,
        progress: Callable[[int], None] | None = None,
    ) -> tuple[dict[int, FrameFaces], PrepStats]:
        """Raw detections (every face, landmarks) of source frames ``[start, end)``, in padded batches.
        ``progress(n)`` is called per batch of ``n`` source frames detected."""
        started, wall, clock = time.time(), time.perf_counter(), StageClock(self.models.device)
        found: dict[int, FrameFaces] = {}
        batch: list[tuple[int, Picture]] = []

        def detect() -> None:
            with clock.stage("detect"):
                dets = self.models.analyzer.detect_all([f for _, f in batch])
            found.update((s, d) for (s, _), d in zip(batch, dets, strict=True))
            if progress is not None:
                progress(len(batch))
            batch.clear()
            if on_stage is not None:
                on_stage(f"detect {len(found)}/{end - start}")

        with ThreadGroup(f"detect-{start}") as group:
            for src, frame in self._pictures(group, clock, video, start, end):
                batch.append((src, frame))
                if len(batch) == self.cfg.face.batch_size:
                    detect()
            if batch:
                detect()
        stats = PrepStats(
            unit=f"detect {start}-{end}",
            frames=end - start,
            **clock.report(),
            detections=len(found),
            wall_seconds=time.perf_counter() - wall,
            started=started,
        )
        return found, stats

    def prepare_range(
        self,
        video: VideoInfo,
        start: int,
        end: int,
        boxes: dict[int, Box | None],
        on_stage: Callable[[str], None] | None = None,
        progress: Callable[[int], None] | None = None,
    ) -> tuple[list[Entry], PrepStats]:
        """Entries of source frames ``[start, end)`` from their smoothed ``boxes``: per face frame, the
        crop's VAE latents (batched, padded) and blend material (parsing batched, masks in a thread pool).
        Each entry is a pure function of its frame and box, so the grouping into units changes nothing.
        ``progress(n)`` is called per batch with the ``n`` source frames it took in (no-face frames too)."""
        started, wall, clock = time.time(), time.perf_counter(), StageClock(self.models.device)
        m, shape = self.models, (video.height, video.width)
        entries: list[Entry] = []
        # per face frame waiting for its batch: (src, box, VAE crop, parser input); only these small crops
        # are kept, so a decoded frame is let go as soon as it is cropped
        pending: list[tuple[int, Box, np.ndarray, np.ndarray | None]] = []
        made: list[tuple] = []  # (src, box, latents, Future -> (BlendMaterial, rect))
        encodes = parsings = seen = reported = 0

        def report() -> None:
            nonlocal reported
            if progress is not None and seen > reported:
                progress(seen - reported)
            reported = seen

        def flush(masks: ThreadPoolExecutor) -> None:
            nonlocal encodes, parsings
            with clock.stage("vae_encode", device=True):
                crops = np.stack([crop for _, _, crop, _ in pending])
                with model_call():
                    latents = m.generator.encode(crops, self.cfg.batch_size)
            encodes += len(pending)
            with clock.stage("blend_prepare", device=True):
                labels = m.blender.parse_inputs([x for _, _, _, x in pending])
            parsings += len(pending) if m.blender.parser is not None else 0
            for (src, box, _, _), lat, found in zip(pending, latents, labels, strict=True):
                # masks are built in the pool while the next batch is decoded, encoded and parsed
                made.append((src, box, lat.numpy(), masks.submit(self._material, clock, found, box, shape)))
            pending.clear()
            report()
            if on_stage is not None:
                on_stage(f"prepare {len(entries) + len(made)}/{end - start}")

        with ThreadGroup(f"prepare-{start}") as group:
            masks = ThreadPoolExecutor(self.tuning.mask_workers, thread_name_prefix=f"prepare-{start}-mask")
            group.on_exit(lambda: masks.shutdown(wait=True, cancel_futures=True))
            for src, frame in self._decoded(group, clock, video, start, end):
                seen += 1
                box = boxes[src]
                if box is None:
                    entries.append(Entry(src))
                    continue
                with clock.stage("vae_encode"):
                    crop = crop_face(frame, box)
                with clock.stage("blend_prepare"):
                    parse_in = m.blender.parse_input(frame, box)
                del frame
                pending.append((src, box, crop, parse_in))
                if len(pending) == self.cfg.batch_size:
                    flush(masks)
            if pending:
                flush(masks)
            report()  # trailing frames without a face
            for src, box, latents, job in made:
                material, rect = job.result()
                entries.append(
                    Entry(src, box, latents, material.square, material.mask, material.parsed, rect)
                )
        entries.sort(key=lambda e: e.src)
        stats = PrepStats(
            unit=f"prepare {start}-{end}",
            frames=end - start,
            **clock.report(),
            vae_encodes=encodes,
            parsings=parsings,
            wall_seconds=time.perf_counter() - wall,
            started=started,
        )
        return entries, stats

    def _material(self, clock: StageClock, labels: np.ndarray | None, box: Box, shape: tuple[int, int]):
        with clock.stage("blend_prepare"):
            material = self.models.blender.material(labels, box)
            rect = active_rect(box, material.square, material.mask, shape)
        return material, rect

    def encode_audio(
        self, samples: np.ndarray, segments: list[int]
    ) -> tuple[dict[int, torch.Tensor], PrepStats]:
        """Whisper features of 30 s ``segments`` of ``samples`` ((N,) float32 16 kHz): k -> (1500, L, D)."""
        started, wall, clock = time.time(), time.perf_counter(), StageClock(self.models.device)
        out = {}
        for k in segments:
            with clock.stage("audio", device=True), model_call():
                out[k] = self.models.audio.encode(samples[k * SEGMENT_SAMPLES : (k + 1) * SEGMENT_SAMPLES], k)
        stats = PrepStats(
            unit=f"audio {segments}",
            **clock.report(),
            audio_segments=len(segments),
            wall_seconds=time.perf_counter() - wall,
            started=started,
        )
        return out, stats

    def prepare_job(
        self, video: VideoInfo, samples: np.ndarray, plan: Plan, chunk: int = ShardsConfig.prep_length
    ) -> tuple[dict[int, Entry], AudioFeatures, list[PrepStats]]:
        """Every preparation a job needs, in this process (:class:`musetalk.preparation.PrepPlan`): detections
        (all frames' if a track is chosen), boxes of each frame's face (``plan.face_choice``), entries
        (``chunk`` source frames a unit), Whisper features."""
        f, whole = self.cfg.face, any(is_track(face) for face in plan.faces)
        prep = PrepPlan(plan, plan.shards, chunk=chunk, smooth_radius=f.smooth_radius, whole=whole)
        prep.start()
        stats: list[PrepStats] = []
        for unit in prep.units_of(UnitKind.DETECT):
            found, st = self.detect_range(video, unit.start, unit.end)
            prep.detected(unit, found)
            stats.append(st)
        entries: dict[int, Entry] = {}
        shape = (video.height, video.width)
        for unit in prep.units_of(UnitKind.PREPARE):
            rng, n = range(unit.start, unit.end), plan.source_frames
            boxes = boxes_from_detections(prep.detections, rng, shape, f, n, plan.face_choice, prep.tracks)
            done, st = self.prepare_range(video, unit.start, unit.end, boxes)
            entries.update((e.src, e) for e in done)
            stats.append(st)
        segments, st = self.encode_audio(samples, [u.start for u in prep.units_of(UnitKind.AUDIO)])
        stats.append(st)
        return entries, AudioFeatures(segments, plan.total_samples, plan.fps), stats

    # Generation ---------------------------------------------------------------------------------
    def render_shard(
        self,
        *,
        video: VideoInfo,
        plan: Plan,
        shard: Shard,
        out_path: Path,
        encode: EncodeSettings,
        entries: Callable[[int], Entry],
        audio: AudioFeatures,
        progress: Callable[[int], None] | None = None,
        on_stage: Callable[[str], None] | None = None,
        on_frame: Callable[[int, np.ndarray], None] | None = None,
    ) -> ShardStats:
        """Render output frames ``[shard.start, shard.end)`` into a video-only segment at ``out_path``.

        ``entries(src)`` gives the prepared entry of each source frame the shard shows; ``audio`` holds
        the Whisper segments its windows read. ``progress(n)`` is called per batch of ``n`` frames written,
        ``on_stage(text)`` once rendering starts. ``on_frame(t, frame)`` sees every finished output frame
        ((H, W, 3) uint8 BGR, read-only, before encoding) on the compositing thread: the lip-sync scorer's
        crops (:class:`musetalk.syncscore.ShardCropper`); it changes nothing in the output.

        Threads (bounded channels between them, depths from :class:`PipelineTuning`):
        1. decode: the source frames the shard shows, in order -> ``decoded``;
        2. entries: per output frame in order, its entry (read and decompressed off the critical path);
           generate: UNet + VAE decode per batch of faces, batch N+1 queued before batch N is waited for,
           [GFPGAN] -> ``faces`` (256x256 faces, no source frame: generation needs only latents and
           audio, so no frame waits in memory for its batch to fill);
        3. this thread: each output frame's source frame from ``decoded`` with its generated face
           composited (on CUDA on a side stream, only the face rectangle crossing the bus) -> ``finished``;
        4. encode: ``finished`` -> the ffmpeg encoder.
        An exception in any thread stops them all and is raised here; the encoder is killed and the partial
        segment removed.
        """
        started, wall = time.time(), time.perf_counter()
        ctx = self._context(video, plan, shard, entries, audio, progress, on_stage)  # 0.
        ctx.on_frame = on_frame
        lo, hi = min(ctx.shown), max(ctx.shown) + 1
        with ThreadGroup(shard.name) as group:
            decoded = self._decoded(group, ctx.clock, video, lo, hi)  # 1.
            faces = group.channel(self.tuning.faces_depth)
            finished = group.channel(self.tuning.encode_depth)
            writer = self._writer(out_path, video.width, video.height, plan.fps, encode)
            group.on_exit(writer.abort, on_error_only=True)  # kills ffmpeg, removes the partial file
            stream = current_stream(self.models.device)
            prefetched = group.channel(2 * self.cfg.batch_size)
            group.start("entries", self._entries_step, ctx, prefetched)  # 2.
            group.start("generate", self._generate_step, ctx, prefetched, faces, stream)  # 2.
            encoder = group.start("encode", self._encode_step, ctx, finished, writer)  # 4.
            self._composite_step(ctx, decoded, faces, finished, side_stream(self.models.device))  # 3.
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
            decoded_frames=hi - lo,
            **ctx.clock.report(),
            enhance_fallbacks=kinds.count(ENHANCE_FALLBACK),
            parsing_fallbacks=kinds.count(PARSING_FALLBACK),
            frame_kinds=kinds,
            wall_seconds=time.perf_counter() - wall,
            started=started,
        )

    # Step 0 --------------------------------------------------------------------------------------
    def _context(self, video, plan, shard, entries, audio, progress, on_stage) -> ShardContext:
        last_use: dict[int, int] = {}
        for t in range(shard.start, shard.end):
            last_use[plan.source_index(t)] = t
        return ShardContext(
            video=video,
            plan=plan,
            shard=shard,
            clock=StageClock(self.models.device),
            shown=frozenset(last_use),
            last_use=last_use,
            entries=entries,
            windows=audio.for_shard(shard.start, shard.end),
            progress=progress,
            on_stage=on_stage,
        )

    # Step 2: entries and generate threads ------------------------------------------------------
    def _entries_step(self, ctx: ShardContext, out: Channel) -> None:
        for t in range(ctx.shard.start, ctx.shard.end):
            out.put((t, ctx.entries(ctx.plan.source_index(t))))
        out.put(END)

    def _generate_step(self, ctx: ShardContext, entries: Channel, faces: Channel, stream) -> None:
        """Output frames in order -> one :class:`~musetalk.generation.Generated` each, in fixed batches
        with one in flight (:func:`musetalk.generation.generate_faces`)."""
        m = self.models
        with on_stream(stream):
            for g in generate_faces(
                entries, m.generator, m.enhancer, ctx.windows, ctx.clock, self.cfg.batch_size
            ):
                faces.put(g)
        faces.put(END)

    # Step 3: this thread --------------------------------------------------------------------------
    def _composite_step(
        self, ctx: ShardContext, decoded: Channel, faces: Channel, finished: Channel, stream
    ) -> None:
        """Output frames in order: passthrough, or the generated face composited into its source frame
        (device compositing on ``stream``, :func:`musetalk.stages.side_stream`). A source frame is kept
        only until the last output frame that shows it (ping-pong reuses it)."""
        store: dict[int, np.ndarray] = {}
        incoming = iter(decoded)
        if ctx.on_stage is not None:
            ctx.on_stage("render")

        def need(src: int) -> np.ndarray:
            while src not in store:
                item = next(incoming, None)
                if item is None:
                    raise RuntimeError(f"{ctx.shard.name}: source frame {src} was never decoded")
                if item[0] in ctx.shown:
                    store[item[0]] = item[1]
            return store[src]

        for g in faces:
            e = g.entry
            frame = need(e.src)
            own = ctx.last_use[e.src] == g.t  # no later output shows this source frame: paste in place
            if own:
                del store[e.src]
            if g.face is None:
                ctx.kinds.append(PASSTHROUGH)
                if ctx.on_frame is not None:
                    ctx.on_frame(g.t, frame)
                finished.put(frame)
                continue
            material = BlendMaterial(square=e.square, mask=e.mask, parsed=e.parsed)
            with ctx.clock.stage("blend", device=self._device_composite, stream=stream):
                frame = frame if own else frame.copy()
                if self._compositor is None:
                    paste_numpy(frame, g.face, e.box, material.square, material.mask, e.rect)
                else:
                    self._compositor.paste_host(frame, g.face, e.box, e.square, e.mask, e.rect, stream)
            parsing_fell = self.cfg.blend.parsing and not material.parsed
            ctx.kinds.append(
                ENHANCE_FALLBACK if g.enhance_failed else PARSING_FALLBACK if parsing_fell else FACE
            )
            if ctx.on_frame is not None:
                ctx.on_frame(g.t, frame)
            finished.put(frame)
        if next(incoming, None) is not None or store:
            raise RuntimeError(f"{ctx.shard.name}: decoded frames left over")
        finished.put(END)

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
