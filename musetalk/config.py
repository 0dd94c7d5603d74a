"""Typed configuration of the per-frame pipeline. Hydra's DictConfig never reaches musetalk/:
cluster/ converts it to these frozen dataclasses at the boundary."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class FaceConfig:
    detector: str = "s3fd"  # s3fd (face-alignment) | haar (OpenCV cascade, no weights needed)
    crop: str = (
        "landmarks"  # landmarks (upstream v1.5 rule from 68 FAN landmarks) | box (detector box + bbox_shift)
    )
    bbox_shift: int = (
        0  # pixels added to landmark 29's y (landmarks: top moves 2x) or the detector box's top (box)
    )
    extra_margin: int = 10  # pixels added below the chin (upstream v1.5), clipped to the frame
    detect_max_side: int = 640  # detection runs on frames downscaled so the longer side is at most this
    smooth_radius: int = 2  # temporal box smoothing over source frames [s - r, s + r]
    # which face: largest (per frame, the default) | left | right | center (per-frame rules) | a track id
    # (int, see `python -m cluster.faces`); musetalk.tracks explains each
    select: str = "largest"
    batch_size: int = 8  # detector batch (padded to this size so results never depend on batch-mates)


@dataclass(frozen=True)
class BlendConfig:
    mode: str = "jaw"  # face-parsing mode as upstream: jaw | raw | neck
    parsing: bool = True  # False: pure feathered-ellipse mask, no face parsing
    upper_boundary_ratio: float = 0.5  # the mask's top part (of the blend square) is zeroed
    expand: float = 1.5  # blend square side = 2 * int(max(w, h) // 2 * expand)
    ellipse_feather: float = 0.15  # feather width of the ellipse as a fraction of its radii
    ellipse: bool = True  # parsing mask x feathered ellipse; False: upstream v1.5's mask unchanged


@dataclass(frozen=True)
class EnhanceConfig:
    enabled: bool = False
    upscale: int = 1  # 1, 2 or 4: resolution of the enhanced face before it is pasted


# PipelineConfig fields that change how fast a worker runs, never what it computes (out of every key)
PACING_FIELDS = ("decode_depth", "faces_depth", "encode_depth", "mask_workers")


@dataclass(frozen=True)
class PipelineConfig:
    models_dir: str = "models"
    tiny: bool = False  # models_dir holds the random-weight stand-ins (changes only the fetch hint)
    device: str = "auto"
    dtype: str = "float32"  # float32 | float16 | bfloat16 (CPU always computes in float32)
    batch_size: int = 8  # VAE/UNet batch; every batch is padded to this size (shard invariance)
    # CPU intra-op threads (None: leave torch's setting). CPU kernels round differently with different
    # thread counts, so every worker of a job uses the same count (the driver pins it).
    threads: int | None = None
    # How a worker runs (musetalk.stages.PipelineTuning). ``composite``: auto (device on CUDA, numpy
    # elsewhere) | device | numpy; the device compositor is within one level of the numpy one, so it is
    # keyed. GPU only, change rounding (so keyed too): ``channels_last`` (UNet and VAE memory format),
    # ``compile`` (torch.compile the UNet). Queue depths (items) and mask threads change no pixel.
    composite: str = "auto"
    channels_last: bool = False
    compile: bool = False
    decode_depth: int = 4
    faces_depth: int = 16
    encode_depth: int = 2
    mask_workers: int = 2
    face: FaceConfig = field(default_factory=FaceConfig)
    blend: BlendConfig = field(default_factory=BlendConfig)
    enhance: EnhanceConfig = field(default_factory=EnhanceConfig)
