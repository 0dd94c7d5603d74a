"""The models a pipeline runs and the weight files they load.

:func:`load_models` loads every model a :class:`~musetalk.config.PipelineConfig` names (once per worker);
:func:`required_weights` lists the files it will read (paths from :class:`~musetalk.layout.ModelLayout`)
and :func:`check_weights` refuses a job with any of them missing, before any worker starts.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from musetalk.audio import WhisperAudioEncoder, load_whisper
from musetalk.blending import Blender
from musetalk.blending import warm_up as blend_warm_up
from musetalk.config import PipelineConfig
from musetalk.device import in_dtype, resolve_device, resolve_dtype
from musetalk.enhance import FaceEnhancer, load_gfpgan
from musetalk.faces import FaceAnalyzer, load_face_analyzer
from musetalk.generation import LatentGenerator, load_unet, load_vae
from musetalk.layout import ModelLayout
from musetalk.parsing import load_face_parser
from musetalk.stages import PipelineTuning
from shards.errors import WeightsError

logger = logging.getLogger(__name__)


@dataclass
class Models:
    """Every loaded model the pipeline needs."""

    analyzer: FaceAnalyzer
    audio: WhisperAudioEncoder
    generator: LatentGenerator
    blender: Blender
    enhancer: FaceEnhancer | None
    device: torch.device


def load_models(cfg: PipelineConfig, tuning: PipelineTuning | None = None) -> Models:
    """Load every model named by ``cfg`` from ``cfg.models_dir`` (WeightsError names any missing file)."""
    tuning = tuning or PipelineTuning.of(cfg)
    layout = ModelLayout.at(cfg.models_dir, tiny=cfg.tiny)
    device = resolve_device(cfg.device)
    dtype = resolve_dtype(cfg.dtype, device)
    logger.info("loading models from %s on %s (%s)", layout.root, device, dtype)
    analyzer = load_face_analyzer(layout, cfg.face, device)
    # preparation models follow render.dtype (float32 on a CPU: resolve_dtype); S3FD and FAN get float32
    # inputs from their callers, so they run behind an adapter that casts them
    if analyzer.s3fd_net is not None:
        analyzer.s3fd_net = in_dtype(analyzer.s3fd_net, dtype)
    if analyzer.fan is not None:
        analyzer.fan = in_dtype(analyzer.fan, dtype)
    audio = load_whisper(layout, device, dtype)
    unet, vae = load_unet(layout, device, dtype), load_vae(layout, device, dtype)
    channels_last = device.type == "cuda" and tuning.channels_last  # GPU only, not measured: changes rounding
    if channels_last:
        unet = unet.to(memory_format=torch.channels_last)
        vae = vae.to(memory_format=torch.channels_last)
    generator = LatentGenerator(unet, vae, device, dtype, cfg.batch_size, channels_last=channels_last)
    if device.type == "cuda" and tuning.compile:  # GPU only, not measured: changes rounding
        generator.compile()
    parser = load_face_parser(layout, device, dtype=dtype) if cfg.blend.parsing else None
    blender = Blender(parser, cfg.blend)
    blend_warm_up()  # the blend's compiled loops load once here, not inside the first unit's clock
    enhancer = load_gfpgan(layout, device, cfg.enhance.upscale, dtype) if cfg.enhance.enabled else None
    return Models(analyzer, audio, generator, blender, enhancer, device)


def required_weights(cfg: PipelineConfig) -> list[tuple[Path, str]]:
    """Every weight file ``cfg`` needs, as (path, description); checked before any worker starts."""
    layout = ModelLayout.at(cfg.models_dir, tiny=cfg.tiny)
    need = [
        (layout.unet_config, "MuseTalk UNet config"),
        (layout.unet_weights, "MuseTalk UNet weights"),
        (layout.vae_dir / "config.json", "VAE config"),
        (layout.whisper_dir / "config.json", "Whisper config"),
        (layout.whisper_dir / "preprocessor_config.json", "Whisper feature extractor config"),
    ]
    if cfg.face.detector == "s3fd":
        need.append((layout.s3fd, "S3FD face detector"))
    if cfg.face.crop == "landmarks":
        need.append((layout.fan, "FAN landmark network"))
    if cfg.blend.parsing:
        need += [
            (layout.resnet18, "ResNet18 (face parsing backbone)"),
            (layout.face_parse, "BiSeNet face parsing"),
        ]
    if cfg.enhance.enabled:
        need.append((layout.gfpgan, "GFPGAN v1.4"))
    return need


def check_weights(cfg: PipelineConfig) -> None:
    """Raise one WeightsError naming every missing file and the command that fetches them."""
    layout = ModelLayout.at(cfg.models_dir, tiny=cfg.tiny)
    missing = [(p, what) for p, what in required_weights(cfg) if not p.exists()]
    if missing:
        names = ", ".join(f"{what} at {p}" for p, what in missing)
        hint = layout.fetch_hint.format(root=layout.root)
        raise WeightsError(f"missing model weights: {names}; fetch them with `{hint}`")
