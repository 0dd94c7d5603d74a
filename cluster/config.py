"""The boundary between Hydra and the code: DictConfig in, frozen dataclasses out, every problem at once."""

from __future__ import annotations

from dataclasses import dataclass, fields
from pathlib import Path

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import MissingMandatoryValue

from musetalk.config import BlendConfig, EnhanceConfig, FaceConfig, PipelineConfig
from shards.errors import ConfigError
from shards.media import EncodeSettings

REPO_ROOT = Path(__file__).resolve().parents[1]
CONF_DIR = REPO_ROOT / "conf"


def _repo_path(relative: str) -> str:
    """``${repo:models}`` -> an absolute path inside the repository (works from any working directory)."""
    return str(REPO_ROOT / relative)


if not OmegaConf.has_resolver("repo"):
    OmegaConf.register_new_resolver("repo", _repo_path)


@dataclass(frozen=True)
class ClusterConfig:
    address: str = ""
    workers: int | None = None
    gpus_per_worker: float = 1.0
    cpus_per_worker: float = 1.0
    cpu_workers: int = 1
    max_in_flight: int = 2
    max_attempts: int = 3
    start_timeout_s: float = 600.0
    inputs: str = "object_store"
    num_cpus: int | None = None


@dataclass(frozen=True)
class JobConfig:
    """One render job, fully resolved and validated."""

    video: Path
    audio: Path
    output: Path
    make_demo: bool
    download: bool
    shard_length: int | None
    shard_seconds: float | None
    overlap: int
    summary: bool
    pipeline: PipelineConfig
    encode: EncodeSettings
    cluster: ClusterConfig


def job_from_config(cfg: DictConfig) -> JobConfig:
    """Convert and validate; raises one ConfigError listing every problem found."""
    problems: list[str] = []

    def get(key: str, default=None):
        try:
            value = OmegaConf.select(cfg, key, throw_on_missing=True, default=default)
        except MissingMandatoryValue:
            problems.append(f"{key} is required (set {key}=... or use +task=test)")
            return default
        return value

    video, audio, output = get("task.video"), get("task.audio"), get("task.output")

    def node(key: str, drop: tuple[str, ...] = ()) -> dict:
        """A config group's values as a plain dict (its YAML holds every default)."""
        values = OmegaConf.to_container(cfg[key], resolve=True)
        return {k: v for k, v in values.items() if k not in drop}

    def typed(cls, name: str, values: dict):
        """``cls`` from ``values``; unknown keys are reported (and the known ones still checked)."""
        known = {f.name for f in fields(cls)}
        for key in sorted(set(values) - known):
            problems.append(f"{name}.{key} is not a known setting (known: {', '.join(sorted(known))})")
        return cls(**{k: v for k, v in values.items() if k in known})

    models, output_node, shards = node("models"), node("output"), node("shards")
    face = typed(FaceConfig, "face", {**node("face"), "bbox_shift": get("task.bbox_shift")})
    pipeline = typed(
        PipelineConfig,
        "render",
        {
            **node("render"),
            "models_dir": str(models["dir"]),
            "tiny": models["tiny"],
            "face": face,
            "blend": typed(BlendConfig, "blend", node("blend")),
            "enhance": typed(EnhanceConfig, "enhance", node("enhance", drop=("name",))),
        },
    )
    cluster = typed(ClusterConfig, "cluster", node("cluster"))
    encode = typed(EncodeSettings, "output", node("output", drop=("summary",)))
    length, seconds, overlap = shards["length"], shards["seconds"], shards["overlap"]

    problems += pipeline_problems(pipeline)
    if overlap < face.smooth_radius:
        problems.append(
            f"shards.overlap={overlap} is smaller than face.smooth_radius={face.smooth_radius}; "
            f"set shards.overlap>={face.smooth_radius}"
        )
    if length is not None and seconds is not None:
        problems.append("set either shards.length or shards.seconds, not both (set the other to null)")
    if length is None and seconds is None:
        problems.append("set shards.length (frames) or shards.seconds")
    if length is not None and int(length) <= 0:
        problems.append(f"shards.length must be positive, got {length}")
    if seconds is not None and float(seconds) <= 0:
        problems.append(f"shards.seconds must be positive, got {seconds}")
    if cluster.inputs not in ("object_store", "uri"):
        problems.append(f"cluster.inputs must be object_store or uri, got {cluster.inputs!r}")
    if cluster.max_attempts < 1:
        problems.append(f"cluster.max_attempts must be >= 1, got {cluster.max_attempts}")
    if cluster.max_in_flight < 1:
        problems.append(f"cluster.max_in_flight must be >= 1, got {cluster.max_in_flight}")
    if cluster.workers is not None and cluster.workers < 1:
        problems.append(f"cluster.workers must be >= 1 or null, got {cluster.workers}")
    if not 0 < cluster.gpus_per_worker <= 1 and cluster.gpus_per_worker != int(cluster.gpus_per_worker):
        problems.append(
            f"cluster.gpus_per_worker must be a fraction in (0, 1] or a whole number, got {cluster.gpus_per_worker}"
        )
    if not 0 <= encode.crf <= 51:
        problems.append(f"output.crf must be in 0..51, got {encode.crf}")
    if output is not None and not str(output).lower().endswith(".mp4"):
        problems.append(f"task.output must be an .mp4 path, got {output}")
    if problems:
        raise ConfigError("invalid configuration: " + "; ".join(problems))
    return JobConfig(
        video=Path(video),
        audio=Path(audio),
        output=Path(output),
        make_demo=bool(get("task.make_demo", False)),
        download=bool(models["download"]),
        shard_length=None if length is None else int(length),
        shard_seconds=None if seconds is None else float(seconds),
        overlap=overlap,
        summary=bool(output_node["summary"]),
        pipeline=pipeline,
        encode=encode,
        cluster=cluster,
    )


def pipeline_problems(p: PipelineConfig) -> list[str]:
    """Every invalid value of a PipelineConfig, each with its fix."""
    out = []
    if p.face.detector not in ("s3fd", "haar"):
        out.append(f"face.detector must be s3fd or haar, got {p.face.detector!r}")
    if p.face.crop not in ("landmarks", "box"):
        out.append(f"face.crop must be landmarks or box, got {p.face.crop!r}")
    if p.face.smooth_radius < 0:
        out.append(f"face.smooth_radius must be >= 0, got {p.face.smooth_radius}")
    if p.face.detect_max_side < 32:
        out.append(f"face.detect_max_side must be >= 32, got {p.face.detect_max_side}")
    if p.face.batch_size < 1:
        out.append(f"face.batch_size must be >= 1, got {p.face.batch_size}")
    if p.threads is not None and p.threads < 1:
        out.append(f"render.threads must be >= 1 or null, got {p.threads}")
    if p.batch_size < 1:
        out.append(f"render.batch_size must be >= 1, got {p.batch_size}")
    if p.dtype not in ("float32", "fp32", "float16", "fp16", "bfloat16", "bf16"):
        out.append(f"render.dtype must be float32, float16 or bfloat16, got {p.dtype!r}")
    if p.blend.mode not in ("jaw", "raw", "neck"):
        out.append(f"blend.mode must be jaw, raw or neck, got {p.blend.mode!r}")
    if not 0 <= p.blend.upper_boundary_ratio < 1:
        out.append(f"blend.upper_boundary_ratio must be in [0, 1), got {p.blend.upper_boundary_ratio}")
    if not isinstance(p.blend.ellipse, bool):
        out.append(f"blend.ellipse must be true or false, got {p.blend.ellipse!r}")
    elif not p.blend.ellipse and not p.blend.parsing:
        out.append("blend.ellipse=false needs blend.parsing=true (without parsing the mask is the ellipse)")
    if p.enhance.upscale not in (1, 2, 4):
        out.append(f"enhance.upscale must be 1, 2 or 4, got {p.enhance.upscale}")
    return out
