"""A batch driver killed with SIGKILL mid-batch: the same command again finishes every job.

Three jobs on one worker (``cluster.max_in_flight=1``): a (1 shard), b (4 shards), c (2 shards). Shards
0 and 1 of every job pass the hold point; b's third shard is held, and once b's first two segments are
in its run directory the driver is killed with SIGKILL (no handler, no atexit: what a crash or the OOM
killer leaves). The same command, same environment, then renders what is missing: b reuses its two
segments, every output equals its single-process render frame for frame (lossless), and nothing of
ours is left: no lock, no run directory, no worker scratch, no process of either run.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import pytest

from cluster.config import REPO_ROOT
from cluster.faults import HOLD_ENV
from cluster.rundir import run_dir_path
from musetalk.local import render_local
from musetalk.pipeline import FramePipeline
from tests.helpers import (
    assert_same_frames,
    cli_tmp,
    decode_all,
    held,
    job_for,
    processes_under,
    scratch_under,
    trimmed_audio,
    wait_for,
)

_SETTINGS = [
    "output.lossless=true",
    "render.batch_size=4",
    "render.threads=1",
    "face.crop=box",
    "shards.length=5",
    "cluster.workers=1",
    "cluster.max_in_flight=1",
    "cache.enabled=false",
]


@pytest.mark.slow
def test_sigkill_mid_batch_then_the_same_command_finishes_every_job(tiny_models, demo_media, tmp_path):
    seconds = {"a": 0.2, "b": 0.8, "c": 0.4}  # 5, 20 and 10 frames: 1, 4 and 2 shards
    audio = {n: trimmed_audio(demo_media.audio, tmp_path / f"{n}.wav", s) for n, s in seconds.items()}
    out = tmp_path / "results"
    out.mkdir()
    tasks = tmp_path / "tasks.csv"
    tasks.write_text(
        "video,audio,output\n" + "".join(f"{demo_media.video},{audio[n]},{out / n}.mp4\n" for n in seconds)
    )
    hold = tmp_path / "hold"
    hold.mkdir()
    for shard in ("shard_00000", "shard_00001"):
        (hold / f"release-{shard}").touch()
    tmp = cli_tmp()  # the same TMPDIR for both runs: the same command in the same environment
    cmd = [sys.executable, "-m", "cluster.batch", str(tasks), "--output-dir", str(out)]
    cmd += ["models=tiny", f"models.dir={tiny_models}", *_SETTINGS]
    env = {**os.environ, "TMPDIR": str(tmp)}

    first = subprocess.Popen(
        cmd,
        cwd=REPO_ROOT,
        env={**env, HOLD_ENV: str(hold)},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    segments = run_dir_path(out / "b.mp4") / "segments"
    try:
        wait_for(
            lambda: (
                first.poll() is not None
                or ("shard_00002" in [n for n, _ in held(hold)] and len(list(segments.glob("*.mkv"))) == 2)
            )
        )
    finally:
        first.send_signal(signal.SIGKILL)
    first.wait(60)
    assert first.returncode == -signal.SIGKILL
    kept = {n: len(list((run_dir_path(out / f"{n}.mp4") / "segments").glob("*.mkv"))) for n in seconds}
    assert kept["b"] == 2, kept

    again = subprocess.run(cmd, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=1800)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "Traceback" not in again.stderr, again.stderr[-3000:]
    reused = {n: json.loads((out / f"{n}.summary.json").read_text())["reused_shards"] for n in seconds}
    assert reused["b"] == 2
    assert all(reused[n] == kept[n] for n in seconds if kept[n]), (reused, kept)

    pipeline = None  # the same settings for every job: the models are loaded once for the references
    for n in seconds:
        job = job_for(tiny_models, demo_media.video, audio[n], tmp_path / "ref" / f"{n}.mp4", *_SETTINGS)
        pipeline = pipeline or FramePipeline(job.pipeline)
        ref = render_local(
            demo_media.video, audio[n], job.output, job.pipeline, encode=job.encode, pipeline=pipeline
        ).output
        assert_same_frames(decode_all(ref), out / f"{n}.mp4")

    left = sorted(p.name for p in out.iterdir() if p.name.endswith(".lock"))
    assert left == [], f"locks left: {left}"
    assert scratch_under(tmp) == []
    assert wait_for(lambda: not processes_under(tmp))
