"""
What secret DP noise costs: utils/secure_rng.py's ChaCha20 Gaussian noise (the default for every DP run)
against torch.randn of the same size, dtype and device, side by side in one run. GPT-2 124M has
124,439,808 parameters, so one DP step draws that many normals.

Interleaved rounds (randn, secure, randn, secure, ...) share the machine's load; the figure is the ratio
of medians of process CPU time (CPU) or of synchronized wall time (CUDA). One untimed warm-up round
each first (the first draw of a process also touches fresh pages). Also timed: Opacus's own secure-mode
recipe on torch's generator (4 normals summed, / 2), which needs torchcsprng to be secure at all.

    python bench/secure_noise.py                       # CPU, 124M normals, 3 rounds
    python bench/secure_noise.py --device=cuda         # on a GPU (keystream on the CPU, transform on the GPU)
    python bench/secure_noise.py --numel=10000000 --rounds=5

Prints the machine, its load (uptime) and a markdown row for BENCHMARKS.md.
"""
import statistics
import subprocess
import sys
import time

import torch

from configurator import configure
from utils.cli import UserError, run_cli
from utils.machine import describe_machine
from utils.secure_rng import RunSecret

DEFAULTS = dict(
    numel=124_439_808,  # normals per draw: GPT-2 124M's parameter count
    device="cpu",  # 'cpu' | 'cuda'
    dtype="float32",  # 'float32' | 'float64'
    rounds=3,  # timed interleaved rounds (median)
    threads=1,  # torch threads on CPU: 1 keeps process CPU time clean (OpenMP spin-waits on a loaded machine)
)


def timed(fn, device):
    """Seconds of process CPU time (CPU) or synchronized wall time (CUDA) for one call."""
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        return time.perf_counter() - start
    start = time.process_time()
    fn()
    return time.process_time() - start


def main(argv=None):
    cfg = configure(DEFAULTS, sys.argv[1:] if argv is None else argv)
    if cfg["numel"] <= 0 or cfg["rounds"] <= 0:
        raise UserError("numel and rounds must be positive")
    if cfg["device"].startswith("cuda") and not torch.cuda.is_available():
        raise UserError("--device=cuda but no CUDA GPU is visible")
    if cfg["dtype"] not in ("float32", "float64"):
        raise UserError("dtype must be float32 or float64")
    torch.set_num_threads(cfg["threads"])
    n, device, dtype = cfg["numel"], cfg["device"], getattr(torch, cfg["dtype"])
    stream = RunSecret.fresh().stream("noise")
    draws = {
        "torch.randn": lambda: torch.randn(n, device=device, dtype=dtype),
        "secure (ChaCha20)": lambda: stream.normal((n,), 1.0, dtype, device),
        "Opacus secure recipe on torch.randn (4 normals / 2)": lambda: sum(
            torch.randn(n, device=device, dtype=dtype) for _ in range(4)) / 2,
    }
    print(f"machine: {describe_machine()}\nload at start: {subprocess.run(['uptime'], capture_output=True, text=True).stdout.strip()}")
    for fn in draws.values():
        fn()  # warm-up
    times = {name: [] for name in draws}
    for r in range(cfg["rounds"]):
        for name, fn in draws.items():
            times[name].append(timed(fn, device))
        print(f"round {r + 1}/{cfg['rounds']}: " + ", ".join(f"{k} {v[-1]:.3f} s" for k, v in times.items()), flush=True)
    median = {k: statistics.median(v) for k, v in times.items()}
    base = median["torch.randn"]
    print(f"load at end: {subprocess.run(['uptime'], capture_output=True, text=True).stdout.strip()}")
    clock = "wall (synchronized)" if device.startswith("cuda") else "process CPU"
    print(f"\n| draw ({n:,} {cfg['dtype']} normals, {device}) | {clock} s, median of {cfg['rounds']} | x torch.randn |")
    print("|---|---|---|")
    for name, t in median.items():
        print(f"| {name} | {t:.3f} | {t / base:.2f} |")
    return median


if __name__ == "__main__":
    run_cli(main)
