"""Small helpers shared by tests (imported as ``tests.helpers``)."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import soundfile as sf

from cluster.config import REPO_ROOT, JobConfig, compose_job
from shards.decode import read_frames
from shards.probe import load_audio, probe_video


def decode_all(path: Path) -> list[np.ndarray]:
    info = probe_video(path)
    return list(read_frames(info, 0, info.frame_count))


def assert_same_frames(expected: list[np.ndarray], path: Path) -> None:
    """Decoded frames of ``path`` equal ``expected`` bit for bit, with the same count."""
    got = decode_all(path)
    assert len(got) == len(expected)
    for t, (a, b) in enumerate(zip(expected, got, strict=True)):
        assert np.array_equal(a, b), f"frame {t} of {path.name} differs from the single-shard render"


def trimmed_audio(src: Path, dst: Path, seconds: float) -> Path:
    """A WAV with the first ``seconds`` of ``src`` at 16 kHz."""
    samples = load_audio(src)[: int(seconds * 16000)]
    sf.write(dst, samples, 16000, subtype="PCM_16")
    return dst


def job_for(models: Path, video: Path, audio: Path, out: Path, *overrides: str) -> JobConfig:
    """The tiny-model test job composed from the real config, lossless, box crop."""
    return compose_job(
        [
            "+task=test",
            "models=tiny",
            f"models.dir={models}",
            f"task.video={video}",
            f"task.audio={audio}",
            f"task.output={out}",
            "task.make_demo=false",
            "output.lossless=true",
            "render.batch_size=4",
            "render.threads=1",
            "face.crop=box",
            *overrides,
        ]
    )


def held(hold: Path) -> list[tuple[str, int]]:
    """(shard name, worker pid) of every render blocked at the hold point (``MUSETALK_HOLD_DIR``)."""
    out = []
    for f in sorted(hold.glob("held-*")):
        name, pid = f.name.removeprefix("held-").rsplit("-", 1)
        out.append((name, int(pid)))
    return out


def cli_tmp() -> Path:
    """A fresh, short temp root for one CLI run (its TMPDIR: Ray files, worker scratch, processes)."""
    return Path(tempfile.mkdtemp(prefix="c"))


def demo_args(models: Path, video: Path, audio: Path, *overrides: str) -> list[str]:
    """The CLI arguments of a short tiny-model render of the demo video (box crop, 2 CPUs), then
    ``overrides`` (which win): the command-line twin of :func:`job_for`'s usual settings."""
    return [
        "+task=test",
        "models=tiny",
        f"models.dir={models}",
        f"task.video={video}",
        f"task.audio={audio}",
        "task.make_demo=false",
        "cluster.num_cpus=2",
        "face.crop=box",
        *overrides,
    ]


def cli(*args: str, tmp: Path, env: dict | None = None, wait: bool = True):
    """Run ``python -m cluster.render ARGS`` from the repository root with its own TMPDIR.

    Returns the CompletedProcess (``wait``) or the running Popen."""
    full_env = {**os.environ, "TMPDIR": str(tmp), **(env or {})}
    cmd = [sys.executable, "-m", "cluster.render", *args]
    if not wait:
        return subprocess.Popen(
            cmd, cwd=REPO_ROOT, env=full_env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
    return subprocess.run(cmd, cwd=REPO_ROOT, env=full_env, capture_output=True, text=True, timeout=1800)


def error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("error: ")]


def processes_under(tmp: Path) -> list:
    """Live processes started with TMPDIR=``tmp`` (a CLI run's Ray cluster and workers)."""
    import psutil

    found = []
    for proc in psutil.process_iter():
        try:
            if proc.environ().get("TMPDIR") == str(tmp) and proc.status() != psutil.STATUS_ZOMBIE:
                found.append(proc)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return found


def scratch_under(tmp: Path) -> list[Path]:
    """Worker scratch directories left under a temp root."""
    return sorted(tmp.glob("musetalk-job-*"))


def wait_for(predicate, timeout: float = 600.0, interval: float = 0.2):
    """Poll ``predicate`` until it returns something truthy; fail the test after ``timeout`` seconds
    (generous: a safety net against hangs on a loaded machine, not a timing assumption)."""
    import time

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"condition not met within {timeout} s")
