"""Atomic file writes: write a temp file in the target's folder, fsync, then rename over the target.
A reader sees the old file or the new one, never half of one. Files are created owner-only (0600,
mkstemp's mode): checkpoints and datasets here hold, or derive from, sensitive records.

A writer killed mid-write (SIGKILL, power loss) cannot remove its temp file, and that file may hold
plaintext weights or records: the next atomic write of the same target removes such leftovers first.
Two processes writing the same target at once are not supported (the last rename would win anyway)."""
import json
import math
import os
import tempfile
from contextlib import contextmanager


@contextmanager
def atomic_path(path):
    """Yield a temporary path beside `path`; on success rename it to `path`, on failure remove it."""
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    sweep_stale_temps(path)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix="." + os.path.basename(path) + ".", suffix=".tmp")
    os.close(fd)
    try:
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def sweep_stale_temps(path):
    """Remove `.NAME.*.tmp` files (atomic_path's temp names for this target) left by a killed writer."""
    folder, name = os.path.split(os.path.abspath(os.fspath(path)))
    if not os.path.isdir(folder):
        return []
    stale = [f for f in os.listdir(folder) if f.startswith(f".{name}.") and f.endswith(".tmp")]
    for f in stale:
        try:
            os.remove(os.path.join(folder, f))
        except OSError:
            pass
    return stale


def write_bytes(path, data):
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        f.write(data)


def json_safe(obj):
    """inf/nan are not JSON: null (epsilon = inf means no guarantee). numpy / 0-d scalars become Python
    numbers."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    if hasattr(obj, "item") and getattr(obj, "ndim", None) == 0:  # numpy scalar, 0-d array or tensor
        return json_safe(obj.item())
    return obj


def write_json(path, obj):
    write_bytes(path, (json.dumps(json_safe(obj), indent=2, sort_keys=False) + "\n").encode())


def torch_save(obj, path):
    import torch
    with atomic_path(path) as tmp:
        torch.save(obj, tmp)
