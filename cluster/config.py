"""The boundary between Hydra and the code: DictConfig in, frozen dataclasses out, every problem at once."""

from __future__ import annotations

import math
import re
import types
import typing
from dataclasses import MISSING, dataclass, fields
from pathlib import Path, PurePosixPath

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import MissingMandatoryValue

from cluster import storage
from musetalk.config import PACING_FIELDS, BlendConfig, EnhanceConfig, FaceConfig, PipelineConfig
from shards.dub import DubSettings, dub_settings
from shards.errors import ConfigError
from shards.plan import ShardsConfig
from shards.ranges import parse_select
from shards.segment import EncodeSettings

REPO_ROOT = Path(__file__).resolve().parents[1]
CONF_DIR = REPO_ROOT / "conf"
# The bundled demo clip lives here (``conf/task/test.yaml``); it is only ever built in this directory.
DEMO_DIR = REPO_ROOT / "media"

# task.mode: ``audio`` (the output lasts the audio, the video ping-pongs: upstream's behaviour) or ``dub``
# (the picture's timeline: the video's frames and length, the audio replaced; shards.dub)
DEVICE_PATTERN = re.compile(r"auto|cpu|mps|cuda(:\d+)?")
X264_PRESETS = (
    "ultrafast",
    "superfast",
    "veryfast",
    "faster",
    "fast",
    "medium",
    "slow",
    "slower",
    "veryslow",
    "placebo",
)
_KINDS = {bool: "a boolean (true or false)", int: "an integer", float: "a number", str: "a string"}


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
    connect_timeout_s: float = 30.0
    inputs: str = "object_store"
    num_cpus: int | None = None
    require_gpus: bool = False
    max_workers: int | None = None


@dataclass(frozen=True)
class CacheConfig:
    """The avatar cache (``cluster.cache.AvatarStore``): per-source-frame preparation kept for later
    renders of the same video. ``dir`` is a directory (read and written by the driver) or an fsspec URI
    (prepared chunks written and read by the workers themselves)."""

    enabled: bool = True
    dir: str = "~/.cache/musetalk-farm/avatars"


@dataclass(frozen=True)
class QaConfig:
    """Unattended quality control (:mod:`cluster.syncjob`): lip-sync scores (SyncNet on the frames
    before encoding) and the gate that flags a job. Defaults flag only clearly bad jobs:

    - ``min_sync_confidence`` 3.0: LatentSync (ByteDance, 2024) drops training clips below SyncNet
      confidence 3 as out of sync;
    - ``max_offset_frames`` 4 (25 fps frames, 160 ms): past ITU-R BT.1359's acceptability limits for sound
      ahead of picture (90 ms) and close to the one for sound behind it (185 ms);
    - ``min_face_share`` 0.1: our own guard for "the detector hardly found a face" (no literature value).
    A flagged job's output is still written; ``fail_on_flag`` makes the run exit with code 6."""

    sync: bool = True
    min_sync_confidence: float = 3.0
    max_offset_frames: int = 4
    min_face_share: float = 0.1
    fail_on_flag: bool = False


@dataclass(frozen=True)
class SweepConfig:
    """How each run of a sweep (``-m``) is measured, so that its runs compare like with like
    (:func:`cluster.sweep.on_footing`); outside a sweep it does nothing. ``prep``:

    - ``cache``: before a run is timed, its preparation (detection, VAE encodes, face parsing) is put in
      the avatar cache by a warm-up on the same pool (reported apart: ``warmup_s``), so every run reads all
      of its preparation from the cache and its time is generation's;
    - ``paid``: every run computes its whole preparation (the avatar cache is off for the sweep's runs).
    """

    prep: str = "cache"


SWEEP_PREP = ("cache", "paid")


@dataclass(frozen=True)
class JobConfig:
    """One render job, fully resolved and validated."""

    video: Path
    audio: Path
    output: Path
    make_demo: bool
    download: bool
    shards: ShardsConfig
    summary: bool
    resume: bool
    pipeline: PipelineConfig
    encode: EncodeSettings
    cluster: ClusterConfig
    qa: bool = True  # write <output>.qa.png (timeline of frame kinds, sampled source | output frames)
    # Object storage (cluster/storage.py): the URI an input is read from or the output is published to.
    # ``video``/``audio`` then hold their node-local staging place (set when the driver stages them) and
    # ``output`` the local file rendered before it is published.
    video_uri: str | None = None
    audio_uri: str | None = None
    output_uri: str | None = None
    cache: CacheConfig = CacheConfig()
    gate: QaConfig = QaConfig()  # the ``qa`` group (``qa`` above is output.qa, the QA sheet)
    sweep: SweepConfig = SweepConfig()
    dub: DubSettings | None = None  # task.mode=dub (with task.segments, its ranges); None: audio mode
    # The kept segments beside the output (cluster/rundir.py): with a limit, segments the last render did
    # not use are removed, oldest first, past it; None keeps every one until ``python -m cluster.clean``.
    segments_max_mb: float | None = None


def compose_job(overrides: list[str]) -> JobConfig:
    """The job the shipped config gives with Hydra ``overrides`` (as on the command line), validated."""
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return job_from_config(compose("config", overrides=overrides))


def job_from_config(cfg: DictConfig) -> JobConfig:
    """Convert and validate; raises one ConfigError listing every problem found (types, ranges, names)."""
    problems: list[str] = []

    def get(key: str, kind: type, default=None, nullable: bool = False):
        """``key`` checked to be of ``kind``; a missing or mistyped value is reported and ``default`` used."""
        try:
            value = OmegaConf.select(cfg, key, throw_on_missing=True, default=default)
        except MissingMandatoryValue:
            problems.append(f"{key} is required (set {key}=... or use +task=test)")
            return default
        value, problem = check_type(key, value, kind, nullable)
        if problem:
            problems.append(problem)
            return default
        return value

    video, audio, output = (get(f"task.{k}", str) for k in ("video", "audio", "output"))

    def node(key: str, drop: tuple[str, ...] = ()) -> dict:
        """A config group's values as a plain dict (its YAML holds every default)."""
        values = OmegaConf.to_container(cfg[key], resolve=True)
        return {k: v for k, v in values.items() if k not in drop}

    def typed(cls, name: str, values: dict, keys: dict[str, str] | None = None):
        """``cls`` from ``values``: unknown keys and mistyped values are reported (a mistyped value is
        replaced by the field's default so the range checks below still run)."""
        hints = typing.get_type_hints(cls)
        known = {f.name: f for f in fields(cls)}
        # Offered as known: the group's own scalar keys (not those filled from other groups or nested).
        own = sorted(k for k in known if k not in (keys or {}) and _scalar(hints[k])[0] is not None)
        for key in sorted(set(values) - set(known)):
            problems.append(f"{name}.{key} is not a known setting (known: {', '.join(own)})")
        checked = {}
        for key, value in values.items():
            if key not in known:
                continue
            kind, nullable = _scalar(hints[key])
            if kind is not None:
                value, problem = check_type((keys or {}).get(key, f"{name}.{key}"), value, kind, nullable)
                if problem:
                    problems.append(problem)
                    f = known[key]
                    value = f.default if f.default is not MISSING else f.default_factory()
            checked[key] = value
        return cls(**checked)

    face = typed(
        FaceConfig,
        "face",
        {**_select_as_text(node("face")), "bbox_shift": get("task.bbox_shift", int, 0)},
        {"bbox_shift": "task.bbox_shift"},
    )
    pipeline = typed(
        PipelineConfig,
        "render",
        {
            **node("render"),
            "models_dir": get("models.dir", str, "models"),
            "tiny": get("models.tiny", bool, False),
            "face": face,
            "blend": typed(BlendConfig, "blend", node("blend")),
            "enhance": typed(EnhanceConfig, "enhance", node("enhance", drop=("name",))),
        },
        {"models_dir": "models.dir", "tiny": "models.tiny"},
    )
    cluster = typed(ClusterConfig, "cluster", node("cluster"))
    encode = typed(
        EncodeSettings, "output", node("output", drop=("summary", "resume", "root", "qa", "segments_max_mb"))
    )
    segments_max_mb = get("output.segments_max_mb", float, None, nullable=True)
    if segments_max_mb is not None and segments_max_mb < 0:
        problems.append(f"output.segments_max_mb must be >= 0 or null, got {segments_max_mb}")
    root = get("output.root", str, ".")
    summary = get("output.summary", bool, True)
    resume = get("output.resume", bool, True)
    qa = get("output.qa", bool, True)
    make_demo, download = get("task.make_demo", bool, False), get("models.download", bool, False)
    dub = dub_settings(
        get("task.mode", str, "audio"), get("task.segments", str, None, nullable=True), problems
    )
    before = len(problems)
    shards = typed(ShardsConfig, "shards", node("shards"))
    shards_typed = len(problems) == before
    cache = typed(CacheConfig, "cache", node("cache")) if "cache" in cfg else CacheConfig()
    gate = typed(QaConfig, "qa", node("qa")) if "qa" in cfg else QaConfig()
    sweep = typed(SweepConfig, "sweep", node("sweep")) if "sweep" in cfg else SweepConfig()
    if sweep.prep not in SWEEP_PREP:
        problems.append(f"sweep.prep must be one of {', '.join(SWEEP_PREP)}, got {sweep.prep!r}")
    problems += qa_problems(gate)
    problems += pipeline_problems(pipeline)
    problems += noop_problems(pipeline, encode)
    problems += cluster_problems(cluster, pipeline.device)
    length, seconds = shards.length, shards.seconds
    if length is not None and seconds is not None:
        problems.append("set either shards.length or shards.seconds, not both (set the other to null)")
    if length is None and seconds is None and shards_typed:
        problems.append("set shards.length (frames) or shards.seconds")
    if length is not None and length <= 0:
        problems.append(f"shards.length must be positive, got {length}")
    if seconds is not None and seconds <= 0:
        problems.append(f"shards.seconds must be positive, got {seconds}")
    if shards.prep_length < 1:
        problems.append(f"shards.prep_length must be positive, got {shards.prep_length}")
    if not cache.dir:
        problems.append("cache.dir must name a directory or URI (or set cache.enabled=false)")
    if not 0 <= encode.crf <= 51:
        problems.append(f"output.crf must be in 0..51, got {encode.crf}")
    if encode.preset not in X264_PRESETS:
        problems.append(f"output.preset must be one of {', '.join(X264_PRESETS)}, got {encode.preset!r}")
    if encode.gop is not None and encode.gop < 1:
        problems.append(f"output.gop must be >= 1 or null, got {encode.gop}")
    if output is not None and not output.lower().endswith(".mp4"):
        problems.append(f"task.output must be an .mp4 path, got {output}")
    if problems:
        raise ConfigError("invalid configuration: " + "; ".join(problems))
    (video, video_uri), (audio, audio_uri) = _source(video), _source(audio)
    output, output_uri = _target(output, root)
    return JobConfig(
        video=video,
        audio=audio,
        output=output,
        video_uri=video_uri,
        audio_uri=audio_uri,
        output_uri=output_uri,
        make_demo=make_demo,
        download=download,
        shards=shards,
        summary=summary,
        resume=resume,
        pipeline=pipeline,
        encode=encode,
        cluster=cluster,
        qa=qa,
        cache=cache,
        gate=gate,
        sweep=sweep,
        dub=dub,
        segments_max_mb=segments_max_mb,
    )


def qa_problems(qa: QaConfig) -> list[str]:
    """What is wrong with the ``qa`` group's values."""
    problems = []
    if qa.min_sync_confidence < 0:
        problems.append(f"qa.min_sync_confidence must be >= 0, got {qa.min_sync_confidence}")
    if not 0 <= qa.max_offset_frames <= 15:
        problems.append(
            f"qa.max_offset_frames must be in 0..15 (SyncNet looks 15 frames either way), got {qa.max_offset_frames}"
        )
    if not 0 <= qa.min_face_share <= 1:
        problems.append(f"qa.min_face_share must be in 0..1, got {qa.min_face_share}")
    return problems


def _source(value: str) -> tuple[Path, str | None]:
    """(local path, URI) of an input: a path or ``file://`` is local; another URI is staged by the driver
    into ``<staging root>/inputs`` (the path here is its place before the object's version is known)."""
    local = storage.local_path(value)
    if local is not None:
        return local, None
    return storage.staging_root() / "inputs" / storage.key(value) / PurePosixPath(value).name, value


def _target(value: str, root: str) -> tuple[Path, str | None]:
    """(local path, URI) of the output: a path (relative ones under ``output.root``) or ``file://`` is
    local; another URI is rendered into ``<staging root>/outputs/<hash of the URI>/`` (where its lock and
    resumable run directory live) and published to the URI, never joined under ``output.root``."""
    local = storage.local_path(value)
    if local is not None:
        return Path(root) / local, None  # an absolute task.output stays as it is
    return storage.staging_root() / "outputs" / storage.key(value) / PurePosixPath(value).name, value


def _select_as_text(face: dict) -> dict:
    """``face.select=2`` reaches us as an int: a track id is kept as text, like the rule names."""
    select = face.get("select")
    if isinstance(select, int) and not isinstance(select, bool):
        return {**face, "select": str(select)}
    return face


def check_type(key: str, value, kind: type, nullable: bool = False) -> tuple[object, str | None]:
    """(``value`` as ``kind``, None), or (None, the problem): bool is not an int, an int is a valid float."""
    if value is None:
        return None, None if nullable else f"{key} must be {_KINDS[kind]}, got null"
    if kind is bool:
        ok = isinstance(value, bool)
    elif kind is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif kind is float:
        ok = isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
    else:
        ok = isinstance(value, kind)
    if ok:
        return (float(value) if kind is float else value), None
    return None, f"{key} must be {_KINDS[kind]}{' or null' if nullable else ''}, got {value!r}"


def _scalar(hint) -> tuple[type | None, bool]:
    """(the scalar type, nullable) of a dataclass field's annotation; (None, False) for nested configs."""
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        args = typing.get_args(hint)
        rest = [a for a in args if a is not type(None)]
        return (rest[0] if len(rest) == 1 and rest[0] in _KINDS else None), type(None) in args
    return (hint if hint in _KINDS else None), False


def device_problem(device: str) -> str | None:
    """The problem with a ``render.device`` name, if any (syntax only: availability is checked by the driver)."""
    if DEVICE_PATTERN.fullmatch(device):
        return None
    return f"render.device must be auto, cpu, cuda, cuda:N or mps, got {device!r}"


def cluster_problems(c: ClusterConfig, device: str) -> list[str]:
    """Every invalid cluster value, and a device index no worker can see, each with its fix."""
    out = []
    if c.inputs not in ("object_store", "uri"):
        out.append(f"cluster.inputs must be object_store or uri, got {c.inputs!r}")
    if c.max_attempts < 1:
        out.append(f"cluster.max_attempts must be >= 1, got {c.max_attempts}")
    if c.max_in_flight < 1:
        out.append(f"cluster.max_in_flight must be >= 1, got {c.max_in_flight}")
    if c.workers is not None and c.workers < 1:
        out.append(f"cluster.workers must be >= 1 or null, got {c.workers}")
    if c.max_workers is not None and c.max_workers < 1:
        out.append(f"cluster.max_workers must be >= 1 or null, got {c.max_workers}")
    if c.workers is not None and c.max_workers is not None:
        out.append(
            f"cluster.max_workers={c.max_workers} does nothing with a fixed cluster.workers={c.workers}; "
            "set one of them to null"
        )
    if c.cpu_workers < 1:
        out.append(f"cluster.cpu_workers must be >= 1, got {c.cpu_workers}")
    if not (
        c.gpus_per_worker > 0 and (c.gpus_per_worker <= 1 or c.gpus_per_worker == int(c.gpus_per_worker))
    ):
        out.append(
            f"cluster.gpus_per_worker must be a fraction in (0, 1] or a whole number, got {c.gpus_per_worker}"
        )
    if c.cpus_per_worker <= 0:
        out.append(f"cluster.cpus_per_worker must be > 0, got {c.cpus_per_worker}")
    if c.start_timeout_s <= 0:
        out.append(f"cluster.start_timeout_s must be > 0, got {c.start_timeout_s}")
    if c.connect_timeout_s <= 0:
        out.append(f"cluster.connect_timeout_s must be > 0, got {c.connect_timeout_s}")
    if c.num_cpus is not None and c.num_cpus < 1:
        out.append(f"cluster.num_cpus must be >= 1 or null, got {c.num_cpus}")
    index = re.fullmatch(r"cuda:(\d+)", device)
    visible = max(1, int(c.gpus_per_worker)) if c.gpus_per_worker > 0 else 1
    if index and int(index[1]) >= visible:
        out.append(
            f"render.device={device} names GPU {index[1]}, but each worker sees only the {visible} GPU(s) Ray "
            f"assigned it, numbered from 0; use render.device=cuda (or raise cluster.gpus_per_worker)"
        )
    return out


def pipeline_problems(p: PipelineConfig) -> list[str]:
    """Every invalid value of a PipelineConfig, each with its fix."""
    out = []
    if problem := device_problem(p.device):
        out.append(problem)
    if p.face.detector not in ("s3fd", "haar"):
        out.append(f"face.detector must be s3fd or haar, got {p.face.detector!r}")
    if p.face.crop not in ("landmarks", "box"):
        out.append(f"face.crop must be landmarks or box, got {p.face.crop!r}")
    try:
        parse_select(p.face.select)
    except ValueError as err:
        out.append(str(err))
    if p.face.smooth_radius < 0:
        out.append(f"face.smooth_radius must be >= 0, got {p.face.smooth_radius}")
    if p.face.extra_margin < 0:
        out.append(f"face.extra_margin must be >= 0, got {p.face.extra_margin}")
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
    if p.composite not in ("auto", "device", "numpy"):
        out.append(f"render.composite must be auto, device or numpy, got {p.composite!r}")
    for name in PACING_FIELDS:
        if getattr(p, name) < 1:
            out.append(f"render.{name} must be >= 1, got {getattr(p, name)}")
    # The blend rules mirror musetalk.blending.Blender's (which checks again inside the worker): here they
    # fail before Ray starts, without importing torch.
    if p.blend.mode not in ("jaw", "raw", "neck"):
        out.append(f"blend.mode must be jaw, raw or neck, got {p.blend.mode!r}")
    if not 0 <= p.blend.upper_boundary_ratio < 1:
        out.append(f"blend.upper_boundary_ratio must be in [0, 1), got {p.blend.upper_boundary_ratio}")
    if p.blend.expand < 1:
        out.append(
            f"blend.expand must be >= 1 (the blend square must hold the face box), got {p.blend.expand}"
        )
    if not 0 <= p.blend.ellipse_feather <= 1:
        out.append(f"blend.ellipse_feather must be in [0, 1], got {p.blend.ellipse_feather}")
    if not p.blend.ellipse and not p.blend.parsing:
        out.append("blend.ellipse=false needs blend.parsing=true (without parsing the mask is the ellipse)")
    if p.enhance.upscale not in (1, 2, 4):
        out.append(f"enhance.upscale must be 1, 2 or 4, got {p.enhance.upscale}")
    return out


def noop_problems(p: PipelineConfig, encode: EncodeSettings) -> list[str]:
    """Settings that would change nothing: a sweep over them renders byte-identical duplicates, and a
    single run silently ignores what the user asked for. Each is refused with its fix."""
    out = []
    if not p.enhance.enabled and p.enhance.upscale != 1:
        out.append(
            f"enhance.upscale={p.enhance.upscale} does nothing with enhancement off; "
            "use enhance=gfpgan, or leave enhance.upscale=1"
        )
    if not p.blend.parsing and p.blend.mode != BlendConfig.mode:
        out.append(
            f"blend.mode={p.blend.mode} does nothing with blend.parsing=false (the mask is the ellipse); "
            "set blend.parsing=true, or leave blend.mode=jaw"
        )
    if encode.lossless and encode.crf != EncodeSettings.crf:
        out.append(
            f"output.crf={encode.crf} does nothing with output.lossless=true (lossless is qp 0); "
            "set output.lossless=false, or leave output.crf=18"
        )
    if p.device == "cpu" and p.dtype not in ("float32", "fp32"):
        out.append(
            f"render.dtype={p.dtype} does nothing on render.device=cpu (the CPU computes in float32); "
            "use a GPU device, or leave render.dtype=float32"
        )
    return out
