"""Hydra callback: after a multirun, one table of every run's frames, fps and per-stage time."""

from __future__ import annotations

import json
import logging
from pathlib import Path

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

logger = logging.getLogger(__name__)


def sweep_table(sweep_dir: Path) -> list[dict]:
    """One row per run directory under ``sweep_dir`` that wrote metrics.json (in run order)."""
    rows = []
    run_dirs = sorted(
        (p for p in sweep_dir.iterdir() if p.is_dir() and p.name.isdigit()), key=lambda p: int(p.name)
    )
    for run in run_dirs:
        metrics = run / "metrics.json"
        overrides = run / ".hydra" / "overrides.yaml"
        row = {
            "run": int(run.name),
            "overrides": " ".join(OmegaConf.load(overrides)) if overrides.exists() else "",
        }
        if metrics.exists():
            m = json.loads(metrics.read_text())
            row.update(frames=m["frames"], face_frames=m["face_frames"], seconds=m["seconds"], fps=m["fps"])
            row.update({f"{k}_s": v for k, v in m["stage_seconds"].items()})
            row["status"] = "ok"
        else:
            row["status"] = "failed"
        rows.append(row)
    # Show only what the sweep varied: drop overrides every run shares.
    split = [r["overrides"].split() for r in rows]
    common = set.intersection(*(set(o) for o in split)) if split else set()
    for r, o in zip(rows, split, strict=True):
        r["overrides"] = " ".join(x for x in o if x not in common or len(rows) == 1)
    return rows


def format_table(rows: list[dict]) -> str:
    cols = ["run", "status", "frames", "fps", "seconds", "generate_s", "enhance_s", "blend_s", "overrides"]
    widths = {c: max(len(c), *(len(str(r.get(c, ""))) for r in rows)) for c in cols}
    lines = ["  ".join(c.ljust(widths[c]) for c in cols)]
    lines += ["  ".join(str(r.get(c, "")).ljust(widths[c]) for c in cols) for r in rows]
    return "\n".join(lines)


class SweepSummary(Callback):
    def on_multirun_end(self, config: DictConfig, **kwargs) -> None:
        sweep_dir = Path(config.hydra.sweep.dir)
        if not sweep_dir.is_dir():
            return
        rows = sweep_table(sweep_dir)
        (sweep_dir / "sweep_summary.json").write_text(json.dumps(rows, indent=1))
        table = format_table(rows)
        (sweep_dir / "sweep_summary.txt").write_text(table + "\n")
        print(f"\nsweep summary ({sweep_dir}):\n{table}")
