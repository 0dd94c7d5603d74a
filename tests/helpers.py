"""Small helpers shared by tests (imported as ``tests.helpers``)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import soundfile as sf
from hydra import compose, initialize_config_dir

from cluster.config import CONF_DIR, JobConfig, job_from_config
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
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose(
            "config",
            overrides=[
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
            ],
        )
    return job_from_config(cfg)


def busy_workers() -> list:
    """psutil Processes of Ray RenderWorker actors that are executing a render call right now."""
    import psutil

    found = []
    for proc in psutil.process_iter(["cmdline"]):
        cmdline = " ".join(proc.info.get("cmdline") or [])
        if cmdline.startswith("ray::RenderWorker.render"):
            found.append(proc)
    return found


def wait_for(predicate, timeout: float = 120.0, interval: float = 0.2):
    """Poll ``predicate`` until it returns something truthy; fail the test after ``timeout`` seconds."""
    import time

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"condition not met within {timeout} s")
