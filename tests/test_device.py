"""utils/device.py: which device and precision a run uses, and the one-line refusals of bad names."""
import pytest
import torch

from utils.cli import UserError
from utils.device import autocast_context, resolve_device, resolve_dtype

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def test_auto_device_is_cuda_only_when_there_is_one():
    assert resolve_device("auto") == ("cuda" if torch.cuda.is_available() else "cpu")
    assert resolve_device("cpu") == "cpu"


@pytest.mark.parametrize("device, needle", [("tpu", "unknown device 'tpu'"), ("gpu0", "unknown device")])
def test_unknown_device_is_refused(device, needle):
    with pytest.raises(UserError, match=needle):
        resolve_device(device)


@pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is here")
def test_cuda_without_cuda_is_refused():
    with pytest.raises(UserError, match="CUDA is not available"):
        resolve_device("cuda:0")


def test_cpu_runs_in_float32_and_refuses_mixed_precision():
    assert resolve_dtype("auto", "cpu") == resolve_dtype("float32", "cpu") == "float32"
    for dtype in ("bfloat16", "float16"):
        with pytest.raises(UserError, match="needs CUDA"):
            resolve_dtype(dtype, "cpu")
    with pytest.raises(UserError, match="dtype must be"):
        resolve_dtype("fp8", "cpu")


def test_no_autocast_on_cpu_or_in_float32():
    a = torch.randn(4, 4)
    for device, dtype in (("cpu", "float32"), ("cuda", "float32")):
        with autocast_context(device, dtype):
            assert not torch.is_autocast_enabled("cuda") and (a @ a).dtype == torch.float32


@cuda
def test_cuda_autocasts_matmuls_to_the_resolved_dtype():
    dtype = resolve_dtype("auto", "cuda")
    assert dtype == ("bfloat16" if torch.cuda.is_bf16_supported() else "float16")
    a = torch.randn(4, 4, device="cuda")
    with autocast_context("cuda", dtype):
        assert (a @ a).dtype == getattr(torch, dtype)
