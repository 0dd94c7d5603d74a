"""Device and dtype resolution. Inside a Ray actor the visible GPU is whatever Ray assigned."""

from __future__ import annotations

import platform
from dataclasses import astuple, dataclass

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


@dataclass(frozen=True)
class ComputeIdentity:
    """What the rounding of a worker's results depends on, beyond the weights and the settings: the
    device type and model (a GPU's name; on a CPU, the architecture and the SIMD level torch dispatches
    to), the dtype it computes in, its torch threads, and the torch and CUDA versions. Results are
    bit-identical across workers of one identity (shard invariance is claimed per identity), so a job
    never mixes identities, and every key of reusable work (resume, avatar cache) includes it."""

    device: str  # cpu | cuda | mps
    model: str
    dtype: str
    threads: int
    torch: str
    cuda: str = ""

    def key(self) -> str:
        """A stable text form, for hashing into keys."""
        return "|".join(str(v) for v in astuple(self))

    def __str__(self) -> str:
        cuda = f", CUDA {self.cuda}" if self.cuda else ""
        return f"{self.device} ({self.model}), {self.dtype}, {self.threads} threads, torch {self.torch}{cuda}"


def compute_identity(device: torch.device, dtype: torch.dtype) -> ComputeIdentity:
    """The identity of this process computing on ``device`` in ``dtype`` (call after the thread count
    is set: it is read from torch)."""
    if device.type == "cuda":
        model = torch.cuda.get_device_name(device)
    else:
        model = f"{platform.machine()} {torch.backends.cpu.get_cpu_capability()}"
    return ComputeIdentity(
        device=device.type,
        model=model,
        dtype=str(dtype).removeprefix("torch."),
        threads=torch.get_num_threads(),
        torch=torch.__version__,
        cuda=(torch.version.cuda or "") if device.type == "cuda" else "",
    )


def is_device_failure(err: BaseException) -> bool:
    """Whether ``err`` is the device failing (out of memory, a CUDA or accelerator error), not the frame.

    Such an error must fail the unit (the pool retries it, then the job fails with one line); a per-frame
    fallback (the ellipse mask, a plain resize) would hide a sick GPU behind quietly worse frames.
    """
    # torch.OutOfMemoryError (torch >= 2.5) is torch.cuda.OutOfMemoryError; AcceleratorError is newer still
    device_errors = tuple(
        cls
        for cls in (getattr(torch, "OutOfMemoryError", None), torch.cuda.OutOfMemoryError,
                    getattr(torch, "AcceleratorError", None))
        if cls is not None
    )  # fmt: skip
    if isinstance(err, device_errors):
        return True
    return isinstance(err, RuntimeError) and any(word in str(err) for word in ("CUDA", "CUBLAS", "CUDNN"))


def upload(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A host tensor -> ``device``. To CUDA through page-locked memory and non-blocking: the copy is queued
    on the current stream and the host thread goes on (the pinned block is not reused before the copy
    ran: the caching host allocator records the stream). Elsewhere the tensor itself (CPU) or ``.to``."""
    if device.type == "cuda":
        return tensor.contiguous().pin_memory().to(device, non_blocking=True)
    return tensor.to(device)


class _InDtype(torch.nn.Module):
    def __init__(self, module: torch.nn.Module, dtype: torch.dtype) -> None:
        super().__init__()
        self.module = module.to(dtype)
        self.dtype = dtype

    def forward(self, *args):
        return self.module(
            *(a.to(self.dtype) if torch.is_tensor(a) and a.is_floating_point() else a for a in args)
        )


def in_dtype(module: torch.nn.Module, dtype: torch.dtype) -> torch.nn.Module:
    """``module`` computing in ``dtype``: its weights cast, its floating inputs cast on the way in (its
    outputs stay in ``dtype``: callers read them back with ``.float()``). For preparation models whose
    callers build float32 inputs (S3FD, FAN); ``module`` itself when ``dtype`` is float32."""
    return module if dtype == torch.float32 else _InDtype(module, dtype)
