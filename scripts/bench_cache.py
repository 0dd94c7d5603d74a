"""Avatar cache speed-up: the same video rendered twice with different audio, on one warm Ray pool.

    python -m scripts.bench_cache --models models/tiny [--video V] [--seconds 4] [--out outputs/bench_cache.json]

The first render prepares every shown source frame and fills a fresh cache; the second, with other speech
of the same length, reads them. Both run on the same warm pool (no model loading in either), so the
difference is the preparation phase. Prints a table and writes JSON: per render, seconds without model
loading, per-stage seconds, detections, VAE encodes, parsings and cache hits.
"""

from __future__ import annotations

import argparse
import json
import logging
import tempfile
from pathlib import Path

import numpy as np
import soundfile as sf

from cluster.config import compose_job
from musetalk.testing.demo_media import ensure_demo_media, speech_like

logger = logging.getLogger(__name__)


def _speech(path: Path, seconds: float, shift: int) -> Path:
    sf.write(path, np.roll(speech_like(seconds), shift), 16000, subtype="PCM_16")
    return path


def run(video: Path, models: Path, seconds: float, overrides: list[str]) -> dict:
    from cluster.driver import run_job

    rows = []
    with tempfile.TemporaryDirectory(prefix="musetalk-bench-cache-") as tmp:
        work = Path(tmp)
        for n, shift in enumerate((0, 12345)):
            job = compose_job(
                [
                    "+task=test",
                    "models=tiny",
                    f"models.dir={models}",
                    f"task.video={video}",
                    f"task.audio={_speech(work / f'speech{n}.wav', seconds, shift)}",
                    f"task.output={work / f'out{n}.mp4'}",
                    "task.make_demo=false",
                    f"cache.dir={work / 'avatars'}",
                    "output.qa=false",
                    *overrides,
                ]
            )
            s = run_job(job)
            rows.append(
                {
                    "render": "first (fills the cache)" if n == 0 else "second (other audio)",
                    "frames": s.frames,
                    "render_seconds": s.render_seconds,
                    "render_fps": s.render_fps,
                    "model_loads": s.model_loads,
                    "stage_seconds": s.stage_seconds,
                    "detections": s.detections,
                    "vae_encodes": s.vae_encodes,
                    "parsings": s.parsings,
                    "cache_hits": s.cache_hits,
                }
            )
    first, second = rows
    return {
        "video": str(video),
        "renders": rows,
        "speedup": round(first["render_seconds"] / second["render_seconds"], 2),
    }


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", type=Path, default=Path("models/tiny"))
    parser.add_argument("--video", type=Path, help="default: the demo clip (built in a temporary directory)")
    parser.add_argument("--seconds", type=float, default=4.0, help="speech length of each render")
    parser.add_argument("--out", type=Path, default=Path("outputs/bench_cache.json"))
    parser.add_argument("overrides", nargs="*", help="Hydra overrides for both renders")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    with tempfile.TemporaryDirectory(prefix="musetalk-bench-media-") as media:
        video = args.video or ensure_demo_media(Path(media)).video
        result = run(video.resolve(), args.models.resolve(), args.seconds, args.overrides)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))
    print(f"{'render':<26}{'seconds':>9}{'fps':>8}{'detect':>8}{'vae':>6}{'parse':>7}{'hits':>6}  stages")
    for r in result["renders"]:
        stages = ", ".join(f"{k} {v:.1f}" for k, v in r["stage_seconds"].items() if v > 0)
        print(
            f"{r['render']:<26}{r['render_seconds']:>9.1f}{r['render_fps']:>8.2f}{r['detections']:>8}"
            f"{r['vae_encodes']:>6}{r['parsings']:>7}{r['cache_hits']:>6}  {stages}"
        )
    print(f"second render: {result['speedup']}x faster")
    return result


if __name__ == "__main__":
    main()
