"""The sharded renderer on a real local Ray cluster: shard invariance, the CLI, errors, a multirun sweep."""

from __future__ import annotations

import concurrent.futures
import json
import tempfile
from dataclasses import replace
from pathlib import Path

import av
import cv2
import psutil
import pytest
import ray

from cluster.driver import run_job
from cluster.faults import HOLD_ENV
from cluster.pool import warm_pools
from shards.errors import FarmError
from tests.helpers import (
    assert_same_frames,
    cli,
    cli_tmp,
    demo_args,
    held,
    job_for,
    scratch_under,
    trimmed_audio,
    wait_for,
)


def test_shard_invariance_across_shardings_and_workers(
    local_ray, tiny_models, demo_media, short_audio, reference_frames, tmp_path
):
    # 13-frame shards on one worker running one unit at a time: preparation looks ahead 2 shards
    # (cluster.driver.PREP_LEAD), so the prepare units of the later shards run only as earlier ones land
    for length, prep, workers, units in [(13, 7, 1, 1), (17, 64, 2, 2)]:
        out = tmp_path / f"sharded_{length}.mp4"
        job = job_for(
            tiny_models,
            demo_media.video,
            short_audio,
            out,
            f"shards.length={length}",
            f"shards.prep_length={prep}",
            f"cluster.workers={workers}",
            f"cluster.max_in_flight={units}",
        )
        summary = run_job(job)
        assert scratch_under(Path(tempfile.gettempdir())) == [], "worker scratch left"
        assert summary.shards >= 3 and summary.frames == 50
        assert_same_frames(reference_frames, out)
        written = json.loads(out.with_suffix(".summary.json").read_text())
        assert written["frames"] == 50 and sum(written["worker_frames"].values()) == 50
        assert written["reused_shards"] == 0
        assert not [p for p in tmp_path.iterdir() if p.name.endswith(".lock")]  # the segments stay, no lock


def test_inputs_as_paths_every_node_reads(
    local_ray, tiny_models, demo_media, short_audio, reference_frames, tmp_path
):
    """cluster.inputs=uri: workers read the task paths themselves instead of the object store."""
    out = tmp_path / "uri.mp4"
    job = job_for(tiny_models, demo_media.video, short_audio, out, "cluster.inputs=uri", "shards.length=25")
    summary = run_job(job)
    assert summary.shards == 2
    assert_same_frames(reference_frames, out)


def _held_job(tiny_models, demo_media, short_audio, tmp_path, monkeypatch, name, *, workers, units):
    """(hold dir, output, job) of the short job in 10-frame shards whose workers stop at HOLD_ENV."""
    hold = tmp_path / "hold"
    hold.mkdir()
    warm_pools().discard(graceful=True)  # its workers started without the hold point (not in the pool key)
    monkeypatch.setenv(HOLD_ENV, str(hold))
    out = tmp_path / f"{name}.mp4"
    job = job_for(
        tiny_models,
        demo_media.video,
        short_audio,
        out,
        "shards.length=10",
        f"cluster.workers={workers}",
        f"cluster.max_in_flight={units}",
    )
    return hold, out, job


def test_killed_worker_mid_shard_is_replaced_and_output_identical(
    local_ray, tiny_models, demo_media, short_audio, reference_frames, tmp_path, monkeypatch
):
    hold, out, job = _held_job(
        tiny_models, demo_media, short_audio, tmp_path, monkeypatch, "killed", workers=2, units=1
    )
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        future = pool.submit(run_job, job)
        _, pid = wait_for(lambda: held(hold))[0]  # a worker is blocked inside render(), its input copied
        psutil.Process(pid).kill()  # SIGKILL in the middle of a shard
        (hold / "release-all").touch()
        summary = future.result(timeout=1800)
    assert summary.retries >= 1
    assert_same_frames(reference_frames, out)
    assert scratch_under(Path(tempfile.gettempdir())) == [], "the killed worker's scratch was left"


def test_one_worker_runs_two_units_side_by_side_with_the_same_output(
    local_ray, tiny_models, demo_media, short_audio, reference_frames, tmp_path, monkeypatch
):
    """cluster.max_in_flight=2 on one worker: two shards are inside render() of the same process at once
    (a threaded actor), never more, and the output is the single-shard reference bit for bit."""
    hold, out, job = _held_job(
        tiny_models, demo_media, short_audio, tmp_path, monkeypatch, "side_by_side", workers=1, units=2
    )
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        future = pool.submit(run_job, job)
        try:
            both = wait_for(lambda: held(hold) if len(held(hold)) >= 2 else None)
            assert len(both) == 2 and len({pid for _, pid in both}) == 1, both
        finally:
            (hold / "release-all").touch()
        summary = future.result(timeout=1800)
    assert (summary.shards, summary.workers, summary.retries) == (5, 1, 0)
    assert 0 < summary.busy_seconds <= summary.seconds
    assert_same_frames(reference_frames, out)


def test_worker_that_cannot_start_fails_the_job_at_once(
    local_ray, tiny_models, demo_media, short_audio, tmp_path
):
    """A worker that raises while loading (here: a GPU device on a machine without one, past config
    validation) fails the job with its reason, instead of restarting workers until a timeout."""
    out = tmp_path / "no_device.mp4"
    job = job_for(tiny_models, demo_media.video, short_audio, out)
    job = replace(job, pipeline=replace(job.pipeline, device="cuda:0"))
    with pytest.raises(FarmError, match="cuda:0"):
        run_job(job)
    assert not out.exists()
    assert scratch_under(Path(tempfile.gettempdir())) == []


def _cli(*args: str):
    """The CLI from the repository root, with its own TMPDIR (tests.helpers.cli)."""
    return cli(*args, tmp=cli_tmp())


def test_cli_renders_playable_mp4_with_audio(tiny_models, demo_media, short_audio, tmp_path):
    ray.shutdown()
    out = tmp_path / "cli.mp4"
    proc = _cli(
        *demo_args(tiny_models, demo_media.video, short_audio),
        f"task.output={out}",
        f"hydra.run.dir={tmp_path}/run",
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "frames      50" in proc.stdout
    with av.open(str(out)) as f:
        kinds = sorted(s.type for s in f.streams)
        assert kinds == ["audio", "video"]
        assert f.streams.video[0].codec_context.name == "h264"
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["frames"] == 50 and metrics["fps"] > 0


@pytest.mark.parametrize(
    ("override", "needle", "code"),
    [
        ("task.video={tmp}/missing.mp4", "missing.mp4", 2),
        ("task.audio={tmp}/notes.txt", "notes.txt", 2),
        ("task.video={audio}", "no video stream", 2),
        ("render.batch_size=0", "render.batch_size", 2),
        ("models=musetalk_v15 models.dir={tmp}/nowhere", "scripts.download_models", 3),
    ],
)
def test_cli_bad_input_one_line_error_and_no_output(
    tiny_models, demo_media, short_audio, tmp_path, override, needle, code
):
    (tmp_path / "notes.txt").write_text("not audio")
    out = tmp_path / "bad.mp4"
    args = [
        *demo_args(tiny_models, demo_media.video, short_audio),
        f"task.output={out}",
        f"hydra.run.dir={tmp_path}/run",
    ]
    extra = override.format(tmp=tmp_path, audio=short_audio).split()
    if extra[0].startswith("models="):
        args = [a for a in args if not a.startswith("models")]
    proc = _cli(*args, *extra)
    assert proc.returncode == code, proc.stderr[-3000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and needle in errors[0], proc.stderr[-3000:]
    assert not out.exists()


def test_multirun_sweep_writes_summary(tiny_models, demo_media, tmp_path):
    """A sweep on one warm pool: a change of batch size or of a per-job setting keeps the loaded weights;
    every run is measured on the same footing (its preparation put in the avatar cache by a warm-up, then
    read from there), preparation and generation reported apart; a setting that does nothing is refused
    per run; table and plot written."""
    audio = trimmed_audio(demo_media.audio, tmp_path / "tiny.wav", 0.8)
    sweep = tmp_path / "sweep"
    proc = _cli(
        "-m",
        *demo_args(tiny_models, demo_media.video, audio),
        "render.batch_size=2,4",
        "enhance.upscale=1,2",  # enhance=none: upscale 2 does nothing and is refused
        "task.bbox_shift=0,2",  # per job: changes no model, so the pool stays warm
        f"hydra.sweep.dir={sweep}",
    )
    assert proc.returncode == 2, proc.stderr[-3000:]  # some runs were refused
    rows = json.loads((sweep / "sweep_summary.json").read_text())
    assert len(rows) == 8
    ok = [r for r in rows if r["status"] == "ok"]
    refused = [r for r in rows if r["status"] == "rejected"]
    assert [r["run"] for r in ok] == [0, 1, 4, 5] and all(r["frames"] == 20 for r in ok)
    assert [r["run"] for r in refused] == [2, 3, 6, 7]
    assert all("enhance.upscale=2 does nothing" in r["error"] for r in refused)
    assert ok[0]["overrides"] == "render.batch_size=2 enhance.upscale=1 task.bbox_shift=0"
    # One load per worker for the whole sweep: batch size and bbox_shift are the job's, not the models'.
    assert [r["loads"] for r in ok] == [1, 0, 0, 0]
    assert len({r["pool"] for r in ok}) == 1
    assert ok[0]["load_s"] > 0 and all(r["load_s"] == 0 for r in ok[1:])
    for r in ok:
        assert r["render_fps"] >= r["fps"] > 0 and r["retries"] == 0
        # the same footing: each run's warm-up paid its preparation (batch 4 re-encodes: its key differs),
        # the timed run read all of it from the avatar cache
        assert r["prep"] == "cache" and r["warmup_s"] > 0
        assert r["gen_s"] > 0 and r["gen_fps"] > 0 and r["prep_s"] >= 0
    table = (sweep / "sweep_summary.txt").read_text().splitlines()
    for col in (
        "render_fps",
        "prep",
        "prep_s",
        "gen_s",
        "gen_fps",
        "warmup_s",
        "load_s",
        "loads",
        "retries",
        "detect_s",
        "blend_prepare_s",
        "generate_s",
        "error",
    ):
        assert col in table[0].split()
    png = cv2.imread(str(sweep / "sweep_summary.png"))
    assert png is not None and png.shape[1] == 70 + 150 * 8 + 190 and png.shape[0] > 400
    for r in ok:
        outputs = list((sweep / str(r["run"])).glob("*.mp4"))
        assert len(outputs) == 1 and outputs[0].stat().st_size > 0
    assert "sweep summary" in proc.stdout


def test_dub_job_on_ray_keeps_the_picture_and_passes_through_outside_its_ranges(
    local_ray, tiny_models, demo_media, short_audio, tmp_path
):
    """task.mode=dub with a CSV segments file, workers reading paths (cluster.inputs=uri: the dub's track
    still travels through the object store): the video's 100 frames, passthrough outside the ranges, the
    ranges' frames lip-synced, nothing left beside the output (its track, lock and run directory)."""
    import numpy as np

    from tests.helpers import decode_all

    (tmp_path / "in").mkdir()
    take = trimmed_audio(demo_media.audio, tmp_path / "in" / "take.wav", 1.0)
    segments = tmp_path / "in" / "ranges.csv"
    segments.write_text(
        f"start,end,face,audio,offset\n0.2,1.0,largest,{take.name},0.1\n00:00:02.800,3.6,,,\n"
    )
    out = tmp_path / "out" / "dub.mp4"
    job = job_for(
        tiny_models,
        demo_media.video,
        short_audio,  # 2 s: padded with silence to the 4 s picture
        out,
        "task.mode=dub",
        f"task.segments={segments}",
        "shards.length=40",
        "cluster.inputs=uri",
        "qa.sync=false",
    )
    summary = run_job(job)
    source, rendered = decode_all(demo_media.video), decode_all(out)
    assert summary.frames == len(rendered) == len(source) == 100
    assert summary.shards == 7  # a grid of 40 cut at 5, 25, 70 and 90
    inside = set(range(5, 25)) | set(range(70, 90))
    assert all(np.array_equal(rendered[t], source[t]) for t in range(100) if t not in inside)
    assert sum(not np.array_equal(rendered[t], source[t]) for t in inside) > len(inside) // 2
    assert summary.face_frames == len(inside) and summary.face_share == 1.0
    assert out.with_suffix(".qa.png").is_file()
    # no dub track or lock left; the kept segments stay for a revision
    assert sorted(p.name for p in out.parent.iterdir() if p.name.startswith(".")) == [f".{out.name}.run"]
