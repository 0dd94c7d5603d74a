"""The renderer under Ray Jobs: `ray job submit` to a `ray start --head` cluster on 127.0.0.1 joins that
cluster, writes the output where it was asked for, and refuses Ray's temporary copy of the working
directory; plus the output-root and require-GPUs rules without Ray."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import psutil
import pytest
import yaml

from cluster.config import REPO_ROOT
from cluster.preflight import RAY_JOB_CONFIG_ENV, gpu_problem, output_problems
from tests.helpers import (
    cli,
    cli_tmp,
    decode_all,
    error_lines,
    job_for,
    processes_under,
    scratch_under,
    trimmed_audio,
    wait_for,
)

BIN = Path(sys.executable).parent
TERMINAL = {"SUCCEEDED", "FAILED", "STOPPED"}


def _free_ports(n: int) -> list[int]:
    """``n`` distinct ports free on 127.0.0.1 right now (held open together so they differ)."""
    socks = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _stop(tmp: Path) -> list:
    """`ray stop --force`, limited to the head started with TMPDIR=``tmp``: SIGKILL by process id (plain
    `ray stop` matches processes by name and would stop every Ray cluster on the machine; SIGTERM leaves
    raylet and gcs_server running for 15 s and more). Returns what is still alive after a bounded wait."""
    for _ in range(3):  # a raylet may start a worker while its siblings are being killed
        procs = processes_under(tmp)
        for p in procs:
            try:
                p.kill()
            except psutil.NoSuchProcess:
                pass
        psutil.wait_procs(procs, timeout=30)
    return processes_under(tmp)


@pytest.fixture(scope="module")
def ray_head():
    """`ray start --head` on 127.0.0.1 with its own temp root, 2 CPUs and the dashboard (Jobs API) on
    a free port; yields the dashboard address. Torn down by process id, checked to leave nothing."""
    tmp = Path(tempfile.mkdtemp(prefix="rj", dir="/tmp"))
    gcs, dashboard, client, agent, agent_grpc, metrics, env_agent = _free_ports(7)
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    # A 127.0.0.1-only test cluster: no token auth (Ray 2.60 turns it on when ~/.ray/auth_token exists,
    # and then wants the token on every client).
    env.update(
        TMPDIR=str(tmp),
        PATH=f"{BIN}:{env.get('PATH', '')}",
        RAY_USAGE_STATS_ENABLED="0",
        RAY_AUTH_MODE="disabled",
    )
    cmd = [
        str(BIN / "ray"),
        "start",
        "--head",
        "--node-ip-address=127.0.0.1",
        f"--port={gcs}",
        f"--temp-dir={tmp / 'r'}",
        "--num-cpus=2",
        "--num-gpus=0",
        "--include-dashboard=true",
        "--dashboard-host=127.0.0.1",
        f"--dashboard-port={dashboard}",
        f"--ray-client-server-port={client}",
        f"--dashboard-agent-listen-port={agent}",
        f"--dashboard-agent-grpc-port={agent_grpc}",
        f"--metrics-export-port={metrics}",
        f"--runtime-env-agent-port={env_agent}",
        "--disable-usage-stats",
    ]
    try:
        started = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
        assert started.returncode == 0, started.stdout + started.stderr
        yield {"address": f"http://127.0.0.1:{dashboard}", "env": env, "tmp": tmp}
    finally:
        left = _stop(tmp)
        shutil.rmtree(tmp, ignore_errors=True)
        assert not left, f"processes left after stopping the head: {left}"


def _submit(head: dict, runtime_env: dict, *args: str, tmp: Path) -> tuple[str, str]:
    """`ray job submit --no-wait` the render with ARGS, wait for the job to end; (status, logs)."""
    from ray.job_submission import JobSubmissionClient

    env_file = tmp / "runtime_env.yaml"
    env_file.write_text(yaml.safe_dump(runtime_env))
    sid = f"musetalk-test-{os.getpid()}-{tmp.name}"
    submit = [
        str(BIN / "ray"),
        "job",
        "submit",
        f"--address={head['address']}",
        f"--submission-id={sid}",
        "--working-dir=.",
        f"--runtime-env={env_file}",
        "--no-wait",
        "--",
        "python",
        "-m",
        "cluster.render",
        *args,
    ]
    done = subprocess.run(submit, cwd=REPO_ROOT, env=head["env"], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    client = JobSubmissionClient(head["address"])
    status = wait_for(
        lambda: (s := str(client.get_job_status(sid).value)) in TERMINAL and s, timeout=900, interval=1.0
    )
    return status, client.get_job_logs(sid)


def _shipped_runtime_env(**env_vars: str) -> dict:
    runtime_env = yaml.safe_load((REPO_ROOT / "deploy" / "runtime_env.yaml").read_text())
    if env_vars:
        runtime_env["env_vars"] = env_vars
    return runtime_env


@pytest.mark.slow
def test_ray_job_renders_into_the_named_output(ray_head, tiny_models, demo_media, tmp_path):
    """The default cluster config under `ray job submit` joins the head (its RenderWorkers are that
    cluster's actors: no second cluster), the output lands at the absolute task.output, and Hydra's run
    directory under MUSETALK_OUTPUT_ROOT; nothing lands in Ray's copy of the working directory."""
    from ray.util.state import list_actors

    audio = trimmed_audio(demo_media.audio, tmp_path / "short.wav", 1.0)
    out = tmp_path / "renders" / "lipsync.mp4"
    root = tmp_path / "runs"
    status, logs = _submit(
        ray_head,
        _shipped_runtime_env(MUSETALK_OUTPUT_ROOT=str(root)),
        "+task=test",
        "models=tiny",
        f"models.dir={tiny_models}",
        f"task.video={demo_media.video}",
        f"task.audio={audio}",
        f"task.output={out}",
        "task.make_demo=false",
        "render.batch_size=4",
        tmp=tmp_path,
    )
    assert status == "SUCCEEDED", logs
    assert len(decode_all(out)) == 25
    assert json.loads(out.with_suffix(".summary.json").read_text())["frames"] == 25
    assert len(list(root.glob("outputs/*/*/metrics.json"))) == 1
    workers = list_actors(address=ray_head["address"], filters=[("class_name", "=", "RenderWorker")])
    assert workers, "the job's workers did not run on the submitted-to cluster"
    copies = list((ray_head["tmp"] / "r").glob("session_*/runtime_resources/working_dir_files/*"))
    assert copies, "no working-dir copy found: the job did not run from an uploaded working dir"
    for copy in copies:
        assert not (copy / "outputs").exists() and not list(copy.rglob("*.mp4")), list(copy.rglob("*"))


@pytest.mark.slow
def test_ray_job_refuses_output_in_working_dir_copy(ray_head, tmp_path):
    """Without an output root, the default (relative) output would land in Ray's temporary copy: the job
    fails at once with one line naming the fix, before any demo media or weights are built."""
    status, logs = _submit(ray_head, _shipped_runtime_env(), "+task=test", "models=tiny", tmp=tmp_path)
    assert status == "FAILED", logs
    errors = [line for line in logs.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, logs
    assert "inside Ray's temporary copy of the job's working directory" in errors[0]
    assert "MUSETALK_OUTPUT_ROOT" in errors[0] and "absolute task.output" in errors[0]


def _as_ray_job(monkeypatch, copy: Path, working_dir: str | None = "gcs://_ray_pkg_x.zip") -> None:
    """Make this process look like a Ray Job's entrypoint running in ``copy``."""
    runtime_env = {"working_dir": working_dir} if working_dir else {}
    monkeypatch.setenv(RAY_JOB_CONFIG_ENV, json.dumps({"runtime_env": runtime_env, "metadata": {}}))
    monkeypatch.chdir(copy)


def _job(tiny_models, demo_media, output: str | Path = "out.mp4", *overrides: str):
    return job_for(tiny_models, demo_media.video, demo_media.audio, Path(output), *overrides)


def test_relative_output_goes_under_output_root(tiny_models, demo_media, tmp_path):
    job = _job(tiny_models, demo_media, "takes/a.mp4", f"output.root={tmp_path}")
    assert job.output == tmp_path / "takes" / "a.mp4"
    job = _job(tiny_models, demo_media, f"{tmp_path / 'abs.mp4'}", "output.root=/elsewhere")
    assert job.output == tmp_path / "abs.mp4"


def test_output_root_comes_from_the_environment(tiny_models, demo_media, tmp_path, monkeypatch):
    monkeypatch.setenv("MUSETALK_OUTPUT_ROOT", str(tmp_path))
    assert _job(tiny_models, demo_media, "b.mp4").output == tmp_path / "b.mp4"


def test_output_inside_a_job_copy_is_refused(tiny_models, demo_media, tmp_path, monkeypatch):
    copy = tmp_path / "working_dir_files" / "_ray_pkg_x"
    copy.mkdir(parents=True)
    _as_ray_job(monkeypatch, copy)
    problems = output_problems(_job(tiny_models, demo_media, "outputs/x.mp4"))
    assert len(problems) == 1 and "Ray's temporary copy" in problems[0]
    assert output_problems(_job(tiny_models, demo_media, f"{tmp_path / 'kept.mp4'}")) == []
    root = _job(tiny_models, demo_media, "x.mp4", f"output.root={tmp_path / 'root'}")
    assert output_problems(root) == []


def test_a_job_without_working_dir_runs_where_it_was_started(tiny_models, demo_media, tmp_path, monkeypatch):
    """No working_dir: the entrypoint runs in the head's own directory, which Ray does not delete."""
    _as_ray_job(monkeypatch, tmp_path, working_dir=None)
    assert output_problems(_job(tiny_models, demo_media, "x.mp4")) == []


@pytest.mark.parametrize(
    ("require", "gpus", "can_grow", "refused"),
    [
        (True, 0, False, True),  # an embedded cluster never gains a GPU: refused at once
        (True, 0, True, False),  # a joined cluster may: the driver asks its autoscaler and waits
        (True, 0.5, False, False),
        (False, 0, False, False),
        (False, 8, False, False),
    ],
)
def test_require_gpus(require, gpus, can_grow, refused):
    problem = gpu_problem(require, gpus, can_grow=can_grow)
    assert (problem is not None) == refused
    if refused:
        assert "cluster.require_gpus=false" in problem


def test_require_gpus_is_a_config_setting(tiny_models, demo_media):
    assert _job(tiny_models, demo_media).cluster.require_gpus is False
    assert _job(tiny_models, demo_media, "out.mp4", "cluster.require_gpus=true").cluster.require_gpus is True


def test_require_gpus_stops_before_rendering(tiny_models, demo_media, tmp_path):
    """On a real (embedded) cluster without GPUs, cluster.require_gpus=true refuses before any shard runs."""
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    out = tmp_path / "gpu_only.mp4"
    tmp = cli_tmp()
    proc = cli(
        "+task=test",
        "models=tiny",
        f"models.dir={tiny_models}",
        f"task.video={demo_media.video}",
        f"task.audio={demo_media.audio}",
        f"task.output={out}",
        f"hydra.run.dir={tmp_path}/hydra",
        "task.make_demo=false",
        "cluster.num_cpus=2",
        "cluster.require_gpus=true",
        tmp=tmp,
    )
    assert proc.returncode == 2, proc.stderr[-3000:]
    (line,) = error_lines(proc.stderr)
    assert "cluster.require_gpus=true but the Ray cluster has no GPU" in line
    assert not out.exists() and scratch_under(tmp) == []
