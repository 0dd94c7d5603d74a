"""Checks that run before any work (no media probing, no model loading, no Ray): the output can be
written, would replace no input and would not vanish with Ray's copy of a job's working directory, the
inputs exist, an explicitly named device exists here. URIs (object storage) are checked with fsspec:
objects exist, buckets exist, the output URI is no input URI.

Each check returns its problems as one-line strings with their fix; :func:`check_before_work` raises
them together.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from pathlib import Path

from cluster import storage
from cluster.config import DEMO_DIR, JobConfig
from cluster.rundir import run_dir_path
from shards.errors import ConfigError, InputError, StorageError

logger = logging.getLogger(__name__)

# Set by Ray's job supervisor for a job's entrypoint (ray/_private/runtime_env/constants.py): the job's
# runtime_env and metadata as JSON.
RAY_JOB_CONFIG_ENV = "RAY_JOB_CONFIG_JSON_ENV_VAR"


def ray_job_copy() -> Path | None:
    """Ray's temporary copy of the working directory when this process is the entrypoint of a Ray Job
    submitted with a ``working_dir`` (the entrypoint runs inside that copy); None otherwise.

    Ray deletes the copy once no job uses it, so nothing the user keeps may be written there.
    """
    raw = os.environ.get(RAY_JOB_CONFIG_ENV)
    if not raw:
        return None
    try:
        runtime_env = json.loads(raw).get("runtime_env") or {}
    except (ValueError, AttributeError):
        return None
    return Path.cwd().resolve() if runtime_env.get("working_dir") else None


def in_ray_job_copy(path: Path) -> Path | None:
    """The Ray Job working-directory copy that ``path`` lies in, if any."""
    copy = ray_job_copy()
    if copy is not None and (path.resolve() == copy or copy in path.resolve().parents):
        return copy
    return None


def in_demo_dir(path: Path) -> bool:
    """Whether ``path`` lies in the bundled demo directory (the only place the demo builder writes)."""
    return path.resolve().parent == DEMO_DIR.resolve()


def demo_to_build(job: JobConfig) -> list[Path]:
    """The inputs the demo builder will make: missing ones at the bundled paths, when ``task.make_demo``."""
    if not job.make_demo:
        return []
    return [p for p in (job.video, job.audio) if not p.exists() and in_demo_dir(p)]


def same_file(a: Path, b: Path) -> bool:
    """The same file after resolving symlinks and relative parts (and hard links, when both exist)."""
    if a.resolve() == b.resolve():
        return True
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


def output_problems(job: JobConfig) -> list[str]:
    """The output, its summary and its scratch directory must not be (or hold) an input; its directory
    must be creatable and writable, tested by creating and deleting a probe file (mode bits say nothing
    to root)."""
    out = job.output
    problems = []
    inputs = [("task.video", job.video), ("task.audio", job.audio)]
    for name, path in inputs:
        if same_file(out, path):
            problems.append(
                f"task.output={out} is the input {name}: the render would replace it; choose another task.output"
            )
        for wanted, side, switch in (
            (job.summary, ".summary.json", "output.summary"),
            (job.qa, ".qa.png", "output.qa"),
        ):
            beside = out.with_suffix(side)
            if wanted and same_file(beside, path):
                what = "summary" if side == ".summary.json" else "QA sheet"
                problems.append(
                    f"the {what} {beside} (written beside task.output) would replace the input {name}; "
                    f"choose another task.output or set {switch}=false"
                )
        run_dir = run_dir_path(out).resolve()
        if run_dir in path.resolve().parents:
            problems.append(
                f"the input {name}={path} is inside {run_dir}, the scratch directory the render deletes; "
                f"choose another task.output"
            )
    if copy := in_ray_job_copy(out):
        problems.append(
            f"task.output={out} is inside Ray's temporary copy of the job's working directory ({copy}), "
            f"which Ray deletes; give an absolute task.output or set MUSETALK_OUTPUT_ROOT (or output.root) "
            f"to a directory outside it, e.g. shared storage"
        )
    if out.is_dir():
        problems.append(f"task.output={out} is a directory; give a file path ending in .mp4")
        return problems
    existing = out.parent
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent  # the output's directory is created later: probe where it would be
    if not existing.is_dir():
        problems.append(
            f"task.output={out} cannot be created: {existing} is a file, not a directory; choose another task.output"
        )
    else:
        try:
            fd, probe = tempfile.mkstemp(prefix=".musetalk-write-probe-", dir=existing)
            os.close(fd)
            os.unlink(probe)
        except OSError as err:
            problems.append(
                f"task.output={out} cannot be written: creating a file in {existing} failed "
                f"({err.strerror}); choose a writable task.output"
            )
    return problems


def input_problems(job: JobConfig) -> list[str]:
    """Each input must be an existing file (or object), unless the demo builder is about to make it."""
    problems = []
    pending = demo_to_build(job)
    for name, path, uri in (
        ("task.video", job.video, job.video_uri),
        ("task.audio", job.audio, job.audio_uri),
    ):
        if uri is not None:
            problems += _object_problems(name, uri)
            continue
        if path in pending:
            continue
        if not path.exists():
            hint = f" (the demo is built only in {DEMO_DIR})" if job.make_demo else ""
            problems.append(f"{name} not found: {path}{hint}; check the path")
        elif not path.is_file():
            problems.append(f"{name} is not a file: {path}; give a video or audio file")
    return problems


def _object_problems(name: str, uri: str) -> list[str]:
    """An input URI must name an existing object in an existing bucket (one line each, no traceback)."""
    try:
        if storage.exists(uri):
            return []
        if problem := storage.bucket_problem(uri):
            return [f"{name}: {problem}"]
    except StorageError as err:
        return [f"{name}: {err}"]
    return [f"{name} not found: {uri}; check the URI"]


def output_uri_problems(job: JobConfig) -> list[str]:
    """An output URI must not be an input URI (nor may its summary or QA sheet be), and its bucket must
    exist; the local staging file behind it is checked like any output."""
    out = job.output_uri
    if out is None:
        return []
    problems = []
    for name, uri in (("task.video", job.video_uri), ("task.audio", job.audio_uri)):
        if uri is None:
            continue
        if uri == out:
            problems.append(
                f"task.output={out} is the input {name}: the render would replace it; choose another task.output"
            )
        for wanted, side, switch in (
            (job.summary, ".summary.json", "output.summary"),
            (job.qa, ".qa.png", "output.qa"),
        ):
            if wanted and storage.beside(out, side) == uri:
                problems.append(
                    f"{storage.beside(out, side)} (written beside task.output) would replace the input {name}; "
                    f"choose another task.output or set {switch}=false"
                )
    try:
        if problem := storage.bucket_problem(out):
            problems.append(f"task.output: {problem}")
    except StorageError as err:
        problems.append(f"task.output: {err}")
    return problems


def device_problem(job: JobConfig) -> str | None:
    """An explicitly named device that this machine lacks, when the render runs on an embedded cluster
    here (a remote cluster's workers check their own device and report it)."""
    device = job.pipeline.device
    if job.cluster.address or os.environ.get("RAY_ADDRESS") or device in ("auto", "cpu"):
        return None
    import torch

    if device.startswith("cuda") and not torch.cuda.is_available():
        return f"render.device={device} but this machine has no CUDA GPU; use render.device=auto or cpu"
    if device.startswith("cuda") and int(device.partition(":")[2] or 0) >= torch.cuda.device_count():
        return f"render.device={device} but this machine has {torch.cuda.device_count()} CUDA GPU(s); use render.device=cuda"
    if device == "mps" and not torch.backends.mps.is_available():
        return "render.device=mps but this machine has no Apple MPS device; use render.device=auto or cpu"
    return None


def gpu_problem(require_gpus: bool, cluster_gpus: float, *, can_grow: bool = False) -> str | None:
    """With ``cluster.require_gpus``, a cluster without GPUs is an error rather than a CPU render, unless it
    ``can_grow`` (one the driver joined: its autoscaler is asked for GPU nodes and the driver waits)."""
    if require_gpus and not cluster_gpus and not can_grow:
        return (
            "cluster.require_gpus=true but the Ray cluster has no GPU; start GPU nodes (or wait for them to "
            "join) or set cluster.require_gpus=false to render on CPU workers"
        )
    return None


def check_before_work(job: JobConfig) -> None:
    """Raise ConfigError for a device this machine lacks, else one InputError listing every path problem."""
    if problem := device_problem(job):
        raise ConfigError(problem)
    problems = output_uri_problems(job) + output_problems(job) + input_problems(job)
    if problems:
        raise InputError("; ".join(problems))
    logger.debug("preflight passed for %s", job.output)
