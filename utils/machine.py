"""One line describing the machine a benchmark ran on: CPU model, cores, load, GPU, library versions."""
import os
import platform


def cpu_model():
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or "unknown CPU"


def describe_machine(*extras):
    """e.g. 'AMD EPYC ..., 2 cores, load average 3.1; Python 3.11.7, torch 2.13.0+cpu (1 threads); <extras>'."""
    import torch
    gpu = f", GPU {torch.cuda.get_device_name()}" if torch.cuda.is_available() else ", no GPU"
    load = f", load average {os.getloadavg()[0]:.1f}" if hasattr(os, "getloadavg") else ""
    parts = [f"{cpu_model()}, {os.cpu_count()} cores{load}{gpu}",
             f"Python {platform.python_version()}, torch {torch.__version__} ({torch.get_num_threads()} threads)"]
    return "; ".join(parts + [e for e in extras if e])
