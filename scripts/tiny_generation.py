"""Tiny random-weight stand-ins for the MuseTalk UNet and the sd-vae-ft-mse VAE, in the official formats.

Same file layout and formats as the real weights (``musetalk.json`` + a ``torch.save``d state dict;
a diffusers ``save_pretrained`` directory), so the real loaders read them. Deterministic from the seed.
"""

from __future__ import annotations

import json

import diffusers
import torch
from diffusers import AutoencoderKL, UNet2DConditionModel

from musetalk.layout import ModelLayout


def tiny_unet_config() -> dict:
    """A ``musetalk.json``-shaped diffusers config dump, shrunk: 8 -> 4 channels, 384-d audio context."""
    return {
        "_class_name": "UNet2DConditionModel",
        "_diffusers_version": diffusers.__version__,
        "act_fn": "silu",
        "attention_head_dim": 8,
        "block_out_channels": [32, 64],
        "center_input_sample": False,
        "cross_attention_dim": 384,
        "down_block_types": ["CrossAttnDownBlock2D", "DownBlock2D"],
        "downsample_padding": 1,
        "flip_sin_to_cos": True,
        "freq_shift": 0,
        "in_channels": 8,
        "layers_per_block": 1,
        "mid_block_scale_factor": 1,
        "norm_eps": 1e-05,
        "norm_num_groups": 8,
        "out_channels": 4,
        "sample_size": 32,
        "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D"],
    }


def write_tiny_unet(layout: ModelLayout, seed: int) -> None:
    """Write ``musetalkV15/musetalk.json`` and ``unet.pth`` (a plain state dict, as upstream saves it)."""
    config = tiny_unet_config()
    torch.manual_seed(seed)
    unet = UNet2DConditionModel.from_config({k: v for k, v in config.items() if not k.startswith("_")})
    layout.unet_config.parent.mkdir(parents=True, exist_ok=True)
    layout.unet_config.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    torch.save(unet.state_dict(), layout.unet_weights)


def write_tiny_vae(layout: ModelLayout, seed: int) -> None:
    """Write ``sd-vae/`` (config.json + diffusion_pytorch_model.safetensors): 4 blocks, so 256x256 -> 4x32x32."""
    torch.manual_seed(seed)
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(8, 8, 16, 16),
        layers_per_block=1,
        norm_num_groups=4,
        latent_channels=4,
        sample_size=256,
    )
    vae.save_pretrained(layout.vae_dir, safe_serialization=True)
