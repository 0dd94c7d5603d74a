"""Device and dtype resolution. Inside a Ray actor the visible GPU is whatever Ray assigned."""

from __future__ import annotations

import torch

from shards.errors import ConfigError

_DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "float16": torch.float16,
    "fp16": torch.float16,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
}


def resolve_device(name: str = "auto") -> torch.device:
    """``auto`` is the first visible CUDA device, else the CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"device {name!r} requested but no CUDA GPU is visible; use device=auto or cpu")
    return torch.device(name)


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """fp16/bf16 only on CUDA; the CPU always computes in float32."""
    if name not in _DTYPES:
        raise ConfigError(f"unknown dtype {name!r}; use one of float32, float16, bfloat16")
    dtype = _DTYPES[name]
    if device.type == "cpu" and dtype != torch.float32:
        return torch.float32
    return dtype
