"""The progress an operator watches counts a job's whole work: detection and preparation move it too.

A 50-frame job in one shard, without box smoothing (``face.smooth_radius=0``: each shown source frame's
box reads only its own detection) and without the avatar cache: its work is 50 source frames to detect,
50 to prepare and 50 output frames to generate. The one generation shard is held at its hold point, so the
job stands where preparation is all done and generation has not begun.
"""

from __future__ import annotations

import threading

from cluster.driver import RenderProgress, run_jobs
from cluster.faults import HOLD_ENV
from cluster.pool import warm_pools
from tests.helpers import held, job_for, wait_for


def test_progress_counts_detection_and_preparation_before_any_shard_lands(
    tiny_models, demo_media, short_audio, local_ray, tmp_path, monkeypatch
):
    hold = tmp_path / "hold"
    hold.mkdir()
    monkeypatch.setenv(HOLD_ENV, str(hold))
    warm_pools().discard(graceful=False)  # workers must start with the hold directory in their environment
    job = job_for(
        tiny_models,
        demo_media.video,
        short_audio,
        tmp_path / "out.mp4",
        "shards.length=1000",
        "face.smooth_radius=0",
        "cache.enabled=false",
    )
    seen: list[RenderProgress] = []
    results: list = []
    t = threading.Thread(target=lambda: results.extend(run_jobs([job], on_progress=seen.append)), daemon=True)
    t.start()
    try:
        assert wait_for(lambda: held(hold))[0][0] == "shard_00000"
        # the workers' counts reach the progress actor asynchronously: wait until the last one is in
        at_hold = wait_for(lambda: seen and seen[-1].done == 100 and seen[-1])
        assert at_hold.total == 150  # 50 to detect + 50 to prepare + 50 to generate
        assert at_hold.jobs_done == 0
        assert not (tmp_path / "out.mp4").exists()
    finally:
        (hold / "release-all").touch()
        t.join(600)
    (result,) = results
    assert result.summary is not None and result.summary.frames == 50
    assert seen[-1].done == seen[-1].total == 150
    assert seen[-1].jobs_done == 1
    warm_pools().discard(graceful=True)  # the next test's pool starts without the hold directory
