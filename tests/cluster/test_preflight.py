"""Checks before any work, on real files: outputs that would replace an input, unwritable outputs, missing inputs."""

from __future__ import annotations

import os
from dataclasses import replace
from pathlib import Path

import pytest

from cluster.config import DEMO_DIR
from cluster.preflight import check_before_work, demo_to_build, input_problems, output_problems
from shards.errors import InputError
from tests.helpers import job_for


@pytest.fixture
def files(tmp_path):
    (tmp_path / "in").mkdir()
    video, audio = tmp_path / "in" / "clip.mp4", tmp_path / "in" / "speech.wav"
    video.write_bytes(b"video")
    audio.write_bytes(b"audio")
    return tmp_path, video, audio


def _job(video: Path, audio: Path, out: Path, *overrides: str):
    return job_for(Path("/unused/models"), video, audio, out, *overrides)


def test_a_sound_job_passes_and_leaves_no_probe(files):
    tmp, video, audio = files
    job = _job(video, audio, tmp / "new" / "deeper" / "out.mp4")
    check_before_work(job)
    assert sorted(p.name for p in tmp.rglob("*")) == ["clip.mp4", "in", "speech.wav"]  # nothing created


@pytest.mark.parametrize(
    ("output", "needle"),
    [
        ("in/clip.mp4", "is the input task.video"),
        ("in/../in/./clip.mp4", "is the input task.video"),
        ("link.mp4", "is the input task.video"),
        ("hard.mp4", "is the input task.video"),
        ("in/speech.mp4", None),  # a different file beside the inputs is fine
    ],
)
def test_output_that_is_an_input(files, output, needle):
    tmp, video, audio = files
    (tmp / "link.mp4").symlink_to(video)
    os.link(video, tmp / "hard.mp4")
    problems = output_problems(_job(video, audio, tmp / output))
    assert (needle is None and problems == []) or (len(problems) == 1 and needle in problems[0])


def test_relative_output_resolving_to_the_input(files, monkeypatch):
    tmp, video, audio = files
    monkeypatch.chdir(tmp / "in")
    assert "is the input task.video" in output_problems(_job(video, audio, Path("clip.mp4")))[0]


def test_summary_beside_output_that_is_an_input(files):
    tmp, video, _ = files
    audio = tmp / "in" / "take.summary.json"
    audio.write_bytes(b"audio")
    (problem,) = output_problems(_job(video, audio, tmp / "in" / "take.mp4"))
    assert "would replace the input task.audio" in problem and "output.summary=false" in problem
    assert output_problems(_job(video, audio, tmp / "in" / "take.mp4", "output.summary=false")) == []


def test_input_inside_the_scratch_directory(files):
    tmp, _, audio = files
    video = tmp / "out" / ".render.mp4.run" / "clip.mp4"
    video.parent.mkdir(parents=True)
    video.write_bytes(b"video")
    (problem,) = output_problems(_job(video, audio, tmp / "out" / "render.mp4"))
    assert "scratch directory the render deletes" in problem


@pytest.mark.parametrize(
    ("output", "needle"),
    [
        ("in/clip.mp4/out.mp4", "in/clip.mp4 is a file, not a directory"),
        ("in/speech.wav/a/b/out.mp4", "in/speech.wav is a file, not a directory"),
        ("in", "is a directory"),
    ],
)
def test_output_that_cannot_be_created(files, output, needle):
    tmp, video, audio = files
    problems = output_problems(replace(_job(video, audio, tmp / "x.mp4"), output=tmp / output))
    assert len(problems) == 1 and needle in problems[0]


def test_unwritable_output_directory_even_for_root(files):
    """sysfs refuses new files with EACCES even to root, which ignores mode bits elsewhere."""
    _, video, audio = files
    (problem,) = output_problems(_job(video, audio, Path("/sys/out.mp4")))
    assert "creating a file in /sys failed (Permission denied)" in problem


def test_missing_inputs_named_and_demo_built_only_in_media(files):
    tmp, video, audio = files
    job = _job(tmp / "in" / "gone.mp4", tmp / "nowhere" / "x.wav", tmp / "out.mp4", "task.make_demo=true")
    assert demo_to_build(job) == []
    problems = input_problems(job)
    assert [p.split(" (")[0] for p in problems] == [
        f"task.video not found: {tmp / 'in' / 'gone.mp4'}",
        f"task.audio not found: {tmp / 'nowhere' / 'x.wav'}",
    ]
    with pytest.raises(InputError, match="gone.mp4.*x.wav"):
        check_before_work(job)
    bundled = DEMO_DIR / "not-yet-built.mp4"
    job = _job(bundled, audio, tmp / "out.mp4", "task.make_demo=true")
    assert demo_to_build(job) == [bundled] and input_problems(job) == []
    assert demo_to_build(replace(job, make_demo=False)) == []


def test_input_that_is_a_directory(files):
    tmp, video, _ = files
    (problem,) = input_problems(_job(video, tmp / "in", tmp / "out.mp4"))
    assert problem.startswith("task.audio is not a file")
