"""Hydra callback: after a multirun, one table and one plot of every run's frames, fps and per-stage time.

Runs of a sweep render on one warm pool while the models stay the same (``cluster.pool.warm_pools()``), so the
table separates model loading (``load_s``, ``loads``) from rendering: ``fps`` is end to end, ``render_fps``
without loading. A run whose settings were refused (a setting that does nothing, see
``cluster.config.noop_problems``) is listed as ``rejected`` with its reason; the sweep goes on and exits
non-zero at the end. With ``qa.fail_on_flag``, a run the quality gate flagged is listed as ``flagged``
and the sweep exits with code 6 (``shards.errors.Flagged``) when no run failed outright.
"""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

import cv2
import numpy as np
from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from shards.errors import Flagged

logger = logging.getLogger(__name__)

# Where a run that was refused leaves its reason (``cluster.render`` writes it in multirun mode).
REJECTED = "rejected.json"
_HEAD = [
    "run",
    "status",
    "frames",
    "fps",
    "render_fps",
    "seconds",
    "load_s",
    "loads",
    "retries",
    "sync",
    "offset",
    "flags",
]


def sweep_table(sweep_dir: Path) -> list[dict]:
    """One row per run directory under ``sweep_dir`` (in run order): ok with metrics, rejected with its
    reason, or failed."""
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
            row.update(
                frames=m["frames"],
                face_frames=m["face_frames"],
                seconds=m["seconds"],
                fps=m["fps"],
                render_fps=m.get("render_fps"),
                load_s=m.get("load_seconds"),
                loads=m.get("model_loads"),
                retries=m.get("retries"),
                pool=m.get("pool", ""),
                sync=m.get("sync_confidence"),  # lip-sync confidence (cluster/syncjob.py)
                offset=m.get("sync_offset"),
                flags="; ".join(m.get("flags", [])),
            )
            row.update({f"{k}_s": v for k, v in m["stage_seconds"].items()})
            row["status"] = "flagged" if m.get("flagged") and m.get("fail_on_flag") else "ok"
        elif (run / REJECTED).exists():
            row["status"] = "rejected"
            row["error"] = json.loads((run / REJECTED).read_text())["error"]
        else:
            row["status"] = "failed"
        rows.append(row)
    # Show only what the sweep varied: drop overrides every run shares.
    split = [r["overrides"].split() for r in rows]
    common = set.intersection(*(set(o) for o in split)) if split else set()
    for r, o in zip(rows, split, strict=True):
        r["overrides"] = " ".join(x for x in o if x not in common or len(rows) == 1)
    return rows


def stage_columns(rows: list[dict]) -> list[str]:
    """Every ``<stage>_s`` column, in pipeline order (as the summaries list them)."""
    cols: list[str] = []
    for r in rows:
        cols += [k for k in r if k.endswith("_s") and k != "load_s" and k not in cols]
    return cols


def format_table(rows: list[dict]) -> str:
    cols = [*_HEAD, *stage_columns(rows), "overrides", "error"]
    return text_table(cols, [[cell(r.get(c), missing="") for c in cols] for r in rows])


def cell(value, missing: str = "-") -> str:
    """One table cell: floats to 2 decimals, None as ``missing``."""
    if value is None:
        return missing
    return f"{value:.2f}" if isinstance(value, float) else str(value)


def text_table(cols: list[str], cells: list[list[str]]) -> str:
    """Left-aligned columns, two spaces apart, a header line first."""
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(cols)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(cols, widths, strict=True)).rstrip()]
    lines += ["  ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)).rstrip() for row in cells]
    return "\n".join(lines)


# BGR colours: fps lines, then one per stage (stacked bars), model loading last.
_FPS, _RENDER_FPS, _LOAD = (60, 60, 60), (200, 120, 0), (128, 128, 128)
_PALETTE = [
    (180, 119, 31),
    (14, 127, 255),
    (44, 160, 44),
    (40, 39, 214),
    (189, 103, 148),
    (75, 86, 140),
    (194, 119, 227),
    (34, 189, 188),
    (207, 190, 23),
]


def plot(rows: list[dict], path: Path) -> None:
    """A PNG: fps (end to end and without loading) above, per-stage seconds and model loading stacked
    below, one column per run labelled with its swept values. Drawn with OpenCV (no plotting library)."""
    stages = stage_columns(rows)
    col_w, left = 150, 70
    width = left + col_w * max(1, len(rows)) + 190
    top_h, bottom_h = 200, 260
    label_h = 16 * (1 + max(1, max(len(r["overrides"].split()) for r in rows))) + 14
    height = 30 + top_h + 30 + bottom_h + label_h
    img = np.full((height, width, 3), 255, np.uint8)
    font = cv2.FONT_HERSHEY_SIMPLEX

    def text(s: str, x: int, y: int, colour=(0, 0, 0), scale=0.4) -> None:
        cv2.putText(img, s, (x, y), font, scale, colour, 1, cv2.LINE_AA)

    ok = [r for r in rows if r["status"] == "ok"]
    xs = {r["run"]: left + col_w * i + col_w // 2 for i, r in enumerate(rows)}
    # fps panel
    y0 = 30
    fps_max = max([r.get(k) or 0 for r in ok for k in ("fps", "render_fps")] + [1e-9])
    text("frames/s (dark: end to end, blue: without model loading)", left, y0 - 10)
    cv2.rectangle(img, (left, y0), (left + col_w * len(rows), y0 + top_h), (200, 200, 200), 1)
    text(f"{fps_max:.2f}", 5, y0 + 10)
    text("0", 5, y0 + top_h)
    for key, colour in (("fps", _FPS), ("render_fps", _RENDER_FPS)):
        pts = [(xs[r["run"]], int(y0 + top_h - (r.get(key) or 0) / fps_max * (top_h - 10))) for r in ok]
        for a, b in zip(pts, pts[1:], strict=False):
            cv2.line(img, a, b, colour, 2, cv2.LINE_AA)
        for p in pts:
            cv2.circle(img, p, 4, colour, -1, cv2.LINE_AA)
    # stage panel
    y1 = y0 + top_h + 30
    parts = [*stages, "load_s"]
    colours = {s: _PALETTE[i % len(_PALETTE)] for i, s in enumerate(stages)} | {"load_s": _LOAD}
    sec_max = max([sum(r.get(s) or 0 for s in parts) for r in ok] + [1e-9])
    text("seconds per stage (stacked), model loading on top", left, y1 - 10)
    cv2.rectangle(img, (left, y1), (left + col_w * len(rows), y1 + bottom_h), (200, 200, 200), 1)
    text(f"{sec_max:.1f}s", 5, y1 + 10)
    text("0", 5, y1 + bottom_h)
    for r in rows:
        x = xs[r["run"]]
        if r["status"] != "ok":
            text(r["status"], x - 30, y1 + bottom_h - 10, (0, 0, 200))
            continue
        base = y1 + bottom_h
        for s in parts:
            h = int(round((r.get(s) or 0) / sec_max * (bottom_h - 10)))
            if h > 0:
                cv2.rectangle(img, (x - 30, base - h), (x + 30, base), colours[s], -1)
            base -= h
    # legend and labels
    lx = left + col_w * len(rows) + 15
    for i, s in enumerate(parts):
        cv2.rectangle(img, (lx, y1 + 16 * i), (lx + 12, y1 + 16 * i + 12), colours[s], -1)
        text(s.removesuffix("_s") if s != "load_s" else "model load", lx + 18, y1 + 16 * i + 11)
    for r in rows:
        for j, part in enumerate([f"run {r['run']}", *r["overrides"].split()]):
            text(part[:24], xs[r["run"]] - col_w // 2 + 4, y1 + bottom_h + 18 + 16 * j, scale=0.35)
    if not cv2.imwrite(str(path), img):
        raise OSError(f"could not write {path}")


class SweepSummary(Callback):
    def on_multirun_end(self, config: DictConfig, **kwargs) -> None:
        sweep_dir = Path(config.hydra.sweep.dir)
        if not sweep_dir.is_dir():
            return
        rows = sweep_table(sweep_dir)
        (sweep_dir / "sweep_summary.json").write_text(json.dumps(rows, indent=1))
        table = format_table(rows)
        (sweep_dir / "sweep_summary.txt").write_text(table + "\n")
        plot(rows, sweep_dir / "sweep_summary.png")
        print(f"\nsweep summary ({sweep_dir}):\n{table}\nplot: {sweep_dir / 'sweep_summary.png'}")
        refused = [r for r in rows if r["status"] not in ("ok", "flagged")]
        if refused:
            print(
                f"error: {len(refused)} of {len(rows)} runs did not render (see the table)", file=sys.stderr
            )
            sys.exit(2)
        flagged = [r for r in rows if r["status"] == "flagged"]
        if flagged:  # qa.fail_on_flag: every output is written; the sweep says some need a look
            print(f"error: {len(flagged)} of {len(rows)} runs flagged by the quality gate", file=sys.stderr)
            sys.exit(Flagged.exit_code)
