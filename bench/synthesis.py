"""
Benchmark of DP synthesis by private prediction (synthesize_dp.py), measured side by side in one run:

1. synthetic tokens/s with the KV cache (prefill once per batch, truncate per example) vs recomputing
   the whole context every token, on the default CPU base shape (4 x 256, GPT-2 vocabulary);
2. private/public token share with the public drafter + SVT on structured records: a small byte-level
   model pretrained (train.py) on one population of `employees` records drafts for another population,
   and every mechanism runs at the same (epsilon, delta), so the tokens it produces compare directly.

    python bench/synthesis.py [--out bench/results_synthesis.md] [--key=value ...]
"""
import os
import subprocess
import sys
import tempfile
import time

import torch

import synthesize_dp as S
import train
from configurator import configure
from model import GPT, GPTConfig
from utils.atomic import write_bytes
from utils.cli import run_cli
from utils.machine import describe_machine

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

DEFAULTS = dict(
    out="",                  # also write the markdown here
    seed=0,
    threads=1,               # torch threads; 1 keeps timings stable on a shared machine (OpenMP spinning)
    # 1. KV cache vs recompute
    s=16,                    # private prompts per batch (+1 public)
    prompt_tokens=96,        # longest private prompt; the others are shorter (left padding)
    new_tokens=48,           # tokens per synthetic example
    # 2. SVT on structured records
    fields=("Department", "Annual Salary"),
    public_people=600,       # the drafter's pretraining population
    private_people=220,      # the sensitive population (a different seed: nobody is in both)
    train_iters=250,
    synth_s=50,              # expected batch size of the private run
    synth_batches=4,
    epsilon=8.0,
    delta=1e-6,
    max_examples_per_batch=6,
    utility=False,           # also run synthesize_dp's utility check on the last mechanism's records
    utility_steps=60,
)

# (name, mechanism overrides): every run is held to the same (epsilon, delta)
MECHANISMS = [
    ("no SVT", dict(svt=False)),
    ("SVT sigma=0.5 theta=0.8", dict(svt=True, sigma=0.5, theta=0.8)),
    ("SVT sigma=1.0 theta=1.2", dict(svt=True, sigma=1.0, theta=1.2)),
    ("SVT sigma=1.0 theta=1.2, public top-16 mask", dict(svt=True, sigma=1.0, theta=1.2, public_top_k=16)),
]


def machine():
    return describe_machine()


def kv_cache_speed(cfg):
    """Synthetic tokens/s of one batch (s private prompts + the public one), cached vs recomputed."""
    torch.manual_seed(cfg["seed"])
    model = GPT(GPTConfig(n_layer=4, n_head=4, n_embd=256, block_size=256, vocab_size=50304)).eval()
    g = torch.Generator().manual_seed(cfg["seed"])
    lengths = torch.randint(cfg["prompt_tokens"] // 2, cfg["prompt_tokens"] + 1, (cfg["s"],), generator=g)
    prompts = [torch.randint(0, 50257, (int(n),), generator=g).tolist() for n in lengths] + [[50256]]
    mech = S.Mechanism(s=cfg["s"], c=10.0, tau=2.0, svt=False, sigma=1.0, theta=0.0, tau_pub=1.0)
    rows = {}
    for use_cache in (True, False, True):  # cached twice: the first run also warms up
        t0 = time.perf_counter()
        decoder = S.BatchDecoder(model, prompts, cfg["new_tokens"], use_kv_cache=use_cache)
        examples, spent = S.synthesize_batch(decoder, cfg["s"], mech, cfg["new_tokens"], S.make_generator(0),
                                             eot=50256, max_new_tokens=cfg["new_tokens"], max_examples=1,
                                             vocab=50257)
        dt = time.perf_counter() - t0
        n = sum(len(e["tokens"]) + e["finished"] for e in examples)
        rows["KV cache" if use_cache else "recompute"] = (n, dt)
    return rows


def prepare(folder, seed, n_people, fields):
    cmd = [sys.executable, os.path.join(REPO, "data", "employees", "prepare.py"), f"--out_dir={folder}",
           "--tokenizer=byte", f"--n_people={n_people}", f"--seed={seed}", f"--fields={','.join(fields)}",
           "--canary_reps=()", "--n_control_canaries=0", "--val_frac=0.1"]
    subprocess.run(cmd, check=True, capture_output=True, text=True)


def svt_share(cfg, tmp):
    """Pretrain a small public drafter, then synthesize from a disjoint private population."""
    pub, priv = os.path.join(tmp, "public"), os.path.join(tmp, "private")
    prepare(pub, 1, cfg["public_people"], cfg["fields"])
    prepare(priv, 2, cfg["private_people"], cfg["fields"])
    t0 = time.perf_counter()
    tcfg = {**train.DEFAULTS, "data_dir": pub, "out_dir": os.path.join(tmp, "base"), "n_layer": 2, "n_head": 4,
            "n_embd": 128, "block_size": 256, "batch_size": 16, "max_iters": cfg["train_iters"],
            "lr_decay_iters": cfg["train_iters"], "warmup_iters": 20, "learning_rate": 3e-3, "eval_interval": 10 ** 6,
            "eval_iters": 2, "device": "cpu", "dtype": "float32", "seed": cfg["seed"]}
    trained = train.train(tcfg, log=lambda *a, **k: None)
    model, train_s = trained["model"].eval(), time.perf_counter() - t0
    rows, utility = [], None
    for name, overrides in MECHANISMS:
        scfg = {**S.DEFAULTS, "data_dir": priv, "epsilon": cfg["epsilon"], "delta": cfg["delta"], "r": 0,
                "s": cfg["synth_s"], "n_batches": cfg["synth_batches"], "batch_salt": "bench", "seed": cfg["seed"],
                "prompt_template": "{record}{eot}", "public_prompt": "{eot}", "max_new_tokens": 120,
                "max_examples_per_batch": cfg["max_examples_per_batch"], **overrides}
        t0 = time.perf_counter()
        res = S.synthesize(scfg, model=model, log=lambda *a, **k: None)
        dt = time.perf_counter() - t0
        p, d = res["privacy"], res["privacy"]["diagnostics"]
        rows.append(dict(name=name, r=p["r"], rho_token=p["rho_per_private_token"], epsilon=p["epsilon"],
                         private=d["private_tokens"], public=d["public_tokens"], share=d["private_share"],
                         examples=d["examples"], finished=d["examples_kept"], seconds=dt,
                         sample=res["examples"][0]["text"] if res["examples"] else ""))
    if cfg["utility"]:
        ucfg = {**scfg, "ckpt": os.path.join(tmp, "base", "ckpt.pt"), "utility_steps": cfg["utility_steps"]}
        utility = S.utility_check(ucfg, [e["text"] for e in res["examples"]], log=print)
    return rows, train_s, utility


def markdown(cfg, speed, svt_rows, train_s, utility=None):
    (n_c, t_c), (n_r, t_r) = speed["KV cache"], speed["recompute"]
    lines = [
        "## DP synthesis by private prediction (synthesize_dp.py)",
        "",
        f"Machine: {machine()}. Command: `python bench/synthesis.py{' --utility=True' if utility else ''}`.",
        "",
        f"Synthetic tokens/s for one batch of {cfg['s']} private prompts (up to {cfg['prompt_tokens']} tokens, left-padded) "
        f"+ 1 public prompt, {cfg['new_tokens']} new tokens, default CPU base shape (4 layers x 256, vocab 50304), "
        "prefill included:",
        "",
        "| decoding | tokens | seconds | synthetic tokens/s |",
        "|---|---|---|---|",
        f"| KV cache (prefill once, truncate per example) | {n_c} | {t_c:.2f} | {n_c / t_c:.1f} |",
        f"| full recompute every token | {n_r} | {t_r:.2f} | {n_r / t_r:.1f} |",
        f"| **speed-up** | | | **{(n_c / t_c) / (n_r / t_r):.1f}x** |",
        "",
        f"Private/public token share on structured records ({', '.join(cfg['fields'])} Q/A lines of `employees`, "
        f"byte tokenizer). Drafter/base: 2 x 128 GPT pretrained with train.py on {cfg['public_people']} public people "
        f"({train_s:.0f} s); records: {cfg['private_people']} other people, {cfg['synth_batches']} batches, "
        f"s={cfg['synth_s']}, c=10, tau=2, every run at epsilon={cfg['epsilon']}, delta={cfg['delta']} "
        f"(r solved from it; at most {cfg['max_examples_per_batch']} examples per batch):",
        "",
        "| mechanism | rho / private token | r | private tokens | public tokens | private share | "
        "tokens / private token | examples (finished) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in svt_rows:
        total = row["private"] + row["public"]
        lines.append(f"| {row['name']} | {row['rho_token']:.4f} | {row['r']} | {row['private']} | {row['public']} | "
                     f"{row['share']:.0%} | {total / max(1, row['private']):.2f} | {row['examples']} ({row['finished']}) |")
    best = max(svt_rows, key=lambda r: r["private"] + r["public"])
    lines += ["", f"Sample ({best['name']}): `{best['sample'][:160]!r}`", ""]
    if utility:
        lines += [f"Utility check (`--utility_check`, last mechanism): the base fine-tuned non-privately for "
                  f"{utility['steps']} steps on the synthetic records vs on as many real ones, scored on "
                  f"{utility['val_records']} real val records and {utility['qa_people']} val people's Q/A:", "",
                  "| model | train records | val perplexity | field accuracy |", "|---|---|---|---|"]
        for name in ("base", "synthetic", "real"):
            u = utility[name]
            lines.append(f"| {name} | {u.get('train_records', 0)} | {u['val_ppl']:.3f} | "
                         f"{u.get('field_accuracy', float('nan')):.3f} |")
        lines.append("")
    return "\n".join(lines)


def main(argv=None):
    cfg = configure(DEFAULTS, argv or [])
    torch.set_num_threads(cfg["threads"])
    print(f"machine: {machine()}")
    speed = kv_cache_speed(cfg)
    for k, (n, dt) in speed.items():
        print(f"{k:10s}: {n} tokens in {dt:.2f}s = {n / dt:.1f} tokens/s")
    with tempfile.TemporaryDirectory(prefix="bench_synth_") as tmp:
        rows, train_s, utility = svt_share(cfg, tmp)
    text = markdown(cfg, speed, rows, train_s, utility)
    print(text)
    if cfg["out"]:
        write_bytes(cfg["out"], (text + "\n").encode())


if __name__ == "__main__":
    run_cli(main)
