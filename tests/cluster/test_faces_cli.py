"""``python -m cluster.faces``: the listing of the two-faces clip, and its one-line refusals."""

from __future__ import annotations

import json
import subprocess
import sys

import cv2

from cluster.config import REPO_ROOT
from musetalk.testing.two_faces import make_two_faces
from tests.helpers import error_lines


def _faces(*args: str, tmp):
    cmd = [sys.executable, "-m", "cluster.faces", *args]
    env = {"TMPDIR": str(tmp), "PATH": "/usr/bin:/bin"}
    return subprocess.run(cmd, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=1800)


def test_listing_finds_two_tracks_per_shot(tiny_models, tmp_path):
    clip = make_two_faces(tmp_path / "clip")
    out = tmp_path / "listing"
    args = ["models=tiny", f"models.dir={tiny_models}", f"cache.dir={tmp_path / 'avatars'}"]
    done = _faces(str(clip.video), "--out", str(out), *args, tmp=tmp_path)
    assert done.returncode == 0, done.stderr
    assert "30 of 30 frames detected here" in done.stderr
    listing = json.loads((out / "tracks.json").read_text())
    assert listing["cuts"] == [clip.cut]
    spans = [(t["id"], t["first_frame"], t["last_frame"], t["frames_seen"]) for t in listing["tracks"]]
    shot2 = clip.frames - clip.cut
    # stable ids across the first shot (the right face survives its absence), new ids after the cut
    assert spans == [
        (1, 0, clip.cut - 1, clip.cut),
        (2, 0, clip.cut - 1, clip.cut - len(clip.absent)),
        (3, clip.cut, clip.frames - 1, shot2),
        (4, clip.cut, clip.frames - 1, shot2),
    ]
    assert listing["tracks"][0]["mean_box"][2] < 256 < listing["tracks"][1]["mean_box"][0]  # 1 left, 2 right
    sheet = cv2.imread(str(out / "tracks.png"))
    assert sheet.shape[0] == 4 * 96
    again = _faces(str(clip.video), "--out", str(tmp_path / "again"), *args, tmp=tmp_path)
    assert again.returncode == 0 and "from the avatar cache" in again.stderr  # nothing detected again
    assert json.loads((tmp_path / "again" / "tracks.json").read_text())["tracks"] == listing["tracks"]


def test_listing_refuses_a_missing_video(tmp_path):
    done = _faces(
        str(tmp_path / "none.mp4"), "--out", str(tmp_path / "listing"), "cache.enabled=false", tmp=tmp_path
    )
    assert done.returncode != 0
    assert len(error_lines(done.stderr)) == 1 and "none.mp4 not found" in done.stderr
    assert not (tmp_path / "listing").exists()
