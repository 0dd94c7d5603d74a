"""scripts/gpu_check.py: Ray- and Hydra-free, and its CPU run with the tiny models writes every section."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_importing_it_imports_no_ray_hydra_or_omegaconf():
    code = (
        "import sys, scripts.gpu_check\n"
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('ray', 'hydra', 'omegaconf'))\n"
        "print(bad)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_quick_tiny_cpu_run_writes_every_section(tiny_models, tmp_path):
    out = tmp_path / "check.json"
    cmd = [sys.executable, "-m", "scripts.gpu_check", "--device", "cpu", "--tiny", "--quick", "--threads", "1",
           "--models", str(tiny_models), "--work", str(tmp_path / "work"), "--out", str(out),
           "--host"]  # fmt: skip
    run = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    data = json.loads(out.read_text())
    sections = data["sections"]
    assert set(sections) == {"models", "invariance", "end_to_end", "workers", "host"}
    for name, part in sections.items():
        assert "error" not in part and "partial" not in part, (name, part)
        assert name == "workers" or "section_s" in part
    assert [r["batch"] for r in sections["models"]["generate"]] == [2, 4]
    assert all(r["nonfinite"] == 0 for r in sections["models"]["generate"])
    # on the CPU, with padded batches and one thread count, every invariance holds bit-exactly
    inv = sections["invariance"]
    for key in ("positions", "batch_mates", "two_threads", "two_processes"):
        assert inv[key]["bit_exact"], (key, inv[key])
    e2e = sections["end_to_end"]
    for composite in ("device", "numpy"):
        for run_name in ("first_render", "re_render"):
            assert e2e[composite][run_name]["fps"] > 0
            assert e2e[composite][run_name]["face_frames"] > 0  # Haar found the face
    assert sections["workers"] == {"skipped": "opt-in"}
    assert sections["host"]["encode_lossless"]["frames"] == sections["host"]["decode"]["frames"] > 0
    assert "| dtype | batch |" in run.stdout
