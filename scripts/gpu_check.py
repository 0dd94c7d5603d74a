"""Measure the GPU path in one process, without Ray, Hydra or an ffmpeg binary (a lent GPU machine has none).

``python -m scripts.gpu_check [--device auto|cuda|cpu] [--tiny] [--quick] [--dtype float16]
[--sections models,invariance,end_to_end] [--workers 1,2,4] [--host] [--models DIR] [--work DIR]
[--out gpu_check.json]``

Random-weight models in the official formats (``musetalk.testing.tiny_models``: full size by default,
``--tiny`` the tiny set) are written under ``--work`` once; media is generated and encoded with PyAV
(:class:`shards.segment.AVSegmentWriter`). After every section the whole JSON file at ``--out`` is rewritten,
so a run cut short by a timeout still leaves what it measured; a Markdown table is printed at the end.

Sections:
- ``models``: UNet + VAE decode per batch size and dtype (fp16 and bf16 on CUDA, fp32 on the CPU): ms per
  frame (CUDA events on CUDA, perf_counter on the CPU), host enqueue ms per batch, peak device memory,
  non-finite values, max difference against fp32 (uint8 levels); VAE encode, S3FD and FAN forward passes
  (a random S3FD finds thousands of boxes: only its network is timed), BiSeNet, Whisper, GFPGAN per frame.
- ``invariance``: one face at different batch positions and with different batch-mates, two CUDA streams
  (CPU: two threads) at once against one, two processes: bit-exact or the largest difference.
- ``end_to_end``: a generated talking-head clip (1080p; smaller with ``--tiny``) through
  :class:`~musetalk.pipeline.FramePipeline` with the device and the numpy compositors (Haar detector: a
  random S3FD finds noise): a first render and a re-render from the prepared entries; fps, stage seconds,
  host CPU seconds per frame, the share of wall time inside model calls.
- opt-in ``workers`` (``--workers 1,2,4``): that many processes render the clip at once on the device;
  ``host`` (``--host``): decode and encode fps per core.
The profiles: default (about 5 minutes on an H100), ``--quick`` (fewer batch sizes, repeats, frames).
"""

from __future__ import annotations

import argparse
import json
import logging
import multiprocessing as mp
import os
import platform
import resource
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch

from musetalk.config import FaceConfig, PipelineConfig
from musetalk.device import resolve_device, resolve_dtype
from musetalk.layout import ModelLayout
from musetalk.stages import PipelineTuning
from shards.plan import ShardsConfig
from shards.segment import AVSegmentWriter, EncodeSettings

logger = logging.getLogger("gpu_check")

SECTIONS = ("models", "invariance", "end_to_end", "workers", "host")
DEFAULT_SECTIONS = ("models", "invariance", "end_to_end")
MODEL_STAGES = ("detect", "vae_encode", "blend_prepare", "audio", "generate", "enhance")


@dataclass(frozen=True)
class Profile:
    """How much each section measures."""

    batches: tuple[int, ...]  # UNet + VAE batch sizes
    repeats: int
    warmup: int
    clip_seconds: float
    clip_size: tuple[int, int]  # (W, H)
    shard_frames: int
    model_batch: int = 8  # frames per call of the other models
    s3fd_hw: tuple[int, int] = (360, 640)  # S3FD input (detect_max_side 640 on a 16:9 frame)

    @staticmethod
    def pick(quick: bool, tiny: bool) -> Profile:
        if tiny and quick:  # the test suite's run: seconds on a loaded 2-core CPU
            return Profile((2, 4), 1, 0, 0.4, (320, 180), 10, model_batch=2, s3fd_hw=(90, 160))
        if tiny:
            return Profile((4, 8), 3, 1, 2.0, (640, 360), 25)
        if quick:
            return Profile((8, 32), 3, 1, 2.0, (1920, 1080), 25)
        return Profile((8, 16, 32, 64), 10, 2, 8.0, (1920, 1080), 50)


class Report:
    """One JSON file, rewritten whole (atomically) after each section."""

    def __init__(self, path: Path, header: dict) -> None:
        self.path = path
        self.data = {**header, "sections": {}}
        self.write()

    def add(self, name: str, result: dict) -> None:
        self.data["sections"][name] = result
        self.write()

    def write(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(f".{self.path.name}.tmp")
        tmp.write_text(json.dumps(self.data, indent=1, default=str) + "\n")
        os.replace(tmp, self.path)


# Timing helpers ---------------------------------------------------------------------------------------
def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_device(fn: Callable[[], object], device: torch.device, repeats: int, warmup: int) -> dict:
    """Device ms per call (CUDA events on CUDA, perf_counter elsewhere) and host enqueue ms per call."""
    for _ in range(warmup):
        fn()
    _sync(device)
    enqueue, events, walls = [], [], []
    for _ in range(repeats):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
        t0 = time.perf_counter()
        fn()
        enqueue.append((time.perf_counter() - t0) * 1000)
        if device.type == "cuda":
            end.record()
            events.append((start, end))
        else:
            walls.append(enqueue[-1])
    _sync(device)
    ms = [s.elapsed_time(e) for s, e in events] if events else walls
    return {"ms": float(np.median(ms)), "ms_min": float(min(ms)), "enqueue_ms": float(np.median(enqueue))}


def time_wall(fn: Callable[[], object], device: torch.device, repeats: int, warmup: int) -> float:
    """Median wall ms per call, synchronised (calls that copy their results to the host)."""
    for _ in range(warmup):
        fn()
    _sync(device)
    ms = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        _sync(device)
        ms.append((time.perf_counter() - t0) * 1000)
    return float(np.median(ms))


def _peak_reset(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def _peak_mib(device: torch.device) -> float | None:
    return torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None


def _cpu_seconds() -> float:
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime


# Context shared by the sections ---------------------------------------------------------------------
@dataclass(frozen=True)
class Check:
    device: torch.device
    dtypes: tuple[str, ...]  # timed in section models
    dtype: str  # the one the other sections run in
    layout_root: Path
    tiny: bool
    profile: Profile
    work: Path
    threads: int

    @property
    def layout(self) -> ModelLayout:
        return ModelLayout.at(self.layout_root, tiny=True)

    def config(self, **face) -> PipelineConfig:
        return PipelineConfig(
            models_dir=str(self.layout_root),
            tiny=True,
            device=str(self.device),
            dtype=self.dtype,
            batch_size=8,
            threads=self.threads,
            face=FaceConfig(detector="haar", crop="landmarks", **face),
        )


def _generator(check: Check, dtype_name: str, batch: int):
    from musetalk.generation import LatentGenerator, load_unet, load_vae

    dtype = resolve_dtype(dtype_name, check.device)
    unet = load_unet(check.layout, check.device, dtype)
    vae = load_vae(check.layout, check.device, dtype)
    return LatentGenerator(unet, vae, check.device, dtype, batch)


def _inputs(n: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(n, 8, 32, 32) latents and (n, 50, 384) audio prompts, deterministic."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 8, 32, 32, generator=g), torch.randn(n, 50, 384, generator=g)


def _float_faces(gen, latents: torch.Tensor, audio: torch.Tensor) -> torch.Tensor:
    """The decoded image before rounding ((B, 3, 256, 256) float32, device): for non-finite counts."""
    from musetalk.generation import UNET_SCALE

    x, ctx = latents.to(gen.device, gen.dtype), audio.to(gen.device, gen.dtype)
    pred = gen.unet(x, timestep=0, encoder_hidden_states=ctx).sample
    return gen.vae.decode((pred / UNET_SCALE).to(gen.vae.dtype)).sample.float()


def _diff(a: np.ndarray, b: np.ndarray) -> int:
    return int(np.abs(a.astype(np.int16) - b.astype(np.int16)).max())


# Section (a) ----------------------------------------------------------------------------------------
@torch.inference_mode()
def section_models(check: Check, report_part: Callable[[dict], None]) -> dict:
    from musetalk.audio import SEGMENT_SAMPLES, load_whisper
    from musetalk.enhance import load_gfpgan
    from musetalk.faces import _load_fan, _load_s3fd
    from musetalk.parsing import load_face_parser

    dev, prof = check.device, check.profile
    out: dict = {"generate": [], "per_frame_ms": {}}
    ref_n = min(prof.batches)
    latents, audio = _inputs(max(prof.batches))
    reference = None
    if dev.type == "cuda":  # fp32 once, untimed: what fp16/bf16 are compared with
        gen = _generator(check, "float32", ref_n)
        reference = gen.generate(latents[:ref_n], audio[:ref_n])
        gen = None
    crops = np.random.default_rng(0).integers(0, 256, (max(prof.batches), 256, 256, 3), dtype=np.uint8)
    for dtype_name in check.dtypes:
        gen = _generator(check, dtype_name, ref_n)
        for batch in prof.batches:
            gen.batch_size = batch
            x = latents[:batch].to(dev, gen.dtype)
            a = audio[:batch].to(dev, gen.dtype)
            _peak_reset(dev)
            timing = time_device(
                lambda g=gen, x=x, a=a: g._generate_batch(x, a), dev, prof.repeats, prof.warmup
            )
            peak = _peak_mib(dev)
            images = _float_faces(gen, x, a)
            row = {
                "dtype": dtype_name,
                "batch": batch,
                "ms_per_frame": timing["ms"] / batch,
                "ms_per_frame_min": timing["ms_min"] / batch,
                "enqueue_ms_per_batch": timing["enqueue_ms"],
                "peak_mib": peak,
                "nonfinite": int((~torch.isfinite(images)).sum()),
                "max_diff_vs_fp32": (  # the CPU computes in fp32 only: nothing to compare
                    _diff(gen.generate(latents[:ref_n], audio[:ref_n]), reference)
                    if reference is not None
                    else 0
                ),
            }
            enc = torch.from_numpy(crops[:batch])
            row["vae_encode_ms_per_frame"] = (
                time_device(lambda g=gen, e=enc: g._encode_batch(e), dev, prof.repeats, prof.warmup)["ms"]
                / batch
            )
            out["generate"].append(row)
            logger.info("generate %s", row)
            report_part(out)
        gen = None
    n = prof.model_batch
    per = out["per_frame_ms"]
    s3fd = _load_s3fd(check.layout, dev)
    x = torch.rand(n, 3, *prof.s3fd_hw, device=dev) * 255
    per[f"s3fd_forward_{prof.s3fd_hw[1]}x{prof.s3fd_hw[0]}"] = (
        time_wall(lambda: s3fd(x), dev, prof.repeats, prof.warmup) / n
    )
    s3fd = None
    fan = _load_fan(check.layout, dev)
    x = torch.rand(n, 3, 256, 256, device=dev)
    per["fan_forward"] = time_wall(lambda: fan(x), dev, prof.repeats, prof.warmup) / n
    fan = None
    parser = load_face_parser(check.layout, dev)
    inputs = list(np.random.default_rng(1).integers(0, 256, (n, 512, 512, 3), dtype=np.uint8))
    per["bisenet"] = time_wall(lambda: parser.labels(inputs), dev, prof.repeats, prof.warmup) / n
    parser = None
    whisper = load_whisper(check.layout, dev, resolve_dtype(check.dtype, dev))
    samples = np.random.default_rng(2).standard_normal(SEGMENT_SAMPLES).astype(np.float32) * 0.1
    # one 30 s segment serves 750 frames at 25 fps
    per["whisper_per_25fps_frame"] = time_wall(lambda: whisper.encode(samples, 0), dev, 1, 1) / 750
    whisper = None
    if check.layout.gfpgan.exists():
        enhancer = load_gfpgan(check.layout, dev, 1)
        faces = crops[:n]
        per["gfpgan"] = time_wall(lambda: enhancer.enhance(faces), dev, max(1, prof.repeats // 3), 1) / n
    return out


# Section (b) ----------------------------------------------------------------------------------------
def _child_generate(root: str, device: str, dtype: str, batch: int, threads: int, conn) -> None:
    """In a spawned process: the same generator, the same inputs -> faces (sent back through ``conn``)."""
    try:
        torch.set_num_threads(threads)
        check = Check(
            torch.device(device),
            (dtype,),
            dtype,
            Path(root),
            True,
            Profile.pick(True, True),
            Path(root),
            threads,
        )
        gen = _generator(check, dtype, batch)
        latents, audio = _inputs(2 * batch)  # the parent's inputs
        conn.send(("ok", gen.generate(latents[:batch], audio[:batch])))
    except BaseException as err:  # noqa: BLE001 - reported to the parent
        conn.send(("error", f"{type(err).__name__}: {err}"))


@torch.inference_mode()
def section_invariance(check: Check, report_part: Callable[[dict], None]) -> dict:
    dev, batch = check.device, 8
    gen = _generator(check, check.dtype, batch)
    latents, audio = _inputs(2 * batch)
    out: dict = {"dtype": check.dtype, "batch": batch}
    base = gen.generate(latents[:batch], audio[:batch])
    # the same faces rolled by three positions; then face 0 with other batch-mates
    rolled = gen.generate(latents[:batch].roll(3, 0), audio[:batch].roll(3, 0))
    mates = torch.cat([latents[:1], latents[batch + 1 :]]), torch.cat([audio[:1], audio[batch + 1 :]])
    other = gen.generate(*mates)
    out["positions"] = {
        "bit_exact": bool((np.roll(base, 3, 0) == rolled).all()),
        "max_diff": _diff(np.roll(base, 3, 0), rolled),
    }
    out["batch_mates"] = {
        "bit_exact": bool((base[0] == other[0]).all()),
        "max_diff": _diff(base[0], other[0]),
    }
    report_part(out)

    results: list[np.ndarray | None] = [None, None]

    def run(i: int) -> None:
        if dev.type == "cuda":
            with torch.inference_mode(), torch.cuda.stream(torch.cuda.Stream(dev)):
                results[i] = gen.generate(latents[:batch], audio[:batch])
        else:
            with torch.inference_mode():
                results[i] = gen.generate(latents[:batch], audio[:batch])

    t0 = time.perf_counter()
    for i in (0, 1):
        run(i)
    serial = time.perf_counter() - t0
    threads = [threading.Thread(target=run, args=(i,)) for i in (0, 1)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    both = time.perf_counter() - t0
    exact = all(r is not None and (r == base).all() for r in results)
    out["two_streams" if dev.type == "cuda" else "two_threads"] = {
        "bit_exact": bool(exact),
        "max_diff": max(_diff(r, base) for r in results if r is not None),
        "serial_s": serial,
        "concurrent_s": both,
    }
    report_part(out)

    ctx = mp.get_context("spawn")
    pipes, procs = [], []
    for _ in range(2):
        parent, child = ctx.Pipe(duplex=False)
        proc = ctx.Process(
            target=_child_generate,
            args=(str(check.layout_root), str(dev), check.dtype, batch, torch.get_num_threads(), child),
        )
        proc.start()
        pipes.append(parent)
        procs.append(proc)
    got = []
    for parent, proc in zip(pipes, procs, strict=True):
        status, value = parent.recv()
        proc.join()
        got.append(value if status == "ok" else None)
        if status != "ok":
            out.setdefault("process_errors", []).append(value)
    found = [g for g in got if g is not None]
    out["two_processes"] = {
        "bit_exact": bool(found) and all((g == base).all() for g in found),
        "max_diff": max((_diff(g, base) for g in found), default=None),
    }
    return out


# Section (c) ----------------------------------------------------------------------------------------
def make_clip(work: Path, seconds: float, size: tuple[int, int]):
    """The benchmark clip (scripts.make_bench_media's frames) encoded with PyAV; (video, wav, frames)."""
    from musetalk.testing.demo_media import SAMPLE_RATE, _write_wav, speech_like
    from scripts.make_bench_media import BENCH_FPS, bench_frames

    work.mkdir(parents=True, exist_ok=True)
    video = work / f"clip_{size[0]}x{size[1]}_{seconds:g}s.mp4"
    audio = video.with_suffix(".wav")
    if video.exists() and audio.exists():
        return video, audio
    tmp = video.with_name(f".{video.name}")
    settings = EncodeSettings(crf=18, preset="veryfast", gop=50)
    with AVSegmentWriter(tmp, size[0], size[1], BENCH_FPS, settings) as writer:
        for frame in bench_frames(BENCH_FPS, seconds, size):
            writer.write(frame)
        frames = writer.close()
    _write_wav(audio, speech_like(float(frames / BENCH_FPS)), SAMPLE_RATE)
    os.replace(tmp, video)
    return video, audio


def _render(pipeline, info, plan, entries, features, out_dir: Path, encode: EncodeSettings) -> list:
    stats = []
    for shard in plan.shards:
        stats.append(
            pipeline.render_shard(
                video=info,
                plan=plan,
                shard=shard,
                out_path=out_dir / f"{shard.name}.mkv",
                encode=encode,
                entries=entries.__getitem__,
                audio=features,
            )
        )
    return stats


def _run_e2e(check: Check, composite: str, models=None) -> tuple[dict, object]:
    from musetalk.local import plan_job
    from musetalk.pipeline import FramePipeline
    from musetalk.stats import stage_totals

    video, audio = make_clip(check.work / "media", check.profile.clip_seconds, check.profile.clip_size)
    info, samples, plan = plan_job(video, audio, shard_frames=check.profile.shard_frames)
    pipeline = FramePipeline(
        check.config(), models=models, tuning=PipelineTuning(composite=composite), writer=AVSegmentWriter
    )
    encode = EncodeSettings()
    result: dict = {"composite": composite, "frames": plan.output_frames, "size": [info.width, info.height]}
    with tempfile.TemporaryDirectory(dir=check.work) as tmp:
        for run in ("first_render", "re_render"):
            _sync(check.device)
            cpu0, t0 = _cpu_seconds(), time.perf_counter()
            prep_seconds: dict[str, float] = {}
            if run == "first_render":
                entries, features, prep = pipeline.prepare_job(info, samples, plan, ShardsConfig.prep_length)
                for st in prep:
                    for k, v in st.seconds.items():
                        prep_seconds[k] = prep_seconds.get(k, 0.0) + v
            stats = _render(pipeline, info, plan, entries, features, Path(tmp), encode)
            _sync(check.device)
            wall, cpu = time.perf_counter() - t0, _cpu_seconds() - cpu0
            stages = stage_totals(stats)
            for k, v in prep_seconds.items():
                stages[k] = stages.get(k, 0.0) + v
            model = sum(stages.get(k, 0.0) for k in MODEL_STAGES)
            result[run] = {
                "fps": plan.output_frames / wall,
                "wall_s": wall,
                "stage_s": {k: round(v, 4) for k, v in stages.items() if v},
                "host_cpu_ms_per_frame": 1000 * cpu / plan.output_frames,
                "model_share_of_wall": model / wall,
                "face_frames": sum(s.face_frames for s in stats),
            }
    return result, pipeline.models


def section_end_to_end(check: Check, report_part: Callable[[dict], None]) -> dict:
    out: dict = {"clip_seconds": check.profile.clip_seconds, "dtype": check.dtype}
    models = None
    for composite in ("device", "numpy"):
        out[composite], models = _run_e2e(check, composite, models)
        report_part(out)
    return out


# Section (d) ----------------------------------------------------------------------------------------
def _child_render(check_dict: dict, start, conn) -> None:
    try:
        check = Check(**{**check_dict, "device": torch.device(check_dict["device"])})
        torch.set_num_threads(check.threads)
        from musetalk.models import load_models

        models = load_models(check.config())
        start.wait()
        result, _ = _run_e2e(check, "auto", models)
        conn.send(("ok", result))
    except BaseException as err:  # noqa: BLE001 - reported to the parent
        conn.send(("error", f"{type(err).__name__}: {err}\n{traceback.format_exc(limit=3)}"))


def section_workers(check: Check, counts: list[int], report_part: Callable[[dict], None]) -> dict:
    make_clip(check.work / "media", check.profile.clip_seconds, check.profile.clip_size)
    ctx = mp.get_context("spawn")
    out: dict = {}
    as_dict = {**asdict(check), "device": str(check.device), "profile": check.profile}
    for n in counts:
        start = ctx.Event()
        pipes, procs = [], []
        for _ in range(n):
            parent, child = ctx.Pipe(duplex=False)
            proc = ctx.Process(target=_child_render, args=(as_dict, start, child))
            proc.start()
            pipes.append(parent)
            procs.append(proc)
        # every worker loads its models before the clock starts (they wait on the event)
        time.sleep(0.5)
        t0 = time.perf_counter()
        start.set()
        results = []
        for parent, proc in zip(pipes, procs, strict=True):
            results.append(parent.recv())
            proc.join()
        wall = time.perf_counter() - t0
        errors = [v for s, v in results if s != "ok"]
        frames = sum(v["frames"] for s, v in results if s == "ok")
        out[str(n)] = {
            "workers": n,
            "frames": frames,
            "wall_s": wall,
            "fps_total": frames / wall if wall else None,
            "per_worker_fps": [v["first_render"]["fps"] for s, v in results if s == "ok"],
            "errors": errors,
        }
        report_part(out)
    return out


def section_host(check: Check, report_part: Callable[[dict], None]) -> dict:
    from shards.decode import read_frames
    from shards.probe import probe_video

    video, _ = make_clip(check.work / "media", check.profile.clip_seconds, check.profile.clip_size)
    info = probe_video(video)
    cpu0, t0 = _cpu_seconds(), time.perf_counter()
    frames = list(read_frames(info, 0, info.frame_count))
    decode = {"frames": len(frames), "wall_s": time.perf_counter() - t0, "cpu_s": _cpu_seconds() - cpu0}
    out = {"size": [info.width, info.height], "decode": decode}
    with tempfile.TemporaryDirectory(dir=check.work) as tmp:
        for name, settings in (
            ("encode_veryfast_crf18", EncodeSettings()),
            ("encode_lossless", EncodeSettings(lossless=True)),
        ):
            cpu0, t0 = _cpu_seconds(), time.perf_counter()
            with AVSegmentWriter(
                Path(tmp) / f"{name}.mkv", info.width, info.height, info.fps, settings, threads=1
            ) as w:
                for frame in frames:
                    w.write(frame)
            out[name] = {
                "frames": len(frames),
                "wall_s": time.perf_counter() - t0,
                "cpu_s": _cpu_seconds() - cpu0,
            }
    for part in out.values():
        if isinstance(part, dict) and "cpu_s" in part:
            part["fps_per_core"] = part["frames"] / part["cpu_s"] if part["cpu_s"] else None
            part["fps"] = part["frames"] / part["wall_s"]
    return out


# Output ---------------------------------------------------------------------------------------------
def table(data: dict) -> str:
    """The JSON's headline numbers as Markdown."""
    env, sections = data["environment"], data["sections"]
    lines = [
        f"GPU check on {env['device_name']} ({env['device']}), torch {env['torch']}, {data['profile']}",
        "",
    ]
    gen = sections.get("models", {}).get("generate", [])
    if gen:
        lines += ["| dtype | batch | UNet+VAE decode ms/frame | enqueue ms/batch | VAE encode ms/frame | peak MiB | non-finite | max diff vs fp32 |",
                  "|---|---|---|---|---|---|---|---|"]  # fmt: skip
        for r in gen:
            peak = f"{r['peak_mib']:.0f}" if r["peak_mib"] is not None else "-"
            lines.append(f"| {r['dtype']} | {r['batch']} | {r['ms_per_frame']:.2f} | {r['enqueue_ms_per_batch']:.2f} | "
                         f"{r.get('vae_encode_ms_per_frame', float('nan')):.2f} | {peak} | {r['nonfinite']} | {r['max_diff_vs_fp32']} |")  # fmt: skip
        per = sections["models"].get("per_frame_ms", {})
        if per:
            lines += ["", "| model | ms/frame |", "|---|---|"] + [
                f"| {k} | {v:.2f} |" for k, v in per.items()
            ]
    inv = sections.get("invariance", {})
    if inv:
        lines += ["", "| invariance | bit-exact | max diff |", "|---|---|---|"]
        for k in ("positions", "batch_mates", "two_streams", "two_threads", "two_processes"):
            if isinstance(inv.get(k), dict):
                lines.append(f"| {k} | {inv[k]['bit_exact']} | {inv[k]['max_diff']} |")
    e2e = sections.get("end_to_end", {})
    rows = [
        (c, r, e2e[c][r])
        for c in ("device", "numpy")
        if isinstance(e2e.get(c), dict)
        for r in ("first_render", "re_render")
        if r in e2e[c]
    ]
    if rows:
        lines += [
            "",
            "| compositor | run | fps | host CPU ms/frame | model share of wall |",
            "|---|---|---|---|---|",
        ]
        lines += [
            f"| {c} | {r} | {v['fps']:.1f} | {v['host_cpu_ms_per_frame']:.0f} | {v['model_share_of_wall']:.2f} |"
            for c, r, v in rows
        ]
    workers = sections.get("workers", {})
    if workers and "skipped" not in workers:
        lines += ["", "| workers | total fps |", "|---|---|"]
        lines += [
            f"| {v['workers']} | {v['fps_total']:.1f} |"
            for v in workers.values()
            if isinstance(v, dict) and v.get("fps_total")
        ]
    host = sections.get("host", {})
    if host and "skipped" not in host:
        lines += ["", "| host | fps | fps per core |", "|---|---|---|"]
        lines += [
            f"| {k} | {v['fps']:.1f} | {v['fps_per_core']:.1f} |"
            for k, v in host.items()
            if isinstance(v, dict) and "fps" in v
        ]
    for name, part in sections.items():
        if isinstance(part, dict) and "error" in part:
            lines.append(f"\n{name}: ERROR {part['error']}")
    return "\n".join(lines)


def environment(device: torch.device) -> dict:
    import av

    name = (
        torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else f"{platform.machine()} {platform.processor()}".strip()
    )
    return {
        "device": str(device),
        "device_name": name,
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "python": platform.python_version(),
        "pyav": av.__version__,
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "cudnn_allow_tf32": torch.backends.cudnn.allow_tf32,
        "matmul_allow_tf32": torch.backends.cuda.matmul.allow_tf32,
        "cublas_workspace_config": os.environ.get("CUBLAS_WORKSPACE_CONFIG"),
    }


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="auto")
    p.add_argument("--tiny", action="store_true", help="the tiny random models (tests), not full size")
    p.add_argument("--quick", action="store_true", help="fewer batch sizes, repeats and frames")
    p.add_argument(
        "--dtype", help="dtype of invariance and end_to_end (default float16 on CUDA, else float32)"
    )
    p.add_argument("--sections", default=",".join(DEFAULT_SECTIONS), help=f"comma-separated, of {SECTIONS}")
    p.add_argument(
        "--workers", default="", help="opt-in: worker process counts sharing the device, e.g. 1,2,4"
    )
    p.add_argument("--host", action="store_true", help="opt-in: decode and encode fps per core")
    p.add_argument("--models", type=Path, help="models dir (default: under --work)")
    p.add_argument("--work", type=Path, default=Path("outputs/gpu_check"))
    p.add_argument("--out", type=Path, default=Path("outputs/gpu_check/gpu_check.json"))
    p.add_argument("--threads", type=int, help="torch CPU threads (default: torch's)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from musetalk.testing.tiny_models import ensure_tiny_models

    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    cuda = device.type == "cuda"
    sections = [s for s in args.sections.split(",") if s]
    unknown = set(sections) - set(SECTIONS)
    if unknown:
        raise SystemExit(f"error: unknown sections {sorted(unknown)}; choose from {SECTIONS}")
    counts = [int(n) for n in args.workers.split(",") if n]
    if counts and "workers" not in sections:
        sections.append("workers")
    if args.host and "host" not in sections:
        sections.append("host")
    profile = Profile.pick(args.quick, args.tiny)
    models_dir = args.models or args.work / ("models-tiny" if args.tiny else "models-full")
    report = Report(
        args.out,
        {
            "started": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "command": sys.argv if argv is None else ["scripts/gpu_check.py", *argv],
            "profile": "quick" if args.quick else "default",
            "tiny": args.tiny,
            "environment": environment(device),
        },
    )
    t0 = time.perf_counter()
    ensure_tiny_models(models_dir, seed=0, full_size=not args.tiny)
    report.data["models_setup_s"] = time.perf_counter() - t0
    check = Check(
        device=device,
        dtypes=("float16", "bfloat16") if cuda else ("float32",),
        dtype=args.dtype or ("float16" if cuda else "float32"),
        layout_root=models_dir,
        tiny=args.tiny,
        profile=profile,
        work=args.work,
        threads=torch.get_num_threads(),
    )
    runners = {
        "models": lambda part: section_models(check, part),
        "invariance": lambda part: section_invariance(check, part),
        "end_to_end": lambda part: section_end_to_end(check, part),
        "workers": lambda part: section_workers(check, counts or [1, 2, 4], part),
        "host": lambda part: section_host(check, part),
    }
    for name in SECTIONS:
        if name not in sections:
            report.add(name, {"skipped": "not selected" if name in DEFAULT_SECTIONS else "opt-in"})
    for name in SECTIONS:
        if name not in sections:
            continue
        logger.info("section %s", name)
        start = time.perf_counter()
        try:
            result = runners[name](lambda part, name=name: report.add(name, {**part, "partial": True}))
        except Exception as err:  # noqa: BLE001 - recorded; later sections still run
            logger.exception("section %s failed", name)
            result = {"error": f"{type(err).__name__}: {err}"}
        result["section_s"] = time.perf_counter() - start
        report.add(name, result)
    report.data["finished"] = datetime.now(timezone.utc).isoformat(timespec="seconds")
    report.write()
    print(table(report.data))
    return report.data


if __name__ == "__main__":
    main()
