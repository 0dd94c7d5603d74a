"""A sweep's runs on one footing, and after the multirun one table and one plot of every run's frames, fps
and per-stage time (a Hydra callback).

Every run is measured under the same conditions (:func:`on_footing`, ``sweep.prep``): with ``cache`` (the
default) each run's preparation is first put in the avatar cache by an untimed warm-up, so every run reads
all of it from there; with ``paid`` every run computes its own. The table's ``prep`` column says which
footing each run had, read from what it did (``cache``, ``paid``, or ``mixed``: a warning). Preparation and
generation are reported apart (``prep_s``, ``gen_s``: busy worker seconds; ``gen_fps``: one generating
worker's frames per second).

Runs of a sweep render on one warm pool while the loaded models stay the same
(``cluster.pool.warm_pools()``; ``render.batch_size`` is a per-job setting, so a sweep over it loads the
weights once), so the table separates model loading (``load_s``, ``loads``: the run's warm-up included)
from rendering: ``fps`` is end to end, ``render_fps`` without loading. A run whose settings were refused
(a setting that does nothing, see ``cluster.config.noop_problems``) is listed as ``rejected`` with its
reason; the sweep goes on and exits non-zero at the end. With ``qa.fail_on_flag``, a run the quality gate flagged is listed as ``flagged``
and the sweep exits with code 6 (``shards.errors.Flagged``) when no run failed outright.
"""

from __future__ import annotations

import json
import logging
import sys
from dataclasses import replace
from pathlib import Path

import cv2
import numpy as np
from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from cluster.config import JobConfig
from musetalk.stats import STAGES
from shards.errors import ConfigError, Flagged

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
    "prep",
    "prep_s",
    "gen_s",
    "gen_fps",
    "warmup_s",
    "load_s",
    "loads",
    "retries",
    "sync",
    "offset",
    "flags",
]


def on_footing(job: JobConfig) -> tuple[JobConfig, dict]:
    """``job`` as a sweep measures it (``sweep.prep``), and what its warm-up did (metrics to add).

    ``cache``: the job's preparation runs first into the avatar cache on the same warm pool, untimed
    (:func:`cluster.driver.run_jobs` with ``prepare_only``); the timed run then reads it all from there.
    ``paid``: the avatar cache is off for the run, so it computes its whole preparation."""
    if job.sweep.prep == "paid":
        return replace(job, cache=replace(job.cache, enabled=False)), {}
    if not job.cache.enabled:
        raise ConfigError(
            "sweep.prep=cache serves every run's preparation from the avatar cache, which is off: set "
            "cache.enabled=true, or sweep.prep=paid to have every run compute its preparation"
        )
    from cluster.driver import run_jobs  # imports Ray and the models' code

    logger.info("sweep: preparing %s into the avatar cache before it is timed", job.output.name)
    (warm,) = run_jobs([job], isolate=False, prepare_only=True)
    w = warm.summary
    return job, {
        "warmup_seconds": w.seconds,
        "warmup_loads": w.model_loads,
        "warmup_load_seconds": w.load_seconds,
    }


def footing(metrics: dict) -> str:
    """Where a run's preparation came from: ``cache`` (all of it), ``paid`` (none from the cache) or
    ``mixed``."""
    done = metrics.get("detections", 0) + metrics.get("vae_encodes", 0) + metrics.get("parsings", 0)
    if not done:
        return "cache"
    return "paid" if not metrics.get("cache_hits", 0) else "mixed"


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
                prep=footing(m),
                prep_s=m.get("prep_seconds"),
                gen_s=m.get("generation_seconds"),
                gen_fps=m.get("generation_fps"),
                warmup_s=m.get("warmup_seconds"),
                # the models a run's warm-up loaded are the run's
                load_s=m.get("load_seconds", 0.0) + m.get("warmup_load_seconds", 0.0),
                loads=m.get("model_loads", 0) + m.get("warmup_loads", 0),
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
        cols += [k for k in r if k.endswith("_s") and k.removesuffix("_s") in STAGES and k not in cols]
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
        footings = {r["prep"] for r in rows if r["status"] in ("ok", "flagged")}
        if len(footings) > 1:
            logger.warning(
                "the sweep's runs did not all get their preparation the same way (%s): compare their gen_fps",
                ", ".join(sorted(footings)),
            )
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
