"""Bad input through the real CLI: one ``error:`` line, the domain exit code, and nothing touched.

Each case runs ``python -m cluster.render`` as a subprocess on copies of the demo clip and asserts: the exit
code; exactly one stderr line starting ``error: `` that names the problem; no file at the output path (or an
existing output byte-identical); the inputs and the user's files byte-identical; no scratch left (worker
temp dirs, the ``.<output>.run`` directory, write probes); and no process left that the run started.

Every case fails before Ray starts (a cluster to join is only probed): the subprocess gets its own TMPDIR and an environment tag, and after it
exits no process carrying the tag may remain (Ray's raylet, GCS and workers inherit the environment).

Unwritable output, honestly as root (which ignores mode bits): ``/sys`` is a directory in which even root
cannot create a file (sysfs answers EACCES), and a parent path whose component is a regular file fails
for everyone.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch

from cluster.config import DEMO_DIR, REPO_ROOT


@dataclass(frozen=True)
class Case:
    """``args`` are formatted with the case's paths: {tmp} {video} {audio} {out} {user} {rel_video}."""

    name: str
    args: tuple[str, ...]
    needle: str
    code: int = 2
    output: str = "{tmp}/out/out.mp4"
    existing_output: bool = False  # write an output first: it must survive byte-identical
    extra_files: dict[str, str] = field(default_factory=dict)  # path template -> content, made before
    flags: tuple[str, ...] = ()  # Hydra flags, before the overrides (-m)
    env: dict[str, str] = field(default_factory=dict)  # the subprocess's environment, added


CASES = [
    # Data safety: the output (or what is written beside it) is an input.
    Case("output_is_video", (), "is the input task.video", output="{video}"),
    Case("output_is_audio_mp4", ("task.audio={tmp}/in/voice.mp4",), "is the input task.audio", output="{tmp}/in/voice.mp4"),
    Case("output_is_video_relative", (), "is the input task.video", output="{rel_video}"),
    Case("output_is_video_via_symlink", (), "is the input task.video", output="{tmp}/link.mp4"),
    Case("output_is_video_hard_link", (), "is the input task.video", output="{tmp}/hard.mp4"),
    Case("summary_is_audio", ("task.audio={tmp}/in/take.summary.json",), "would replace the input task.audio", output="{tmp}/in/take.mp4"),
    Case("input_inside_scratch_dir", ("task.video={tmp}/out/.out.mp4.run/in.mp4",), "scratch directory the render deletes",
         extra_files={"{tmp}/out/.out.mp4.run/in.mp4": "a clip kept where the render puts its scratch"}),
    # The demo is never built outside media/: a missing input is reported, the user's directory untouched.
    Case("missing_video_beside_users_demo", ("task.video={user}/x.mp4",), "task.video not found: {user}/x.mp4",
         extra_files={"{user}/demo.mp4": "my own demo.mp4", "{user}/notes.txt": "mine"}),
    Case("missing_audio", ("task.audio={tmp}/nowhere/speech.wav",), "task.audio not found: {tmp}/nowhere/speech.wav"),
    Case("models_dir_holds_users_files", ("models.dir={user}",), "make_tiny_models refuses to write into {user}",
         extra_files={"{user}/notes.txt": "mine", "{user}/sub/more.txt": "also mine"}),
    # Unwritable outputs, found before the inputs are probed.
    Case("output_parent_is_a_file", (), "is a file, not a directory", output="{tmp}/in/demo.wav/out.mp4"),
    Case("output_grandparent_is_a_file", (), "is a file, not a directory", output="{user}/notes.txt/a/b/out.mp4",
         extra_files={"{user}/notes.txt": "mine"}),
    Case("output_dir_not_writable", (), "creating a file in /sys failed", output="/sys/musetalk-test-{token}.mp4"),
    Case("output_is_a_directory", (), "is a directory", output="{tmp}/clips.mp4",
         extra_files={"{tmp}/clips.mp4/readme.txt": "a directory named like a video"}),
    Case("output_not_mp4", (), "task.output must be an .mp4 path", output="{tmp}/out/out.mkv"),
    # Values: types, names and ranges, all before Ray.
    Case("batch_size_not_int", ("render.batch_size=abc",), "render.batch_size must be an integer, got 'abc'", existing_output=True),
    Case("batch_size_bool", ("render.batch_size=true",), "render.batch_size must be an integer, got True"),
    Case("shard_length_not_int", ("shards.length=x",), "shards.length must be an integer or null, got 'x'"),
    Case("shard_seconds_not_number", ("shards.length=null", "shards.seconds=soon"), "shards.seconds must be a number"),
    Case("lossless_not_bool", ("output.lossless=maybe",), "output.lossless must be a boolean"),
    Case("gpus_per_worker_float_text", ("cluster.gpus_per_worker=half",), "cluster.gpus_per_worker must be a number"),
    Case("device_tpu", ("render.device=tpu",), "render.device must be auto, cpu, cuda, cuda:N or mps, got 'tpu'"),
    Case("device_index_not_visible", ("render.device=cuda:1",), "render.device=cuda:1 names GPU 1"),
    Case("gpus_per_worker_zero", ("cluster.gpus_per_worker=0",), "cluster.gpus_per_worker must be a fraction"),
    Case("cpus_per_worker_zero", ("cluster.cpus_per_worker=0",), "cluster.cpus_per_worker must be > 0"),
    Case("blend_expand", ("blend.expand=0.5",), "blend.expand must be >= 1"),
    Case("face_margin", ("face.extra_margin=-3",), "face.extra_margin must be >= 0"),
    Case("output_preset", ("output.preset=fastest",), "output.preset must be one of"),
    # An unreachable cluster: one line naming the address and where it came from, before anything is
    # written (the address is probed first; a small connect_timeout_s only bounds a silent address).
    Case("cluster_address_unreachable", ("cluster.address=127.0.0.1:9", "cluster.connect_timeout_s=3"),
         "cannot reach the Ray cluster at 127.0.0.1:9 (cluster.address): connection refused; check that the cluster is running"),
    Case("ray_address_env_unreachable", ("cluster.address=", "cluster.connect_timeout_s=3"),
         "cannot reach the Ray cluster at 127.0.0.1:9 (RAY_ADDRESS): connection refused", env={"RAY_ADDRESS": "127.0.0.1:9"}),
    Case("ray_client_unreachable", ("cluster.address=ray://127.0.0.1:9", "cluster.connect_timeout_s=3"),
         "cannot reach the Ray Client server at 127.0.0.1:9 (cluster.address)"),
    Case("cluster_address_not_an_address", ("cluster.address=http://head:8265",),
         "cluster.address=http://head:8265 is a dashboard URL (for ray job submit), not an address Ray can join"),
    Case("connect_timeout_zero", ("cluster.connect_timeout_s=0",), "cluster.connect_timeout_s must be > 0"),
    # Dub mode's segments file: one line naming the file, the range and the fix, before Ray (past the
    # picture's end: once the video is probed, still before Ray).
    Case("segments_overlap", ("task.mode=dub", "task.segments={tmp}/in/s.json"),
         "segments file {tmp}/in/s.json: entry 2 overlaps entry 1 (starts at 1 s, before 2 s); make the ranges disjoint",
         extra_files={"{tmp}/in/s.json": '[{"start": 0, "end": 2}, {"start": 1, "end": 3}]'}),
    Case("segments_time", ("task.mode=dub", "task.segments={tmp}/in/s.csv"), "line 2: start '0:99' is not a time",
         extra_files={"{tmp}/in/s.csv": "start,end\n0:99,1\n"}),
    Case("segments_audio_missing", ("task.mode=dub", "task.segments={tmp}/in/s.srt"),
         "line 1: audio file not found: {tmp}/in/take 2.wav; check the path (relative to the segments file)",
         extra_files={"{tmp}/in/s.srt": "00:00:01,000 --> 00:00:02,000\naudio='take 2.wav'\n"}),
    Case("segments_past_end", ("task.mode=dub", "task.segments={tmp}/in/s.json"),
         "entry 1 ends at 9.5 s, past the picture's end (4 s); end it at 4 s or earlier",
         extra_files={"{tmp}/in/s.json": '[{"start": 3, "end": 9.5}]'}),
    Case("segments_without_dub", ("task.segments={tmp}/in/s.json",), "task.segments={tmp}/in/s.json needs task.mode=dub",
         extra_files={"{tmp}/in/s.json": '[{"start": 0, "end": 1}]'}),
    # Hydra's refusals of an override, as one line before Hydra runs (no four-line message, exit code 2).
    Case("misspelt_key", ("render.bogus=1",), "render.bogus=1: render.bogus is not a known setting (render has batch_size"),
    Case("misspelt_key_close_match", ("render.bacth_size=3",), "did you mean render.batch_size?"),
    Case("key_in_other_group", ("render.smooth_radius=3",), "did you mean face.smooth_radius?"),
    Case("removed_key", ("shards.overlap=8",), "shards.overlap=8: shards.overlap was removed: box smoothing context is face.smooth_radius"),
    Case("group_option_missing", ("models=bogus",), "models=bogus: models has no option 'bogus' (options: musetalk_v15, tiny)"),
    Case("append_existing_key", ("+render.batch_size=3",), "render.batch_size is already in the config"),
    # A path with a space reaches the job whole when it is one argv element (here: a missing file) ...
    Case("path_with_space_one_element", ("task.video={tmp}/in/my clip.mp4",), "task.video not found: {tmp}/in/my clip.mp4"),
    # ... and split by the shell, the error shows the quoting that works.
    Case("path_with_space_split", ("task.video={tmp}/in/my", "clip.mp4"),
         "'clip.mp4' is not an override (key=value): it looks like the rest of task.video={tmp}/in/my split at a space; "
         "quote a value with spaces for Hydra inside the shell's quotes: task.video=\"'{tmp}/in/my clip.mp4'\""),
    Case("path_hydra_cannot_read", ("task.video={tmp}/in/my clip (1).mp4",),
         "Hydra cannot read this value (mismatched input ' (' expecting <EOF>); quote it for Hydra inside the shell's quotes: "
         "task.video=\"'{tmp}/in/my clip (1).mp4'\""),
    Case("comma_without_multirun", ("task.video={tmp}/in/a,b.mp4",), "a comma makes a sweep"),
    # A -m sweep: every run's overrides are checked before the sweep starts.
    Case("sweep_bad_key", ("render.batch_size=1,2", "render.bogus=3", "hydra.sweep.dir={tmp}/hydra/sweep"),
         "render.bogus=3: render.bogus is not a known setting", flags=("-m",)),
    Case("sweep_bad_group_option", ("models=tiny,bogus", "hydra.sweep.dir={tmp}/hydra/sweep"),
         "models has no option 'bogus'", flags=("-m",)),
    pytest.param(
        Case("device_cuda_absent", ("render.device=cuda",), "render.device=cuda but this machine has no CUDA GPU"),
        marks=pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a CUDA GPU"),
    ),
]  # fmt: skip


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _snapshot(root: Path) -> dict[str, str]:
    """Every file under ``root`` (relative path -> sha256), Hydra's run directory aside."""
    return {
        str(p.relative_to(root)): _digest(p)
        for p in sorted(root.rglob("*"))
        if p.is_file() and p.relative_to(root).parts[0] != "hydra"
    }


def _tagged(tag: str) -> list[str]:
    """Command lines of live processes whose environment carries the test's tag (read from /proc: psutil is
    not a dependency of this project, only vendored inside Ray)."""
    needle = f"MUSETALK_TEST_TAG={tag}".encode()
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            if needle in (proc / "environ").read_bytes().split(b"\0"):
                found.append((proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace"))
        except OSError:  # gone, or not ours to read
            continue
    return found


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_bad_input_fails_fast_with_one_line_and_touches_nothing(case, tiny_models, demo_media, tmp_path):
    token = uuid.uuid4().hex[:8]
    (tmp_path / "in").mkdir()
    video, audio = tmp_path / "in" / "clip.mp4", tmp_path / "in" / "demo.wav"
    shutil.copyfile(demo_media.video, video)
    shutil.copyfile(demo_media.audio, audio)
    shutil.copyfile(demo_media.video, tmp_path / "in" / "voice.mp4")
    shutil.copyfile(demo_media.audio, tmp_path / "in" / "take.summary.json")
    (tmp_path / "link.mp4").symlink_to(video)
    os.link(video, tmp_path / "hard.mp4")
    paths = {
        "tmp": tmp_path,
        "video": video,
        "audio": audio,
        "user": tmp_path / "user",
        "rel_video": os.path.relpath(video, REPO_ROOT),
        "token": token,
    }
    for template, content in case.extra_files.items():
        path = Path(template.format(**paths))
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(content)
    out = Path(case.output.format(**paths))
    run_dir = out.parent / f".{out.name}.run"
    if case.existing_output:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_bytes(b"an earlier render")
    existed = out.exists(), run_dir.exists()
    before = _snapshot(tmp_path)
    models_before = _snapshot(tiny_models)
    demo_before = _snapshot(DEMO_DIR) if DEMO_DIR.exists() else None
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    tag = f"test-cli-errors-{token}"

    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "cluster.render",
            *case.flags,
            "+task=test",  # make_demo stays true: it must build nothing outside media/
            "models=tiny",
            f"models.dir={tiny_models}",
            f"task.video={video}",
            f"task.audio={audio}",
            f"task.output={out}",
            f"hydra.run.dir={tmp_path}/hydra",
            *(arg.format(**paths) for arg in case.args),
        ],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "TMPDIR": str(scratch), "MUSETALK_TEST_TAG": tag, **case.env},
    )

    assert proc.returncode == case.code, proc.stderr[-3000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, proc.stderr[-3000:]
    assert case.needle.format(**paths) in errors[0], errors[0]
    assert "Traceback" not in proc.stderr + proc.stdout, proc.stderr[-3000:]
    assert "HYDRA_FULL_ERROR" not in proc.stderr + proc.stdout, proc.stderr[-3000:]  # Hydra's own report
    # Nothing written, nothing replaced, nothing deleted (an output that existed is among the snapshot's files).
    assert _snapshot(tmp_path) == before
    assert (out.exists(), run_dir.exists()) == existed
    assert _snapshot(tiny_models) == models_before
    assert (_snapshot(DEMO_DIR) if DEMO_DIR.exists() else None) == demo_before
    # No scratch, no processes: the run stopped before Ray or any worker.
    assert list(scratch.iterdir()) == []
    assert _tagged(tag) == []


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (("render.bogus=1",), "render.bogus=1: render.bogus is not a known setting"),
        (("shards.overlap=8",), "shards.overlap=8: shards.overlap was removed"),
        (("render.batch_size=1,2",), "render.batch_size=1,2: a comma makes a sweep"),
        (("cluster.address=127.0.0.1:9", "cluster.connect_timeout_s=3"), "cannot reach the Ray cluster at 127.0.0.1:9 (cluster.address)"),
    ],
    ids=["misspelt_key", "removed_key", "sweep", "cluster_unreachable"],
)  # fmt: skip
def test_batch_overrides_and_cluster_fail_with_one_line(args, needle, tiny_models, demo_media, tmp_path):
    """``python -m cluster.batch`` composes through the same helper: one line, exit code 2, no results."""
    tasks = tmp_path / "tasks.yaml"
    tasks.write_text(f"task_0:\n  video_path: {demo_media.video}\n  audio_path: {demo_media.audio}\n")
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    tag = f"test-cli-errors-{uuid.uuid4().hex[:8]}"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "cluster.batch",
            str(tasks),
            "models=tiny",
            f"models.dir={tiny_models}",
            *args,
        ],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "TMPDIR": str(scratch), "MUSETALK_TEST_TAG": tag},
    )
    assert proc.returncode == 2, proc.stderr[-3000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and needle in errors[0], proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr + proc.stdout and "HYDRA_FULL_ERROR" not in proc.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["scratch", "tasks.yaml"]  # no results/
    assert list(scratch.iterdir()) == []
    assert _tagged(tag) == []
