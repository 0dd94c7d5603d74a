"""Random-weight stand-ins for the MuseTalk UNet and the sd-vae-ft-mse VAE, in the official formats.

Same file layout and formats as the real weights (``musetalk.json`` + a ``torch.save``d state dict;
a diffusers ``save_pretrained`` directory), so the real loaders read them. Deterministic from the seed.
By default they are tiny; with ``full_size=True`` they have the real architectures (the published
``musetalk.json``, ~850M parameters, a 3.4 GB ``unet.pth``; sd-vae-ft-mse's config), for benchmarks.
"""

from __future__ import annotations

import json

import diffusers
import torch
from diffusers import AutoencoderKL, UNet2DConditionModel

from musetalk.layout import ModelLayout

# musetalkV15/musetalk.json as published by TMElyralab/MuseTalk (a diffusers 0.6 config dump).
FULL_UNET_CONFIG = {
    "_class_name": "UNet2DConditionModel",
    "_diffusers_version": "0.6.0.dev0",
    "act_fn": "silu",
    "attention_head_dim": 8,
    "block_out_channels": [320, 640, 1280, 1280],
    "center_input_sample": False,
    "cross_attention_dim": 384,
    "down_block_types": [
        "CrossAttnDownBlock2D",
        "CrossAttnDownBlock2D",
        "CrossAttnDownBlock2D",
        "DownBlock2D",
    ],
    "downsample_padding": 1,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "in_channels": 8,
    "layers_per_block": 2,
    "mid_block_scale_factor": 1,
    "norm_eps": 1e-05,
    "norm_num_groups": 32,
    "out_channels": 4,
    "sample_size": 64,
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
}

# stabilityai/sd-vae-ft-mse's config.json (the diffusers AutoencoderKL arguments).
FULL_VAE_CONFIG = {
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": ("DownEncoderBlock2D",) * 4,
    "up_block_types": ("UpDecoderBlock2D",) * 4,
    "block_out_channels": (128, 256, 512, 512),
    "layers_per_block": 2,
    "act_fn": "silu",
    "norm_num_groups": 32,
    "latent_channels": 4,
    "sample_size": 256,
}


def tiny_unet_config() -> dict:
    """The published ``musetalk.json`` shrunk: 2 blocks of 32/64 channels, same 8 -> 4 channels, 384-d audio."""
    return {
        **FULL_UNET_CONFIG,
        "_diffusers_version": diffusers.__version__,
        "block_out_channels": [32, 64],
        "down_block_types": ["CrossAttnDownBlock2D", "DownBlock2D"],
        "layers_per_block": 1,
        "norm_num_groups": 8,
        "sample_size": 32,
        "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D"],
    }


def unet_config(full_size: bool = False) -> dict:
    """The ``musetalk.json`` to write: the published one, or the tiny stand-in's."""
    return json.loads(json.dumps(FULL_UNET_CONFIG)) if full_size else tiny_unet_config()


def vae_config(full_size: bool = False) -> dict:
    """``AutoencoderKL`` arguments: sd-vae-ft-mse's, or a tiny VAE with the same 256 -> 4x32x32 interface."""
    if full_size:
        return dict(FULL_VAE_CONFIG)
    return {
        **FULL_VAE_CONFIG,
        "block_out_channels": (8, 8, 16, 16),
        "layers_per_block": 1,
        "norm_num_groups": 4,
    }


def write_tiny_unet(layout: ModelLayout, seed: int, *, full_size: bool = False) -> None:
    """Write ``musetalkV15/musetalk.json`` and ``unet.pth`` (a plain state dict, as upstream saves it).

    Weights use diffusers' default init under ``seed`` (~12 s on 2 CPU cores at full size; its outputs
    stay finite); the global torch RNG is left as it was.
    """
    config = unet_config(full_size)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet = UNet2DConditionModel.from_config({k: v for k, v in config.items() if not k.startswith("_")})
    layout.unet_config.parent.mkdir(parents=True, exist_ok=True)
    layout.unet_config.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    torch.save(unet.state_dict(), layout.unet_weights)


def write_tiny_vae(layout: ModelLayout, seed: int, *, full_size: bool = False) -> None:
    """Write ``sd-vae/`` (config.json + diffusion_pytorch_model.safetensors): 4 blocks, so 256x256 -> 4x32x32."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        vae = AutoencoderKL(**vae_config(full_size))
    vae.save_pretrained(layout.vae_dir, safe_serialization=True)
