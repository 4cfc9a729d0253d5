"""The one checkpoint reader and writer. A checkpoint is a torch file holding only tensors and plain
data (loaded with weights_only=True: no pickled code runs), written atomically."""
import os

import torch

from model import GPT, GPTConfig
from utils.atomic import torch_save
from utils.cli import UserError

FORMAT_VERSION = 1


def clean_state_dict(sd):
    """Strip the prefixes torch.compile (`_orig_mod.`) and DDP/Opacus (`module.`) add."""
    out = {}
    for k, v in sd.items():
        for prefix in ("_orig_mod.", "module."):
            while k.startswith(prefix):
                k = k[len(prefix):]
        out[k] = v
    return out


def unwrap(model):
    """The GPT inside DDP / Opacus GradSampleModule / torch.compile wrappers."""
    while not isinstance(model, GPT):
        if hasattr(model, "_module"):
            model = model._module
        elif hasattr(model, "module"):
            model = model.module
        elif hasattr(model, "_orig_mod"):
            model = model._orig_mod
        else:
            raise TypeError(f"cannot find a GPT inside {type(model).__name__}")
    return model


def save_checkpoint(path, model, optimizer=None, iter_num=0, config=None, **extra):
    """Write model weights and args (+ optimizer, iteration, run config, anything in extra) atomically."""
    gpt = unwrap(model)
    ckpt = {
        "format_version": FORMAT_VERSION,
        "model_args": gpt.config.to_dict(),
        "lora": gpt.lora_config,
        "model": clean_state_dict(gpt.state_dict()),
        "iter_num": iter_num,
        "config": dict(config or {}),
    }
    if optimizer is not None:
        ckpt["optimizer"] = optimizer.state_dict()
    ckpt.update(extra)
    torch_save(ckpt, path)


def load_checkpoint(path, map_location="cpu"):
    """Read a checkpoint dict; a clear UserError for missing, truncated, corrupt or foreign files."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise UserError(f"checkpoint {path} does not exist")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # truncated zip, random bytes, pickled code refused by weights_only, ...
        raise UserError(f"checkpoint {path} is corrupt or truncated ({type(e).__name__})") from None
    if not isinstance(ckpt, dict) or "model_args" not in ckpt or "model" not in ckpt:
        raise UserError(f"{path} is not a private-nanogpt checkpoint (no model_args/model)")
    return ckpt


def model_from_checkpoint(ckpt, path="checkpoint"):
    """Rebuild the GPT a checkpoint describes and load its weights strictly."""
    try:
        model = GPT(GPTConfig.from_dict(ckpt["model_args"]))
    except (TypeError, ValueError) as e:
        raise UserError(f"{path}: bad model args ({e})") from None
    if ckpt.get("lora"):
        lo = ckpt["lora"]
        model.add_lora(lo["rank"], lo["alpha"], tuple(lo["targets"]))
    try:
        model.load_state_dict(ckpt["model"], strict=True)
    except RuntimeError as e:
        first = str(e).strip().splitlines()[0]
        raise UserError(f"{path} does not match its architecture ({first})") from None
    return model


def load_model(path, device="cpu"):
    """(model in eval mode on device, checkpoint dict)."""
    ckpt = load_checkpoint(path)
    model = model_from_checkpoint(ckpt, path).to(device).eval()
    return model, ckpt
