"""The soak benchmark's smoke run: six jobs (two bad), a worker killed mid-job, a clean report."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from cluster.config import REPO_ROOT
from tests.helpers import cli_tmp, processes_under, scratch_under, wait_for


def test_soak_smoke_run(tiny_models, demo_media, tmp_path):
    tmp = cli_tmp()
    out = tmp_path / "soak"
    args = ["--jobs", "6", "--kill-every", "3", "--kill-free", "3", "--warmup", "2", "--seed", "1"]
    args += ["--bad-every", "3"]
    args += ["--out", str(out), "--models", str(tiny_models), "--demo", str(demo_media.video.parent)]
    proc = subprocess.run(
        [sys.executable, "-m", "scripts.soak", *args],
        cwd=REPO_ROOT,
        env={**os.environ, "TMPDIR": str(tmp), "MUSETALK_STAGING_DIR": str(tmp_path / "staging")},
        capture_output=True,
        text=True,
        timeout=1200,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rep = json.loads((out / "soak.json").read_text())
    assert rep["jobs"] == 6 and rep["problems"] == []
    assert rep["kills"] == 1, "a worker is killed at job 3 (the first after the kill-free phase)"
    assert [r["bad"] for r in rep["records"]] == [False, False, True, False, False, True]
    for key in ("driver_rss", "worker_rss", "object_store_bytes", "driver_fds", "disk_bytes"):
        assert key in rep["figures"] and f"| {key} |" in (out / "soak.md").read_text()
    assert not list((out / "outputs").iterdir()), "verified outputs are deleted"
    assert scratch_under(tmp) == []
    assert wait_for(lambda: not processes_under(tmp))
