"""Many jobs, one warm pool: ``python -m cluster.batch TASKS [--output-dir DIR] [hydra overrides]``.

``TASKS`` is an upstream MuseTalk inference YAML (``task_N: {video_path, audio_path, bbox_shift,
result_name}`` and the seed pipeline's ``gfpgan: {enabled, upscale, model_path}`` block), or a CSV / JSONL
manifest with ``video,audio[,output][,bbox_shift]``. Relative paths resolve against the task file's
directory. The overrides are the single-job CLI's (``render.batch_size=4 cluster.workers=2 ...``) and
apply to every job. Outputs default to upstream's naming, ``<output dir>/<video stem>_<audio stem>.mp4``,
with ``<task file dir>/results`` as the output directory.

Every job renders on one pool whose workers load the models once (the shared settings are the same for
all jobs; ``bbox_shift`` is per job and changes no model), with shards of different jobs interleaved.
Each job keeps its own lock, resume manifest and summary. A bad job is reported while the others finish;
the run ends with one table (``batch_summary.txt`` / ``.json`` in the output directory) and exits
non-zero when any job failed.
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import signal
import sys
from dataclasses import dataclass
from pathlib import Path

import yaml
from omegaconf import OmegaConf

from cluster.config import JobConfig, job_from_config
from cluster.overrides import compose
from cluster.preflight import check_before_work, same_file
from cluster.sweep import cell, text_table
from shards.dub import MODES
from shards.errors import ConfigError, FarmError, Flagged, Interrupted
from shards.ranges import face_problem

logger = logging.getLogger("cluster.batch")

_DUB_KEYS = {"segments", "mode", "face"}  # per job, in either format
_TASK_KEYS = {"video_path", "audio_path", "bbox_shift", "result_name", *_DUB_KEYS}
_GFPGAN_KEYS = {"enabled", "upscale", "model_path"}
_MANIFEST_KEYS = {"video", "audio", "output", "bbox_shift", *_DUB_KEYS}


@dataclass(frozen=True)
class TaskSpec:
    """One job as the task file gives it; ``problem`` is set when the entry itself is malformed."""

    name: str
    video: Path | None = None
    audio: Path | None = None
    output: Path | None = None  # None: upstream naming in the output directory
    bbox_shift: int | None = None  # None: the config's task.bbox_shift
    problem: str | None = None
    dub: tuple[tuple[str, object], ...] = ()  # (config key, value): task.mode, task.segments, face.select


@dataclass(frozen=True)
class TaskFile:
    tasks: list[TaskSpec]
    overrides: list[str]  # what the file's global blocks (gfpgan) set, as Hydra overrides
    gfpgan_model: Path | None = None


@dataclass(frozen=True)
class BatchRow:
    job: str
    status: str  # ok | flagged (by the quality gate, with qa.fail_on_flag) | failed | interrupted
    output: str
    frames: int | None = None
    fps: float | None = None
    seconds: float | None = None
    error: str = ""
    sync: float | None = None  # lip-sync confidence (LSE-C; cluster/syncjob.py)
    offset: int | None = None  # audio-video offset, 25 fps frames
    flags: str = ""  # the quality gate's reasons (a flagged job's output is written all the same)


def load_tasks(path: Path) -> TaskFile:
    """Parse a task file (YAML by upstream's schema, CSV or JSONL); ConfigError for a file that cannot be
    read as one. A malformed entry becomes a TaskSpec with ``problem`` set (that job fails alone)."""
    if not path.is_file():
        raise ConfigError(f"task file not found: {path}")
    base = path.resolve().parent
    suffix = path.suffix.lower()
    if suffix == ".csv":
        with path.open(newline="") as f:
            rows = list(csv.DictReader(f))
        return TaskFile([_manifest_entry(f"row_{i + 1}", r, base) for i, r in enumerate(rows)], [])
    if suffix in (".jsonl", ".ndjson"):
        entries = []
        for i, line in enumerate(path.read_text().splitlines()):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except ValueError as err:
                entries.append(TaskSpec(f"line_{i + 1}", problem=f"not JSON ({err})"))
                continue
            entries.append(_manifest_entry(f"line_{i + 1}", row, base))
        return TaskFile(entries, [])
    if suffix in (".yaml", ".yml"):
        return _upstream_yaml(path, base)
    raise ConfigError(f"task file {path} must be .yaml/.yml (upstream tasks), .csv or .jsonl")


def _upstream_yaml(path: Path, base: Path) -> TaskFile:
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise ConfigError(f"task file {path} is not valid YAML: {str(err).splitlines()[0]}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"task file {path} must map task_0, task_1, ... to tasks")
    unknown = sorted(k for k in data if not str(k).startswith("task_") and k != "gfpgan")
    if unknown:
        raise ConfigError(
            f"task file {path}: {', '.join(map(str, unknown))} not understood "
            "(expected task_N entries and an optional gfpgan block)"
        )
    overrides, model = _gfpgan(data.get("gfpgan"), path, base)
    tasks = []
    for name, entry in data.items():
        if name == "gfpgan":
            continue
        if not isinstance(entry, dict):
            tasks.append(TaskSpec(name, problem="must be a mapping with video_path and audio_path"))
            continue
        problems = [
            f"{k} is not a task key (known: {', '.join(sorted(_TASK_KEYS))})"
            for k in entry
            if k not in _TASK_KEYS
        ]
        problems += [f"{k} is required" for k in ("video_path", "audio_path") if not entry.get(k)]
        shift = entry.get("bbox_shift")
        if shift is not None and (not isinstance(shift, int) or isinstance(shift, bool)):
            problems.append(f"bbox_shift must be an integer, got {shift!r}")
        result = entry.get("result_name")
        output = None
        if result:
            output = Path(str(result))
            output = output if output.suffix else output.with_suffix(".mp4")
        dub = _dub(entry, base, problems)
        if problems:
            tasks.append(TaskSpec(name, problem="; ".join(problems)))
            continue
        tasks.append(
            TaskSpec(
                name,
                _resolve(entry["video_path"], base),
                _resolve(entry["audio_path"], base),
                output,  # relative to the output directory, as upstream's result_name
                shift,
                dub=dub,
            )
        )
    return TaskFile(tasks, overrides, model)


def _gfpgan(block, path: Path, base: Path) -> tuple[list[str], Path | None]:
    """The seed pipeline's gfpgan block as our enhance settings; its model_path is checked later."""
    if block is None:
        return [], None
    if not isinstance(block, dict) or set(block) - _GFPGAN_KEYS:
        raise ConfigError(f"task file {path}: gfpgan must be a mapping of {', '.join(sorted(_GFPGAN_KEYS))}")
    enabled, upscale = block.get("enabled", True), block.get("upscale", 1)
    if not isinstance(enabled, bool):
        raise ConfigError(f"task file {path}: gfpgan.enabled must be true or false, got {enabled!r}")
    if not enabled:
        return ["enhance=none"], None  # an upscale beside enabled: false is ignored, as upstream does
    model = block.get("model_path")
    return ["enhance=gfpgan", f"enhance.upscale={upscale}"], _resolve(model, base) if model else None


def _manifest_entry(name: str, row: dict, base: Path) -> TaskSpec:
    if not isinstance(row, dict):
        return TaskSpec(name, problem="must be an object with video and audio")
    row = {k.strip() if isinstance(k, str) else k: v for k, v in row.items() if v not in (None, "")}
    problems = [
        f"{k} is not a manifest key (known: video, audio, output, bbox_shift, segments, mode, face)"
        for k in row
        if k not in _MANIFEST_KEYS
    ]
    problems += [f"{k} is required" for k in ("video", "audio") if k not in row]
    shift = row.get("bbox_shift")
    if isinstance(shift, str):
        try:
            shift = int(shift)
        except ValueError:
            problems.append(f"bbox_shift must be an integer, got {shift!r}")
    elif shift is not None and (not isinstance(shift, int) or isinstance(shift, bool)):
        problems.append(f"bbox_shift must be an integer, got {shift!r}")
    dub = _dub(row, base, problems)
    if problems:
        return TaskSpec(name, problem="; ".join(problems))
    output = _resolve(row["output"], base) if "output" in row else None
    return TaskSpec(name, _resolve(row["video"], base), _resolve(row["audio"], base), output, shift, dub=dub)


def _dub(entry: dict, base: Path, problems: list[str]) -> tuple[tuple[str, object], ...]:
    """A task's dub keys as config settings: ``segments`` (resolved against the task file's directory;
    it implies ``mode: dub``), ``mode``, ``face`` (its syntax checked here: :func:`shards.ranges.face_problem`)."""
    out: list[tuple[str, object]] = []
    segments, mode, face = (entry.get(k) for k in ("segments", "mode", "face"))
    if mode not in (None, "", *MODES):
        problems.append(f"mode must be {' or '.join(MODES)}, got {mode!r}")
    if segments not in (None, ""):
        if mode not in (None, "", "dub"):
            problems.append("segments needs mode dub (leave mode out)")
        out += [("task.mode", "dub"), ("task.segments", str(_resolve(segments, base)))]
    elif mode not in (None, ""):
        out.append(("task.mode", str(mode)))
    if face not in (None, ""):
        if problem := face_problem(str(face)):
            problems.append(problem)
        out.append(("face.select", str(face)))
    return tuple(out)


def _resolve(value, base: Path) -> Path:
    p = Path(str(value)).expanduser()
    return p if p.is_absolute() else base / p


def default_output(spec: TaskSpec, output_dir: Path) -> Path:
    """Upstream's naming: ``<video stem>_<audio stem>.mp4``, or the task's result_name, in ``output_dir``."""
    if spec.output is not None:
        return spec.output if spec.output.is_absolute() else output_dir / spec.output
    return output_dir / f"{spec.video.stem}_{spec.audio.stem}.mp4"


def build_jobs(
    tasks: TaskFile, output_dir: Path, overrides: list[str]
) -> tuple[list[tuple[str, JobConfig]], list[BatchRow]]:
    """Validate every job: (name, job) of the sound ones, and a failed row for each bad one.

    The shared settings (overrides, the gfpgan block) are checked first: a problem there fails the whole
    batch with one ConfigError. Per job: the config (bbox_shift), pre-flight (inputs exist, the output
    replaces no input), then collisions between jobs (an output that is another job's output or input).
    """
    base = _compose([*tasks.overrides, *overrides])
    shared = job_from_config(base)  # a bad shared setting fails the batch here, once
    _check_model_path(tasks.gfpgan_model, shared)
    good: list[tuple[str, JobConfig, TaskSpec]] = []
    bad: list[BatchRow] = []
    for spec in tasks.tasks:
        if spec.problem is not None:
            bad.append(BatchRow(spec.name, "failed", "", error=f"task entry: {spec.problem}"))
            continue
        output = default_output(spec, output_dir)
        cfg = base.copy()
        OmegaConf.update(cfg, "task.video", str(spec.video))
        OmegaConf.update(cfg, "task.audio", str(spec.audio))
        OmegaConf.update(cfg, "task.output", str(output))
        if spec.bbox_shift is not None:
            OmegaConf.update(cfg, "task.bbox_shift", spec.bbox_shift)
        for key, value in spec.dub:
            OmegaConf.update(cfg, key, value, force_add=True)
        try:
            job = job_from_config(cfg)
            check_before_work(job)
        except FarmError as err:
            bad.append(BatchRow(spec.name, "failed", str(output), error=str(err)))
            continue
        good.append((spec.name, job, spec))
    kept: list[tuple[str, JobConfig]] = []
    for name, job, _ in good:
        clash = _collision(name, job, [(n, j) for n, j in kept], [(n, j) for n, j, _ in good if n != name])
        if clash:
            bad.append(BatchRow(name, "failed", str(job.output), error=clash))
        else:
            kept.append((name, job))
    return kept, bad


def _collision(name: str, job: JobConfig, earlier: list, others: list) -> str | None:
    """An output that an earlier job also writes, or that is any other job's input."""
    for other, o in earlier:
        if same_file(job.output, o.output):
            return f"output {job.output} is also the output of {other}; give {name} its own output"
    for other, o in others:
        for kind, path in (("video", o.video), ("audio", o.audio)):
            if same_file(job.output, path):
                return f"output {job.output} is the {kind} input of {other}: it would be replaced"
    return None


def _check_model_path(model: Path | None, job: JobConfig) -> None:
    """The gfpgan block's model_path must be the GFPGAN weights the workers load (models.dir)."""
    if model is None:
        return
    from musetalk.layout import ModelLayout

    expected = ModelLayout.at(job.pipeline.models_dir, tiny=job.pipeline.tiny).gfpgan
    if not model.is_file():
        raise ConfigError(f"gfpgan.model_path {model} not found; give the GFPGANv1.4.pth file")
    if not expected.exists() or not same_file(model, expected):
        raise ConfigError(
            f"gfpgan.model_path {model} is not the GFPGAN weights the workers load ({expected}); "
            f"place the file there, or point models.dir at the directory that holds gfpgan/GFPGANv1.4.pth"
        )


def _compose(overrides: list[str]):
    bad = [
        o for o in overrides if o.split("=", 1)[0].lstrip("+~") in ("task.video", "task.audio", "task.output")
    ]
    if bad:
        raise ConfigError(f"{', '.join(bad)}: inputs and outputs come from the task file, one per job")
    # An override Hydra refuses is one ConfigError line, as on cluster.render's command line.
    return compose(["task.video=", "task.audio=", "task.output=x.mp4", *overrides])


def run_batch(task_file: Path, output_dir: Path | None, overrides: list[str]) -> list[BatchRow]:
    """Validate, render every sound job on one warm pool, and return one row per job (task file order)."""
    tasks = load_tasks(task_file)
    if not tasks.tasks:
        raise ConfigError(f"task file {task_file} lists no tasks")
    output_dir = output_dir or task_file.resolve().parent / "results"
    jobs, bad = build_jobs(tasks, output_dir, overrides)
    for row in bad:
        logger.error("%s: %s", row.job, row.error)
    rows = {r.job: r for r in bad}
    stopped: BaseException | None = None
    if jobs:
        from cluster.render import prepare  # weights are shared: fetched or checked once
        from cluster.session import check_reachable

        check_reachable(jobs[0][1].cluster)  # a cluster to join answers, or the batch stops here
        prepare(jobs[0][1])
        from cluster.driver import run_jobs  # imports the models' code: only once the batch is sound

        names = {id(job): name for name, job in jobs}

        def on_result(r) -> None:
            name = names[id(r.job)]
            if r.summary is not None:
                s = r.summary
                status = "flagged" if s.flagged and r.job.gate.fail_on_flag else "ok"
                rows[name] = BatchRow(
                    name,
                    status,
                    s.output,
                    s.frames,
                    s.render_fps,
                    s.seconds,
                    sync=s.sync_confidence,
                    offset=s.sync_offset,
                    flags="; ".join(s.flags),
                )
                logger.info("%s done: %s", name, s.output)
            else:
                rows[name] = BatchRow(name, "failed", str(r.job.output), error=str(r.error))

        try:
            run_jobs([job for _, job in jobs], on_result=on_result)
        except (KeyboardInterrupt, Interrupted) as err:  # the table still says what finished
            stopped = err
            for name, job in jobs:
                if name not in rows:
                    rows[name] = BatchRow(
                        name, "interrupted", str(job.output), error="resume: run the batch again"
                    )
    order = [spec.name for spec in tasks.tasks]
    result = [rows[n] for n in order]
    output_dir.mkdir(parents=True, exist_ok=True)
    (output_dir / "batch_summary.json").write_text(json.dumps([r.__dict__ for r in result], indent=1))
    (output_dir / "batch_summary.txt").write_text(format_rows(result) + "\n")
    if stopped is not None:
        raise BatchInterrupted(result) from stopped
    return result


class BatchInterrupted(Interrupted):
    """Ctrl-C during a batch: ``rows`` says which jobs finished (their outputs stand) and which did not."""

    def __init__(self, rows: list[BatchRow]) -> None:
        done = sum(r.status == "ok" for r in rows)
        super().__init__(
            f"interrupted; {done} of {len(rows)} jobs finished, the others keep their finished shards: "
            "run the same command again to resume"
        )
        self.rows = rows


def format_rows(rows: list[BatchRow]) -> str:
    """The closing table: job, status, frames, fps (without model loading), seconds, lip-sync confidence,
    offset, the quality gate's flags, output, error."""
    cols = ["job", "status", "frames", "fps", "seconds", "sync", "offset", "flags", "output", "error"]
    return text_table(cols, [[cell(getattr(r, c)) for c in cols] for r in rows])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m cluster.batch", description=__doc__.split("\n\n")[0], allow_abbrev=False
    )
    parser.add_argument("tasks", type=Path, help="upstream inference YAML, or a CSV / JSONL manifest")
    parser.add_argument("--output-dir", type=Path, help="where outputs go (default: <task file dir>/results)")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides applied to every job")
    args = parser.parse_intermixed_args(argv)  # overrides may come before or after --output-dir
    logging.basicConfig(level=logging.INFO, format="[%(asctime)s][%(name)s][%(levelname)s] - %(message)s")
    try:
        rows = run_batch(args.tasks, args.output_dir, args.overrides)
    except BatchInterrupted as err:
        print(format_rows(err.rows))
        return _fail(err)
    except KeyboardInterrupt:
        return _fail(
            Interrupted("interrupted; finished shards are kept: run the same command again to resume")
        )
    except FarmError as err:
        return _fail(err)
    print(format_rows(rows))
    failed = [r for r in rows if r.status not in ("ok", "flagged")]
    if failed:
        print(f"error: {len(failed)} of {len(rows)} jobs failed (see the table)", file=sys.stderr)
        return 1
    flagged = [r for r in rows if r.status == "flagged"]
    if flagged:  # qa.fail_on_flag: the outputs are written, the run says they need a look
        return _fail(
            Flagged(f"{len(flagged)} of {len(rows)} jobs flagged by the quality gate (see the table)")
        )
    return 0


def _fail(err: FarmError) -> int:
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    print(f"error: {err}", file=sys.stderr)
    return err.exit_code


if __name__ == "__main__":
    sys.exit(main())
