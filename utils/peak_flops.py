"""The FLOP/s that MFU is divided by: the published dense bf16 peak of a known GPU, or on a CPU (where none
is published) the fp32 matmul rate measured on the spot.

On a CPU both the peak and the training step are timed in process CPU seconds (mfu_clock): on a shared
machine the wall clock counts the time other processes hold the cores, so a peak measured at a busy
moment and steps timed at a quiet one gave an MFU above 100%."""
import time

import torch

# dense bf16 peaks, matched as substrings of the device name in this order (A100 before A10, L40S before L4)
GPU_PEAK_BF16 = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "A10": 125e12, "L4": 121e12}


def mfu_clock(device):
    """The clock MFU's step time is read on: process CPU time on a CPU, wall time on a GPU."""
    return time.perf_counter if device.startswith("cuda") else time.process_time


def measure_matmul_flops(n=512, seconds=0.3, clock=time.process_time):
    """Achieved fp32 matmul FLOP/s on this CPU (per process CPU second by default): the 'peak' MFU is
    measured against where none is published."""
    g = torch.Generator().manual_seed(0)  # never touch the global RNG: dropout streams must resume exactly
    a, b = torch.randn(n, n, generator=g), torch.randn(n, n, generator=g)
    a @ b  # warm up
    reps, t0 = 0, clock()
    while clock() - t0 < seconds:
        a @ b
        reps += 1
    return 2 * n ** 3 * reps / (clock() - t0)


def peak_flops_for(device, configured=0.0):
    """configured if set; else the GPU's published peak (None for an unknown GPU), or the CPU's measured rate."""
    if configured > 0:
        return configured
    if device.startswith("cuda"):
        name = torch.cuda.get_device_name(device)
        return next((v for k, v in GPU_PEAK_BF16.items() if k in name), None)
    return measure_matmul_flops()
