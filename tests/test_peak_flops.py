"""utils/peak_flops.py: the FLOP/s MFU is divided by (a configured value, a GPU's published peak, or the
matmul rate measured on a CPU)."""
import itertools
import time

import pytest
import torch

from utils import peak_flops
from utils.peak_flops import GPU_PEAK_BF16, measure_matmul_flops, mfu_clock, peak_flops_for


def test_measured_rate_is_matmul_flops_over_the_clock():
    ticks = itertools.count()  # 0 = start, 1 and 2 are under 3 s (two matmuls), 3 stops, 4 is the end
    n = 8
    assert measure_matmul_flops(n=n, seconds=3, clock=lambda: next(ticks)) == 2 * n ** 3 * 2 / 4


def test_measuring_leaves_the_global_rng_alone():
    state = torch.get_rng_state()
    measure_matmul_flops(n=8, seconds=0.01)
    assert torch.equal(torch.get_rng_state(), state)  # dropout streams resume exactly after it


def test_a_configured_peak_wins_and_a_cpu_is_measured():
    assert peak_flops_for("cuda", configured=5e12) == 5e12  # never asks the device
    assert peak_flops_for("cpu") > 1e6


@pytest.mark.parametrize("name, expected", [("NVIDIA A100-SXM4-80GB", 312e12), ("NVIDIA A10", 125e12),
                                            ("NVIDIA L40S", 362e12), ("NVIDIA L4", 121e12),
                                            ("NVIDIA H200", 989e12), ("Tesla T4", None)])
def test_gpu_peak_by_device_name_longest_name_first(monkeypatch, name, expected):
    monkeypatch.setattr(peak_flops.torch.cuda, "get_device_name", lambda device=None: name)
    assert peak_flops_for("cuda:0") == expected
    assert expected is None or expected in GPU_PEAK_BF16.values()


def test_a_cpu_peak_and_step_are_timed_in_process_cpu_seconds():
    """Time the process spends off the CPU (another process holding it, here a sleep) is not counted, so
    the peak and the steps see the same clock however busy the machine is; a GPU keeps the wall clock."""
    clock = mfu_clock("cpu")
    t0 = clock()
    time.sleep(0.3)
    assert clock() - t0 < 0.1
    assert mfu_clock("cuda:0") is time.perf_counter
