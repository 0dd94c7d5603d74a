"""Which errors are the device failing (they fail the unit) and which are a frame's (per-frame fallback)."""

from __future__ import annotations

import pytest
import torch

from musetalk.device import is_device_failure


@pytest.mark.parametrize(
    ("error", "device"),
    [
        (torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"), True),
        (torch.cuda.OutOfMemoryError("out of memory"), True),
        (RuntimeError("CUDA error: an illegal memory access was encountered"), True),
        (RuntimeError("CUBLAS_STATUS_EXECUTION_FAILED when calling cublasGemmEx"), True),
        (RuntimeError("cuDNN error: CUDNN_STATUS_INTERNAL_ERROR"), True),
        (
            RuntimeError("Given groups=1, weight of size [19, 4, 1, 1], expected input to have 4 channels"),
            False,
        ),
        (ValueError("CUDA"), False),  # only runtime errors carry the driver's messages
        (KeyError("x"), False),
    ],
)
def test_is_device_failure(error, device):
    assert is_device_failure(error) is device


def test_accelerator_errors_are_device_failures():
    accelerator = getattr(torch, "AcceleratorError", None)
    if accelerator is None:
        pytest.skip("this torch has no AcceleratorError")
    assert is_device_failure(accelerator("device-side assert triggered"))


def test_in_dtype_casts_weights_and_floating_inputs_only_when_needed():
    from musetalk.device import in_dtype

    net = torch.nn.Linear(4, 2)
    assert in_dtype(net, torch.float32) is net  # a CPU computes in float32: nothing changes
    half = in_dtype(torch.nn.Linear(4, 2), torch.bfloat16)
    out = half(torch.ones(3, 4))  # a float32 input, as S3FD's and FAN's callers build it
    assert out.dtype == torch.bfloat16 and out.shape == (3, 2)
    assert all(p.dtype == torch.bfloat16 for p in half.parameters())
