"""The preparation phase and the avatar cache, end to end on a real local Ray cluster with tiny models.

Each distinct source frame is detected and prepared once per job however it is sharded (ping-pong audio
longer than the video included), and a second render of the same video reuses the cache: no detection,
VAE encoding or face parsing, and the same output as a render without any cache.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import soundfile as sf

from cluster.driver import run_job
from musetalk.testing.demo_media import speech_like
from tests.helpers import (
    assert_same_frames,
    cli,
    cli_tmp,
    decode_all,
    demo_args,
    error_lines,
    job_for,
    processes_under,
    scratch_under,
    wait_for,
)


def _wav(path, seconds: float, seed: int = 0):
    samples = speech_like(seconds)
    if seed:
        samples = np.roll(samples, seed * 4000)
    sf.write(path, samples, 16000, subtype="PCM_16")
    return path


def _face_frames(demo_media, shown: range) -> int:
    return sum(1 for s in shown if s not in set(demo_media.no_face_frames))


@pytest.mark.slow
def test_preparation_work_is_once_per_distinct_source_frame(local_ray, tiny_models, demo_media, tmp_path):
    # 5.2 s over the 4 s clip: 130 output frames show source frames 0..99, then 99..70 again.
    audio = _wav(tmp_path / "long.wav", 5.2)
    runs = {
        "one shard": ("shards.length=1000", "shards.prep_length=1000", "cluster.cpu_workers=1"),
        "17-frame shards, 2 workers": ("shards.length=17", "shards.prep_length=24", "cluster.cpu_workers=2"),
    }
    summaries, frames = {}, {}
    for name, overrides in runs.items():
        out = tmp_path / f"{name.replace(' ', '_').replace(',', '')}.mp4"
        job = job_for(tiny_models, demo_media.video, audio, out, "cache.enabled=false", *overrides)
        summaries[name] = run_job(job)
        frames[name] = decode_all(out)
    faces = _face_frames(demo_media, range(100))
    for name, s in summaries.items():
        assert s.frames == 130
        assert (s.detections, s.vae_encodes, s.parsings, s.audio_segments) == (100, faces, faces, 1), name
        assert s.cache_hits == 0 and s.cache == ""
    assert summaries["17-frame shards, 2 workers"].shards == 8
    assert len(summaries["17-frame shards, 2 workers"].worker_frames) == 2
    one, many = frames.values()
    assert len(one) == len(many) == 130
    for t, (a, b) in enumerate(zip(one, many, strict=True)):
        assert np.array_equal(a, b), f"frame {t} depends on the sharding"


@pytest.mark.slow
def test_second_render_of_a_video_reuses_the_avatar_cache(
    local_ray, tiny_models, demo_media, short_audio, reference_frames, tmp_path
):
    cache = tmp_path / "avatars"
    first = job_for(
        tiny_models,
        demo_media.video,
        _wav(tmp_path / "other.wav", 2.4, seed=3),  # other speech, 60 frames: source frames 0..59
        tmp_path / "first.mp4",
        f"cache.dir={cache}",
        "shards.length=20",
    )
    s1 = run_job(first)
    assert s1.cache_hits == 0 and s1.cache == str(cache)
    assert s1.detections == 62  # 0..59 and the 2 frames box smoothing reads beyond them
    assert s1.vae_encodes == s1.parsings == _face_frames(demo_media, range(60))
    assert list(cache.iterdir()), "the cache holds the video"

    second = job_for(
        tiny_models,
        demo_media.video,
        short_audio,  # 2 s: source frames 0..49, all in the cache
        tmp_path / "second.mp4",
        f"cache.dir={cache}",
        "shards.length=20",
    )
    s2 = run_job(second)
    assert s2.cache_hits == 50
    assert (s2.detections, s2.vae_encodes, s2.parsings) == (0, 0, 0)
    assert s2.stage_seconds["detect"] == 0 and s2.stage_seconds["vae_encode"] == 0
    assert_same_frames(reference_frames, second.output)  # the no-cache, single-process render


def test_a_corrupt_cache_file_is_skipped_and_rebuilt(local_ray, tiny_models, demo_media, tmp_path):
    cache = tmp_path / "avatars"
    audio = _wav(tmp_path / "a.wav", 0.8)  # 20 frames
    job = job_for(tiny_models, demo_media.video, audio, tmp_path / "a.mp4", f"cache.dir={cache}")
    run_job(job)
    (chunk,) = cache.glob("*/p*/*.npz")
    chunk.write_bytes(b"not an npz")
    again = job_for(tiny_models, demo_media.video, audio, tmp_path / "b.mp4", f"cache.dir={cache}")
    s = run_job(again)
    assert s.cache_hits == 0 and s.vae_encodes == _face_frames(demo_media, range(20))
    assert_same_frames(decode_all(job.output), again.output)
    assert chunk.read_bytes()[:2] == b"PK", "the bad file was replaced by a good one"


def test_cli_cache_dir_naming_a_file_renders_without_the_cache(
    tiny_models, demo_media, short_audio, tmp_path
):
    """``cache.dir`` naming an existing file (a typo, a shared path that is not a directory): the render
    succeeds with one warning line, and the file at that path is byte-identical afterwards."""
    blocker = tmp_path / "avatars"
    blocker.write_bytes(b"not a directory\n")
    out = tmp_path / "out" / "cached.mp4"
    tmp = cli_tmp()
    proc = cli(
        *demo_args(tiny_models, demo_media.video, short_audio),
        f"task.output={out}",
        f"hydra.run.dir={tmp_path / 'hydra'}",
        f"cache.dir={blocker}",
        "cluster.workers=1",
        "qa.sync=false",
        tmp=tmp,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    logged = (proc.stdout + proc.stderr).splitlines()  # Hydra's console log handler writes to stdout
    warnings = [line for line in logged if "avatar cache" in line and "cannot be used" in line]
    assert len(warnings) == 1 and str(blocker) in warnings[0], (proc.stdout + proc.stderr)[-3000:]
    assert "Traceback" not in proc.stderr and not error_lines(proc.stderr)
    assert blocker.read_bytes() == b"not a directory\n"
    assert out.exists() and json.loads(out.with_suffix(".summary.json").read_text())["cache"] == ""
    assert scratch_under(tmp) == []
    assert wait_for(lambda: not processes_under(tmp))
