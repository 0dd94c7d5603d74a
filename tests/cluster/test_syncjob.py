"""Lip-sync scores per job and the quality gate (cluster/syncjob.py) on the demo with random SyncNet
weights: the values are meaningless, the plumbing is what is checked."""

from __future__ import annotations

import json

import cv2
import pytest

from cluster.batch import format_rows, run_batch
from cluster.config import QaConfig
from cluster.driver import run_job
from cluster.sweep import format_table, sweep_table
from cluster.syncjob import SyncResult, gate
from tests.helpers import cli, cli_tmp, demo_args, job_for, trimmed_audio

SCORE_FIELDS = (
    "sync_confidence",
    "sync_distance",
    "sync_offset",
    "sync_windows",
    "sync_confidence_per_second",
    "sync_distance_per_second",
    "sync_offset_per_second",
    "face_share",
    "flagged",
    "flags",
)


@pytest.mark.parametrize(
    ("result", "qa", "flags"),
    [
        (SyncResult(5.0, 7.0, 0, 10, face_share=1.0), QaConfig(), []),
        (SyncResult(2.0, 7.0, 0, 10, face_share=1.0), QaConfig(), ["sync confidence 2.00 < 3.0"]),
        (SyncResult(5.0, 7.0, -5, 10, face_share=1.0), QaConfig(), ["offset -5 frames"]),
        (SyncResult(5.0, 7.0, 4, 10, face_share=1.0), QaConfig(), []),
        (SyncResult(face_share=0.05), QaConfig(), ["face share 0.05 < 0.1"]),  # not scored: share only
        (SyncResult(0.5, 9.0, 9, 10, face_share=0.0), QaConfig(0, 0.0, 15, 0.0), []),
    ],
)
def test_gate_table(result, qa, flags):
    out = gate(result, qa)
    assert out.flagged == bool(flags)
    assert len(out.flags) == len(flags) and all(f in g for f, g in zip(flags, out.flags, strict=True))


def test_scores_do_not_depend_on_sharding_and_the_gate_flags(
    local_ray, tiny_models, demo_media, short_audio, tmp_path
):
    """The demo as 1 shard and as 13-frame shards (one worker): the same scores; every field written,
    the QA sheet carries the curve; a threshold above the score flags the job, below it passes."""
    one = job_for(
        tiny_models,
        demo_media.video,
        short_audio,
        tmp_path / "one.mp4",
        "shards.length=1000",
        "cluster.workers=1",
        "qa.min_sync_confidence=0",
        "qa.max_offset_frames=15",
        "qa.min_face_share=0",
    )
    a = run_job(one)
    assert a.shards == 1
    written = json.loads((tmp_path / "one.summary.json").read_text())
    for key in SCORE_FIELDS:
        assert key in written, key
    assert written["sync_confidence"] is not None and 0 < written["sync_windows"] <= 45  # min(50, 50) - 5
    assert len(written["sync_confidence_per_second"]) == 2 and written["face_share"] > 0
    assert written["flagged"] is False and written["flags"] == []
    sheet = cv2.imread(str(tmp_path / "one.qa.png"))
    off = job_for(
        tiny_models,
        demo_media.video,
        short_audio,
        tmp_path / "off.mp4",
        "shards.length=1000",
        "qa.sync=false",
    )
    assert cv2.imread(str(tmp_path / "one.qa.png")).shape[0] == sheet.shape[0]
    split = job_for(
        tiny_models,
        demo_media.video,
        short_audio,
        tmp_path / "split.mp4",
        "shards.length=13",
        "cluster.workers=1",
        f"qa.min_sync_confidence={a.sync_confidence + 1}",
    )
    b = run_job(split)
    assert b.shards == 4
    for key in SCORE_FIELDS[:8]:
        got, want = getattr(b, key), getattr(a, key)
        assert got == pytest.approx(want, abs=1e-3), key
    assert b.flagged and "sync confidence" in b.flags[0]
    assert (tmp_path / "split.mp4").exists()  # a flagged job's output is written
    assert any("FLAGGED" in line for line in b.lines())
    # without scoring: no scorer, no score, and the sheet has no curve (it is shorter)
    c = run_job(off)
    assert c.sync_confidence is None and c.sync_windows == 0
    assert cv2.imread(str(tmp_path / "off.qa.png")).shape[0] < sheet.shape[0]
    # the sweep table's score columns, from a run's metrics
    run = tmp_path / "sweep" / "0"
    run.mkdir(parents=True)
    (run / "metrics.json").write_text(json.dumps({**json.loads(b.to_json()), "fail_on_flag": True}))
    rows = sweep_table(tmp_path / "sweep")
    assert rows[0]["sync"] == b.sync_confidence and rows[0]["status"] == "flagged"
    header = format_table(rows).splitlines()[0].split()
    assert {"sync", "offset", "flags"} <= set(header)


def test_batch_table_shows_the_score(local_ray, tiny_models, demo_media, tmp_path):
    audio = trimmed_audio(demo_media.audio, tmp_path / "a.wav", 0.8)
    tasks = tmp_path / "tasks.csv"
    tasks.write_text(f"video,audio\n{demo_media.video},{audio}\n")
    overrides = [f"models.dir={tiny_models}", "models=tiny", "render.threads=1", "face.crop=box"]
    rows = run_batch(tasks, tmp_path / "out", [*overrides, "qa.min_sync_confidence=1000"])
    assert rows[0].status == "ok" and rows[0].sync is not None and "sync confidence" in rows[0].flags
    table = format_rows(rows).splitlines()
    assert table[0].split()[:8] == ["job", "status", "frames", "fps", "seconds", "sync", "offset", "flags"]
    rows = run_batch(
        tasks, tmp_path / "strict", [*overrides, "qa.min_sync_confidence=1000", "qa.fail_on_flag=true"]
    )
    assert rows[0].status == "flagged"


def test_fail_on_flag_exits_with_its_code_and_keeps_the_output(tiny_models, demo_media, tmp_path):
    import ray

    ray.shutdown()
    audio = trimmed_audio(demo_media.audio, tmp_path / "a.wav", 0.8)
    out = tmp_path / "flagged.mp4"
    proc = cli(
        *demo_args(tiny_models, demo_media.video, audio),
        f"task.output={out}",
        f"hydra.run.dir={tmp_path}/run",
        "qa.min_sync_confidence=1000",
        "qa.fail_on_flag=true",
        tmp=cli_tmp(),
    )
    assert proc.returncode == 6, proc.stderr[-3000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "flagged by the quality gate" in errors[0]
    assert out.exists() and out.with_suffix(".summary.json").exists()
    assert json.loads(out.with_suffix(".summary.json").read_text())["flagged"] is True
