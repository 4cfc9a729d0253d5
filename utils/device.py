"""Which device and precision a run uses: cuda when there is one, float32 on CPU, bfloat16 (float16
where bf16 is missing) autocast on CUDA. Bad names are refused in one line (UserError) before any work."""
from contextlib import nullcontext

import torch

from utils.cli import UserError


def resolve_device(device):
    """'auto' = cuda when there is one, else cpu; an unusable or unknown name is refused."""
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"device {device!r} asked for, but CUDA is not available; use --device=cpu")
    if device != "cpu" and not device.startswith(("cuda", "mps")):
        raise UserError(f"unknown device {device!r}; use auto, cpu, cuda or cuda:N")
    return device


def resolve_dtype(dtype, device):
    """float32 on CPU; bfloat16/float16 autocast is for CUDA only."""
    if dtype not in ("auto", "float32", "bfloat16", "float16"):
        raise UserError(f"dtype must be auto, float32, bfloat16 or float16, got {dtype!r}")
    if not device.startswith("cuda"):
        if dtype in ("bfloat16", "float16"):
            raise UserError(f"dtype={dtype} (mixed precision) needs CUDA; use --dtype=float32 on {device}")
        return "float32"
    if dtype == "auto":
        return "bfloat16" if torch.cuda.is_bf16_supported() else "float16"
    return dtype


def autocast_context(device, dtype):
    """Mixed-precision autocast on CUDA; a no-op context in float32 and on CPU."""
    if not device.startswith("cuda") or dtype == "float32":
        return nullcontext()
    return torch.autocast(device_type="cuda", dtype=getattr(torch, dtype))
