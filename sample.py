"""
Generate text from a trained model.

    python sample.py --out_dir=out/base                                  # out/base/ckpt.pt
    python sample.py --ckpt=out/base/ckpt.pt --start="The list" --num_samples=2 --max_new_tokens=100
    python sample.py --ckpt=out/base/ckpt.pt --start=FILE:prompt.txt --greedy --use_kv_cache=False
    python sample.py --init_from=gpt2-tiny-dir --start="Hello"           # GPT-2 weights (gpt2 tokenizer)

Text is decoded with the tokenizer of the data the checkpoint was trained on (train.py stores it in
the checkpoint's config); GPT-2 weights use GPT-2's tokenizer.
"""
import os
from contextlib import nullcontext

import torch

from configurator import configure
from model import GPT, GPT2_NAMES, UnsafeWeightsError
from utils.checkpoint import load_model
from utils.cli import UserError, run_cli
from utils.data import REPO, load_meta
from utils.device import autocast_context, resolve_device, resolve_dtype
from utils.tokenizer import get_tokenizer

DEFAULTS = dict(
    ckpt="",  # "" = out_dir/ckpt.pt
    out_dir="out/base",  # the folder of ckpt.pt (train.py's out_dir)
    init_from="resume",  # 'resume' = the checkpoint above, or a GPT-2 name / save_pretrained directory
    start="\n",  # prompt text, or FILE:path to read it from a file
    num_samples=3,  # continuations of the prompt
    max_new_tokens=200,  # tokens generated per sample, 0..MAX_NEW_TOKENS
    temperature=0.8,  # softmax temperature; 0 = greedy
    top_k=200,  # 0 = off
    top_p=1.0,  # nucleus sampling; 1.0 = off
    greedy=False,  # always the most likely token (temperature, top_k and top_p ignored)
    use_kv_cache=True,  # False recomputes the whole context each token (same tokens, slower)
    seed=1337,  # sampling seed: the same seed gives the same samples
    device="auto",  # 'auto' = cuda if available, else cpu
    dtype="auto",  # 'auto' = bfloat16 on CUDA, float32 on CPU
)


# one forward pass per token: past this a run takes hours on a CPU and the output is no longer "a sample"
MAX_NEW_TOKENS = 100_000


def checkpoint_tokenizer(ckpt):
    """The tokenizer a checkpoint was trained with: the one train.py recorded in its config, else the
    meta.json of the dataset its config names, else the byte tokenizer when the vocabulary is 257."""
    config = ckpt.get("config") or {}
    if isinstance(config.get("tokenizer"), dict):
        return get_tokenizer(config["tokenizer"])
    data_dir = config.get("data_dir") or (config.get("dataset") and os.path.join(REPO, "data", config["dataset"]))
    if data_dir and os.path.isfile(os.path.join(data_dir, "meta.json")):
        return get_tokenizer(load_meta(data_dir))
    if ckpt["model_args"].get("vocab_size") == 257:
        return get_tokenizer("byte")
    raise UserError("the checkpoint does not say which tokenizer it was trained with, and its dataset's "
                    "meta.json cannot be found")


def read_prompt(start):
    if start.startswith("FILE:"):
        path = start[len("FILE:"):]
        try:
            with open(path, encoding="utf-8") as f:
                return f.read()
        except OSError as e:
            raise UserError(f"cannot read the prompt file {path} ({e.strerror})") from None
        except UnicodeDecodeError as e:
            bad = e.object[e.start:e.start + 1]
            raise UserError(f"the prompt file {path} is not UTF-8 text (byte {e.start}: {bad!r})") from None
    return start


def load(cfg, device):
    """(model in eval mode, tokenizer) for cfg's checkpoint or GPT-2 weights."""
    if cfg["init_from"] == "resume":
        model, ckpt = load_model(cfg["ckpt"] or os.path.join(cfg["out_dir"], "ckpt.pt"), device)
        return model, checkpoint_tokenizer(ckpt)
    if cfg["init_from"] not in GPT2_NAMES and not os.path.isdir(cfg["init_from"]):
        raise UserError(f"--init_from={cfg['init_from']!r}: expected resume, one of {', '.join(GPT2_NAMES)} "
                        "or a directory written by transformers' save_pretrained")
    try:
        model = GPT.from_pretrained(cfg["init_from"])
    except UnsafeWeightsError as e:
        raise UserError(f"--init_from={cfg['init_from']}: {e}") from None
    except Exception as e:
        first = (str(e).strip().splitlines() or [""])[0][:200]
        raise UserError(f"could not load GPT-2 weights from {cfg['init_from']!r} "
                        f"({type(e).__name__}: {first})") from None
    return model.to(device).eval(), get_tokenizer("gpt2")


def generate_texts(model, tokenizer, prompt, cfg, device, ctx=None):
    """num_samples continuations of the prompt (the prompt included), decoded."""
    ids = tokenizer.encode(prompt) or [tokenizer.eot]  # an empty prompt starts a new document
    if max(ids) >= model.config.vocab_size:
        raise UserError(f"the prompt has token ids beyond the model's vocabulary ({model.config.vocab_size})")
    idx = torch.tensor([ids] * cfg["num_samples"], dtype=torch.long, device=device)
    gen = torch.Generator(device=device).manual_seed(cfg["seed"])
    with ctx or nullcontext():
        out = model.generate(idx, cfg["max_new_tokens"], temperature=cfg["temperature"], top_k=cfg["top_k"] or None,
                             top_p=cfg["top_p"], greedy=cfg["greedy"], use_kv_cache=cfg["use_kv_cache"],
                             generator=gen)
    return [tokenizer.decode(row.tolist()) for row in out]


def main(argv=None):
    cfg = configure(DEFAULTS, argv or [])
    if cfg["num_samples"] < 1:
        raise UserError(f"--num_samples must be at least 1, got {cfg['num_samples']}")
    if not 0 <= cfg["max_new_tokens"] <= MAX_NEW_TOKENS:
        raise UserError(f"--max_new_tokens must be in 0..{MAX_NEW_TOKENS:,}, got {cfg['max_new_tokens']:,}")
    if cfg["temperature"] < 0 or not 0 < cfg["top_p"] <= 1 or cfg["top_k"] < 0:
        raise UserError("--temperature must be >= 0, --top_p in (0, 1] and --top_k >= 0")
    device = resolve_device(cfg["device"])
    ctx = autocast_context(device, resolve_dtype(cfg["dtype"], device))
    prompt = read_prompt(cfg["start"])  # before the model loads: a bad file is refused at once
    torch.manual_seed(cfg["seed"])
    model, tokenizer = load(cfg, device)
    for text in generate_texts(model, tokenizer, prompt, cfg, device, ctx):
        print(text)
        print("---------------")


if __name__ == "__main__":
    run_cli(main)
