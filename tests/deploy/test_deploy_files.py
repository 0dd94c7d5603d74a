"""The deployment files, offline: the launcher YAML passes Ray's own config validation, the RayJob passes a
schema of KubeRay's required fields and its entrypoint composes a valid job, the Dockerfile installs the
project from the constraints, and the constraints pin the driver's Ray and leave torch to each node."""

from __future__ import annotations

import json
import re
import shlex
import subprocess
import sys

import jsonschema
import pytest
import ray
import tomllib
import yaml
from hydra import compose, initialize_config_dir

from cluster.config import CONF_DIR, REPO_ROOT, job_from_config

DEPLOY = REPO_ROOT / "deploy"
UNPINNED = re.compile(r"^(torch|torchvision|torchaudio|triton|nvidia-.*)$")


def _yaml(name: str):
    return yaml.safe_load((DEPLOY / name).read_text())


def _constraints() -> dict[str, str]:
    pins = {}
    for line in (REPO_ROOT / "constraints.txt").read_text().splitlines():
        if line and not line.startswith("#"):
            name, _, version = line.partition("==")
            pins[name] = version
    return pins


def _canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


# --- Ray cluster launcher (AWS) ---


def test_launcher_yaml_passes_rays_validation():
    """Ray fills in the AWS defaults and validates against its ray-schema.json (no cloud calls)."""
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = prepare_config(_yaml("cluster.yaml"))
    validate_config(config)
    assert config["provider"]["type"] == "aws"


def test_launcher_has_spot_gpu_workers_with_bounds():
    config = _yaml("cluster.yaml")
    gpu = {k: v for k, v in config["available_node_types"].items() if k != config["head_node_type"]}
    assert gpu, "no worker node type"
    for name, node in gpu.items():
        instance = node["node_config"]["InstanceType"]
        assert instance.split(".")[0] in ("g5", "g6", "p4d", "p5"), f"{name}: {instance} is not a GPU type"
        assert node["node_config"]["InstanceMarketOptions"]["MarketType"] == "spot"
        assert 0 <= node["min_workers"] <= node["max_workers"] <= config["max_workers"]
    head = config["available_node_types"][config["head_node_type"]]["node_config"]
    assert "InstanceMarketOptions" not in head, "a spot head loses the whole job when reclaimed"


def test_launcher_setup_installs_pinned_versions_and_fetches_weights():
    commands = _yaml("cluster.yaml")["setup_commands"]
    text = "\n".join(commands)
    assert "python3.11 -m venv" in text
    installs = [c for c in commands if "pip install" in c and "--upgrade pip" not in c]
    assert installs and all("-c " in c and "constraints.txt" in c for c in installs), installs
    assert any('"torch==' in c for c in installs), "torch must be pinned on the nodes (not in constraints)"
    assert any("--no-deps" in c and "gfpgan==" in c for c in installs)
    assert "torchvision" not in text
    assert re.search(r"python -m scripts\.download_models --dir \S+", text)


def test_launcher_file_mounts_keep_conf_models():
    """rsync patterns anchored at the checkout: an unanchored `models/` would drop conf/models/ too."""
    excludes = _yaml("cluster.yaml")["rsync_exclude"]
    assert all(p.startswith("/") for p in excludes), excludes


# --- KubeRay RayJob ---


def test_rayjob_passes_the_crd_schema():
    schema = json.loads((DEPLOY / "rayjob.schema.json").read_text())
    jsonschema.Draft202012Validator.check_schema(schema)
    jsonschema.validate(_yaml("rayjob.yaml"), schema)


@pytest.mark.parametrize(
    ("path", "value"),
    [
        (("spec", "entrypoint"), None),
        (("spec", "rayClusterSpec", "headGroupSpec", "template"), None),
        (("spec", "rayClusterSpec", "workerGroupSpecs", 0, "minReplicas"), None),
        (("spec", "rayClusterSpec", "workerGroupSpecs", 0, "maxReplicas"), "8"),
        (("spec", "rayClusterSpec", "headGroupSpec", "rayStartParams", "num-gpus"), 0),
        (("spec", "rayClusterSpec", "workerGroupSpecs", 0, "template", "spec", "containers"), []),
        (("spec", "rayClusterSpec", "enableInTreeAutoscaling"), "true"),
        (("spec", "rayClusterSpec", "autoscalerOptions", "upscalingMode"), "Fast"),
        (("spec", "rayClusterSpec", "autoscalerOptions", "idleTimeoutSeconds"), "300"),
        (("spec", "rayClusterSpec", "autoscalerOptions", "idleTimeoutSeconds"), -1),
        (("spec", "rayClusterSpec", "autoscalerOptions", "imagePullPolicy"), "Sometimes"),
        (("spec", "rayClusterSpec", "autoscalerOptions", "idleTimeout"), 300),  # not a field
        (("spec", "rayClusterSpec", "autoscalerOptions", "resources", "limits", "cpu"), "one"),
    ],
)
def test_rayjob_schema_rejects_what_kuberay_rejects(path, value):
    """The schema is not vacuous: a missing required field or a wrong type fails it."""
    schema = json.loads((DEPLOY / "rayjob.schema.json").read_text())
    manifest = _yaml("rayjob.yaml")
    node = manifest
    for key in path[:-1]:
        node = node[key]
    if value is None:
        del node[path[-1]]
    else:
        node[path[-1]] = value
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(manifest, schema)


def test_rayjob_gpu_workers_and_versions():
    spec = _yaml("rayjob.yaml")["spec"]
    cluster = spec["rayClusterSpec"]
    assert cluster["rayVersion"] == ray.__version__ == _constraints()["ray"]
    (group,) = cluster["workerGroupSpecs"]
    (container,) = group["template"]["spec"]["containers"]
    for kind in ("requests", "limits"):
        assert str(container["resources"][kind]["nvidia.com/gpu"]) == "1"
    assert group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]


def test_rayjob_gpu_group_scales_through_the_autoscaler():
    """A worker group whose size may change (minReplicas < maxReplicas) needs KubeRay's in-tree autoscaler:
    without it, the driver's request_resources reaches nobody and the group stays at `replicas`."""
    cluster = _yaml("rayjob.yaml")["spec"]["rayClusterSpec"]
    (group,) = cluster["workerGroupSpecs"]
    assert group["minReplicas"] < group["maxReplicas"]
    assert cluster["enableInTreeAutoscaling"] is True
    options = cluster["autoscalerOptions"]
    assert options["upscalingMode"] in ("Default", "Aggressive")  # a batch asks for its GPU pods at once
    assert isinstance(options["idleTimeoutSeconds"], int) and options["idleTimeoutSeconds"] >= 60
    assert {"requests", "limits"} <= set(options["resources"])
    # The README says how to watch this group grow: its label selector and the autoscaler's logs.
    readme = (REPO_ROOT / "README.md").read_text()
    assert f"ray.io/group={group['groupName']}" in readme
    assert "-c autoscaler" in readme


def test_rayjob_entrypoint_is_a_valid_render():
    """The entrypoint's overrides compose with the shipped config into a valid job (absolute output,
    GPUs required, the cluster taken from RAY_ADDRESS)."""
    argv = shlex.split(_yaml("rayjob.yaml")["spec"]["entrypoint"])
    assert argv[:3] == ["python", "-m", "cluster.render"]
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose("config", overrides=argv[3:])
    job = job_from_config(cfg)
    assert job.output.is_absolute() and job.cluster.require_gpus and job.cluster.address == ""


# --- Dockerfile ---


def _instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    lines, current = [], ""
    for raw in (DEPLOY / "Dockerfile").read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        current += " " + line.rstrip("\\").strip() if current else line.rstrip("\\").strip()
        if not line.endswith("\\"):
            lines.append(current)
            current = ""
    return [(line.split(None, 1)[0].upper(), line.split(None, 1)[1]) for line in lines]


def test_dockerfile_structure():
    steps = _instructions()
    assert steps[0][0] == "FROM" and steps[0][1].startswith("nvidia/cuda:"), steps[0]
    runs = " && ".join(args for op, args in steps if op == "RUN")
    pip = [c.strip() for c in re.split(r"&&", runs) if "pip install" in c and "--upgrade pip" not in c]
    assert pip and all("-c constraints.txt" in c for c in pip), pip
    assert any("$TORCH_SPEC" in c for c in pip) and "ARG TORCH_SPEC=torch==" in "\n".join(
        f"{op} {args}" for op, args in steps
    )
    assert any("--no-deps" in c and '"gfpgan==1.3.8"' in c for c in pip)
    assert not any("torchvision" in c for c in pip)
    assert "python3.11" in runs and "ffmpeg" in runs
    copies = [args.split()[:-1] for op, args in steps if op == "COPY"]
    for sources in copies:
        for src in sources:
            assert (REPO_ROOT / src).exists(), f"COPY {src}: not in the repository"
    entry = json.loads(dict(steps)["ENTRYPOINT"])
    assert entry[:2] == ["python", "-m"]
    assert (REPO_ROOT / (entry[2].replace(".", "/") + ".py")).is_file()


def test_docker_context_leaves_venv_and_weights_behind():
    ignored = (DEPLOY / "Dockerfile.dockerignore").read_text().splitlines()
    assert {".venv", "models/*", "!models/README.md", "outputs", "media"} <= set(ignored)


# --- ray job submit's runtime_env ---


def test_runtime_env_excludes_keep_the_code():
    """Ray's own exclude matcher: the venv, weights and renders stay behind, conf/models/ travels."""
    from ray._private.runtime_env.packaging import _get_excludes

    excluded = _get_excludes(REPO_ROOT, _yaml("runtime_env.yaml")["excludes"])
    for kept in ("conf/models/tiny.yaml", "conf/config.yaml", "cluster/render.py", "constraints.txt"):
        assert not excluded(REPO_ROOT / kept), kept
    for dropped in (".venv", "models/README.md", "outputs/x/out.mp4", "media/demo.mp4"):
        assert excluded(REPO_ROOT / dropped), dropped


# --- constraints ---


def test_constraints_pin_every_dependency_but_torch():
    pins = {_canonical(k): v for k, v in _constraints().items()}
    assert pins["ray"] == ray.__version__, "the driver's Ray differs from the pinned one"
    assert not [n for n in pins if UNPINNED.match(n)], "torch/nvidia must be pinned per node, not here"
    assert "musetalk-farm" not in pins
    project = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]
    declared = project["dependencies"] + project["optional-dependencies"]["dev"]
    names = {_canonical(re.split(r"[\[<>=!~; ]", d, maxsplit=1)[0]) for d in declared}
    assert names - {"torch"} <= set(pins), sorted(names - {"torch"} - set(pins))
    assert all(re.fullmatch(r"[0-9][0-9A-Za-z.+!-]*", v) for v in pins.values())
    header = (REPO_ROOT / "constraints.txt").read_text().splitlines()[0:5]
    assert any("make constraints" in line for line in header)


def test_unused_dependencies_are_gone():
    """ffmpeg-python is gone (one module talks to ffmpeg, with argv lists); scipy is back as a direct
    dependency because the lip-sync scorer's MFCC front end uses it (musetalk/syncscore.py)."""
    project = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]
    assert not [d for d in project["dependencies"] if d.startswith("ffmpeg-python")]
    assert "scipy" in (REPO_ROOT / "musetalk" / "syncscore.py").read_text()


def test_constraints_generator_runs():
    """deploy/freeze_constraints.py lists the project's closure from this venv, without torch."""
    out = subprocess.run(
        [sys.executable, str(DEPLOY / "freeze_constraints.py")], capture_output=True, text=True, check=True
    ).stdout
    pins = [line.split("==")[0] for line in out.splitlines() if "==" in line]
    assert "ray" in pins and "hydra-core" in pins and "torch" not in pins and "ffmpeg-python" not in pins
