"""
Benchmark: training tokens/s and MFU of train.py's loop (utils/pretrain.py), and generation tokens/s with
and without the KV cache, on the default CPU config (config/train_pydocs.py: 4 layers, 256 wide), side by
side in one run.
With CUDA, also the GPT-2-124M shape in bf16 + torch.compile (MFU against the GPU's published bf16 peak).

    python bench/train_generate.py [--threads=1] [--key=value ...]    # writes bench/results_train_generate.md

CPU figures are timed twice: wall clock, and this process's CPU time. On a shared machine where other
jobs take the cores, CPU time (with one thread) still says what the code costs; on a quiet machine the
two agree. CPU MFU has no published peak to divide by: it is against the fp32 matmul FLOP/s measured in
this run, with the same clock and threads (utils/peak_flops.py). Data are random tokens:
throughput does not depend on what they say.
"""
import json
import os
import statistics
import tempfile
import time

import numpy as np
import torch

from configurator import configure
from model import GPT, GPTConfig
from utils import pretrain
from utils.atomic import write_bytes
from utils.cli import run_cli
from utils.data import REPO, write_meta, write_split
from utils.device import resolve_dtype
from utils.machine import describe_machine
from utils.peak_flops import measure_matmul_flops, peak_flops_for

TOKENIZER_VOCAB = {"byte": 257, "gpt2": 50257}

DEFAULTS = dict(
    train_config="config/train_pydocs.py",  # relative paths are read from the repository root
    tokenizers=["byte", "gpt2"],  # vocabularies 257 and 50304 (GPT-2's 50257 padded)
    threads=1,  # torch threads on CPU; 0 = torch's default. 1 keeps timings stable on a shared machine
    train_iters=6,  # iterations per vocabulary; the first two are warm-up and not counted
    gen_tokens=256,  # tokens generated per timed generation
    gen_repeats=2,  # each generation is timed this many times; the fastest counts (least disturbed)
    gpu_iters=30,   # training iterations timed on a GPU, when there is one
    out="bench/results_train_generate.md",  # where the markdown results go
)


def machine():
    return describe_machine()


def random_stream(folder, tokenizer, n_tokens=200_000, seed=0):
    """A random-token dataset in the shared format (a few long records)."""
    vocab_size = TOKENIZER_VOCAB[tokenizer]
    rng = np.random.default_rng(seed)
    records = [rng.integers(0, vocab_size, n_tokens // 10).tolist() for _ in range(10)]
    for split in ("train", "val"):
        write_split(folder, split, records, vocab_size)
    write_meta(folder, {"tokenizer": tokenizer, "vocab_size": vocab_size, "dtype": "uint16"})
    return str(folder)


def clocks():
    return time.perf_counter(), time.process_time()


def bench_training(base_cfg, tokenizer, iters, device="cpu"):
    """A real run of train.py's loop (pretrain.train) logging every iteration: the median (wall, CPU)
    seconds per iteration after two warm-up iterations, the trained model and the tokens per iteration.
    CPU time is read when each progress line is logged; on CUDA only the wall clock means anything."""
    stamps = []
    with tempfile.TemporaryDirectory() as tmp:
        cfg = {**base_cfg, "data_dir": random_stream(os.path.join(tmp, "data"), tokenizer), "out_dir": tmp,
               "max_iters": iters, "log_interval": 1, "eval_interval": 10 ** 9, "eval_iters": 1, "patience": 0,
               "device": device, "peak_flops": 1.0, "warmup_iters": 0, "lr_decay_iters": iters + 1}
        result = pretrain.train(cfg, log=lambda line: stamps.append(clocks()) if line.startswith("iter") else None)
        with open(os.path.join(tmp, "log.jsonl")) as f:
            wall = [json.loads(line)["ms_per_iter"] / 1000 for line in f if '"train"' in line][2:]
    cpu = [b[1] - a[1] for a, b in zip(stamps[1:], stamps[2:])]
    tokens_per_iter = cfg["batch_size"] * cfg["gradient_accumulation_steps"] * cfg["block_size"]
    return statistics.median(wall), statistics.median(cpu), result["model"], tokens_per_iter


def bench_generation(base_cfg, vocab_size, new_tokens, repeats):
    """{use_kv_cache: (wall s, CPU s)} to greedily generate new_tokens from a 1-token prompt, fastest of
    `repeats` runs."""
    torch.manual_seed(0)
    shape = {k: base_cfg[k] for k in ("n_layer", "n_head", "n_embd", "block_size", "bias")}
    model = GPT(GPTConfig(vocab_size=vocab_size, **shape)).eval()
    prompt = torch.zeros(1, 1, dtype=torch.long)
    model.generate(prompt, 8, greedy=True)  # warm up
    times, outputs = {}, {}
    for use_cache in (True, False):
        runs = []
        for _ in range(repeats):
            t0 = clocks()
            outputs[use_cache] = model.generate(prompt, new_tokens, greedy=True, use_kv_cache=use_cache)
            t1 = clocks()
            runs.append((t1[0] - t0[0], t1[1] - t0[1]))
        times[use_cache] = (min(r[0] for r in runs), min(r[1] for r in runs))
    assert torch.equal(outputs[True], outputs[False]), "KV-cached and recomputed greedy decoding differ"
    return times


def main(argv=None):
    cfg = configure(DEFAULTS, argv or [])
    if cfg["threads"]:
        torch.set_num_threads(cfg["threads"])
    base = configure(pretrain.DEFAULTS, [os.path.join(REPO, cfg["train_config"])])
    base.update(dropout=0.0, device="cpu")
    info = machine()
    print(info)
    peak_wall = measure_matmul_flops(n=1024, seconds=1.0)
    peak_cpu = measure_matmul_flops(n=1024, seconds=1.0, clock=time.process_time)
    print(f"fp32 matmul (1024x1024): {peak_wall / 1e9:.1f} GFLOP/s wall, {peak_cpu / 1e9:.1f} GFLOP/s per CPU second")
    shape = f"{base['n_layer']} x {base['n_embd']}, block {base['block_size']}"
    rows_train, rows_gen = [], []
    for tokenizer in cfg["tokenizers"]:
        vocab = pretrain.vocab_size_for({"tokenizer": tokenizer, "vocab_size": TOKENIZER_VOCAB[tokenizer]})
        wall, cpu, model, tpi = bench_training(base, tokenizer, cfg["train_iters"])
        fwdbwd = base["batch_size"] * base["gradient_accumulation_steps"]
        rows_train.append(f"| {shape}, vocab {vocab} | {tpi:,} | {tpi / wall:,.0f} / {tpi / cpu:,.0f} | "
                          f"{100 * model.estimate_mfu(fwdbwd, wall, peak_wall):.0f}% / "
                          f"{100 * model.estimate_mfu(fwdbwd, cpu, peak_cpu):.0f}% |")
        print(rows_train[-1])
        t = bench_generation(base, vocab, cfg["gen_tokens"], cfg["gen_repeats"])
        n = cfg["gen_tokens"]
        rows_gen.append(f"| {shape}, vocab {vocab} | {n / t[True][0]:,.0f} / {n / t[True][1]:,.0f} | "
                        f"{n / t[False][0]:,.1f} / {n / t[False][1]:,.1f} | "
                        f"{t[False][0] / t[True][0]:.1f}x / {t[False][1] / t[True][1]:.1f}x |")
        print(rows_gen[-1])
    lines = ["## Training and generation (bench/train_generate.py)", "", f"Machine: {info}.", "",
             "Each figure is given as wall clock / process CPU time (equal on a quiet machine; CPU time still "
             "holds when other jobs share the cores).", "",
             f"Training: train.py's loop on random tokens, config `{cfg['train_config']}` (dropout 0), fp32, median "
             f"of iterations 3..{cfg['train_iters']}. CPU MFU is against the fp32 1024x1024 matmul rate measured in "
             f"the same run ({peak_wall / 1e9:.1f} GFLOP/s wall, {peak_cpu / 1e9:.1f} per CPU second), "
             "not a published peak.", "",
             "| model | tokens/iter | tokens/s | MFU |", "| --- | ---: | ---: | ---: |", *rows_train, "",
             f"Generation: batch 1, 1-token prompt, {cfg['gen_tokens']} new tokens, greedy (identical output "
             f"both ways), fastest of {cfg['gen_repeats']} runs. Goal: the KV cache at least 10x faster than "
             "full recompute.", "",
             "| model | KV cache tok/s | full recompute tok/s | speed-up |", "| --- | ---: | ---: | ---: |",
             *rows_gen]
    if torch.cuda.is_available():
        gpt2 = configure(pretrain.DEFAULTS, [os.path.join(REPO, "config", "train_gpt2.py")])
        gpt2.update(gradient_accumulation_steps=1, dtype="auto", compile=True)
        gpu_peak = peak_flops_for("cuda")
        wall, _, model, tpi = bench_training(gpt2, "gpt2", cfg["gpu_iters"], device="cuda")
        mfu = f"{100 * model.estimate_mfu(gpt2['batch_size'], wall, gpu_peak):.1f}%" if gpu_peak else "n/a"
        lines += ["", f"GPU: GPT-2 124M shape (12 x 768, block 1024, batch {gpt2['batch_size']}), "
                  f"{resolve_dtype('auto', 'cuda')} autocast + torch.compile, median of iterations "
                  f"3..{cfg['gpu_iters']}, wall clock; MFU against the dense bf16 peak "
                  f"({gpu_peak / 1e12 if gpu_peak else 0:.0f} TFLOP/s; nanoGPT reports 37% on one A100).", "",
                  "| model | tokens/iter | tokens/s | MFU |", "| --- | ---: | ---: | ---: |",
                  f"| GPT-2 124M, {torch.cuda.get_device_name()} | {tpi:,} | {tpi / wall:,.0f} | {mfu} |"]
        print(lines[-1])
    else:
        lines += ["", "GPU: skipped (no CUDA device on this machine)."]
    write_bytes(os.path.join(REPO, cfg["out"]), ("\n".join(lines) + "\n").encode())
    print(f"wrote {cfg['out']}")


if __name__ == "__main__":
    run_cli(main)
