"""
The pretraining loop: a GPT on a token stream, nanoGPT style. train.py is its command line; the benchmark
bench/train_generate.py times train() here.

Batches are random windows of data/<dataset>/train.bin (fine for pretraining; DP fine-tuning reads whole
records in utils/finetune.py). They come from a dedicated torch.Generator whose state is checkpointed with
the model, optimizer and RNG states, so N iterations in one run equal N/2 + a resumed N/2 (bit-exact on
CPU). Every DDP rank draws the same global batch and keeps its own slice of it: the ranks see distinct
data, and together exactly what one process with world_size times the batch would see.

train(cfg, log=print) -> {"model", "iter_num", "best_val_loss", "stopped_early", "history"}.
"""
import math
import os
import time
from contextlib import nullcontext

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

from model import GPT, GPT2_NAMES, GPTConfig, UnsafeWeightsError
from utils.checkpoint import load_checkpoint, model_from_checkpoint, save_checkpoint
from utils.cli import UserError
from utils.data import REPO, get_batch, load_meta, tokens
from utils.device import autocast_context, resolve_device, resolve_dtype
from utils.distributed import leave_process_group
from utils.lr_schedule import get_lr
from utils.peak_flops import mfu_clock, peak_flops_for
from utils.progress import format_eta
from utils.run_log import RunLog

DEFAULTS = dict(
    # I/O
    out_dir="out/base",  # checkpoint (ckpt.pt) and log folder
    log_file="",  # JSONL, one line per log/eval event; "" = out_dir/log.jsonl
    eval_interval=250,  # evaluate (and maybe save) every this many iterations
    log_interval=10,  # print a progress line every this many iterations
    eval_iters=20,  # batches per split in each evaluation
    eval_only=False,  # evaluate once and exit, without training
    always_save_checkpoint=True,  # save at every eval; False = only when val loss improves (keeps the best)
    init_from="scratch",  # 'scratch' | 'resume' (out_dir/ckpt.pt) | gpt2, gpt2-medium, ... | a save_pretrained dir
    # data
    dataset="pydocs",  # data/<dataset> holds train.bin, val.bin and meta.json (data/<name>/prepare.py)
    data_dir="",  # "" = data/<dataset>
    gradient_accumulation_steps=1,  # in total over all DDP ranks, as in nanoGPT
    batch_size=16,  # per rank and micro step
    block_size=256,  # context length in tokens (training windows; the model's position table for scratch)
    # model (ignored for GPT-2 weights, which carry their own shape)
    n_layer=4,  # transformer blocks
    n_head=4,  # attention heads (n_embd must be divisible by it)
    n_embd=256,  # width of the residual stream
    dropout=0.0,  # dropout rate in [0, 1); 0 for small data is usually fine
    bias=True,  # biases in Linear and LayerNorm layers (GPT-2 has them)
    pos_encoding="learned",  # 'learned' (GPT-2) | 'sinusoidal' (fixed, Vaswani et al.)
    tie_weights=True,  # lm_head shares the token embedding (GPT-2); False gives it its own weights
    # AdamW
    learning_rate=1e-3,  # peak AdamW learning rate (after warmup)
    max_iters=2000,  # total optimizer steps (a resumed run continues up to it)
    weight_decay=0.1,  # AdamW decay of matmul and embedding weights (never biases or LayerNorm)
    beta1=0.9,  # AdamW first-moment decay
    beta2=0.99,  # AdamW second-moment decay
    grad_clip=1.0,  # 0 = off
    # learning rate: linear warmup, then cosine down to min_lr at lr_decay_iters (independent of max_iters,
    # so a resumed run follows the same schedule)
    decay_lr=True,  # False = constant learning_rate
    warmup_iters=100,  # linear warmup steps
    lr_decay_iters=2000,  # the cosine reaches min_lr here (usually = max_iters)
    min_lr=1e-4,  # learning rate at and after lr_decay_iters
    patience=0,  # stop after this many evals without a better val loss; 0 = never
    # system
    device="auto",  # 'auto' = cuda if available, else cpu
    dtype="auto",  # 'auto' = bfloat16 on CUDA (float16 + GradScaler where bf16 is missing), float32 on CPU
    compile=False,  # torch.compile the model (GPU; slower to start)
    seed=1337,  # seeds init, batches and dropout: reproducible (pretraining has no DP guarantee to void)
    peak_flops=0.0,  # for MFU; 0 = known GPU peak (bf16), or on CPU the matmul FLOP/s measured at start
)

MODEL_KEYS = ("n_layer", "n_head", "n_embd", "block_size", "bias", "pos_encoding", "tie_weights", "dropout")


# ---------------------------------------------------------------------------- small library functions
def vocab_size_for(meta):
    """GPT-2's 50257 padded up to a multiple of 64 (faster matmuls); byte and word vocabularies exactly."""
    v = int(meta["vocab_size"])
    return (v + 63) // 64 * 64 if meta["tokenizer"] == "gpt2" else v


def tokenizer_info(meta):
    """What sample.py and later scripts need to rebuild the tokenizer, stored in the checkpoint config."""
    return {k: meta[k] for k in ("tokenizer", "vocab_size", "words") if k in meta}


def step_batches(data, batch_size, block_size, accum, rank, world_size, generator):
    """One optimizer step's micro-batches for this rank. Every rank draws the same accum x world_size x
    batch_size windows; micro step m on rank r takes block m * world_size + r of them."""
    x, y = get_batch(data, accum * world_size * batch_size, block_size, generator=generator)
    for m in range(accum):
        rows = slice((m * world_size + rank) * batch_size, (m * world_size + rank + 1) * batch_size)
        yield x[rows], y[rows]


def to_device(t, device):
    if device.startswith("cuda"):
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


@torch.no_grad()
def estimate_loss(model, splits, eval_iters, batch_size, block_size, device="cpu", ctx=None, seed=0,
                  rank=0, world_size=1):
    """Mean loss per split over eval_iters batches. The windows come from a fresh generator seeded with
    `seed`, so every eval scores the same windows and never disturbs the training streams; DDP ranks
    share the batches out and average."""
    ctx = ctx or nullcontext()
    was_training = model.training
    model.eval()
    out = {}
    for split, data in splits.items():
        gen = torch.Generator().manual_seed(seed)
        total = torch.zeros(2, device=device)  # (sum of batch losses, number of batches)
        for i in range(eval_iters):
            x, y = get_batch(data, batch_size, block_size, generator=gen)
            if i % world_size != rank:
                continue
            with ctx:
                _, loss = model(to_device(x, device), to_device(y, device))
            total += torch.stack([loss.float(), torch.ones((), device=device)])
        if world_size > 1:
            dist.all_reduce(total)
        out[split] = (total[0] / total[1]).item()
    model.train(was_training)
    return out


def check_config(cfg):
    """Refuse values that would fail later (or silently do nothing), naming the key."""
    positive = ("batch_size", "block_size", "gradient_accumulation_steps", "eval_interval", "eval_iters",
                "log_interval", "n_layer", "n_head", "n_embd")
    for key in positive:
        if cfg[key] < 1:
            raise UserError(f"--{key} must be at least 1, got {cfg[key]}")
    for key in ("max_iters", "warmup_iters", "patience", "learning_rate", "min_lr", "weight_decay", "grad_clip"):
        if cfg[key] < 0:
            raise UserError(f"--{key} must not be negative, got {cfg[key]}")
    if not 0.0 <= cfg["dropout"] < 1.0:
        raise UserError(f"--dropout must be in [0, 1), got {cfg['dropout']}")
    if cfg["decay_lr"] and cfg["lr_decay_iters"] <= cfg["warmup_iters"]:
        raise UserError(f"--lr_decay_iters ({cfg['lr_decay_iters']}) must exceed "
                        f"--warmup_iters ({cfg['warmup_iters']})")
    if cfg["pos_encoding"] not in ("learned", "sinusoidal"):
        raise UserError(f"--pos_encoding must be 'learned' or 'sinusoidal', got {cfg['pos_encoding']!r}")
    if cfg["n_embd"] % cfg["n_head"]:
        raise UserError(f"--n_embd ({cfg['n_embd']}) must be divisible by --n_head ({cfg['n_head']})")
    if os.path.exists(cfg["out_dir"]) and not os.path.isdir(cfg["out_dir"]):
        raise UserError(f"--out_dir={cfg['out_dir']} is a file, not a directory")
    if cfg["log_file"] and os.path.isdir(cfg["log_file"]):
        raise UserError(f"--log_file={cfg['log_file']} is a directory, not a file")
    init = cfg["init_from"]
    if init not in ("scratch", "resume") + GPT2_NAMES and not os.path.isdir(init):
        raise UserError(f"--init_from={init!r}: expected scratch, resume, one of {', '.join(GPT2_NAMES)} "
                        "or a directory written by transformers' save_pretrained")


# ---------------------------------------------------------------------------- model set-up
def check_vocabulary(meta, model_vocab, model_tokenizer, source):
    """The data must be tokenized the way the model was trained, within the model's vocabulary."""
    if model_tokenizer is not None and model_tokenizer.get("tokenizer") != meta["tokenizer"]:
        raise UserError(f"vocabulary mismatch: {source} uses the {model_tokenizer.get('tokenizer')!r} tokenizer "
                        f"but the data uses {meta['tokenizer']!r}")
    if model_tokenizer is not None and model_tokenizer.get("words", meta.get("words")) != meta.get("words"):
        raise UserError(f"vocabulary mismatch: {source} and the data have different word vocabularies")
    if model_vocab < meta["vocab_size"]:
        raise UserError(f"vocabulary mismatch: {source} has {model_vocab} tokens, the data needs {meta['vocab_size']}")


def resume_state(cfg, meta):
    """(checkpoint, path, init_origin) to continue from, after checking it fits this run's config and data.
    A run started from scratch must match the config's model shape; GPT-2 weights carry their own."""
    path = os.path.join(cfg["out_dir"], "ckpt.pt")
    ckpt = load_checkpoint(path)
    if "optimizer" not in ckpt or "sampler" not in ckpt:
        raise UserError(f"{path} was not written by train.py (no optimizer or sampler state); cannot resume it")
    args, saved = ckpt["model_args"], ckpt.get("config", {})
    origin = saved.get("init_origin", "scratch")
    check_vocabulary(meta, args.get("vocab_size", 0), saved.get("tokenizer"), path)
    if origin == "scratch":
        differ = [f"{k} {args.get(k)!r} != {cfg[k]!r}" for k in MODEL_KEYS if args.get(k) != cfg[k]]
        if differ:
            raise UserError(f"{path} has another architecture than this config ({'; '.join(differ)})")
        if args.get("vocab_size") != vocab_size_for(meta):
            raise UserError(f"vocabulary mismatch: {path} has {args.get('vocab_size')} tokens, "
                            f"the data's {meta['tokenizer']} vocabulary needs {vocab_size_for(meta)}")
    return ckpt, path, origin


def pretrained_model(cfg, meta):
    source = cfg["init_from"]
    if meta["tokenizer"] != "gpt2":
        raise UserError(f"vocabulary mismatch: GPT-2 weights ({source}) use the gpt2 tokenizer "
                        f"but the data uses {meta['tokenizer']!r}")
    try:
        model = GPT.from_pretrained(source, override_args={"dropout": cfg["dropout"]})
    except UnsafeWeightsError as e:
        raise UserError(f"--init_from={source}: {e}") from None
    except Exception as e:  # offline hub, missing files, a non-GPT-2 directory, ...
        first = (str(e).strip().splitlines() or [""])[0][:200]
        raise UserError(f"could not load GPT-2 weights from {source!r} ({type(e).__name__}: {first}); "
                        "offline, pass a directory written by transformers' save_pretrained") from None
    check_vocabulary(meta, model.config.vocab_size, None, source)
    return model


def build_model(cfg, meta):
    """(GPT, checkpoint to resume or None, init_origin) for cfg['init_from']."""
    if cfg["init_from"] == "resume":
        ckpt, path, origin = resume_state(cfg, meta)
        return model_from_checkpoint(ckpt, path), ckpt, origin
    if cfg["init_from"] == "scratch":
        args = {k: cfg[k] for k in MODEL_KEYS}
        return GPT(GPTConfig(vocab_size=vocab_size_for(meta), **args)), None, "scratch"
    return pretrained_model(cfg, meta), None, cfg["init_from"]


# ---------------------------------------------------------------------------- training
def is_out_of_memory(e):
    """An allocation failure: CUDA's OutOfMemoryError, the CPU allocator's RuntimeError, Python's MemoryError."""
    return isinstance(e, (torch.OutOfMemoryError, MemoryError)) or "can't allocate memory" in str(e)


def remove_if_unused(paths):
    """Remove the log and out_dir a run created before it failed, so that it leaves nothing half-written."""
    for path in reversed(paths):  # the log file before its folder
        if os.path.isfile(path):
            os.remove(path)
        elif os.path.isdir(path) and not os.listdir(path):
            os.rmdir(path)


def rng_states(device, world_size):
    """Every rank's CPU (and CUDA) RNG state, so dropout continues exactly on resume (a collective in DDP)."""
    cuda = torch.cuda.get_rng_state(device) if device.startswith("cuda") else None
    state = {"cpu": torch.get_rng_state(), "cuda": cuda}
    if world_size == 1:
        return [state]
    gathered = [None] * world_size
    dist.all_gather_object(gathered, state)
    return gathered


def set_rng_states(states, device):
    torch.set_rng_state(states["cpu"])
    if states.get("cuda") is not None and device.startswith("cuda"):
        torch.cuda.set_rng_state(states["cuda"], device)


def train(cfg, log=print):
    """Run the training loop for a full config dict (DEFAULTS updated). Returns a dict with the trained
    "model" (plain GPT), "iter_num", "best_val_loss", "stopped_early" and the eval "history"."""
    cfg = dict(cfg)
    check_config(cfg)
    ddp = int(os.environ.get("RANK", -1)) != -1  # launched by torchrun
    rank, local_rank, world_size = (int(os.environ[k]) for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE")) if ddp \
        else (0, 0, 1)
    master = rank == 0
    if cfg["gradient_accumulation_steps"] % world_size:
        raise UserError(f"--gradient_accumulation_steps ({cfg['gradient_accumulation_steps']}) must be a multiple "
                        f"of the number of DDP processes ({world_size})")
    accum = cfg["gradient_accumulation_steps"] // world_size
    device = resolve_device(cfg["device"])
    if ddp and device.startswith("cuda"):
        device = f"cuda:{local_rank}"
    dtype = resolve_dtype(cfg["dtype"], device)
    ctx = autocast_context(device, dtype)

    # data and model: everything that can refuse the run does so before anything is written
    cfg["data_dir"] = cfg["data_dir"] or os.path.join(REPO, "data", cfg["dataset"])
    meta = load_meta(cfg["data_dir"])
    splits = {s: tokens(cfg["data_dir"], s, meta) for s in ("train", "val")}
    for split, data in splits.items():
        if len(data) <= cfg["block_size"]:
            raise UserError(f"block_size {cfg['block_size']} is larger than the {split} data ({len(data)} tokens)")
    peak = peak_flops_for(device, cfg["peak_flops"])  # before seeding: measuring uses its own generator
    torch.manual_seed(cfg["seed"] + rank)
    model, ckpt, origin = build_model(cfg, meta)
    if cfg["block_size"] > model.config.block_size:
        raise UserError(f"block_size {cfg['block_size']} exceeds the model's {model.config.block_size}")
    if origin != "scratch":  # record the real shape, not the unused defaults
        cfg.update({k: getattr(model.config, k) for k in MODEL_KEYS if k != "block_size"})
    model.to(device)
    optimizer = model.configure_optimizers(cfg["weight_decay"], cfg["learning_rate"], (cfg["beta1"], cfg["beta2"]),
                                           "cuda" if device.startswith("cuda") else device)
    scaler = torch.amp.GradScaler("cuda", enabled=dtype == "float16")
    sampler = torch.Generator().manual_seed(cfg["seed"])  # the same on every rank (see step_batches)
    iter_num, best_val_loss, evals_since_best = 0, float("inf"), 0
    if ckpt is not None:
        try:
            optimizer.load_state_dict(ckpt["optimizer"])
        except (ValueError, KeyError) as e:
            raise UserError(f"the optimizer state in {cfg['out_dir']}/ckpt.pt does not fit the model ({e})") from None
        if ckpt.get("scaler") and scaler.is_enabled():
            scaler.load_state_dict(ckpt["scaler"])
        sampler.set_state(ckpt["sampler"])
        iter_num, best_val_loss = ckpt["iter_num"], ckpt.get("best_val_loss", float("inf"))
        evals_since_best = ckpt.get("evals_since_best", 0)
        rngs = ckpt.get("rng") or []
        if len(rngs) == world_size:
            set_rng_states(rngs[rank], device)
        elif master:
            log(f"note: the checkpoint has RNG states for {len(rngs)} processes, this run has {world_size}: "
                "dropout will not continue exactly")
    start_iter, resumed = iter_num, ckpt is not None
    del ckpt  # free the copy of the weights and optimizer state
    saved_config = {**cfg, "tokenizer": tokenizer_info(meta), "init_origin": origin}
    ckpt_path = os.path.join(cfg["out_dir"], "ckpt.pt")
    tokens_per_iter = cfg["gradient_accumulation_steps"] * cfg["batch_size"] * cfg["block_size"]

    if ddp:
        if device.startswith("cuda"):
            torch.cuda.set_device(device)
        dist.init_process_group(backend="nccl" if device.startswith("cuda") else "gloo")
    if device.startswith("cuda"):
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    raw_model = model
    model = eval_model = torch.compile(model) if cfg["compile"] else model
    if ddp:  # eval_model stays unwrapped: ranks run different numbers of eval batches
        model = DDP(model, device_ids=[local_rank] if device.startswith("cuda") else None)
    log_path = cfg["log_file"] or os.path.join(cfg["out_dir"], "log.jsonl")
    created = [p for p in (cfg["out_dir"], log_path) if not os.path.exists(p)]  # removed again after an OOM
    run_log = RunLog(log_path, append=resumed, enabled=master, echo=log)
    run_log.echo(f"{raw_model.get_num_params() / 1e6:.2f}M parameters | {tokens_per_iter:,} tokens per iteration | "
                 f"{world_size} process(es) on {device} ({dtype}) | iter {iter_num} -> {cfg['max_iters']}")
    history, stopped_early, finished = [], False, False
    clock = mfu_clock(device)  # MFU's step time (CPU: process CPU seconds, immune to other processes' load)
    t_last, c_last, iters_since_log, dt_ema = time.perf_counter(), clock(), 0, None
    try:
        while True:
            last = iter_num >= cfg["max_iters"]
            scored = resumed and iter_num == start_iter and not cfg["eval_only"]  # the resumed point was scored
            if (iter_num % cfg["eval_interval"] == 0 or last or cfg["eval_only"]) and not scored:
                losses = estimate_loss(eval_model, splits, cfg["eval_iters"], cfg["batch_size"], cfg["block_size"],
                                       device, ctx, cfg["seed"] + 1, rank, world_size)
                improved = losses["val"] < best_val_loss
                best_val_loss = min(best_val_loss, losses["val"])
                evals_since_best = 0 if improved else evals_since_best + 1
                stopped_early = cfg["patience"] > 0 and evals_since_best >= cfg["patience"]
                record = {"event": "eval", "iter": iter_num, "train_loss": losses["train"], "val_loss": losses["val"],
                          "train_ppl": math.exp(min(losses["train"], 50)), "val_ppl": math.exp(min(losses["val"], 50)),
                          "best_val_loss": best_val_loss}
                history.append(record)
                saved = ""
                if not cfg["eval_only"] and iter_num > start_iter and (improved or cfg["always_save_checkpoint"]):
                    rng = rng_states(device, world_size)
                    if master:
                        save_checkpoint(ckpt_path, raw_model, optimizer, iter_num, saved_config, rng=rng,
                                        best_val_loss=best_val_loss, evals_since_best=evals_since_best,
                                        sampler=sampler.get_state(),
                                        scaler=scaler.state_dict() if scaler.is_enabled() else None)
                    saved = f" | saved {ckpt_path}"
                    created = []  # a checkpoint exists now: keep everything
                run_log.event(f"eval {iter_num}: train {losses['train']:.4f} (ppl {record['train_ppl']:.2f}) | val "
                              f"{losses['val']:.4f} (ppl {record['val_ppl']:.2f}) | best {best_val_loss:.4f}{saved}",
                              **record)
                if stopped_early:
                    run_log.event(f"early stop at iter {iter_num}: no better val loss in {evals_since_best} evals",
                                  event="stop", iter=iter_num, reason="patience")
                t_last, c_last, iters_since_log = time.perf_counter(), clock(), 0  # eval time is not training time
            if last or cfg["eval_only"] or stopped_early:
                break

            lr = get_lr(iter_num, cfg)
            for group in optimizer.param_groups:
                group["lr"] = lr
            step_loss = torch.zeros((), device=device)
            batches = step_batches(splits["train"], cfg["batch_size"], cfg["block_size"], accum, rank, world_size,
                                   sampler)
            for micro, (x, y) in enumerate(batches):
                # DDP all-reduces gradients on the last micro step only
                with nullcontext() if not ddp or micro == accum - 1 else model.no_sync():
                    with ctx:
                        _, loss = model(to_device(x, device), to_device(y, device))
                        loss = loss / accum
                    scaler.scale(loss).backward()
                step_loss += loss.detach()
            if cfg["grad_clip"] > 0:
                scaler.unscale_(optimizer)
                torch.nn.utils.clip_grad_norm_(model.parameters(), cfg["grad_clip"])
            scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad(set_to_none=True)
            iter_num += 1
            iters_since_log += 1

            if iter_num % cfg["log_interval"] == 0 and master:
                loss_value = step_loss.item()  # the one sync point per log interval
                dt = (time.perf_counter() - t_last) / iters_since_log
                dt_mfu = (clock() - c_last) / iters_since_log
                t_last, c_last, iters_since_log = time.perf_counter(), clock(), 0
                dt_ema = dt if dt_ema is None else 0.9 * dt_ema + 0.1 * dt
                mfu = raw_model.estimate_mfu(cfg["batch_size"] * accum, dt_mfu, peak, cfg["block_size"]) if peak else None
                tok_s, width = tokens_per_iter / dt, len(str(cfg["max_iters"]))
                run_log.event(f"iter {iter_num:>{width}}/{cfg['max_iters']} | loss {loss_value:.4f} | lr {lr:.2e} | "
                              f"{tok_s:,.0f} tok/s | mfu {'n/a' if mfu is None else f'{100 * mfu:.1f}%'} | "
                              f"eta {format_eta(dt_ema * (cfg['max_iters'] - iter_num))}",
                              event="train", iter=iter_num, loss=loss_value, lr=lr, tokens_per_s=tok_s, mfu=mfu,
                              ms_per_iter=1000 * dt)
        finished = True
    except (RuntimeError, MemoryError) as e:
        if not is_out_of_memory(e):
            raise
        run_log.close()
        remove_if_unused(created)
        raise UserError(f"out of memory at iter {iter_num} on {device}: a micro-batch of {cfg['batch_size']} x "
                        f"{cfg['block_size']} tokens does not fit; lower --batch_size or --block_size (a larger "
                        "--gradient_accumulation_steps keeps the tokens per step)") from None
    finally:
        run_log.close()
        if ddp:
            model = None  # the DDP wrapper's reducer holds the group: drop it while the group is alive
            leave_process_group(finished)
    return {"model": raw_model, "iter_num": iter_num, "best_val_loss": best_val_loss,
            "stopped_early": stopped_early, "history": history}
