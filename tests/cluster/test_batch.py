"""Batches: upstream task files and manifests parse into jobs; many jobs render on one warm pool."""

from __future__ import annotations

import json
import os
from pathlib import Path

import cv2
import pytest
import yaml

from cluster.batch import build_jobs, default_output, format_rows, load_tasks, run_batch
from shards.dub import DubSettings
from shards.errors import ConfigError
from tests.helpers import assert_same_frames, decode_all, trimmed_audio


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def test_upstream_yaml_with_gfpgan_block_and_relative_paths(tmp_path):
    (tmp_path / "data").mkdir()
    tasks = load_tasks(
        _write(
            tmp_path / "test.yaml",
            "task_0:\n video_path: data/yongen.mp4\n audio_path: data/yongen.wav\n"
            "task_1:\n video_path: data/yongen.mp4\n audio_path: /abs/eng.wav\n bbox_shift: -7\n"
            " result_name: take2\n"
            "gfpgan:\n enabled: true\n upscale: 2\n",
        )
    )
    assert tasks.overrides == ["enhance=gfpgan", "enhance.upscale=2"]
    t0, t1 = tasks.tasks
    assert (t0.video, t0.audio, t0.bbox_shift) == (
        tmp_path / "data/yongen.mp4",
        tmp_path / "data/yongen.wav",
        None,
    )
    assert t1.bbox_shift == -7 and t1.audio == Path("/abs/eng.wav")
    out = tmp_path / "results"
    assert default_output(t0, out) == out / "yongen_yongen.mp4"  # upstream's <video>_<audio>.mp4
    assert default_output(t1, out) == out / "take2.mp4"


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        ("gfpgan: {enabled: false, upscale: 2}\ntask_0: {video_path: a.mp4, audio_path: b.wav}\n", None),
        ("task_0: {video_path: a.mp4}\n", "audio_path is required"),
        ("task_0: {video_path: a.mp4, audio_path: b.wav, bbox_shift: up}\n", "bbox_shift must be an integer"),
        ("task_0: {video_path: a.mp4, audio_path: b.wav, fps: 25}\n", "fps is not a task key"),
    ],
)
def test_upstream_yaml_entry_problems_are_per_task(tmp_path, text, needle):
    (spec,) = load_tasks(_write(tmp_path / "t.yaml", text)).tasks
    assert (spec.problem is None) if needle is None else (needle in spec.problem)


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        ("video: a.mp4\n", "video not understood"),
        ("gfpgan: {enabled: true, scale: 2}\n", "gfpgan must be a mapping"),
        ("[1, 2]\n", "must map task_0"),
    ],
)
def test_a_malformed_task_file_fails_the_batch(tmp_path, text, needle):
    with pytest.raises(ConfigError, match=needle):
        load_tasks(_write(tmp_path / "t.yaml", text))


def test_csv_and_jsonl_manifests(tmp_path):
    csv_tasks = load_tasks(
        _write(tmp_path / "m.csv", "video,audio,output,bbox_shift\nv.mp4,a.wav,out/x.mp4,3\nv.mp4,b.wav,,\n")
    )
    a, b = csv_tasks.tasks
    assert (a.video, a.output, a.bbox_shift) == (tmp_path / "v.mp4", tmp_path / "out/x.mp4", 3)
    assert b.output is None and b.bbox_shift is None and b.problem is None
    rows = [{"video": "v.mp4", "audio": "a.wav"}, {"video": "v.mp4"}]
    lines = "\n".join(json.dumps(r) for r in rows) + "\nnot json\n"
    j = load_tasks(_write(tmp_path / "m.jsonl", lines)).tasks
    assert j[0].problem is None and "audio is required" in j[1].problem and "not JSON" in j[2].problem


def test_bad_jobs_are_rejected_alone_and_collisions_named(tiny_models, demo_media, tmp_path):
    """Missing inputs and outputs that collide fail their own job; the sound jobs remain."""
    video, audio = demo_media.video, demo_media.audio
    tasks = load_tasks(
        _write(
            tmp_path / "t.yaml",
            yaml.safe_dump(
                {
                    "task_0": {"video_path": str(video), "audio_path": str(audio)},
                    "task_1": {"video_path": "missing.mp4", "audio_path": str(audio)},
                    "task_2": {"video_path": str(video), "audio_path": str(audio), "bbox_shift": 4},
                    "task_3": {"video_path": str(video), "audio_path": str(audio), "result_name": "in.mp4"},
                    "task_4": {"video_path": str(tmp_path / "results/in.mp4"), "audio_path": str(audio)},
                }
            ),
        )
    )
    (tmp_path / "results").mkdir()
    (tmp_path / "results/in.mp4").write_bytes(b"")
    jobs, bad = build_jobs(tasks, tmp_path / "results", ["models=tiny", f"models.dir={tiny_models}"])
    assert [n for n, _ in jobs] == ["task_0", "task_4"]
    errors = {r.job: r.error for r in bad}
    assert "missing.mp4" in errors["task_1"]
    assert "also the output of task_0" in errors["task_2"]  # same <video>_<audio>.mp4 name
    assert "is the video input of task_4" in errors["task_3"]
    assert jobs[0][1].output == tmp_path / "results" / f"{video.stem}_{audio.stem}.mp4"


def test_per_job_segments_file_mode_and_face(tiny_models, demo_media, tmp_path):
    """A task's ``segments`` (relative to the task file; implies dub mode), ``mode`` and ``face`` keys
    become that job's settings; a bad segments file or face spec fails its own job only."""
    video, audio = demo_media.video, demo_media.audio
    _write(tmp_path / "interview.csv", "start,end,face\n0.5,1.5,left\n")
    _write(tmp_path / "overlap.json", '[{"start": 0, "end": 2}, {"start": 1, "end": 3}]')
    rows = [
        {"video": str(video), "audio": str(audio), "output": "a.mp4", "segments": "interview.csv"},
        {"video": str(video), "audio": str(audio), "output": "b.mp4", "mode": "dub"},
        {"video": str(video), "audio": str(audio), "output": "c.mp4"},
        {"video": str(video), "audio": str(audio), "output": "d.mp4", "segments": "overlap.json"},
        {"video": str(video), "audio": str(audio), "output": "e.mp4", "face": "biggest"},
    ]
    tasks = load_tasks(_write(tmp_path / "m.jsonl", "\n".join(json.dumps(r) for r in rows)))
    jobs, bad = build_jobs(tasks, tmp_path / "results", ["models=tiny", f"models.dir={tiny_models}"])
    dub = {n: j.dub for n, j in jobs}
    assert dub == {"line_1": DubSettings(tmp_path / "interview.csv"), "line_2": DubSettings(), "line_3": None}
    errors = {r.job: r.error for r in bad}
    assert "overlap.json: entry 2 overlaps entry 1" in errors["line_4"]
    assert "face 'biggest' is not a face spec" in errors["line_5"]


def test_gfpgan_model_path_must_be_the_loaded_weights(tiny_models, tmp_path):
    text = "task_0: {{video_path: a.mp4, audio_path: b.wav}}\ngfpgan: {{enabled: true, model_path: {}}}\n"
    elsewhere = _write(tmp_path / "GFPGANv1.4.pth", "x")
    with pytest.raises(ConfigError, match="not the GFPGAN weights the workers load"):
        build_jobs(
            load_tasks(_write(tmp_path / "t.yaml", text.format(elsewhere))),
            tmp_path,
            ["models=tiny", f"models.dir={tiny_models}"],
        )
    ours = tiny_models / "gfpgan" / "GFPGANv1.4.pth"
    jobs, bad = build_jobs(
        load_tasks(_write(tmp_path / "t.yaml", text.format(ours))),
        tmp_path,
        ["models=tiny", f"models.dir={tiny_models}"],
    )
    assert len(bad) == 1 and jobs == []  # the inputs are missing: that job alone fails
    off = "task_0: {video_path: a.mp4, audio_path: b.wav}\ngfpgan: {enabled: false}\n"
    with pytest.raises(
        ConfigError, match="enhance.upscale=2 does nothing"
    ):  # a shared setting: the batch fails
        build_jobs(load_tasks(_write(tmp_path / "t.yaml", off)), tmp_path, ["enhance.upscale=2"])


def _warm_pool_settings(tiny_models) -> list[str]:
    """The batch settings of the warm-pool tests (the same pool serves both)."""
    return [
        "models=tiny",
        f"models.dir={tiny_models}",
        "output.lossless=true",
        "render.batch_size=4",
        "render.threads=1",
        "face.crop=box",
        "shards.length=13",
        "cluster.workers=2",
    ]


def test_three_jobs_on_one_warm_pool(
    local_ray, tiny_models, demo_media, short_audio, reference_frames, tmp_path
):
    """An upstream-style YAML with three jobs, one of them bad: the pool is built once, each worker
    loads its models once, the bad job is reported with its error and the two others land, the first
    frame for frame equal to a single-job render."""
    from cluster.pool import warm_pools

    media = tmp_path / "media"
    media.mkdir()
    trimmed_audio(demo_media.audio, media / "one.wav", 1.0)
    (media / "notes.txt").write_text("not audio")
    rel = os.path.relpath
    task_file = _write(
        tmp_path / "tasks.yaml",
        yaml.safe_dump(
            {
                "task_0": {
                    "video_path": rel(demo_media.video, tmp_path),
                    "audio_path": rel(short_audio, tmp_path),
                },
                "task_1": {"video_path": rel(demo_media.video, tmp_path), "audio_path": "media/notes.txt"},
                "task_2": {
                    "video_path": rel(demo_media.video, tmp_path),
                    "audio_path": "media/one.wav",
                    "bbox_shift": 3,
                },
            }
        ),
    )
    built = warm_pools().built
    rows = run_batch(
        task_file,
        None,
        _warm_pool_settings(tiny_models),
    )
    assert warm_pools().built == built + 1, "one pool for the whole batch"
    info = warm_pools().pool.worker_info()
    assert len(info) == 2 and all(w["loads"] == 1 for w in info), info
    assert sum(w["units"] for w in info) == 4 + 2  # 50 frames in 13s, 25 frames in 13s

    by_job = {r.job: r for r in rows}
    assert by_job["task_1"].status == "failed" and "notes.txt" in by_job["task_1"].error
    assert by_job["task_0"].status == "ok" and by_job["task_0"].frames == 50
    assert by_job["task_2"].status == "ok" and by_job["task_2"].frames == 25
    results = tmp_path / "results"
    out0 = results / f"{demo_media.video.stem}_{short_audio.stem}.mp4"
    out2 = results / f"{demo_media.video.stem}_one.mp4"
    assert_same_frames(reference_frames, out0)
    assert len(decode_all(out2)) == 25
    s0, s2 = (json.loads(o.with_suffix(".summary.json").read_text()) for o in (out0, out2))
    assert s0["pool"] == s2["pool"] and s0["model_loads"] + s2["model_loads"] == 2
    assert s0["render_seconds"] <= s0["seconds"] and s0["load_seconds"] >= 0
    assert not [p for p in results.iterdir() if p.name.endswith(".lock")], "a lock was left"
    sheet = cv2.imread(str(out0.with_suffix(".qa.png")))  # the QA sheet beside the summary
    assert sheet is not None and sheet.shape[1] == 960
    table = (results / "batch_summary.txt").read_text()
    assert table.split()[:10] == [
        "job", "status", "frames", "fps", "seconds", "sync", "offset", "flags", "output", "error"
    ]  # fmt: skip
    assert format_rows(rows).count("failed") == 1


def test_cli_bad_task_file_is_one_line(tmp_path):
    import subprocess
    import sys

    from cluster.config import REPO_ROOT

    bad = _write(tmp_path / "t.yaml", "video: a.mp4\n")
    proc = subprocess.run(
        [sys.executable, "-m", "cluster.batch", str(bad), "render.batch_size=2"],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 2
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "video not understood" in errors[0], proc.stderr[-2000:]


@pytest.mark.slow
def test_ctrl_c_during_a_batch_prints_what_finished(tiny_models, demo_media, tmp_path):
    """Job a (one shard) finishes, job b is held inside a shard: SIGINT gives exit 130, one error line,
    and the table says a finished and b was interrupted (its finished shards kept for a resume)."""
    import signal
    import subprocess
    import sys

    from cluster.config import REPO_ROOT
    from cluster.faults import HOLD_ENV
    from tests.helpers import cli_tmp, error_lines, held, wait_for

    short = trimmed_audio(demo_media.audio, tmp_path / "short.wav", 0.2)  # 5 frames: 1 shard
    long = trimmed_audio(demo_media.audio, tmp_path / "long.wav", 0.8)  # 20 frames: 4 shards
    tasks = _write(
        tmp_path / "tasks.csv",
        f"video,audio,output,bbox_shift\n{demo_media.video},{short},a.mp4,\n{demo_media.video},{long},b.mp4,\n",
    )
    hold, out = tmp_path / "hold", tmp_path / "results"
    hold.mkdir()
    (hold / "release-shard_00000").touch()  # every job's first shard runs; b's later ones are held
    env = {**os.environ, "TMPDIR": str(cli_tmp()), HOLD_ENV: str(hold)}
    cmd = [sys.executable, "-m", "cluster.batch", str(tasks), "--output-dir", str(out)]
    cmd += ["models=tiny", f"models.dir={tiny_models}", "face.crop=box", "shards.length=5"]
    cmd += ["cluster.workers=1", "cluster.max_in_flight=1"]
    proc = subprocess.Popen(
        cmd, cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        # a landed, and b is blocked in a shard after its first (first shards pass the hold point)
        wait_for(
            lambda: (
                proc.poll() is not None
                or ((tmp_path / "a.mp4").exists() and [n for n, _ in held(hold) if n != "shard_00000"])
            )
        )
    finally:
        proc.send_signal(signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=600)
    assert proc.returncode == 130, stderr[-3000:]
    (line,) = error_lines(stderr)
    assert "interrupted; 1 of 2 jobs finished" in line and "run the same command again" in line
    rows = {r["job"]: r for r in json.loads((out / "batch_summary.json").read_text())}
    assert rows["row_1"]["status"] == "ok" and rows["row_2"]["status"] == "interrupted", rows
    # Outputs named in a manifest are relative to it; the table goes to --output-dir.
    assert "interrupted" in stdout and (tmp_path / "a.mp4").exists() and not (tmp_path / "b.mp4").exists()
    assert (tmp_path / ".b.mp4.run").is_dir(), "b's finished shards are kept for a resume"


def test_a_face_track_the_video_lacks_fails_its_job_alone(local_ray, tiny_models, demo_media, tmp_path):
    """A track id is checked once the video's tracks are linked, when the driver plans the job's next
    unit: that job fails with the one-line reason and the batch goes on (the other job lands)."""
    media = tmp_path / "media"
    media.mkdir()
    trimmed_audio(demo_media.audio, media / "one.wav", 1.0)
    video = os.path.relpath(demo_media.video, tmp_path)
    task_file = _write(
        tmp_path / "tasks.yaml",
        yaml.safe_dump(
            {
                "task_0": {"video_path": video, "audio_path": "media/one.wav"},
                "task_1": {
                    "video_path": video,
                    "audio_path": "media/one.wav",
                    "face": 7,
                    "result_name": "t.mp4",
                },
            }
        ),
    )
    rows = run_batch(
        task_file,
        None,
        _warm_pool_settings(tiny_models),
    )
    by_job = {r.job: r for r in rows}
    assert by_job["task_0"].status == "ok" and by_job["task_0"].frames == 25
    assert by_job["task_1"].status == "failed", by_job["task_1"]
    assert "no track 7" in by_job["task_1"].error and "\n" not in by_job["task_1"].error
    results = tmp_path / "results"
    assert not [p for p in results.iterdir() if p.name.endswith(".lock")], "a lock was left"
