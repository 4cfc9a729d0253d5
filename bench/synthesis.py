"""
Benchmark of DP synthesis by private prediction (synthesize_dp.py), side by side in one run:

1. speed: synthetic tokens/s of one batch (s private prompts of about prompt_tokens tokens + the public
   one) with the KV cache (prefill once), recomputing the whole context every token, and the peer
   anchor: a per-token `model.generate(max_new_tokens=1)` loop that aggregates on the host in numpy (the
   pattern of the only open reimplementation, InvisibleInk-Experiments' generate_amin.py). Process CPU
   time, rounds interleaved (cached, recompute, peer, cached, ...), the machine's load recorded;
2. utility: `synthesize_dp.py config/synthesize_employees.py` at each epsilon on the prepared employees
   data (1,000 people), its utility table (TV per categorical field and joint, KS for Annual Salary,
   against the public drafter and the DP histogram at the same epsilon, delta), the downstream
   fine-tune at the last epsilon, the record count and the time.

    python bench/synthesis.py --out bench/results_synthesis.md [--parts=speed,utility] [--key=value ...]
"""
import json
import os
import resource
import runpy
import secrets
import subprocess
import sys
import time

import numpy as np
import torch

from configurator import configure
from model import GPT, GPTConfig
from utils import private_prediction as pp
from utils import record_synthesis as rs
from utils import synthetic_utility as su
from utils.checkpoint import load_model
from utils.data import load_meta
from utils.records import load_people, load_schema
from utils.tokenizer import get_tokenizer
from utils.atomic import write_bytes
from utils.cli import run_cli
from utils.machine import describe_machine

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

DEFAULTS = dict(
    out="",                  # also write the markdown here
    parts=("speed", "utility"),  # which parts to run
    threads=1,               # torch threads; 1 keeps timings stable on a shared machine
    s=64,                    # speed: private prompts per batch (+1 public)
    prompt_tokens=256,       # speed: prompt length (the shortest is 7/8 of it: left padding)
    new_tokens=8,            # speed: synthetic tokens per round, recompute and peer (each costs a full forward)
    cached_tokens=128,       # speed: synthetic tokens per round with the KV cache (one prefill serves a batch's tokens)
    vocabs=(50304, 257),     # speed: GPT-2's vocabulary and the default small base's (bytes)
    rounds=2,                # speed: interleaved rounds
    config="config/synthesize_employees.py",  # utility: the user's config
    ckpt="out/base/ckpt.pt",  # utility: the public base
    data_dir="data/employees",  # utility: prepared with the four fields
    epsilons=(1.0, 3.0, 8.0),  # utility: one run each
    downstream_at=8.0,       # utility: the epsilon whose run also fine-tunes downstream
    max_examples_per_batch=0,  # utility: 0 = the config's
    workdir="out/bench_synthesis",  # utility: outputs of each run (the drafter is trained once, reused)
    exact_ckpt="",           # exact: the models to probe, comma-separated ('' = workdir/drafter.pt)
    exact_whole_values=True,  # exact: one choice per categorical value (False: byte by byte)
    exact_tau=1.0,           # exact: the tau the plan picks at epsilon 8 (2c/tau = 6 with the config's c = 3)
)


def load():
    return os.getloadavg()[0]


def speed(cfg, vocab):
    """{mode: (tokens, cpu seconds)} summed over interleaved rounds, prefill included."""
    torch.manual_seed(0)
    block = cfg["prompt_tokens"] + cfg["cached_tokens"] + 8
    model = GPT(GPTConfig(n_layer=4, n_head=4, n_embd=256, block_size=block, vocab_size=vocab)).eval()
    g = torch.Generator().manual_seed(0)
    lengths = torch.randint(cfg["prompt_tokens"] * 7 // 8, cfg["prompt_tokens"] + 1, (cfg["s"],), generator=g)
    prompts = [torch.randint(0, vocab - 1, (int(n),), generator=g).tolist() for n in lengths] + [[vocab - 1]]
    mech = pp.Mechanism(s=cfg["s"], c=10.0, tau=2.0, svt=False, sigma=1.0, theta=0.0, tau_pub=1.0)
    totals = {"KV cache": [0, 0.0], "full recompute": [0, 0.0], "peer: per-token generate + host numpy": [0, 0.0]}

    def ours(use_cache):
        n = cfg["cached_tokens"] if use_cache else cfg["new_tokens"]
        decoder = pp.BatchDecoder(model, prompts, n, use_kv_cache=use_cache)
        examples, _ = pp.synthesize_batch(decoder, cfg["s"], mech, n, pp.make_generator(0), eot=-1,
                                          max_new_tokens=n, max_examples=1, vocab=vocab)
        return sum(len(e["tokens"]) for e in examples)

    def peer():
        P = max(len(p) for p in prompts)
        idx = torch.zeros(len(prompts), P, dtype=torch.long)
        mask = torch.zeros(len(prompts), P, dtype=torch.bool)
        for i, p in enumerate(prompts):
            idx[i, P - len(p):], mask[i, P - len(p):] = torch.tensor(p), True
        rng = np.random.default_rng(0)
        for _ in range(cfg["new_tokens"]):
            _, logits = model.generate(idx, 1, attention_mask=mask, return_logits=True)
            z = logits[:, -1].numpy().astype(np.float64)
            clipped = np.maximum(-10.0, z[:-1] - z[:-1].max(-1, keepdims=True) + 10.0)
            p = np.exp(clipped.sum(0) / cfg["s"] / 2.0)
            token = rng.choice(len(p), p=p / p.sum())
            idx = torch.cat([idx, torch.full((len(prompts), 1), int(token))], 1)
            mask = torch.cat([mask, torch.ones(len(prompts), 1, dtype=torch.bool)], 1)
        return cfg["new_tokens"]

    ours(True)  # warm-up
    for _ in range(cfg["rounds"]):
        for name, fn in (("KV cache", lambda: ours(True)), ("full recompute", lambda: ours(False)),
                         ("peer: per-token generate + host numpy", peer)):
            t0 = time.process_time()
            n = fn()
            totals[name][0] += n
            totals[name][1] += time.process_time() - t0
    return totals


def utility_runs(cfg):
    """The user's command at each epsilon, as a user runs it (a child process: its CPU time is the child's
    rusage), then its reports read back from beside the output."""
    rows = []
    for eps in cfg["epsilons"]:
        out = os.path.join(cfg["workdir"], f"eps{eps:g}.jsonl")
        cmd = [sys.executable, os.path.join(REPO, "synthesize_dp.py"), cfg["config"], f"--ckpt={cfg['ckpt']}",
               f"--data_dir={cfg['data_dir']}", f"--out={out}", f"--epsilon={eps}",
               f"--drafter_ckpt={os.path.join(cfg['workdir'], 'drafter.pt')}", f"--downstream={eps == cfg['downstream_at']}"]
        cmd += [f"--max_examples_per_batch={cfg['max_examples_per_batch']}"] if cfg["max_examples_per_batch"] else []
        load_start, t0, c0 = load(), time.time(), children_cpu()
        subprocess.run(cmd, check=True)
        wall, cpu = time.time() - t0, children_cpu() - c0
        base = os.path.splitext(out)[0]
        with open(base + ".privacy.json") as f:
            privacy = json.load(f)
        with open(base + ".utility.json") as f:
            utility = json.load(f)
        rows.append({"epsilon": eps, "c": privacy["c"], "wall_s": wall, "cpu_s": cpu, "plan": privacy["plan"],
                     "discarded": privacy["diagnostics"]["discarded"], "synthesis_s": privacy["diagnostics"]["seconds"],
                     "utility": utility, "load": (load_start, load())})
    return rows


def exact_first_field(cfg):
    """The exact distribution of the first field's value under the mechanism (every branch of the value
    grammar, one batch of the real people, no sampling noise), and of the public row alone (the drafter),
    against the private people's: what infinitely many records would give. For the operator (real data)."""
    conf = runpy.run_path(cfg["config"])
    schema, tok = load_schema(cfg["data_dir"]), get_tokenizer(load_meta(cfg["data_dir"]))
    tpl = rs.RecordTemplate(schema, conf["fields"], conf["domains"], conf["digits"], tok, conf["record_header"])
    model = load_model(cfg["exact_ckpt"] or os.path.join(cfg["workdir"], "drafter.pt"))[0].eval()
    people = load_people(cfg["data_dir"], "train", schema)
    batches, _ = pp.assign_batches([json.dumps(p, sort_keys=True) for p in people], "", secrets.token_hex(16),
                                   conf["n_batches"])
    members, room = batches[0], model.config.block_size - tpl.max_new_tokens()
    prompts = [tpl.prompt_ids(people[i], room) for i in members] + [tpl.public_ids()]
    decoder, n = pp.BatchDecoder(model, prompts, tpl.max_new_tokens()), len(members)
    mech = pp.Mechanism(s=conf["s"], c=conf["c"], tau=cfg["exact_tau"], svt=False, sigma=1.0, theta=0.0, tau_pub=1.0)
    field, private, public = tpl.fields[0], {}, {}
    tau = rs.field_tau(mech, tpl, field)

    def walk(tokens, text, p_priv, p_pub):
        ids = tpl.allowed(field, text)
        while len(ids) == 1 and not text.endswith("\n"):
            tokens, text = tokens + ids, text + tpl.strings[ids[0]]
            ids = tpl.allowed(field, text)
        if text.endswith("\n"):
            private[text[:-1]], public[text[:-1]] = p_priv, p_pub
            return
        decoder.reset()
        logits = decoder.extend(tpl.label_ids[field] + tokens)[:, :tpl.vocab]
        mask = tpl.mask(ids, logits.device)
        q_priv = pp.private_log_probs(pp.aggregate(logits[:n], mech.c, mech.s, mask), tau, mask).exp()
        q_pub = torch.softmax(pp.masked(logits[n], mask), -1)
        for t in ids:
            walk(tokens + [t], text + tpl.strings[t], p_priv * float(q_priv[t]), p_pub * float(q_pub[t]))

    if cfg["exact_whole_values"]:  # one choice among the public values (record_synthesis.whole_value_scores)
        decoder.reset()
        Z = rs.whole_value_scores(decoder, tpl, field, tpl.label_ids[field])
        q_priv = pp.private_log_probs(pp.aggregate(Z[:n], mech.c, mech.s), tau).exp()
        q_pub = torch.softmax(Z[n], -1)
        for k, v in enumerate(tpl.domains[field]):
            private[v], public[v] = float(q_priv[k]), float(q_pub[k])
    else:
        walk([], "", 1.0, 1.0)
    real = su.distribution([p.get(field) for p in people])
    as_keys = lambda d: {repr(k): v for k, v in d.items()}
    return {"field": field, "batch_people": n, "tau": tau,
            "mode": "whole values" if cfg["exact_whole_values"] else "byte by byte", "private": private, "public": public,
            "tv_private": su.total_variation(as_keys(private), real),
            "tv_public": su.total_variation(as_keys(public), real),
            "tv_private_vs_its_batch": su.total_variation(as_keys(private), su.distribution(
                [people[i].get(field) for i in members]))}


def children_cpu():
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def markdown(cfg, speed_rows, utility_rows, load_before, exact_rows=None):
    lines = ["## DP synthesis by private prediction (synthesize_dp.py)", "",
             f"Machine: {describe_machine()}; load average {load_before:.1f} at the start (shared with other "
             f"engineers' jobs). Command: `python bench/synthesis.py`.", ""]
    for vocab, rows in (speed_rows or {}).items():
        base = rows["KV cache"][0] / rows["KV cache"][1]
        lines += [f"Speed, vocabulary {vocab}: one batch of s={cfg['s']} private prompts of {cfg['prompt_tokens'] * 7 // 8}.."
                  f"{cfg['prompt_tokens']} tokens (left-padded) + 1 public, 4 x 256 GPT; {cfg['cached_tokens']} tokens per "
                  f"round with the cache (prefill included), {cfg['new_tokens']} per round otherwise (each token is a "
                  f"full forward there); {cfg['rounds']} interleaved round(s), process CPU time:", "",
                  "| decoding | tokens | CPU s | tokens/s | KV cache is |", "|---|---|---|---|---|"]
        for name, (n, t) in rows.items():
            lines.append(f"| {name} | {n} | {t:.2f} | {n / t:.2f} | {base / (n / t):.1f}x |")
        lines.append("")
    for row in utility_rows:
        u, p = row["utility"], row["plan"]
        copying = ", ".join(f"{f} {v:.2f}" for f, v in (p.get("drafter_copy_probability") or {}).items())
        lines += [f"### epsilon = {row['epsilon']:g}", "",
                  f"Plan: {p['batches']} batches, s={p['s']}, tau={p['tau']:.3g} (2c/tau = {2 * row['c'] / p['tau']:.2f}), "
                  f"r={p['r']}, at most {p['private_tokens_per_record']:.1f} private tokens per record -> "
                  f"{p['expected_records']} expected. Kept {u['records']} records (discarded: {row['discarded'] or 'none'}); "
                  f"synthesis {row['synthesis_s']:.0f} s wall, whole command {row['wall_s']:.0f} s wall / "
                  f"{row['cpu_s']:.0f} s CPU (load {row['load'][0]:.1f} at the start, {row['load'][1]:.1f} at the end). "
                  f"Public drafter, p(own value | prompt) on held-out public records: {copying or 'not measured'}.", "",
                  su.utility_markdown(u)]
    for row in exact_rows or []:
        e = row["exact"]
        lines += [f"Exact {e['field']} distribution under the mechanism (every grammar branch, one batch of {e['batch_people']} "
                  f"real people, 2c/tau = {2 * 3.0 / e['tau']:.2f}, {e['mode']}; no sampling noise), model `{row['ckpt']}` "
                  f"({row['cpu_s']:.0f} s CPU): TV to the private people {e['tv_private']:.3f} (to its own batch "
                  f"{e['tv_private_vs_its_batch']:.3f}); the public row alone (the drafter, epsilon 0) {e['tv_public']:.3f}.", ""]
    return "\n".join(lines)


def main(argv=None):
    cfg = configure(DEFAULTS, argv or [])
    torch.set_num_threads(cfg["threads"])
    load_before = load()
    speed_rows = {v: speed(cfg, v) for v in cfg["vocabs"]} if "speed" in cfg["parts"] else None
    for vocab, rows in (speed_rows or {}).items():
        for name, (n, t) in rows.items():
            print(f"vocab {vocab}, {name}: {n} tokens in {t:.2f} CPU s = {n / t:.2f} tokens/s")
    utility_rows = utility_runs(cfg) if "utility" in cfg["parts"] else []
    exact_rows = []
    for ckpt in (cfg["exact_ckpt"].split(",") if "exact" in cfg["parts"] else []):
        c0 = time.process_time()
        exact = exact_first_field({**cfg, "exact_ckpt": ckpt})
        exact_rows.append({"ckpt": ckpt, "exact": exact, "cpu_s": time.process_time() - c0})
        print(json.dumps(exact_rows[-1]))
    text = markdown(cfg, speed_rows, utility_rows, load_before, exact_rows)
    print(text)
    if cfg["out"]:
        write_bytes(cfg["out"], (text + "\n").encode())


if __name__ == "__main__":
    run_cli(main)
