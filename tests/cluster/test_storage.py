"""Object storage: the fsspec layer on ``file://`` and ``memory://``, and a real render from and to
``s3://`` against a local S3 server (moto in server mode on 127.0.0.1, started and stopped here) with two
Ray worker processes reading inputs and weights through it."""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import threading
import uuid
from pathlib import Path

import fsspec
import pytest

from cluster import storage
from cluster.faults import HOLD_ENV
from cluster.rundir import run_dir_path
from shards.errors import StorageError
from tests.helpers import assert_same_frames, cli, cli_tmp, error_lines, held, job_for, wait_for

# ---------------------------------------------------------------- the fsspec layer, no server needed


@pytest.mark.parametrize(
    ("value", "uri", "remote"),
    [
        ("s3://bucket/x.mp4", True, True),
        ("gs://bucket/x.mp4", True, True),
        ("file:///tmp/x.mp4", True, False),
        ("/tmp/x.mp4", False, False),
        ("clips/x.mp4", False, False),
        ("C:\\clips\\x.mp4", False, False),
        ("C://clips/x.mp4", False, False),  # a drive letter is no scheme
    ],
)
def test_what_is_a_uri(value, uri, remote):
    assert storage.is_uri(value) is uri
    assert storage.is_remote(value) is remote


def test_local_paths_and_names_beside():
    assert storage.local_path("file:///data/in.mp4") == Path("/data/in.mp4")
    assert storage.local_path("rel/in.mp4") == Path("rel/in.mp4")
    assert storage.local_path("s3://b/in.mp4") is None
    assert storage.beside("s3://b/x/out.mp4", ".summary.json") == "s3://b/x/out.summary.json"
    assert storage.beside("s3://b/x/out.mp4", ".qa.png") == "s3://b/x/out.qa.png"


def test_staging_root_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv(storage.STAGING_ENV, str(tmp_path / "st"))
    assert storage.staging_root() == tmp_path / "st"
    monkeypatch.delenv(storage.STAGING_ENV)
    assert storage.staging_root() == Path.home() / ".cache" / "musetalk-farm" / "staging"


def _memory(data: bytes, name: str = "clip.mp4") -> str:
    uri = f"memory://t-{uuid.uuid4().hex}/{name}"
    with fsspec.open(uri, "wb") as f:
        f.write(data)
    return uri


def test_stage_downloads_once_per_object_version(tmp_path):
    uri = _memory(b"first version")
    first = storage.stage(uri, tmp_path)
    assert first.read_bytes() == b"first version" and first.name == "clip.mp4"
    stamp = first.stat().st_mtime_ns
    assert storage.stage(uri, tmp_path) == first and first.stat().st_mtime_ns == stamp  # reused
    with fsspec.open(uri, "wb") as f:
        f.write(b"second, longer version")
    second = storage.stage(uri, tmp_path)
    assert second != first and second.read_bytes() == b"second, longer version"
    assert not list(tmp_path.rglob("*.partial"))


def test_stage_leaves_local_paths_alone(tmp_path):
    clip = tmp_path / "a.mp4"
    clip.write_bytes(b"x")
    assert storage.stage(str(clip)) == clip
    assert storage.stage(f"file://{clip}") == clip


@pytest.mark.parametrize(
    ("uri", "needle"),
    [
        ("memory://nowhere-{token}/clip.mp4", "not found"),
        ("foo://bucket/clip.mp4", "unknown storage protocol foo://"),
    ],
)
def test_stage_errors_are_one_line(uri, needle, tmp_path):
    with pytest.raises(StorageError) as err:
        storage.stage(uri.format(token=uuid.uuid4().hex), tmp_path)
    assert needle in str(err.value) and "\n" not in str(err.value)
    assert not list(tmp_path.rglob("*"))


@pytest.mark.skipif(importlib.util.find_spec("gcsfs") is not None, reason="gcsfs is installed")
def test_a_protocol_without_its_package_names_the_package():
    with pytest.raises(StorageError, match="pip install gcsfs"):
        storage.exists("gs://bucket/clip.mp4")


def test_publish_to_memory_and_file(tmp_path):
    local = tmp_path / "out.mp4"
    local.write_bytes(b"rendered")
    uri = f"memory://t-{uuid.uuid4().hex}/x/out.mp4"
    storage.publish(local, uri)
    assert fsspec.open(uri, "rb").open().read() == b"rendered"
    target = tmp_path / "published" / "out.mp4"
    storage.publish(local, f"file://{target}")
    assert target.read_bytes() == b"rendered"
    assert sorted(p.name for p in target.parent.iterdir()) == ["out.mp4"]  # no temporary left


def test_sync_fetches_missing_or_wrong_size_files_only(tmp_path):
    root = f"memory://t-{uuid.uuid4().hex}/models"
    for rel, data in (("a/w.pth", b"weights"), ("b/config.json", b"{}")):
        with fsspec.open(f"{root}/{rel}", "wb") as f:
            f.write(data)
    dest = storage.sync(root, ["a/w.pth", "b/config.json"], tmp_path / "m")
    assert (dest / "a/w.pth").read_bytes() == b"weights" and (dest / "b/config.json").read_bytes() == b"{}"
    kept = (dest / "a/w.pth").stat().st_mtime_ns
    (dest / "b/config.json").write_bytes(b"{broken")  # a different size: fetched again
    storage.sync(root, ["a/w.pth", "b/config.json"], dest)
    assert (dest / "a/w.pth").stat().st_mtime_ns == kept
    assert (dest / "b/config.json").read_bytes() == b"{}"
    with pytest.raises(StorageError, match="not found"):
        storage.sync(root, ["c/missing.pth"], dest)


def test_config_keeps_uri_outputs_out_of_output_root(tiny_models, tmp_path):
    job = job_for(
        tiny_models,
        "s3://bkt/in/clip.mp4",
        "file:///data/voice.wav",
        "s3://bkt/out/take.mp4",
        f"output.root={tmp_path}",
    )
    assert job.video_uri == "s3://bkt/in/clip.mp4" and job.audio_uri is None
    assert job.audio == Path("/data/voice.wav")
    assert job.output_uri == "s3://bkt/out/take.mp4"
    assert job.output.name == "take.mp4" and storage.staging_root() in job.output.parents
    assert tmp_path not in job.output.parents
    # The same output URI always renders at the same place (its lock and resumable run directory).
    again = job_for(tiny_models, "s3://bkt/in/other.mp4", "s3://bkt/v.wav", "s3://bkt/out/take.mp4")
    assert again.output == job.output
    assert run_dir_path(job.output).parent == job.output.parent


def test_weights_identity_follows_remote_weights_without_downloading(tiny_models, tmp_path):
    from cluster.keys import weights_identity
    from cluster.weights import weight_files
    from musetalk.config import PipelineConfig

    root = f"memory://t-{uuid.uuid4().hex}/models"
    local = PipelineConfig(models_dir=str(tiny_models), tiny=True)
    remote = PipelineConfig(models_dir=root, tiny=True)
    for rel, _ in weight_files(local):
        storage.publish(tiny_models / rel, f"{root}/{rel}")
    for d in ("sd-vae", "whisper"):
        for f in (tiny_models / d).iterdir():
            storage.publish(f, f"{root}/{d}/{f.name}")
    first = weights_identity(remote)
    assert weights_identity(remote) == first
    unet = next(rel for rel, what in weight_files(remote) if what == "MuseTalk UNet weights")
    with fsspec.open(f"{root}/{unet}", "wb") as f:
        f.write(b"w" * 11)  # replaced: another size (and version)
    assert weights_identity(remote) != first
    assert weights_identity(remote, preparation=True) == weights_identity(remote, preparation=True)
    assert not list(tmp_path.glob("**/unet.pth"))


def test_preflight_refuses_an_output_uri_that_is_an_input(tiny_models, tmp_path):
    from cluster.preflight import input_problems, output_uri_problems

    base = _memory(b"clip", "in.mp4").rsplit("/", 1)[0]
    with fsspec.open(f"{base}/take.summary.json", "wb") as f:
        f.write(b"{}")
    job = job_for(tiny_models, f"{base}/in.mp4", f"{base}/take.summary.json", f"{base}/in.mp4")
    problems = output_uri_problems(job)
    assert any(f"task.output={base}/in.mp4 is the input task.video" in p for p in problems), problems
    assert input_problems(job) == []
    job = job_for(tiny_models, f"{base}/in.mp4", f"{base}/take.summary.json", f"{base}/take.mp4")
    (problem,) = output_uri_problems(job)
    assert "would replace the input task.audio" in problem
    job = job_for(tiny_models, f"{base}/gone.mp4", f"{base}/take.summary.json", str(tmp_path / "o.mp4"))
    assert input_problems(job) == [f"task.video not found: {base}/gone.mp4; check the URI"]


# ---------------------------------------------------------------- a real S3 server on localhost

BUCKET = "farm-test"


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    """moto's S3 in server mode on 127.0.0.1 (an OS-chosen port), fake credentials in the environment
    for this process and the CLI subprocesses (s3fs and boto3 honour ``AWS_ENDPOINT_URL``). Stopped in
    teardown."""
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # one line per request otherwise
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()  # returns once the server is bound and serving
    host, port = server.get_host_and_port()
    env = {
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_ENDPOINT_URL": f"http://{host}:{port}",
    }
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        import boto3

        boto3.client("s3").create_bucket(Bucket=BUCKET)
        yield env
    finally:
        server.stop()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        fsspec.AbstractFileSystem.clear_instance_cache()  # s3fs instances bound to the stopped server


@pytest.fixture(scope="module")
def s3_job(s3, tiny_models, demo_media, short_audio):
    """The short demo job and the tiny weights uploaded to the bucket; returns their URIs."""
    import boto3

    client = boto3.client("s3")
    client.upload_file(str(demo_media.video), BUCKET, "in/demo.mp4")
    client.upload_file(str(short_audio), BUCKET, "in/short.wav")
    for path in tiny_models.rglob("*"):
        if path.is_file():
            client.upload_file(str(path), BUCKET, f"models/tiny/{path.relative_to(tiny_models).as_posix()}")
    base = f"s3://{BUCKET}"
    return {"video": f"{base}/in/demo.mp4", "audio": f"{base}/in/short.wav", "models": f"{base}/models/tiny"}


def _args(uris: dict, output: str, *extra: str) -> list[str]:
    return [
        "+task=test",
        "models=tiny",
        f"models.dir={uris['models']}",
        f"task.video={uris['video']}",
        f"task.audio={uris['audio']}",
        f"task.output={output}",
        "task.make_demo=false",
        "output.lossless=true",
        "render.batch_size=4",
        "render.threads=1",
        "face.crop=box",
        "cluster.num_cpus=2",
        *extra,
    ]


def _keys(prefix: str) -> list[str]:
    import boto3

    found = boto3.client("s3").list_objects_v2(Bucket=BUCKET, Prefix=prefix)
    return sorted(o["Key"] for o in found.get("Contents", []))


def test_render_from_and_to_s3_with_workers_reading_it(s3, s3_job, tiny_models, reference_frames, tmp_path):
    """Two shards on two CPU workers: each worker process stages the inputs and syncs the weights from S3;
    the output, its summary and QA sheet land in the bucket; frames equal the single-process render."""
    staging, hold = tmp_path / "staging", tmp_path / "hold"
    hold.mkdir()
    out = f"s3://{BUCKET}/renders/take 1/out.mp4"
    proc = cli(
        *_args(
            s3_job,
            f"'{out}'",
            "cluster.inputs=uri",
            "cluster.cpu_workers=2",
            "cluster.max_in_flight=1",  # one shard per worker at a time: the second shard waits for worker 2
            "shards.length=25",
            f"cache.dir=s3://{BUCKET}/avatars",  # the avatar cache in the bucket too
            f"hydra.run.dir={tmp_path}/run",
        ),
        tmp=cli_tmp(),
        # RAY_DEDUP_LOGS=0: each worker's log lines reach the driver's stderr, not one "repeated 2x".
        env={**s3, "MUSETALK_STAGING_DIR": str(staging), HOLD_ENV: str(hold), "RAY_DEDUP_LOGS": "0"},
        wait=False,
    )
    streams: list = []
    reader = threading.Thread(target=lambda: streams.extend(proc.communicate()), daemon=True)
    reader.start()  # drain the pipes while the workers are held
    try:
        # Both workers hold a shard (their inputs already staged from the URIs): each renders one.
        wait_for(lambda: len({pid for _, pid in held(hold)}) == 2 or proc.poll() is not None, timeout=600)
    finally:
        (hold / "release-all").touch()
        reader.join(timeout=600)
    stdout, stderr = streams
    assert proc.returncode == 0, stderr[-3000:]
    assert "frames      50" in stdout and "in 2 shards on 2 workers" in stdout
    assert _keys("renders/") == [
        "renders/take 1/out.mp4",
        "renders/take 1/out.qa.png",
        "renders/take 1/out.summary.json",
    ]
    import boto3

    client = boto3.client("s3")
    local = tmp_path / "out.mp4"
    client.download_file(BUCKET, "renders/take 1/out.mp4", str(local))
    assert_same_frames(reference_frames, local)
    summary = json.loads(
        client.get_object(Bucket=BUCKET, Key="renders/take 1/out.summary.json")["Body"].read()
    )
    assert summary["output"] == out and summary["frames"] == 50 and len(summary["worker_frames"]) == 2
    cached = _keys("avatars/")
    assert [k for k in cached if k.endswith(".npz")] and [k for k in cached if k.endswith(".json")], cached
    assert summary["cache"] == f"s3://{BUCKET}/avatars" and summary["vae_encodes"] > 0
    # Prepared entries went from a worker process to the bucket, and shards read them from there.
    wrote = [
        line for line in stderr.splitlines() if "RenderWorker" in line and "wrote avatar entries" in line
    ]
    assert wrote and all(f"s3://{BUCKET}/avatars/" in line for line in wrote), stderr[-3000:]
    # Workers (other processes than the driver) fetched the weights from S3, once for the node.
    workers = [line for line in stderr.splitlines() if "RenderWorker" in line and "pid=" in line]
    synced = [line for line in workers if f"weights from {s3_job['models']}" in line]
    assert len(synced) == 2, stderr[-3000:]
    assert sum("(0 files fetched)" not in line for line in synced) == 1  # the second found them there
    staged = [line for line in workers if f"{s3_job['video']} already staged" in line]
    # Both workers resolved the input URI on their node (finding the driver's download there).
    assert len({line.split(")")[0] for line in staged}) == 2, stderr[-3000:]
    models = staging / "models" / storage.key(s3_job["models"])
    assert (models / "musetalkV15" / "unet.pth").stat().st_size == (
        tiny_models / "musetalkV15" / "unet.pth"
    ).stat().st_size
    # Nothing half-written or left behind in staging: no temporaries, no local output or lock; only the
    # kept segments (a later render of the same output URI reuses them).
    assert not [p for p in staging.rglob("*") if ".partial" in p.name]
    left = [p for p in (staging / "outputs").rglob("*") if p.is_file()]
    assert left and all(p.parent.parent.name == ".out.mp4.run" or p.name == "manifest.json" for p in left), (
        left
    )

    # A second render of the same video reads every entry from the bucket: the driver only lists the
    # chunks there, the workers fetch them (a broken handoff would fail the render or prepare again).
    again = f"s3://{BUCKET}/renders/again.mp4"
    proc = cli(
        *_args(
            s3_job,
            again,
            "shards.length=25",
            f"cache.dir=s3://{BUCKET}/avatars",
            f"hydra.run.dir={tmp_path}/run2",
        ),
        tmp=cli_tmp(),
        env={**s3, "MUSETALK_STAGING_DIR": str(staging)},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads(client.get_object(Bucket=BUCKET, Key="renders/again.summary.json")["Body"].read())
    assert summary["cache_hits"] == 50 and (summary["detections"], summary["vae_encodes"]) == (0, 0)
    client.download_file(BUCKET, "renders/again.mp4", str(tmp_path / "again.mp4"))
    assert_same_frames(reference_frames, tmp_path / "again.mp4")


# No credentials anywhere: none in the environment, no config files, no instance metadata service.
_NO_CREDENTIALS = {
    "AWS_ACCESS_KEY_ID": "",
    "AWS_SECRET_ACCESS_KEY": "",
    "AWS_EC2_METADATA_DISABLED": "true",
    "AWS_CONFIG_FILE": "/nonexistent/aws-config",
    "AWS_SHARED_CREDENTIALS_FILE": "/nonexistent/aws-credentials",
}


@pytest.mark.parametrize(
    ("override", "env", "needle"),
    [
        (
            "task.video=s3://farm-test/in/nothing.mp4",
            {},
            "task.video not found: s3://farm-test/in/nothing.mp4",
        ),
        ("task.output=s3://no-such-bucket-here/x/out.mp4", {}, "the bucket s3://no-such-bucket-here of"),
        ("output.qa=true", _NO_CREDENTIALS, "no credentials for s3://farm-test/in/demo.mp4"),
    ],
    ids=["missing_object", "missing_bucket", "no_credentials"],
)
def test_missing_object_or_bucket_is_one_line(s3, s3_job, override, env, needle, tmp_path):
    staging = tmp_path / "staging"
    out = f"s3://{BUCKET}/refused/{uuid.uuid4().hex}/out.mp4"
    proc = cli(
        *_args(s3_job, out, override, f"hydra.run.dir={tmp_path}/run"),
        tmp=cli_tmp(),
        env={**s3, "MUSETALK_STAGING_DIR": str(staging), **env},
    )
    assert proc.returncode == 2, proc.stderr[-3000:]
    errors = error_lines(proc.stderr)
    assert len(errors) == 1 and needle in errors[0], proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    assert _keys("refused/") == []
    assert not [p for p in staging.rglob("*") if p.is_file()]  # nothing staged or half-written
