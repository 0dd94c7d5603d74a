"""Benchmark the pipelined worker with random-weight models (no downloads): 1080p pools, or the demo clip.

``python -m scripts.benchmark [--models DIR] [--full-size|--tiny] [--clip 1080p|demo] [--seconds 30]
[--layouts 1x1,2x8] [--rss-seconds 10,60] [--rss-shard-length 100] [--batch-size 8] [--dtype float32] [--device auto]
[--detector haar|s3fd] [--crop box|landmarks] [--enhance 0|1|2|4] [--threads N] [--out outputs/benchmark.json]``

``--clip 1080p`` (default): the clip of ``scripts.make_bench_media`` (``--seconds`` long, built once under
``--media``, default ``media/bench``) rendered by the real driver (``cluster.driver.run_job``) on a fresh
Ray pool per ``WxS`` layout of ``--layouts`` (W workers, the output cut into S shards; on a GPU the W
workers share it), no avatar cache. Workers load their models before the clock starts and report their
CPU seconds from then on (``getrusage`` SELF + CHILDREN: the ffmpeg coders included) and their peak RSS;
the table gives end-to-end fps, per-stage seconds, the time workers were busy (a unit running; units a
worker runs side by side counted once) against the sum of their stage times, CPU seconds, peak RSS of
the driver and of each worker, peak GPU memory where there is one, the device and the commit.
``--rss-seconds`` adds one 1-worker run per clip length to compare peak worker RSS, in shards of
``--rss-shard-length`` output frames (default 100, as ``shards.length``; 0: the whole clip as one shard).
``--clip demo``: the 256x256 demo clip ping-ponged to ``--frames`` output frames in this process.
A random-weight S3FD finds no faces, so the default detector is the Haar cascade (with FAN landmarks).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import platform
import resource
import subprocess
import tempfile
import time
from datetime import date
from fractions import Fraction
from pathlib import Path

import diffusers
import soundfile as sf
import torch
import transformers

from musetalk.config import EnhanceConfig, FaceConfig, PipelineConfig
from musetalk.device import resolve_device, resolve_dtype
from musetalk.local import plan_job, render_local
from musetalk.models import check_weights
from musetalk.pipeline import FramePipeline
from musetalk.stats import stage_totals
from musetalk.testing.demo_media import SAMPLE_RATE, ensure_demo_media, speech_like
from musetalk.testing.tiny_models import MARKER, ensure_tiny_models
from scripts.make_bench_media import ensure_bench_media
from shards.plan import ShardsConfig

logger = logging.getLogger(__name__)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", type=Path, help="models dir (default models/fullsize or models/tiny)")
    size = parser.add_mutually_exclusive_group()
    size.add_argument("--full-size", dest="full_size", action="store_true", default=True)
    size.add_argument("--tiny", dest="full_size", action="store_false")
    parser.add_argument("--frames", type=int, default=200, help="output frames to time")
    parser.add_argument("--warmup-frames", type=int, help="untimed warm-up frames (default: one batch)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    parser.add_argument("--device", default="auto")
    parser.add_argument("--detector", default="haar", choices=["haar", "s3fd"])
    parser.add_argument("--crop", default="landmarks", choices=["box", "landmarks"])
    parser.add_argument("--enhance", type=int, default=0, choices=[0, 1, 2, 4], help="0: off, else upscale")
    parser.add_argument("--threads", type=int, help="CPU intra-op threads")
    parser.add_argument("--clip", default="1080p", choices=["1080p", "demo"])
    parser.add_argument("--seconds", type=float, default=30.0, help="1080p clip length")
    parser.add_argument("--layouts", default="1x1,2x8", help="WORKERSxSHARDS,... for the 1080p clip")
    parser.add_argument("--rss-seconds", default="", help="clip lengths for the peak-RSS runs, e.g. 10,60")
    parser.add_argument(
        "--rss-shard-length",
        type=int,
        default=100,
        help="output frames per shard in the peak-RSS runs (default: shards.length's default); 0: one shard",
    )
    parser.add_argument("--media", type=Path, help="media dir (default: media/bench, or a temporary demo)")
    parser.add_argument("--out", type=Path, default=Path("outputs/benchmark.json"))
    parser.add_argument(
        "overrides", nargs="*", help="Hydra overrides for the 1080p jobs, e.g. cluster.max_in_flight=1"
    )
    args = parser.parse_args(argv)
    if args.frames < 1 or args.batch_size < 1:
        parser.error("--frames and --batch-size must be positive")
    args.models = args.models or Path("models/fullsize" if args.full_size else "models/tiny")
    try:
        args.layouts = [tuple(int(v) for v in part.split("x")) for part in args.layouts.split(",") if part]
        args.rss_seconds = [float(v) for v in args.rss_seconds.split(",") if v]
    except ValueError:
        parser.error("--layouts takes WORKERSxSHARDS,... and --rss-seconds numbers, e.g. 1x1,2x8 and 10,60")
    if any(len(lay) != 2 or min(lay) < 1 for lay in args.layouts):
        parser.error(f"bad --layouts {args.layouts}")
    return args


def prepare_models(root: Path, full_size: bool) -> str:
    """Generate the stand-ins unless ``root`` holds them (or real weights); return what it holds."""
    marker = root / MARKER
    if not marker.exists() and root.is_dir() and any(root.iterdir()):
        logger.info("%s has no stand-in marker: using the weights found there", root)
        return "as found"
    if marker.exists() and ("full_size=1" in marker.read_text()) != full_size:
        raise SystemExit(
            f"{root} holds {'tiny' if full_size else 'full-size'} stand-ins; pick another --models"
        )
    ensure_tiny_models(root, full_size=full_size)
    return "random full-size" if full_size else "random tiny"


def write_speech(path: Path, frames: int, fps: Fraction) -> Path:
    """A speech-like 16 kHz WAV whose length gives exactly ``frames`` output frames at ``fps``."""
    samples = -(-frames * SAMPLE_RATE * fps.denominator // fps.numerator)  # ceil(frames / fps * 16000)
    sf.write(path, speech_like(samples / SAMPLE_RATE), SAMPLE_RATE, subtype="PCM_16")
    return path


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU {platform.processor() or platform.machine()} ({torch.get_num_threads()} threads)"


def pipeline_config(args: argparse.Namespace, weights: str) -> PipelineConfig:
    return PipelineConfig(
        models_dir=str(args.models),
        tiny=weights != "as found",
        device=args.device,
        dtype=args.dtype,
        batch_size=args.batch_size,
        threads=args.threads,
        face=FaceConfig(detector=args.detector, crop=args.crop),
        enhance=EnhanceConfig(enabled=args.enhance > 0, upscale=max(args.enhance, 1)),
    )


def run(args: argparse.Namespace) -> dict:
    weights = prepare_models(args.models, args.full_size)
    cfg = pipeline_config(args, weights)
    check_weights(cfg)
    common = environment(resolve_device(cfg.device), args, weights)
    if args.clip == "demo":
        return {**common, **run_demo(args, cfg)}
    media_dir = args.media or Path("media/bench")
    media = ensure_bench_media(media_dir, args.seconds)
    extra = args.overrides
    runs = [
        run_pool(cfg, media.video, media.audio, workers, shards, extra=extra)
        for workers, shards in args.layouts
    ]
    rss = []
    for seconds in args.rss_seconds:
        clip = ensure_bench_media(media_dir, seconds)
        shards = math.ceil(clip.frames / args.rss_shard_length) if args.rss_shard_length > 0 else 1
        rss.append({"seconds": seconds, **run_pool(cfg, clip.video, clip.audio, 1, shards, extra=extra)})
    first = runs[0]
    paste_ms = time_paste()
    return {
        **common,
        "clip": str(media.video),
        "frames": first["frames"],
        "face_frames": first["face_frames"],
        "wall_seconds": first["wall_seconds"],
        "fps": first["fps"],
        "stage_seconds": first["stage_seconds"],
        "peak_cuda_memory_mib": first["peak_cuda_memory_mib"],
        "paste_ms_1080p_one_thread": paste_ms,
        "runs": runs,
        "rss_runs": rss,
        "driver_peak_rss_mib": round(_maxrss_mib(resource.RUSAGE_SELF), 1),
    }


def environment(device: torch.device, args: argparse.Namespace, weights: str) -> dict:
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "-uno"], capture_output=True, text=True
        ).stdout
        commit += "+dirty" if dirty.strip() else ""
    except (OSError, subprocess.CalledProcessError):
        commit = "unknown"
    return {
        "device": device_name(device),
        "commit": commit,
        "overrides": list(args.overrides),
        "date": date.today().isoformat(),
        "load_average": [round(v, 2) for v in os.getloadavg()],
        "cpu_count": os.cpu_count(),
        "dtype": args.dtype,
        "compute_dtype": str(resolve_dtype(args.dtype, device)).removeprefix("torch."),
        "weights": weights,
        "models_dir": str(args.models),
        "batch_size": args.batch_size,
        "threads": args.threads or torch.get_num_threads(),
        "detector": args.detector,
        "crop": args.crop,
        "enhance": args.enhance,
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "transformers": transformers.__version__,
    }


def _maxrss_mib(who: int) -> float:
    return resource.getrusage(who).ru_maxrss / 1024  # Linux: KiB


def job_overrides(cfg: PipelineConfig) -> list[str]:
    """The Hydra overrides that give a job ``cfg``'s pipeline settings."""
    out = [
        f"models.dir={Path(cfg.models_dir).resolve()}",
        f"models.tiny={str(cfg.tiny).lower()}",
        f"render.device={cfg.device}",
        f"render.dtype={cfg.dtype}",
        f"render.batch_size={cfg.batch_size}",
        f"face.detector={cfg.face.detector}",
        f"face.crop={cfg.face.crop}",
    ]
    if cfg.threads:
        out.append(f"render.threads={cfg.threads}")
    if cfg.enhance.enabled:
        out += ["enhance=gfpgan", f"enhance.upscale={cfg.enhance.upscale}"]
    return out


def run_pool(
    cfg: PipelineConfig,
    video: Path,
    audio: Path,
    workers: int,
    shards: int,
    prep_length: int = ShardsConfig.prep_length,
    extra: list[str] = (),
) -> dict:
    """Render ``video`` + ``audio`` with the real driver on a fresh Ray pool of ``workers`` workers (on a
    GPU, packed onto it: ``gpus_per_worker = 1 / workers``), the output cut into ``shards`` shards and the
    preparation into units of ``prep_length`` source frames; no avatar cache, so every run does all the
    work. Model loading is not timed (``render_seconds``); worker CPU seconds count from the end of
    loading, ffmpeg children included. ``extra``: more Hydra overrides (they win)."""
    from cluster.config import compose_job
    from cluster.driver import run_job
    from cluster.pool import warm_pools

    _, _, plan = plan_job(video, audio, shard_frames=1)
    shard_frames = math.ceil(plan.output_frames / shards)
    gpu = resolve_device(cfg.device).type == "cuda"
    with tempfile.TemporaryDirectory(prefix="musetalk-bench-") as tmp:
        job = compose_job(
            [
                "+task=test",
                f"task.video={video.resolve()}",
                f"task.audio={audio.resolve()}",
                f"task.output={Path(tmp) / 'out.mp4'}",
                "task.make_demo=false",
                *job_overrides(cfg),
                "cache.enabled=false",
                "output.qa=false",
                "output.summary=false",
                "output.resume=false",
                f"shards.length={shard_frames}",
                f"shards.prep_length={prep_length}",
                f"cluster.workers={workers}",
                *([f"cluster.gpus_per_worker={1 / workers:.6g}"] if gpu else []),
                *extra,
            ]
        )
        warm_pools().discard(
            graceful=True
        )  # fresh worker processes: their CPU seconds and peak RSS are this run's
        summary = run_job(job)
        per_worker = warm_pools().pool.worker_info()
        warm_pools().discard(graceful=True)
    stage_sum = sum(summary.stage_seconds.values())
    cuda = [w["peak_cuda_mib"] for w in per_worker if w.get("peak_cuda_mib") is not None]
    return {
        "host_cpu": host_cpu(summary, per_worker),
        "workers": workers,
        "shards": summary.shards,
        "prep_units": sum(w["prep_units"] for w in per_worker),
        "frames": summary.frames,
        "face_frames": summary.face_frames,
        "detections": summary.detections,
        "vae_encodes": summary.vae_encodes,
        "wall_seconds": round(summary.render_seconds, 3),
        "fps": summary.render_fps,
        "stage_seconds": {k: round(v, 3) for k, v in summary.stage_seconds.items()},
        "worker_wall_seconds": summary.busy_seconds,
        "stage_sum_seconds": round(stage_sum, 3),
        "overlap_ratio": round(stage_sum / summary.busy_seconds, 3) if summary.busy_seconds else None,
        "worker_cpu_seconds": round(sum(w["cpu_seconds"] for w in per_worker), 3),
        "per_worker": [
            {k: w[k] for k in ("name", "units", "prep_units", "cpu_seconds", "peak_rss_mib", "memory_mib")}
            for w in per_worker
        ],
        "worker_peak_rss_mib": round(max(w["peak_rss_mib"] for w in per_worker), 1),
        "peak_cuda_memory_mib": round(max(cuda), 1) if cuda else None,
    }


def host_cpu(summary, per_worker: list[dict]) -> dict:
    """CPU milliseconds per output frame that a GPU node would still pay on its CPU: the workers' CPU outside
    model calls (thread CPU time inside every network forward and the Haar cascade subtracted), split by
    stage, with the encoder apart (the ffmpeg children plus the thread that feeds them).

    ``stages``: each stage's thread CPU outside model calls; ``outside_models_and_encoder``: their sum
    without ``encode``; ``encoder``: ``encode`` + the ffmpeg children; ``process_outside_models_and_encoder``:
    the worker processes' whole CPU (every thread: libav's decoder threads, Ray, queues) less model calls
    and the encoder, ``unattributed`` the part of it no stage clock saw; ``model``: inside model calls."""
    frames = max(summary.frames, 1)

    def ms(seconds: float) -> float:
        return round(seconds * 1000 / frames, 3)

    stages = summary.host_cpu_seconds
    children = sum(w.get("child_cpu_seconds", 0.0) for w in per_worker)
    own = sum(w["cpu_seconds"] for w in per_worker) - children
    model = sum(summary.model_cpu_seconds.values())
    outside = sum(v for k, v in stages.items() if k != "encode")
    process = own - model - stages.get("encode", 0.0)
    return {
        "unit": "CPU ms per output frame",
        "outside_models_and_encoder": ms(outside),
        "encoder": ms(stages.get("encode", 0.0) + children),
        "encoder_children": ms(children),
        "process_outside_models_and_encoder": ms(process),
        "unattributed": ms(process - outside),
        "model": ms(model),
        "stages": {k: ms(v) for k, v in stages.items()},
        "model_stages": {k: ms(v) for k, v in summary.model_cpu_seconds.items() if v > 0},
    }


def time_paste(repeats: int = 30) -> dict:
    """Milliseconds (wall, and this thread's CPU: load-proof) per 1080p paste on ONE CPU thread (cv2 and torch set to 1 thread), a 540x600 px face box
    with a face-parsing-like mask: upstream-exact reference, the numpy path and the torch path on CPU."""
    import cv2
    import numpy as np

    from musetalk.blending import blend_square, fit_face, make_material, paste_face
    from musetalk.composite import DeviceCompositor, active_rect, paste_numpy
    from musetalk.config import BlendConfig

    threads, cv_threads = torch.get_num_threads(), cv2.getNumThreads()
    torch.set_num_threads(1)
    cv2.setNumThreads(1)
    try:
        rng = np.random.default_rng(0)
        frame = rng.integers(0, 256, (1080, 1920, 3), dtype=np.uint8)
        face = rng.integers(0, 256, (256, 256, 3), dtype=np.uint8)
        box = (690, 260, 1230, 860)
        square, _ = blend_square(box, 1.5)
        region = np.zeros((512, 512), np.uint8)
        region[120:460, 90:420] = 255
        mask = make_material(region, box, square, BlendConfig()).mask
        rect = active_rect(box, square, mask, frame.shape[:2])
        compositor = DeviceCompositor(torch.device("cpu"))
        mask_t, face_t = torch.from_numpy(mask.copy()), torch.from_numpy(face)
        work = frame.copy()
        cases = {
            "reference": lambda: paste_face(frame, fit_face(face, box), box, square, mask),
            "numpy": lambda: paste_numpy(work, face, box, square, mask, rect),
            "torch_cpu": lambda: compositor.paste(torch.from_numpy(work), face_t, box, square, mask_t, rect),
        }
        out = {}
        for name, fn in cases.items():
            fn()
            start, cpu = time.perf_counter(), time.thread_time()
            for _ in range(repeats):
                fn()
            out[f"{name}_wall"] = round((time.perf_counter() - start) / repeats * 1000, 2)
            out[f"{name}_cpu"] = round((time.thread_time() - cpu) / repeats * 1000, 2)
        return out
    finally:
        torch.set_num_threads(threads)
        cv2.setNumThreads(cv_threads)


def run_demo(args: argparse.Namespace, cfg: PipelineConfig) -> dict:
    device = resolve_device(cfg.device)
    with tempfile.TemporaryDirectory(prefix="musetalk-bench-") as tmp:
        work = Path(tmp)
        demo = ensure_demo_media(args.media or work / "media")
        start = time.perf_counter()
        pipeline = FramePipeline(cfg)
        load_seconds = time.perf_counter() - start
        warm = args.warmup_frames or args.batch_size
        logger.info("warm-up: %d frames (not timed)", warm)
        start = time.perf_counter()
        render_local(
            demo.video,
            write_speech(work / "warm.wav", warm, demo.fps),
            work / "warm.mp4",
            cfg,
            pipeline=pipeline,
        )
        warmup_seconds = time.perf_counter() - start
        audio = write_speech(work / "speech.wav", args.frames, demo.fps)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
            torch.cuda.reset_peak_memory_stats(device)
        logger.info("timing %d frames", args.frames)
        start = time.perf_counter()
        result = render_local(demo.video, audio, work / "out.mp4", cfg, pipeline=pipeline)
        wall = time.perf_counter() - start
    frames = result.plan.output_frames
    if not any(st.face_frames for st in result.stats):
        logger.warning(
            "no face found: nothing was generated (a random-weight S3FD finds none; use --detector haar)"
        )
    every = [*result.stats, *result.prep]
    stage_seconds = stage_totals(every)
    return {
        "clip": "demo",
        "frames": frames,
        "face_frames": sum(st.face_frames for st in result.stats),
        "source_frames_decoded": sum(st.decoded_frames for st in result.stats),
        "load_seconds": round(load_seconds, 3),
        "warmup_seconds": round(warmup_seconds, 3),
        "wall_seconds": round(wall, 4),
        "fps": round(frames / wall, 3),
        "stage_seconds": {s: round(v, 6) for s, v in stage_seconds.items()},
        "stage_fps": {s: round(frames / v, 3) if v > 0 else None for s, v in stage_seconds.items()},
        "worker_wall_seconds": round(sum(st.wall_seconds for st in every), 4),
        "stage_sum_seconds": round(sum(stage_seconds.values()), 4),
        "peak_cuda_memory_mib": (
            round(torch.cuda.max_memory_allocated(device) / 2**20, 1) if device.type == "cuda" else None
        ),
    }


def table(res: dict) -> str:
    lines = [
        f"{res['device']} | {res['dtype']} (computes {res['compute_dtype']}) | batch {res['batch_size']} | "
        f"{res['weights']} weights | {res['detector']}+{res['crop']} | enhance {res['enhance']} | "
        f"commit {res['commit']} | {res['date']} | load {res['load_average']}"
        + (f" | {' '.join(res['overrides'])}" if res.get("overrides") else ""),
    ]
    if res["clip"] == "demo":
        lines.append(
            f"demo: {res['frames']} frames ({res['face_frames']} with a face) in {res['wall_seconds']:.2f} s: "
            f"{res['fps']:.2f} fps; stage sum {res['stage_sum_seconds']:.2f} s over worker wall "
            f"{res['worker_wall_seconds']:.2f} s"
        )
        lines += [f"  {k:<14}{v:>10.3f}" for k, v in res["stage_seconds"].items()]
        return "\n".join(lines)
    lines.append(f"clip {res['clip']}: {res['frames']} frames ({res['face_frames']} with a face)")
    stages = list(res["stage_seconds"])
    head = f"{'workers x shards':<18}{'fps':>8}{'wall s':>9}{'wkr wall':>9}{'stage sum':>10}{'ratio':>7}"
    head += f"{'cpu s':>9}{'wkr RSS':>9}" + "".join(f"{k[:9]:>10}" for k in stages)
    lines.append(head)
    for run in res["runs"] + res["rss_runs"]:
        name = f"{run['workers']} x {run['shards']}" + (
            f" ({run['seconds']:g} s)" if "seconds" in run else ""
        )
        row = f"{name:<18}{run['fps']:>8.2f}{run['wall_seconds']:>9.1f}{run['worker_wall_seconds']:>9.1f}"
        row += (
            f"{run['stage_sum_seconds']:>10.1f}{run['overlap_ratio']:>7.2f}{run['worker_cpu_seconds']:>9.1f}"
        )
        row += f"{run['worker_peak_rss_mib']:>9.0f}" + "".join(
            f"{run['stage_seconds'][k]:>10.2f}" for k in stages
        )
        lines.append(row)
    for run in res["runs"]:
        cpu = run["host_cpu"]
        lines.append(
            f"{run['workers']} x {run['shards']}: host CPU ms/frame outside model calls: "
            f"{cpu['outside_models_and_encoder']:.2f} by stage clocks ({cpu['process_outside_models_and_encoder']:.2f} "
            f"whole worker processes), encoder {cpu['encoder']:.2f}, model calls {cpu['model']:.2f}; by stage: "
            + ", ".join(f"{k} {v:.2f}" for k, v in cpu["stages"].items() if v > 0)
        )
    lines.append(f"driver peak RSS {res['driver_peak_rss_mib']:.0f} MiB")
    lines.append(f"1080p paste, one CPU thread, ms/frame: {res['paste_ms_1080p_one_thread']}")
    if res["peak_cuda_memory_mib"] is not None:
        lines.append(f"peak CUDA memory: {res['peak_cuda_memory_mib']:.0f} MiB")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    res = run(args)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(res, indent=2) + "\n")
    logger.info("wrote %s", args.out)
    print(table(res))
    return res


if __name__ == "__main__":
    main()
