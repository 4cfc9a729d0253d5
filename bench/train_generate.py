"""
Benchmark: training tokens/s and MFU of train.py's loop, and generation tokens/s with and without the
KV cache, on the default CPU config (config/train_pydocs.py: 4 layers, 256 wide), side by side in one run.
With CUDA, also the GPT-2-124M shape in bf16 + torch.compile (MFU against the GPU's published bf16 peak).

    python bench/train_generate.py                      # writes bench/results_train_generate.md

CPU MFU has no published peak to divide by: it is measured against the fp32 matmul FLOP/s this run
achieves on the same cores (train.measure_matmul_flops), so it reads "fraction of what a big matmul gets".
Data are random tokens: throughput does not depend on what the tokens say.
"""
import json
import os
import platform
import statistics
import tempfile
import time

import numpy as np
import torch

import train
from configurator import configure
from model import GPT, GPTConfig
from utils.atomic import write_bytes
from utils.cli import run_cli
from utils.data import REPO, write_meta, write_split

TOKENIZER_VOCAB = {"byte": 257, "gpt2": 50257}

DEFAULTS = dict(
    train_config="config/train_pydocs.py",  # relative paths are read from the repository root
    tokenizers=["byte", "gpt2"],  # vocabularies 257 and 50304 (GPT-2's 50257 padded)
    train_iters=6,  # iterations per vocabulary; the first two are warm-up and not counted
    gen_tokens=256,
    gpu_iters=30,
    out="bench/results_train_generate.md",
)


def machine():
    cpu = platform.processor() or "unknown"
    if os.path.exists("/proc/cpuinfo"):
        names = [line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")]
        cpu = names[0] if names else cpu
    gpu = f", GPU {torch.cuda.get_device_name()}" if torch.cuda.is_available() else ""
    load = ", load average %.1f" % os.getloadavg()[0] if hasattr(os, "getloadavg") else ""
    return (f"CPU {cpu}, {os.cpu_count()} cores, torch {torch.__version__} ({torch.get_num_threads()} threads), "
            f"Python {platform.python_version()}{gpu}{load}")


def random_stream(folder, tokenizer, n_tokens=200_000, seed=0):
    """A random-token dataset in the shared format (a few long records)."""
    vocab_size = TOKENIZER_VOCAB[tokenizer]
    rng = np.random.default_rng(seed)
    records = [rng.integers(0, vocab_size, n_tokens // 10).tolist() for _ in range(10)]
    for split in ("train", "val"):
        write_split(folder, split, records, vocab_size)
    write_meta(folder, {"tokenizer": tokenizer, "vocab_size": vocab_size, "dtype": "uint16"})
    return str(folder)


def bench_training(base_cfg, tokenizer, iters, peak, device="cpu"):
    """Median tokens/s and MFU (None without a peak) over the iterations of a real train.train run, warm-up
    excluded, and the tokens per iteration."""
    with tempfile.TemporaryDirectory() as tmp:
        cfg = {**base_cfg, "data_dir": random_stream(os.path.join(tmp, "data"), tokenizer), "out_dir": tmp,
               "max_iters": iters, "log_interval": 1, "eval_interval": 10 ** 9, "eval_iters": 1, "patience": 0,
               "device": device, "peak_flops": peak, "warmup_iters": 0, "lr_decay_iters": iters + 1}
        train.train(cfg, log=lambda line: None)
        with open(os.path.join(tmp, "log.jsonl")) as f:
            records = [json.loads(line) for line in f if '"train"' in line][2:]
    mfu = statistics.median(r["mfu"] for r in records) if peak else None
    return (statistics.median(r["tokens_per_s"] for r in records), mfu,
            cfg["batch_size"] * cfg["gradient_accumulation_steps"] * cfg["block_size"])


def bench_generation(base_cfg, vocab_size, new_tokens):
    """Seconds to greedily generate new_tokens from a 1-token prompt, with and without the KV cache."""
    torch.manual_seed(0)
    shape = {k: base_cfg[k] for k in ("n_layer", "n_head", "n_embd", "block_size", "bias")}
    model = GPT(GPTConfig(vocab_size=vocab_size, **shape)).eval()
    prompt = torch.zeros(1, 1, dtype=torch.long)
    model.generate(prompt, 8, greedy=True)  # warm up
    times, outputs = {}, {}
    for use_cache in (True, False):
        t0 = time.perf_counter()
        outputs[use_cache] = model.generate(prompt, new_tokens, greedy=True, use_kv_cache=use_cache)
        times[use_cache] = time.perf_counter() - t0
    assert torch.equal(outputs[True], outputs[False]), "KV-cached and recomputed greedy decoding differ"
    return new_tokens / times[True], new_tokens / times[False]


def main(argv=None):
    cfg = configure(DEFAULTS, argv or [])
    base = configure(train.DEFAULTS, [os.path.join(REPO, cfg["train_config"])])
    base["dropout"] = 0.0
    info = machine()
    print(info)
    peak = train.measure_matmul_flops(n=1024, seconds=1.0)
    print(f"measured fp32 matmul peak (1024x1024, this run): {peak / 1e9:.1f} GFLOP/s")
    shape = f"{base['n_layer']} layers x {base['n_embd']} wide, block {base['block_size']}"
    rows_train, rows_gen = [], []
    for tokenizer in cfg["tokenizers"]:
        vocab = train.vocab_size_for({"tokenizer": tokenizer, "vocab_size": TOKENIZER_VOCAB[tokenizer]})
        tok_s, mfu, tpi = bench_training(base, tokenizer, cfg["train_iters"], peak)
        rows_train.append(f"| {shape}, vocab {vocab} | {tpi:,} | {tok_s:,.0f} | {100 * mfu:.1f}% |")
        print(rows_train[-1])
        kv, full = bench_generation(base, vocab, cfg["gen_tokens"])
        rows_gen.append(f"| {shape}, vocab {vocab} | {kv:,.1f} | {full:,.1f} | {kv / full:.1f}x |")
        print(rows_gen[-1])
    lines = ["## Training and generation (bench/train_generate.py)", "", f"Machine: {info}.", "",
             f"Training: train.py's loop on random tokens, config `{cfg['train_config']}` (dropout 0), fp32, median of "
             f"iterations 3..{cfg['train_iters']}. CPU MFU is against the fp32 matmul FLOP/s measured in the same run "
             f"({peak / 1e9:.1f} GFLOP/s on a 1024x1024 matmul), not a published peak.", "",
             "| model | tokens/iter | tokens/s | MFU |", "| --- | ---: | ---: | ---: |", *rows_train, "",
             f"Generation: batch 1, 1-token prompt, {cfg['gen_tokens']} new tokens, greedy "
             "(identical output both ways). "
             "Goal: KV cache >= 10x faster than full recompute.", "",
             "| model | KV cache tok/s | full recompute tok/s | speed-up |", "| --- | ---: | ---: | ---: |", *rows_gen]
    if torch.cuda.is_available():
        gpt2 = configure(train.DEFAULTS, [os.path.join(REPO, "config", "train_gpt2.py")])
        gpt2.update(gradient_accumulation_steps=1, dtype="auto", compile=True)
        gpu_peak = train.peak_flops_for("cuda")
        tok_s, mfu, tpi = bench_training(gpt2, "gpt2", cfg["gpu_iters"], gpu_peak or 0.0, device="cuda")
        mfu_text = f"{100 * mfu:.1f}%" if gpu_peak else "n/a (unknown GPU peak)"
        lines += ["", f"GPU: GPT-2 124M shape (12 x 768, block 1024, batch {gpt2['batch_size']}), "
                  f"{train.resolve_dtype('auto', 'cuda')} autocast + torch.compile, median of iterations "
                  f"3..{cfg['gpu_iters']}; MFU against {gpu_peak / 1e12 if gpu_peak else 0:.0f} TFLOP/s "
                  "(nanoGPT reports 37% on one A100).", "",
                  "| model | tokens/iter | tokens/s | MFU |", "| --- | ---: | ---: | ---: |",
                  f"| GPT-2 124M, {torch.cuda.get_device_name()} | {tpi:,} | {tok_s:,.0f} | {mfu_text} |"]
        print(lines[-1])
    else:
        lines += ["", "GPU: skipped (no CUDA device on this machine)."]
    write_bytes(cfg["out"], ("\n".join(lines) + "\n").encode())
    print(f"wrote {cfg['out']}")


if __name__ == "__main__":
    run_cli(main)
