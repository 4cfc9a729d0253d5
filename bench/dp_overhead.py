"""
What DP-SGD costs in finetune_dp.py, measured side by side in one run:

1. overhead: step time and peak memory of a DP step (ghost and hooks clipping) over a non-private step
   at the same logical batch, on the default CPU model (4 layers x 256 wide, block 128, GPT-2's padded
   vocabulary 50304; random tokens, every sequence full), each mode in its own subprocess so peak RSS
   is its own; plus where a step's time goes (forward, backward, per-sample norms or gradients, ghost's
   second backward, clipping, noise, optimizer).
2. utility: val loss and answer accuracy (teacher-forced, on val people) on `employees` (byte
   tokenizer, the Department question) at epsilon 1, 3, 8 and infinity (non-private), and at epsilon 8
   with int8 noise quantization, fine-tuning a small base pretrained non-privately through the same
   loop on a *public* employees set (other people, asked only their job title).

    python bench/dp_overhead.py                      # both parts, about 3 minutes on 2 busy CPU cores
    python bench/dp_overhead.py --part=overhead --threads=1

Prints the machine, the figures and markdown rows (bench/results_dp_overhead.md holds a copy).
"""
import contextlib
import copy
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
import warnings

import numpy as np
import torch

from configurator import configure
from utils.finetune import build_run, evaluate, finetune
from model import GPT, GPTConfig
from utils.cli import UserError, run_cli
from utils.data import RecordDataset, write_meta, write_split
from utils.machine import describe_machine

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

DEFAULTS = dict(
    part="all",  # 'overhead' | 'utility' | 'all'
    threads=2,
    # overhead: the default CPU model and one logical batch
    n_layer=4, n_head=4, n_embd=256, block_size=128, vocab_size=50304,
    batch_size=16, microbatch_size=16, warmup=1, steps=3, profile_steps=1,
    # utility
    util_people=1000, public_people=400, util_n_layer=2, util_n_embd=64, util_block_size=128,
    pretrain_steps=60, util_epochs=1.0, util_batch_size=64, util_lr=3e-3, util_clip=1.0,
    epsilons=(1.0, 3.0, 8.0),
    # internal: one mode's peak memory, in a subprocess
    worker="", data_dir="", result="",
)

MODES = ("nonprivate", "ghost", "hooks")


def machine():
    return describe_machine(f"opacus {__import__('opacus').__version__}")


def rss_mb():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


# ----------------------------------------------------------------------------- overhead
def random_records(folder, n, length, vocab_size, seed=0):
    """n records of `length` random tokens: every training sequence is full (no padding)."""
    rng = np.random.default_rng(seed)
    recs = [rng.integers(0, vocab_size, length).tolist() for _ in range(n)]
    for split in ("train", "val"):
        write_split(folder, split, recs, vocab_size)
    write_meta(folder, {"tokenizer": "gpt2", "vocab_size": vocab_size, "dtype": "uint16", "seed": seed,
                        "source_sha256": None, "splits": {}})


class PhaseTimer:
    """Accumulates wall time per phase label while `on`; wraps callables and brackets hook pairs."""

    def __init__(self):
        self.on, self.total, self._start = False, {}, {}

    def add(self, label, dt):
        if self.on:
            self.total[label] = self.total.get(label, 0.0) + dt

    def wrap(self, fn, label):
        def timed(*args, **kwargs):
            t = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.add(label, time.perf_counter() - t)
        return timed

    def start(self, label):
        self._start[label] = time.perf_counter()

    def stop(self, label):
        self.add(label, time.perf_counter() - self._start.pop(label))


def instrument(timer):
    """Time Opacus's per-sample work inside backward: the backward hooks are bound when a model is
    wrapped, so the classes are patched before build_run (the wrappers cost ~a microsecond when off)."""
    from opacus.grad_sample.grad_sample_module import GradSampleHooks
    from opacus.grad_sample.grad_sample_module_fast_gradient_clipping import GradSampleHooksFastGradientClipping
    GradSampleHooks.capture_backprops_hook = timer.wrap(GradSampleHooks.capture_backprops_hook, "per-sample grads/norms")
    GradSampleHooksFastGradientClipping.capture_backprops_hook = timer.wrap(
        GradSampleHooksFastGradientClipping.capture_backprops_hook, "per-sample grads/norms")


def attach_timers(run, timer):
    tr = run.trainer
    run.gpt.register_forward_pre_hook(lambda *_: timer.start("forward"))
    run.gpt.register_forward_hook(lambda *_: timer.stop("forward"))
    base = tr.optimizer.original_optimizer
    base.register_step_pre_hook(lambda *_: timer.start("optimizer (AdamW)"))
    base.register_step_post_hook(lambda *_: timer.stop("optimizer (AdamW)"))
    if tr.dp:
        opt = tr.optimizer
        for name, label in (("clip_and_accumulate", "clipping (scale + sum)"), ("accumulate", "clipping (scale + sum)"),
                            ("add_noise", "noise"), ("scale_grad", "noise")):
            if hasattr(opt, name):
                setattr(opt, name, timer.wrap(getattr(opt, name), label))
        if tr.mode == "ghost":  # Opacus disables the hooks exactly around the second (clipped) backward
            model = tr.model
            disable, enable = model.disable_hooks, model.enable_hooks
            model.disable_hooks = lambda: (timer.start("ghost 2nd backward"), disable())
            model.enable_hooks = lambda: (enable(), timer.stop("ghost 2nd backward"))
            model.get_clipping_coef = timer.wrap(model.get_clipping_coef, "clipping (scale + sum)")


def make_mode(cfg, mode, timer):
    """A Trainer for one mode on the default model, and a function running one logical step on a fixed
    batch of batch_size full records (the same batch for every mode)."""
    torch.manual_seed(0)
    model = GPT(GPTConfig(n_layer=cfg["n_layer"], n_head=cfg["n_head"], n_embd=cfg["n_embd"],
                          block_size=cfg["block_size"], vocab_size=cfg["vocab_size"], dropout=0.0))
    dp = mode != "nonprivate"
    run_cfg = dict(data_dir=cfg["data_dir"], dp=dp, grad_sample_mode=mode if dp else "ghost", noise_multiplier=1.0,
                   target_epsilon=None, batch_size=cfg["batch_size"], microbatch_size=cfg["microbatch_size"],
                   max_steps=10**6, save=False)
    run = build_run(run_cfg, model, log=lambda *a: None)
    attach_timers(run, timer)
    tr = run.trainer
    ds = tr.loader.dataset
    x = torch.stack([ds[i][0] for i in range(cfg["batch_size"])])
    y = torch.stack([ds[i][1] for i in range(cfg["batch_size"])])
    chunks = list(zip(x.split(cfg["microbatch_size"]), y.split(cfg["microbatch_size"])))

    def logical_step():
        for j, (xb, yb) in enumerate(chunks):
            tr.optimizer.signal_skip_step(do_skip=j < len(chunks) - 1)
            tr.train_microbatch(xb, yb)
    return run, logical_step


def memory_worker(cfg):
    """Peak RSS of one mode in a process of its own: baseline after setup, peak over two steps."""
    torch.set_num_threads(cfg["threads"])
    run, logical_step = make_mode(cfg, cfg["worker"], PhaseTimer())
    baseline = rss_mb()
    for _ in range(2):  # the first step allocates the optimizer state; the second shows the steady peak
        logical_step()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    with open(cfg["result"], "w") as f:
        json.dump({"baseline_mb": baseline, "peak_mb": peak}, f)


def overhead(cfg):
    torch.set_num_threads(cfg["threads"])
    with tempfile.TemporaryDirectory() as tmp:
        data = os.path.join(tmp, "data")
        random_records(data, max(64, cfg["batch_size"]), cfg["block_size"] + 1, cfg["vocab_size"])
        cfg = dict(cfg, data_dir=data)
        memory = {}
        for mode in MODES:
            out = os.path.join(tmp, f"{mode}.json")
            argv = [sys.executable, os.path.abspath(__file__), f"--worker={mode}", f"--result={out}"] + \
                [f"--{k}={cfg[k]}" for k in ("data_dir", "threads", "n_layer", "n_head", "n_embd", "block_size",
                                             "vocab_size", "batch_size", "microbatch_size")]
            r = subprocess.run(argv, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": REPO})
            if r.returncode != 0:
                raise SystemExit(f"memory worker {mode} failed:\n{r.stderr[-2000:]}")
            with open(out) as f:
                memory[mode] = json.load(f)
        # Time the three modes in this process, interleaved step by step, so they share the same load.
        timer = PhaseTimer()
        instrument(timer)
        modes = {mode: make_mode(cfg, mode, timer) for mode in MODES}
        times = {mode: [] for mode in MODES}
        for _ in range(cfg["warmup"]):
            for _, step in modes.values():
                step()
        for _ in range(cfg["steps"]):
            for mode, (_, step) in modes.items():
                t = time.perf_counter()
                step()
                times[mode].append(time.perf_counter() - t)
        split, total = {}, {}
        for mode, (_, step) in modes.items():
            timer.total, timer.on = {}, True
            t = time.perf_counter()
            for _ in range(cfg["profile_steps"]):
                step()
            total[mode] = (time.perf_counter() - t) / cfg["profile_steps"]
            timer.on = False
            split[mode] = {k: v / cfg["profile_steps"] for k, v in timer.total.items()}
            split[mode]["backward (autograd) + loss"] = total[mode] - sum(split[mode].values())
    step_s = {mode: float(np.median(t)) for mode, t in times.items()}
    base, base_mem = step_s["nonprivate"], memory["nonprivate"]
    print(f"\n## DP-SGD overhead (model {cfg['n_layer']}x{cfg['n_embd']}, block {cfg['block_size']}, vocab "
          f"{cfg['vocab_size']} (GPT-2 padded), logical batch {cfg['batch_size']}, microbatch {cfg['microbatch_size']}, "
          f"{cfg['threads']} threads, median of {cfg['steps']} interleaved steps; "
          f"{modes['nonprivate'][0].n_trainable:,} trainable parameters)\n")
    print("| mode | step (s) | time ratio | peak RSS (MB) | RSS ratio | peak above setup (MB) | ratio |")
    print("|---|---|---|---|---|---|---|")
    for mode in MODES:
        m = memory[mode]
        inc, base_inc = m["peak_mb"] - m["baseline_mb"], base_mem["peak_mb"] - base_mem["baseline_mb"]
        print(f"| {mode} | {step_s[mode]:.2f} | {step_s[mode] / base:.2f}x | {m['peak_mb']:.0f} | "
              f"{m['peak_mb'] / base_mem['peak_mb']:.2f}x | {inc:.0f} | {inc / base_inc:.2f}x |")
    labels = ["forward", "backward (autograd) + loss", "per-sample grads/norms", "ghost 2nd backward",
              "clipping (scale + sum)", "noise", "optimizer (AdamW)"]
    print("\nWhere one logical step's time goes (s, one instrumented step each):\n")
    print("| phase | " + " | ".join(MODES) + " |")
    print("|---|" + "---|" * len(MODES))
    for label in labels:
        print(f"| {label} | " + " | ".join(f"{split[m].get(label, 0.0):.3f}" for m in MODES) + " |")
    print("| total | " + " | ".join(f"{total[m]:.3f}" for m in MODES) + " |")
    return step_s, memory, split


# ----------------------------------------------------------------------------- utility
def prepare_employees(folder, people, seed, fields):
    cmd = [sys.executable, os.path.join(REPO, "data", "employees", "prepare.py"), "--tokenizer=byte",
           f"--out_dir={folder}", f"--n_people={people}", f"--seed={seed}", f"--fields={fields}"]
    r = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": REPO})
    if r.returncode != 0:
        raise UserError(f"data/employees/prepare.py failed: {r.stderr.strip().splitlines()[-1:]}")


def utility(cfg):
    torch.set_num_threads(cfg["threads"])
    quiet = dict(log=lambda *a: None)
    with tempfile.TemporaryDirectory() as tmp:
        public, private = os.path.join(tmp, "public"), os.path.join(tmp, "private")
        # public: other people, asked only their job title (the format); private: departments
        prepare_employees(public, cfg["public_people"], seed=7, fields="Job Titles")
        prepare_employees(private, cfg["util_people"], seed=1337, fields="Department")
        torch.manual_seed(0)
        base = GPT(GPTConfig(n_layer=cfg["util_n_layer"], n_head=4, n_embd=cfg["util_n_embd"],
                             block_size=cfg["util_block_size"], vocab_size=257, dropout=0.0, tie_weights=False))
        t = time.time()
        base = finetune(dict(data_dir=public, dp=False, sampling="shuffle", batch_size=32, microbatch_size=32,
                             max_steps=cfg["pretrain_steps"], learning_rate=3e-3, loss_on="all", save=False,
                             eval_interval=0), model=base, **quiet)["model"]
        pretrain_s = time.time() - t
        common = dict(data_dir=private, loss_on="answer", batch_size=cfg["util_batch_size"],
                      microbatch_size=cfg["util_batch_size"], epochs=cfg["util_epochs"], learning_rate=cfg["util_lr"],
                      max_grad_norm=cfg["util_clip"], save=False, eval_interval=0)
        settings = [(f"{e:g}", dict(dp=True, target_epsilon=e)) for e in cfg["epsilons"]]
        settings.append((f"{cfg['epsilons'][-1]:g} + int8 noise",
                         dict(dp=True, target_epsilon=cfg["epsilons"][-1], noise_quantization="int8")))
        settings.append(("inf (non-private)", dict(dp=False)))
        val = RecordDataset(private, "val", cfg["util_block_size"], "answer")
        rows = [("base (no fine-tuning)", evaluate(base, val, val, 64, "cpu", contextlib.nullcontext()), {}, 0.0)]
        for name, extra in settings:
            t = time.time()
            out = finetune(dict(common, **extra), model=copy.deepcopy(base), **quiet)
            rows.append((name, out["history"][-1], out["privacy"] or {}, time.time() - t))
    print(f"\n## Utility on employees (byte tokenizer; private: {cfg['util_people']} people asked their Department; "
          f"base {cfg['util_n_layer']}x{cfg['util_n_embd']} pretrained {cfg['pretrain_steps']} steps on "
          f"{cfg['public_people']} other, public people asked their Job Title, {pretrain_s:.0f} s; "
          f"fine-tune {cfg['util_epochs']:g} epochs, "
          f"expected batch {cfg['util_batch_size']}, lr {cfg['util_lr']}, clip {cfg['util_clip']}, loss on answers)\n")
    print("| epsilon | val loss | answer token acc | answer exact | noise multiplier | steps | time (s) |")
    print("|---|---|---|---|---|---|---|")
    for name, last, p, secs in rows:
        nm = f"{p['noise_multiplier']:.3f}" if p else "-"
        print(f"| {name} | {last['val_loss']:.4f} | {last.get('answer_token_acc', float('nan')):.4f} | "
              f"{last.get('answer_exact', float('nan')):.3f} | {nm} | {last.get('step', 0)} | {secs:.0f} |")
    return rows


def main(argv=None):
    cfg = configure(DEFAULTS, sys.argv[1:] if argv is None else argv)
    warnings.filterwarnings("ignore", message="Optimal order is the largest alpha")  # RDP at large q
    if cfg["worker"]:
        return memory_worker(cfg)
    if cfg["part"] not in ("all", "overhead", "utility"):
        raise UserError("part must be all, overhead or utility")
    print(f"machine: {machine()}")
    t = time.time()
    if cfg["part"] in ("all", "overhead"):
        overhead(cfg)
    if cfg["part"] in ("all", "utility"):
        utility(cfg)
    print(f"\nbenchmark wall time {time.time() - t:.0f} s")


if __name__ == "__main__":
    run_cli(main)
