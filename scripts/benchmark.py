"""Benchmark the per-frame pipeline on the bundled demo clip with random-weight models (no downloads).

``python -m scripts.benchmark [--models DIR] [--full-size|--tiny] [--frames 200] [--batch-size 8]
[--dtype float32] [--device auto] [--detector haar|s3fd] [--crop box|landmarks] [--enhance 0|1|2|4]
[--threads N] [--out outputs/benchmark.json]``

Builds the demo clip and a speech-like WAV lasting exactly ``--frames`` output frames (the 100-frame
video ping-pongs, so detection and VAE encoding run once per source frame, as in production), generates
the stand-in models if ``--models`` has none (full-size by default: the real architectures and compute),
loads a :class:`FramePipeline` once, renders a short warm-up (not timed), then times ``render_local``.
A random-weight S3FD finds no faces, so the default detector is the Haar cascade (with FAN landmarks).
A models directory without a stand-in marker (real weights) is used as it is.
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
import tempfile
import time
from fractions import Fraction
from pathlib import Path

import diffusers
import soundfile as sf
import torch
import transformers

from musetalk.config import EnhanceConfig, FaceConfig, PipelineConfig
from musetalk.device import resolve_device, resolve_dtype
from musetalk.pipeline import FramePipeline, check_weights, render_local, stage_totals
from scripts.make_demo_media import SAMPLE_RATE, ensure_demo_media, speech_like
from scripts.make_tiny_models import MARKER, ensure_tiny_models

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
    parser.add_argument("--media", type=Path, help="demo media dir (default: a temporary one)")
    parser.add_argument("--out", type=Path, default=Path("outputs/benchmark.json"))
    args = parser.parse_args(argv)
    if args.frames < 1 or args.batch_size < 1:
        parser.error("--frames and --batch-size must be positive")
    args.models = args.models or Path("models/fullsize" if args.full_size else "models/tiny")
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


def run(args: argparse.Namespace) -> dict:
    weights = prepare_models(args.models, args.full_size)
    cfg = PipelineConfig(
        models_dir=str(args.models),
        tiny=weights != "as found",
        device=args.device,
        dtype=args.dtype,
        batch_size=args.batch_size,
        threads=args.threads,
        face=FaceConfig(detector=args.detector, crop=args.crop),
        enhance=EnhanceConfig(enabled=args.enhance > 0, upscale=max(args.enhance, 1)),
    )
    check_weights(cfg)
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
    stage_seconds = stage_totals(result.stats)
    return {
        "device": device_name(device),
        "dtype": args.dtype,
        "compute_dtype": str(resolve_dtype(cfg.dtype, device)).removeprefix("torch."),
        "weights": weights,
        "models_dir": str(args.models),
        "batch_size": args.batch_size,
        "detector": args.detector,
        "crop": args.crop,
        "enhance": args.enhance,
        "frames": frames,
        "face_frames": sum(st.face_frames for st in result.stats),
        "source_frames_decoded": sum(st.decoded_frames for st in result.stats),
        "load_seconds": round(load_seconds, 3),
        "warmup_seconds": round(warmup_seconds, 3),
        "wall_seconds": round(wall, 4),
        "fps": round(frames / wall, 3),
        "stage_seconds": {s: round(v, 4) for s, v in stage_seconds.items()},
        "stage_fps": {s: round(frames / v, 3) if v > 0 else None for s, v in stage_seconds.items()},
        "peak_cuda_memory_mib": (
            round(torch.cuda.max_memory_allocated(device) / 2**20, 1) if device.type == "cuda" else None
        ),
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "transformers": transformers.__version__,
    }


def table(res: dict) -> str:
    lines = [
        f"{res['device']} | {res['dtype']} (computes {res['compute_dtype']}) | batch {res['batch_size']} | "
        f"{res['weights']} weights | {res['detector']}+{res['crop']} | enhance {res['enhance']}",
        f"{res['frames']} frames ({res['face_frames']} with a face) in {res['wall_seconds']:.2f} s: "
        f"{res['fps']:.2f} fps (load {res['load_seconds']:.1f} s, warm-up {res['warmup_seconds']:.1f} s)",
        f"{'stage':<14}{'seconds':>10}{'fps':>12}",
    ]
    for stage, seconds in res["stage_seconds"].items():
        fps = res["stage_fps"][stage]
        lines.append(f"{stage:<14}{seconds:>10.3f}{'-' if fps is None else f'{fps:.2f}':>12}")
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
