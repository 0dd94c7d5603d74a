"""``face.select`` by track on a real local Ray cluster: the driver's whole-video step (every frame
detected before any preparation), the same pixels as the in-process render, and avatar cache entries
keyed by the face they hold."""

from __future__ import annotations

import pytest

from cluster.driver import run_job
from musetalk.config import FaceConfig, PipelineConfig
from musetalk.local import render_local
from musetalk.testing.two_faces import make_two_faces
from shards.segment import EncodeSettings
from tests.helpers import assert_same_frames, decode_all, job_for


@pytest.mark.slow
def test_track_choice_on_ray_matches_in_process_and_keys_the_cache(local_ray, tiny_models, tmp_path):
    clip = make_two_faces(tmp_path / "clip")
    cache = f"cache.dir={tmp_path / 'avatars'}"
    common = (
        "face.detector=haar",
        "shards.length=12",
        "shards.prep_length=8",
        "cluster.cpu_workers=1",
        cache,
    )

    def ray_render(name: str, select: str):
        out = tmp_path / f"{name}.mkv"
        return out, run_job(
            job_for(tiny_models, clip.video, clip.audio, out, f"face.select={select}", *common)
        )

    out, first = ray_render("two", "2")
    assert first.detections == clip.frames and first.cache_hits == 0  # every frame: the tracks need them
    face = FaceConfig(detector="haar", crop="box", select="2")
    cfg = PipelineConfig(models_dir=str(tiny_models), tiny=True, batch_size=4, threads=1, face=face)
    local = tmp_path / "local.mkv"
    render_local(clip.video, clip.audio, local, cfg, encode=EncodeSettings(lossless=True), chunk=8)

    assert_same_frames(decode_all(local), out)

    _, again = ray_render("two-again", "2")  # the same choice: every entry from the cache
    assert again.detections == 0 and again.cache_hits == clip.frames and again.vae_encodes == 0
    _, other = ray_render("one", "1")  # another face: its own entries, the detections shared
    assert other.detections == 0 and other.cache_hits == 0 and other.vae_encodes > 0
