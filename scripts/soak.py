"""Soak benchmark: many short jobs through ``cluster.driver.run_jobs`` on one warm pool, workers killed.

``python -m scripts.soak --jobs 200 --kill-every 20 --out soak/``

Jobs are the demo clip cut to a few lengths with a few audio lengths, and some deliberately bad ones (a
missing video, an audio file without samples, a text file as audio). The first ``--kill-free`` jobs run
without faults; from then on, every ``--kill-every`` jobs a worker (chosen by ``--seed``) is killed with
SIGKILL in the middle of a job, by the pid the pool's workers report. After every job the script records
the driver's RSS and open file descriptors, each live worker's RSS, the object store's bytes in use,
our worker scratch (``musetalk-job-*``) and staging bytes, live Ray actors and the driver's descendant
processes; the avatar cache's size apart (it grows by design: one entry set per new video). Every good
output is verified (frame count, duration) and deleted with its kept segments; every bad job must have
failed with one line.

The report (``soak.json`` and ``soak.md`` in ``--out``) gives each figure's growth per 100 jobs after the
first ``--warmup`` jobs: the least-squares slope over those jobs, times 100, relative to the figure's
median there. Exit status 1 when an output is wrong, a bad job did not fail with one line, or actors or
processes leaked.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import random
import signal
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import psutil
import soundfile as sf

logger = logging.getLogger("scripts.soak")

FIGURES = ["driver_rss", "worker_rss", "object_store_bytes", "driver_fds", "disk_bytes"]


@dataclass(frozen=True)
class SoakJob:
    name: str
    video: Path
    audio: Path
    frames: int | None  # expected output frames; None: a bad job that must fail


def _cut_video(src: Path, dst: Path, frames: int) -> Path:
    from shards.ffmpeg import run_ffmpeg

    if not dst.exists():
        run_ffmpeg(["-y", "-i", str(src), "-frames:v", str(frames), "-an", "-c:v", "libx264",
                    "-preset", "ultrafast", "-pix_fmt", "yuv420p", str(dst)], what="cutting the soak clip")  # fmt: skip
    return dst


def make_media(root: Path, demo_dir: Path) -> tuple[list[tuple[Path, Path, int]], list[tuple[Path, Path]]]:
    """(good (video, audio, output frames at 25 fps) triples, bad (video, audio) pairs) under ``root``."""
    from musetalk.testing.demo_media import ensure_demo_media
    from shards.probe import load_audio

    demo = ensure_demo_media(demo_dir)
    root.mkdir(parents=True, exist_ok=True)
    videos = [_cut_video(demo.video, root / f"clip{n}.mp4", n) for n in (12, 20, 30)]
    samples = load_audio(demo.audio)
    audios = []
    for ms in (200, 400, 600):
        path = root / f"voice{ms}.wav"
        if not path.exists():
            sf.write(path, samples[: ms * 16], 16000, subtype="PCM_16")
        audios.append((path, ms * 25 // 1000))
    good = [(v, a, s) for v in videos for a, s in audios]
    silent = root / "silent.wav"
    sf.write(silent, np.zeros(0, dtype=np.float32), 16000, subtype="PCM_16")
    text = root / "notes.wav"
    text.write_text("not audio")
    bad = [(root / "missing.mp4", audios[0][0]), (videos[0], silent), (videos[0], text)]
    return good, bad


def plan_jobs(count: int, good, bad, seed: int, bad_every: int) -> list[SoakJob]:
    rng = random.Random(seed)
    jobs = []
    for i in range(count):
        if bad_every and i % bad_every == bad_every - 1:
            video, audio = bad[(i // bad_every) % len(bad)]
            jobs.append(SoakJob(f"job{i:04d}", video, audio, None))
            continue
        video, audio, frames = rng.choice(good)
        jobs.append(SoakJob(f"job{i:04d}", video, audio, frames))
    return jobs


def _job_config(job: SoakJob, models: Path, out: Path, cache: Path, overrides: list[str]):
    from cluster.config import compose_job

    return compose_job(
        [
            "+task=test",
            "models=tiny",
            f"models.dir={models}",
            f"task.video={job.video}",
            f"task.audio={job.audio}",
            f"task.output={out / job.name}.mp4",
            "task.make_demo=false",
            "face.crop=box",
            "render.threads=1",
            "render.batch_size=4",
            "output.qa=false",
            f"cache.dir={cache}",
            *overrides,
        ]
    )


def _bytes_under(paths) -> int:
    total = 0
    for p in paths:
        for f in [p] if p.is_file() else p.rglob("*"):
            try:
                total += f.stat().st_size if f.is_file() else 0
            except OSError:
                continue
    return total


def _object_store_bytes() -> int:
    import ray
    from ray._private.internal_api import get_memory_info_reply, get_state_from_address

    state = get_state_from_address(ray.get_runtime_context().gcs_address)  # this session's, not another's
    return int(get_memory_info_reply(state).store_stats.object_store_bytes_used)


def _live_actors() -> int:
    import ray._private.state

    return sum(a["State"] == "ALIVE" for a in ray._private.state.actors().values())


def _worker_pids() -> list[int]:
    from cluster.pool import warm_pools

    pool = warm_pools().pool
    if pool is None:
        return []
    return [int(w["name"].split(":")[1]) for w in pool.worker_info()]


def measure(staging: Path, cache: Path) -> dict:
    me = psutil.Process()
    workers = {}
    for pid in _worker_pids():
        try:
            workers[pid] = psutil.Process(pid).memory_info().rss
        except psutil.NoSuchProcess:
            continue
    tmp = Path(tempfile.gettempdir())
    return {
        "driver_rss": me.memory_info().rss,
        "worker_rss": workers,
        "object_store_bytes": _object_store_bytes(),
        "driver_fds": len(os.listdir("/proc/self/fd")),
        "scratch_bytes": _bytes_under(tmp.glob("musetalk-job-*")),
        "staging_bytes": _bytes_under([staging]) if staging.exists() else 0,
        "cache_bytes": _bytes_under([cache]) if cache.exists() else 0,
        "actors": _live_actors(),
        "processes": len(me.children(recursive=True)),
    }


def verify(job: SoakJob, result) -> str | None:
    """What is wrong with a job's result, or None."""
    from shards.probe import probe_video

    if job.frames is None:
        if result.error is None:
            return "a bad job succeeded"
        text = str(result.error)
        return None if text and "\n" not in text else f"a bad job failed with {text!r}, not one line"
    if result.error is not None:
        return f"failed: {result.error}"
    info = probe_video(Path(result.summary.output))
    if info.frame_count != job.frames:
        return f"{info.frame_count} frames, expected {job.frames}"
    duration = float(info.frame_count / info.fps)
    if abs(duration - job.frames / 25) > 1e-6:
        return f"{duration:.3f} s, expected {job.frames / 25:.3f} s"
    return None


def growth(series: list[float], warmup: int) -> float | None:
    """Least-squares slope over jobs ``warmup``.. per 100 jobs, in % of the median there."""
    ys = series[warmup:]
    if len(ys) < 3:
        return None
    xs = np.arange(len(ys), dtype=float)
    slope = float(np.polyfit(xs, np.asarray(ys, dtype=float), 1)[0])
    base = statistics.median(ys)
    return 100.0 * slope * 100 / base if base else 0.0


def report(records: list[dict], warmup: int, args, problems: list[str]) -> dict:
    def column(key: str) -> list[float]:
        if key == "worker_rss":  # the mean of the live workers: each worker's own lifetime series is kept
            return [statistics.fmean(r["worker_rss"].values()) if r["worker_rss"] else 0 for r in records]
        if key == "disk_bytes":
            return [r["scratch_bytes"] + r["staging_bytes"] for r in records]
        return [r[key] for r in records]

    figures = {}
    for key in [*FIGURES, "cache_bytes", "actors", "processes"]:
        ys = column(key)
        figures[key] = {
            "first": ys[0] if ys else None,
            "at_warmup": ys[min(warmup, len(ys) - 1)] if ys else None,
            "last": ys[-1] if ys else None,
            "growth_pct_per_100_jobs": growth(ys, warmup),
        }
    lifetimes: dict[str, list[int]] = {}
    for r in records:
        for pid, rss in r["worker_rss"].items():
            lifetimes.setdefault(str(pid), []).append(rss)
    return {
        "command": args.command,
        "jobs": len(records),
        "warmup": warmup,
        "kills": sum(r["killed"] is not None for r in records),
        "figures": figures,
        "worker_lifetimes": {
            pid: {"jobs": len(v), "first": v[0], "last": v[-1], "growth_pct_per_100_jobs": growth(v, 0)}
            for pid, v in lifetimes.items()
        },
        "problems": problems,
        "records": records,
    }


def markdown(rep: dict) -> str:
    def fmt(v) -> str:
        if v is None:
            return "-"
        return f"{v:+.2f} %" if isinstance(v, float) else str(v)

    lines = [
        f"`{rep['command']}`: {rep['jobs']} jobs, {rep['kills']} worker kills, growth after the first "
        f"{rep['warmup']} jobs (least-squares slope per 100 jobs, % of the median)",
        "",
        "| figure | at job 0 | at warm-up | last | growth per 100 jobs |",
        "|---|---|---|---|---|",
    ]
    for key, f in rep["figures"].items():
        lines.append(
            f"| {key} | {f['first']} | {f['at_warmup']} | {f['last']} | {fmt(f['growth_pct_per_100_jobs'])} |"
        )
    lines += ["", f"problems: {len(rep['problems'])}", *[f"- {p}" for p in rep["problems"]]]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m scripts.soak", description=__doc__.split("\n\n")[0])
    parser.add_argument("--jobs", type=int, default=200)
    parser.add_argument("--kill-every", type=int, default=20, help="kill a worker every M jobs (0: never)")
    parser.add_argument("--kill-free", type=int, default=20, help="jobs before the first kill")
    parser.add_argument("--warmup", type=int, default=20, help="jobs left out of the growth figures")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--report-every", type=int, default=10, help="write the report every N jobs too")
    parser.add_argument("--bad-every", type=int, default=7, help="every Nth job is a bad one (0: none)")
    parser.add_argument("--out", type=Path, default=Path("soak"))
    parser.add_argument("--models", type=Path, help="tiny models directory (default: <out>/models)")
    parser.add_argument("--demo", type=Path, help="demo media directory (default: <out>/demo)")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides for every job (cluster.workers=2 ...)")
    args = parser.parse_args(argv)
    args.command = "python -m scripts.soak " + " ".join(argv if argv is not None else sys.argv[1:])
    logging.basicConfig(level=logging.WARNING, format="[%(asctime)s][%(name)s][%(levelname)s] - %(message)s")
    logger.setLevel(logging.INFO)

    from cluster.clean import clean
    from cluster.driver import run_jobs
    from cluster.pool import warm_pools
    from cluster.storage import staging_root
    from musetalk.testing.tiny_models import ensure_tiny_models

    out = args.out.resolve()
    media, outputs, cache = out / "media", out / "outputs", out / "cache"
    outputs.mkdir(parents=True, exist_ok=True)
    models = ensure_tiny_models((args.models or out / "models").resolve())
    good, bad = make_media(media, (args.demo or out / "demo").resolve())
    jobs = plan_jobs(args.jobs, good, bad, args.seed, args.bad_every)
    kill_free = min(args.kill_free, max(1, args.jobs // 2))
    warmup = min(args.warmup, max(0, args.jobs - 3))
    rng = random.Random(args.seed + 1)
    overrides = ["cluster.workers=2", *args.overrides]
    records, problems = [], []
    due = False  # a kill is due: it happens in the next good job (a bad job never reaches a worker)
    for i, job in enumerate(jobs):
        due = due or bool(args.kill_every and i >= kill_free and (i - kill_free) % args.kill_every == 0)
        victim, at = (None, None)
        if due and job.frames and (pids := _worker_pids()):
            victim, at, due = rng.choice(pids), rng.uniform(0.2, 0.8), False
        killed: list[int] = []

        def on_progress(p, victim=victim, at=at, killed=killed) -> None:
            if victim is not None and not killed and p.total and p.done >= at * p.total:
                os.kill(victim, signal.SIGKILL)
                killed.append(victim)

        started = time.perf_counter()
        cfg = _job_config(job, models, outputs, cache, overrides)
        (result,) = run_jobs([cfg], on_progress=on_progress)
        problem = verify(job, result)
        if problem:
            problems.append(f"{job.name} ({job.video.name}, {job.audio.name}): {problem}")
        for p in outputs.glob(f"{job.name}*"):
            p.unlink()
        clean(cfg.output)  # its kept segments too (python -m cluster.clean): disk growth is measured
        record = measure(staging_root(), cache)
        record.update(job=job.name, bad=job.frames is None, killed=killed[0] if killed else None,
                      seconds=round(time.perf_counter() - started, 3))  # fmt: skip
        records.append(record)
        logger.info(
            "%s %s in %.1f s: driver %.0f MiB, %d fds, store %d B, %d actors, %d processes%s",
            job.name,
            "failed as it should"
            if job.frames is None and not problem
            else ("ok" if not problem else problem),
            record["seconds"],
            record["driver_rss"] / 2**20,
            record["driver_fds"],
            record["object_store_bytes"],
            record["actors"],
            record["processes"],
            f", killed worker {killed[0]}" if killed else "",
        )
        if args.report_every and len(records) % args.report_every == 0:  # a long run reports as it goes
            partial = report(records, min(warmup, max(0, len(records) - 3)), args, problems)
            (out / "soak.json").write_text(json.dumps(partial, indent=1))
            (out / "soak.md").write_text(markdown(partial))
    pool = warm_pools().pool
    size = pool.size if pool is not None else 0
    tail = records[warmup:]
    if tail and min(r["actors"] for r in tail[-3:]) > size:
        problems.append(f"live actors {tail[-1]['actors']} > pool size {size}: leaked actors")
    # Ray starts and reaps idle workers on its own (one more or less at any moment): a leak is a count
    # that stays above what it was after warm-up
    if tail and min(r["processes"] for r in tail[-3:]) > max(r["processes"] for r in tail[:3]):
        problems.append(
            f"the driver's descendant processes went from {tail[0]['processes']} to {tail[-1]['processes']}"
        )
    rep = report(records, warmup, args, problems)
    (out / "soak.json").write_text(json.dumps(rep, indent=1))
    (out / "soak.md").write_text(markdown(rep))
    print(markdown(rep))
    return 1 if problems else 0


if __name__ == "__main__":
    raise SystemExit(main())
