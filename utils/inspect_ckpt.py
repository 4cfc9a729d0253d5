"""
What a checkpoint holds: model args, training config, every tensor's shape and dtype, parameter counts
and bytes by dtype.

    python utils/inspect_ckpt.py --ckpt=out/base/ckpt.pt
    python utils/inspect_ckpt.py --ckpt=out/base/ckpt.pt --json     # the same as one JSON object
"""
import json
import os
from collections import defaultdict

import torch

from configurator import configure
from utils.checkpoint import load_checkpoint, model_from_checkpoint
from utils.cli import UserError, run_cli

DEFAULTS = dict(
    ckpt="out/base/ckpt.pt",  # the checkpoint to describe
    json=False,               # print one JSON object instead of tables
)


def tensor_bytes(tensors):
    """Bytes per dtype, counting a storage shared by several entries (tied weights) once."""
    seen, by_dtype = set(), defaultdict(int)
    for t in tensors:
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), t.numel())
        if key not in seen:
            seen.add(key)
            by_dtype[str(t.dtype).replace("torch.", "")] += t.numel() * t.element_size()
    return dict(by_dtype)


def optimizer_tensors(state):
    for per_param in state.get("state", {}).values():
        yield from (v for v in per_param.values() if torch.is_tensor(v))


def describe(path):
    """A JSON-ready summary of the checkpoint at path."""
    ckpt = load_checkpoint(path)
    model = model_from_checkpoint(ckpt, path)  # also proves the weights fit their architecture
    embeddings = [model.transformer.wte.weight] + ([model.transformer.wpe.weight] if "wpe" in model.transformer else [])
    return {
        "path": os.fspath(path),
        "file_bytes": os.path.getsize(path),
        "iter_num": ckpt.get("iter_num"),
        "best_val_loss": ckpt.get("best_val_loss"),
        "model_args": ckpt["model_args"],
        "lora": ckpt.get("lora"),
        "weights_tied": model.weights_tied,
        "params": {
            "total": model.get_num_params(non_embedding=False),
            "trainable": model.get_num_params(non_embedding=False, trainable_only=True),
            "embedding": sum(p.numel() for p in embeddings),
        },
        "tensors": [{"name": k, "shape": list(v.shape), "dtype": str(v.dtype).replace("torch.", ""), "numel": v.numel()}
                    for k, v in ckpt["model"].items()],
        "bytes_by_dtype": {"model": tensor_bytes(ckpt["model"].values()),
                           "optimizer": tensor_bytes(optimizer_tensors(ckpt.get("optimizer") or {}))},
        "config": ckpt.get("config") or {},
    }


def render(info):
    lines = [f"checkpoint {info['path']} ({info['file_bytes'] / 1e6:.2f} MB), iter {info['iter_num']}, "
             f"best val loss {info['best_val_loss']}"]
    lines.append("model args: " + ", ".join(f"{k}={v}" for k, v in info["model_args"].items()))
    if info["lora"]:
        lines.append("lora: " + ", ".join(f"{k}={v}" for k, v in info["lora"].items()))
    p = info["params"]
    lines.append(f"parameters: total {p['total']:,} | trainable {p['trainable']:,} | embedding {p['embedding']:,}"
                 + (" | lm_head tied to wte" if info["weights_tied"] else ""))
    width = max(len(t["name"]) for t in info["tensors"])
    lines.append("")
    lines += [f"  {t['name']:<{width}}  {str(tuple(t['shape'])):<16} {t['dtype']:<9} {t['numel']:>12,}"
              for t in info["tensors"]]
    lines.append("")
    for part, sizes in info["bytes_by_dtype"].items():
        if sizes:
            lines.append(f"{part} bytes: " + ", ".join(f"{d} {b / 1e6:.2f} MB" for d, b in sizes.items()))
    if info["config"]:
        lines.append("config: " + json.dumps(info["config"], sort_keys=True))
    return "\n".join(lines)


def main(argv=None):
    cfg = configure(DEFAULTS, argv or [])
    if not cfg["ckpt"]:
        raise UserError("--ckpt=PATH is required")
    info = describe(cfg["ckpt"])
    print(json.dumps(info, indent=2) if cfg["json"] else render(info))


if __name__ == "__main__":
    run_cli(main)
