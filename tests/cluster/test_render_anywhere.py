"""The installed project renders the demo from any working directory (issue 19): production imports
nothing from ``scripts/``, and cwd-relative outputs land in that directory, never in the checkout."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import av

from cluster.config import REPO_ROOT
from tests.helpers import cli_tmp, trimmed_audio

# What a run from the checkout would create or fill there (cwd-relative outputs, bundled demo, tiny weights).
CHECKOUT_PLACES = ("outputs", "multirun", "media", "models/tiny")


def _listing(root: Path) -> dict[str, list[str] | None]:
    return {
        place: sorted(p.name for p in (root / place).iterdir()) if (root / place).is_dir() else None
        for place in CHECKOUT_PLACES
    }


def test_renders_the_demo_from_a_directory_outside_the_checkout(tiny_models, demo_media, tmp_path):
    """``python -m cluster.render +task=test models=tiny`` with the session's tiny weights and demo clip
    (so nothing is rebuilt in the checkout) and a 1 s audio (25 frames)."""
    work = tmp_path / "elsewhere"
    work.mkdir()
    assert REPO_ROOT not in work.resolve().parents
    audio = trimmed_audio(demo_media.audio, tmp_path / "one_second.wav", 1.0)
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "MUSETALK_OUTPUT_ROOT")}
    env["TMPDIR"] = str(cli_tmp())
    # Nothing beyond the installed distribution: `scripts` (not part of it) must not be importable here.
    probe = subprocess.run(
        [sys.executable, "-c", "import importlib.util as u; print(u.find_spec('scripts'))"],
        cwd=work,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert probe.stdout.strip() == "None", probe.stdout + probe.stderr
    before = _listing(REPO_ROOT)

    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "cluster.render",
            "+task=test",
            "models=tiny",
            f"models.dir={tiny_models}",
            f"task.video={demo_media.video}",
            f"task.audio={audio}",
            "cluster.num_cpus=2",
        ],
        cwd=work,
        env=env,
        capture_output=True,
        text=True,
        timeout=1800,
    )

    assert proc.returncode == 0, proc.stderr[-3000:]
    outputs = sorted(work.glob("outputs/*/*/demo_lipsync.mp4"))
    assert len(outputs) == 1, sorted(str(p.relative_to(work)) for p in work.rglob("*"))
    out = outputs[0]
    with av.open(str(out)) as f:
        assert sorted(s.type for s in f.streams) == ["audio", "video"]
        assert f.streams.video[0].frames == 25
    summary = json.loads(out.with_suffix(".summary.json").read_text())
    assert summary["frames"] == 25
    assert json.loads((out.parent / "metrics.json").read_text())["frames"] == 25
    assert sorted(p.name for p in work.iterdir()) == ["outputs"]
    assert _listing(REPO_ROOT) == before
