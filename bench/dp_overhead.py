"""
What DP-SGD costs in the fine-tuning loop (utils/finetune.py's Trainer), measured side by side in one run:

1. overhead: process CPU time and peak memory of a DP step -- book-keeping ('bk', the default), Opacus's
   ghost and hooks clipping -- over a non-private step with the same model, at logical batches 16 and 64
   (microbatch 16), on the default CPU model (4 layers x 256 wide, block 128, GPT-2's padded vocabulary
   50304; random tokens, every sequence full). Tied and untied weights: bk and hooks keep the tie, ghost
   refuses it, so each DP mode is compared with the non-private step of the same model (tied or untied).
   Modes run interleaved round by round in one process (they share the machine's load); peak RSS comes
   from one subprocess per mode. Then where one step's time goes, and a scaling table (width, depth,
   vocabulary, block size) for bk, ghost and hooks.
2. utility: val loss and answer accuracy (teacher-forced, on val people) on `employees` (byte
   tokenizer, the Department question) at epsilon 1, 3, 8 and infinity (non-private), and at epsilon 8
   with int8 noise quantization, fine-tuning a small base pretrained non-privately through the same
   loop on a *public* employees set (other people, asked only their job title).

    python bench/dp_overhead.py --part=overhead      # ~15 min on 2 busy CPU cores; rerun on an idle machine
    python bench/dp_overhead.py --part=overhead --batch_sizes=16, --scaling=False   # the headline only

Prints the machine, its load (uptime), the figures and markdown rows (bench/results_dp_overhead.md
holds a copy).
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
    threads=1,  # torch threads: 1 keeps process CPU time clean on a shared machine
    n_layer=4,  # overhead: the default CPU model...
    n_head=4,  # ...its heads
    n_embd=256,  # ...its width
    block_size=128,  # ...its context (every record full)
    vocab_size=50304,  # ...GPT-2's padded vocabulary
    batch_sizes=(16, 64),  # logical batches timed
    microbatch_size=16,  # physical batch
    warmup=1,  # untimed rounds (optimizer state, allocator)
    steps=3,  # timed interleaved rounds (median)
    profile_steps=1,  # instrumented steps per mode for the time split
    scaling=True,  # also the scaling table (width, depth, vocabulary, block size)
    scaling_batch=4,  # its logical batch (= one microbatch)
    scaling_steps=2,  # its timed rounds
    util_people=1000,  # utility: private people
    public_people=400,  # utility: public people for the base model
    util_n_layer=2,  # utility base model depth
    util_n_embd=64,  # utility base model width
    util_block_size=128,  # utility block size
    pretrain_steps=60,  # utility base model pretraining steps
    util_epochs=1.0,  # utility fine-tuning epochs
    util_batch_size=64,  # utility expected batch
    util_lr=3e-3,  # utility learning rate
    util_clip=1.0,  # utility clip norm
    epsilons=(1.0, 3.0, 8.0),  # utility target epsilons
    worker="",  # internal: one mode's peak memory, in a subprocess
    data_dir="",  # internal: the worker's data
    result="",  # internal: the worker's result file
)

# label -> (grad_sample_mode or 'nonprivate', tied); each DP mode is compared with the same-tie baseline
MODES = {"non-private tied": ("nonprivate", True), "non-private untied": ("nonprivate", False),
         "bk tied": ("bk", True), "bk untied": ("bk", False), "ghost untied": ("ghost", False),
         "hooks tied": ("hooks", True)}
SCALING = [("base", {}), ("width 128", dict(n_embd=128)), ("width 512", dict(n_embd=512)),
           ("depth 2", dict(n_layer=2)), ("depth 8", dict(n_layer=8)), ("vocab 8192", dict(vocab_size=8192)),
           ("block 64", dict(block_size=64)), ("block 512", dict(block_size=512))]


def machine():
    return describe_machine(f"opacus {__import__('opacus').__version__}")


def load():
    return subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()


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
    """Accumulates process CPU time per phase label while `on`; wraps callables and brackets hook pairs."""

    def __init__(self):
        self.on, self.total, self._start = False, {}, {}

    def add(self, label, dt):
        if self.on:
            self.total[label] = self.total.get(label, 0.0) + dt

    def wrap(self, fn, label):
        def timed(*args, **kwargs):
            t = time.process_time()
            try:
                return fn(*args, **kwargs)
            finally:
                self.add(label, time.process_time() - t)
        return timed

    def start(self, label):
        self._start[label] = time.process_time()

    def stop(self, label):
        self.add(label, time.process_time() - self._start.pop(label))


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
        if tr.mode == "bk":  # book-keeping: norms and the clipped sum after the one backward
            tr.model.clip_and_sum = timer.wrap(tr.model.clip_and_sum, "per-sample grads/norms")
        if tr.mode == "ghost":  # Opacus disables the hooks exactly around the second (clipped) backward
            model = tr.model
            disable, enable = model.disable_hooks, model.enable_hooks
            model.disable_hooks = lambda: (timer.start("ghost 2nd backward"), disable())
            model.enable_hooks = lambda: (enable(), timer.stop("ghost 2nd backward"))
            model.get_clipping_coef = timer.wrap(model.get_clipping_coef, "clipping (scale + sum)")


def make_mode(cfg, label, timer, batch_size):
    """A Trainer for one mode, through the project's own build_run, and a function running one logical
    step on a fixed batch of batch_size full records (the same batch for every mode)."""
    mode, tied = MODES[label]
    torch.manual_seed(0)
    model = GPT(GPTConfig(n_layer=cfg["n_layer"], n_head=cfg["n_head"], n_embd=cfg["n_embd"],
                          block_size=cfg["block_size"], vocab_size=cfg["vocab_size"], dropout=0.0, tie_weights=tied))
    dp = mode != "nonprivate"
    micro = min(cfg["microbatch_size"], batch_size)
    run_cfg = dict(data_dir=cfg["data_dir"], dp=dp, grad_sample_mode=mode if dp else "bk", noise_multiplier=1.0,
                   target_epsilon=None, batch_size=batch_size, microbatch_size=micro, max_steps=10**6, save=False,
                   untie_weights=not tied)
    run = build_run(run_cfg, model, log=lambda *a: None)
    assert run.gpt.weights_tied == tied and run.trainer.mode == mode if dp else True
    attach_timers(run, timer)
    tr = run.trainer
    ds = tr.loader.dataset
    x = torch.stack([ds[i][0] for i in range(batch_size)])
    y = torch.stack([ds[i][1] for i in range(batch_size)])
    chunks = list(zip(x.split(micro), y.split(micro)))

    def logical_step():
        for j, (xb, yb) in enumerate(chunks):
            tr.optimizer.signal_skip_step(do_skip=j < len(chunks) - 1)
            tr.train_microbatch(xb, yb)
    return run, logical_step


def memory_worker(cfg):
    """Peak RSS of one mode in a process of its own: baseline after setup, peak over two steps."""
    torch.set_num_threads(cfg["threads"])
    run, logical_step = make_mode(cfg, cfg["worker"], PhaseTimer(), int(cfg["batch_sizes"][0]))
    baseline = rss_mb()
    for _ in range(2):  # the first step allocates the optimizer state; the second shows the steady peak
        logical_step()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    with open(cfg["result"], "w") as f:
        json.dump({"baseline_mb": baseline, "peak_mb": peak}, f)


def peak_memory(cfg, label, batch_size, tmp):
    out = os.path.join(tmp, "memory.json")
    shape = ("data_dir", "threads", "n_layer", "n_head", "n_embd", "block_size", "vocab_size", "microbatch_size")
    argv = [sys.executable, os.path.abspath(__file__), f"--worker={label}", f"--result={out}",
            f"--batch_sizes=({batch_size},)"] + [f"--{k}={cfg[k]}" for k in shape]
    r = subprocess.run(argv, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": REPO})
    if r.returncode != 0:
        raise SystemExit(f"memory worker {label} failed:\n{r.stderr[-2000:]}")
    with open(out) as f:
        return json.load(f)


def interleaved_cpu_times(steps, rounds, warmup):
    """Median process CPU time of each step function, run round by round (a, b, c, a, b, c, ...)."""
    for _ in range(warmup):
        for step in steps.values():
            step()
    times = {k: [] for k in steps}
    for _ in range(rounds):
        for k, step in steps.items():
            t = time.process_time()
            step()
            times[k].append(time.process_time() - t)
    return {k: float(np.median(v)) for k, v in times.items()}


def baseline_of(label):
    return "non-private tied" if MODES[label][1] else "non-private untied"


def overhead_at(cfg, batch_size, tmp, timer):
    memory = {label: peak_memory(cfg, label, batch_size, tmp) for label in MODES}
    modes = {label: make_mode(cfg, label, timer, batch_size) for label in MODES}
    step_s = interleaved_cpu_times({k: v[1] for k, v in modes.items()}, cfg["steps"], cfg["warmup"])
    split = {}
    for label, (_, step) in modes.items():
        timer.total, timer.on = {}, True
        t = time.process_time()
        for _ in range(cfg["profile_steps"]):
            step()
        total = (time.process_time() - t) / cfg["profile_steps"]
        timer.on = False
        split[label] = {k: v / cfg["profile_steps"] for k, v in timer.total.items()}
        split[label]["backward (autograd) + loss"] = total - sum(split[label].values())
        split[label]["total"] = total
    trainable = {label: run.n_trainable for label, (run, _) in modes.items()}
    print(f"\n### Logical batch {batch_size} (microbatch {min(cfg['microbatch_size'], batch_size)}), "
          f"median of {cfg['steps']} interleaved rounds, process CPU time; load: {load()}\n")
    print("| mode | trainable params | step CPU (s) | time ratio | vs | peak RSS (MB) | RSS ratio | "
          "peak above setup (MB) | ratio |")
    print("|---|---|---|---|---|---|---|---|---|")
    for label in MODES:
        b = baseline_of(label)
        m, bm = memory[label], memory[b]
        inc, base_inc = m["peak_mb"] - m["baseline_mb"], bm["peak_mb"] - bm["baseline_mb"]
        print(f"| {label} | {trainable[label]:,} | {step_s[label]:.2f} | {step_s[label] / step_s[b]:.3f}x | {b} | "
              f"{m['peak_mb']:.0f} | {m['peak_mb'] / bm['peak_mb']:.3f}x | {inc:.0f} | {inc / base_inc:.2f}x |")
    labels = ["forward", "backward (autograd) + loss", "per-sample grads/norms", "ghost 2nd backward",
              "clipping (scale + sum)", "noise", "optimizer (AdamW)", "total"]
    print(f"\nWhere one logical step's CPU time goes (s, {cfg['profile_steps']} instrumented step(s) each; "
          "bk's 'per-sample grads/norms' is clip_and_sum: norms and the clipped sum):\n")
    print("| phase | " + " | ".join(MODES) + " |")
    print("|---|" + "---|" * len(MODES))
    for label in labels:
        print(f"| {label} | " + " | ".join(f"{split[m].get(label, 0.0):.3f}" for m in MODES) + " |")
    return step_s, memory


def scaling(cfg, tmp, timer):
    """Overhead against width, depth, vocabulary and block size: bk (tied) over non-private tied, ghost
    (untied) and hooks (tied) over their own baselines; one small logical batch, interleaved rounds."""
    b = cfg["scaling_batch"]
    print(f"\n### Scaling (logical batch {b}, median of {cfg['scaling_steps']} interleaved rounds, process CPU "
          f"time; ratio = DP step / non-private step of the same model); load: {load()}\n")
    print("| shape | layers x width, block, vocab | non-private tied (s) | bk tied | ghost untied | hooks tied | "
          "bk untied |")
    print("|---|---|---|---|---|---|---|")
    rows = []
    for name, change in SCALING:
        shape = {**cfg, **change, "microbatch_size": b}
        data = os.path.join(tmp, f"scaling_{shape['vocab_size']}_{shape['block_size']}")
        if not os.path.isdir(data):
            random_records(data, max(64, b), shape["block_size"] + 1, shape["vocab_size"])
        shape["data_dir"] = data
        steps = {label: make_mode(shape, label, timer, b)[1] for label in MODES}
        s = interleaved_cpu_times(steps, cfg["scaling_steps"], 1)
        r = {label: s[label] / s[baseline_of(label)] for label in MODES}
        print(f"| {name} | {shape['n_layer']}x{shape['n_embd']}, {shape['block_size']}, {shape['vocab_size']} | "
              f"{s['non-private tied']:.2f} | {r['bk tied']:.2f}x | {r['ghost untied']:.2f}x | {r['hooks tied']:.2f}x | "
              f"{r['bk untied']:.2f}x |", flush=True)
        rows.append((name, s, r))
    return rows


def overhead(cfg):
    torch.set_num_threads(cfg["threads"])
    timer = PhaseTimer()
    instrument(timer)
    print(f"\n## DP-SGD overhead (model {cfg['n_layer']}x{cfg['n_embd']}, block {cfg['block_size']}, vocab "
          f"{cfg['vocab_size']}, {cfg['threads']} torch thread(s), AdamW, noise multiplier 1)")
    with tempfile.TemporaryDirectory() as tmp:
        data = os.path.join(tmp, "data")
        random_records(data, max(64, *cfg["batch_sizes"]), cfg["block_size"] + 1, cfg["vocab_size"])
        cfg = dict(cfg, data_dir=data)
        results = {b: overhead_at(cfg, int(b), tmp, timer) for b in cfg["batch_sizes"]}
        if cfg["scaling"]:
            scaling(cfg, tmp, timer)
    return results


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
    print(f"machine: {machine()}\nload at start: {load()}")
    t = time.time()
    if cfg["part"] in ("all", "overhead"):
        overhead(cfg)
    if cfg["part"] in ("all", "utility"):
        utility(cfg)
    print(f"\nbenchmark wall time {time.time() - t:.0f} s; load at end: {load()}")


if __name__ == "__main__":
    run_cli(main)
