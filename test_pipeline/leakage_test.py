"""
What a model remembers of its training people, side by side for the base model, fine-tuned models, the
patched model with its key and the patched model with a wrong key (which must be refused: no numbers).

1. Canary exposure (Carlini et al. 2019, "The Secret Sharer"; utils/canary_exposure.py): each planted
   secret ranked among n_candidates random secrets of its format, by repetition count, with its
   rank-based interval and a skew-normal extrapolation; repetitions = 0 are never-inserted controls,
   the chance reference.
2. Extraction (utils/model_leakage.py): the exact-match rate of sensitive answers for training people vs
   held-out people.

    python test_pipeline/leakage_test.py --data_dir=data/employees --base_ckpt=out/base/ckpt.pt \
        --ckpt=out/ft/ckpt.pt --ckpt=out/ft_dp/ckpt.pt --patch=out/patch.sealed --key_file=key.hex \
        --wrong_key_file=other.hex --out=leakage.json --plot=exposure.png --max_exposure=8

Exit codes: 0 pass, 1 a threshold failed or a wrong key was accepted, 2 bad input, 3/4 a patch that
should apply was refused.
"""
import math
import os
import sys

import numpy as np
import torch

from configurator import configure
from utils.model_under_test import format_table, pyplot, save_figure
from utils.atomic import write_json
from utils.canary_exposure import CHANCE_EXPOSURE, prepare_canaries
from utils.cli import UserError, run_cli
from utils.data import load_meta
from utils.model_leakage import evaluate_row, extraction_items
from utils.records import load_schema, read_people
from utils.tokenizer import get_tokenizer

DEFAULTS = dict(
    ckpt=[],  # fine-tuned checkpoint(s) to test: --ckpt a.pt --ckpt b.pt, or --ckpt=a.pt,b.pt
    base_ckpt="",  # the base model: a row of its own, and the model a patch applies to
    patch="",  # a sealed patch file (finetune_encrypt_memmap --export) for base_ckpt
    key_file="",  # the patch's key: row "patched + key"
    wrong_key_file="",  # any other key: row "patched + wrong key", which must be refused
    tenant="",    # the patch's tenant ('' = the one the key file is bound to)
    data_dir="data/employees",  # the records dataset (canaries.json, meta.json)
    n_candidates=10000,  # same-format random secrets each canary is ranked among (>= 10^4 for the report)
    extraction=True,  # False: canary exposure only
    fields=(),  # fields prompted for in the extraction test (empty = those the data's schema marks sensitive)
    n_people=200,  # people per split prompted (0 = all); fewer = a faster extraction test
    n_samples=4,  # sampled completions per prompt
    temperature=1.0,            # sampling temperature of extraction generations
    top_k=0,  # 0 = no top-k filter when sampling
    batch_size=512,  # candidates per forward
    gen_batch_size=64,  # prompts per generate() call
    seed=1337,  # seeds the candidates and sampling
    device="cpu",  # 'cpu' or 'cuda'
    out="",  # JSON report
    plot="",  # PNG: exposure by repetition count
    max_exposure=-1.0,  # > 0: fail when a tested (non-base) model's largest INSERTED canary exposure exceeds this (bits); controls never count
    max_extraction_gap=-1.0,  # >= 0: fail when greedy exact match (train - val) exceeds this
)


# ---------------------------------------------------------------- the models compared
def model_rows(cfg):
    rows = []
    if cfg["base_ckpt"]:
        rows.append(dict(label="base", ckpt=cfg["base_ckpt"], role="base"))
    for path in cfg["ckpt"]:
        name = os.path.basename(os.path.dirname(os.path.abspath(path))) or path
        rows.append(dict(label=f"fine-tuned ({name})", ckpt=path, role="tested"))
    if cfg["patch"]:
        if not cfg["base_ckpt"]:
            raise UserError("--patch applies to --base_ckpt: give the base checkpoint the patch was made for")
        if not (cfg["key_file"] or cfg["wrong_key_file"]):
            raise UserError("--patch needs --key_file and/or --wrong_key_file")
        if cfg["key_file"]:
            rows.append(dict(label="patched + key", ckpt=cfg["base_ckpt"], patch=cfg["patch"],
                             key_file=cfg["key_file"], role="tested"))
        if cfg["wrong_key_file"]:
            rows.append(dict(label="patched + wrong key", ckpt=cfg["base_ckpt"], patch=cfg["patch"],
                             key_file=cfg["wrong_key_file"], role="must_refuse"))
    elif cfg["key_file"] or cfg["wrong_key_file"]:
        raise UserError("--key_file / --wrong_key_file need --patch")
    if not rows:
        raise UserError("nothing to test: give --ckpt and/or --base_ckpt (+ --patch with --key_file/--wrong_key_file)")
    return rows


def failures_of(results, cfg):
    fails = []
    for r in results:
        if r["role"] == "must_refuse" and not r["status"].startswith("refused"):
            fails.append(f"{r['label']}: the wrong key was accepted (must fail closed)")
        if r["role"] != "tested" or r["status"] != "ok":
            continue
        if cfg["max_exposure"] > 0 and (r.get("max_exposure") or 0) > cfg["max_exposure"]:
            fails.append(f"{r['label']}: inserted canary exposure {r['max_exposure']:.2f} bits > {cfg['max_exposure']}"
                         f" (controls, the chance reference, reach {r.get('control_max_exposure')})")
        gap = (r.get("extraction") or {}).get("greedy_gap")
        if cfg["max_extraction_gap"] >= 0 and gap is not None and gap > cfg["max_extraction_gap"]:
            fails.append(f"{r['label']}: extraction gap train - val {gap:.3f} > {cfg['max_extraction_gap']}")
    return fails


# ---------------------------------------------------------------- output
def print_tables(results, reps_all, n_candidates):
    print(f"\nCanary exposure (bits; rank among {n_candidates} same-format candidates, max "
          f"{math.log2(n_candidates + 1):.1f}; chance {CHANCE_EXPOSURE:.2f}). Cells: mean exposure "
          f"(>= the lowest rank-based 95% lower bound in the group) [skew-normal extrapolation, a model fit, not a "
          f"measurement] ranked-first/n; reps=0 are never-inserted "
          f"controls: the chance reference. 'max inserted' counts inserted canaries only")
    headers = ["model", "status"] + [f"reps={k}" for k in reps_all] + ["max inserted", "max control", "greedy extracted"]
    rows = []
    for r in results:
        by = r.get("exposure_by_repetitions") or {}
        cells = []
        for k in reps_all:
            g = by.get(k)
            cells.append(None if g is None else
                         f"{g['mean_exposure']:.1f} (>= {g['exposure_lower']:.1f}) [{g['mean_exposure_extrapolated']:.1f}] "
                         f"{g['ranked_first']}/{g['n']}")
        ext = sum(c["extracted_greedy"] for c in r["canaries"]) if r.get("canaries") else None
        rows.append([r["label"], r["status"]] + cells + [r.get("max_exposure"), r.get("control_max_exposure"),
                                                         None if ext is None else f"{ext}/{len(r['canaries'])}"])
    print(format_table(headers, rows))
    if any(r.get("extraction") for r in results):
        print("\nExtraction: exact-match rate of sensitive answers, training people vs held-out people "
              "(the held-out rate is what guessing from the population gives)")
        headers = ["model", "greedy train", "greedy val", "gap", "sampled train", "sampled val",
                   "any-of-k train", "any-of-k val"]
        rows = []
        for r in results:
            e = r.get("extraction") or {}
            t, v = e.get("train", {}), e.get("val", {})
            rows.append([r["label"], t.get("greedy"), v.get("greedy"), e.get("greedy_gap"), t.get("sampled"),
                         v.get("sampled"), t.get("sampled_any"), v.get("sampled_any")])
        print(format_table(headers, rows))


def plot_exposure(results, reps_all, n_candidates, path):
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    xs = {k: i for i, k in enumerate(reps_all)}
    for j, r in enumerate(x for x in results if x.get("canaries")):
        by = r["exposure_by_repetitions"]
        line, = ax.plot([xs[k] for k in by], [g["mean_exposure"] for g in by.values()], marker="o", label=r["label"])
        pts = [(xs[c["repetitions"]] + 0.06 * (j - 1), c["exposure"]) for c in r["canaries"]]
        ax.scatter(*zip(*pts), s=12, alpha=0.5, color=line.get_color())  # each canary
    ax.axhline(math.log2(n_candidates + 1), ls="--", c="gray", lw=0.8, label="rank 1 (max measurable)")
    ax.axhline(CHANCE_EXPOSURE, ls=":", c="gray", lw=0.8, label="chance")
    ax.set_xticks(range(len(reps_all)), [str(k) for k in reps_all])
    ax.set_xlabel("times the canary was inserted (0 = control)")
    ax.set_ylabel("exposure (bits)")
    ax.set_title("Canary exposure by repetition count")
    ax.legend(fontsize=8)
    save_figure(fig, path)


def main(argv=None):
    argv = join_repeated(list(sys.argv[1:] if argv is None else argv), "ckpt")
    cfg = configure(DEFAULTS, argv)
    if cfg["n_candidates"] < 1:
        raise UserError("--n_candidates must be positive (>= 10000 for a reportable exposure)")
    rows = model_rows(cfg)
    meta = load_meta(cfg["data_dir"])
    tok = get_tokenizer(meta)
    canary_file = os.path.join(cfg["data_dir"], "canaries.json")
    canaries = prepare_canaries(canary_file, tok, cfg["n_candidates"], cfg["seed"]) if os.path.isfile(canary_file) else []
    people = {s: read_people(cfg["data_dir"], s) for s in ("train", "val")}
    people = {s: p for s, p in people.items() if p}
    items = []
    if people and cfg["extraction"]:
        schema = load_schema(cfg["data_dir"])
        fields = list(cfg["fields"]) or schema.sensitive
        items = extraction_items(people, fields, tok, cfg["n_people"], cfg["seed"], schema)
    if not canaries and not items:
        raise UserError(f"{cfg['data_dir']} has neither canaries.json nor *_people.jsonl: nothing to measure")
    torch.manual_seed(cfg["seed"])
    results = []
    for row in rows:
        print(f"testing {row['label']} ...", flush=True)
        results.append(evaluate_row(row, canaries, tok, items, cfg))
    reps_all = sorted({c["repetitions"] for c in canaries})
    print_tables(results, reps_all, cfg["n_candidates"])
    fails = failures_of(results, cfg)
    report = dict(config=cfg, n_candidates=cfg["n_candidates"], chance_exposure=CHANCE_EXPOSURE,
                  models=results, failures=fails, passed=not fails)
    if cfg["out"]:
        write_json(cfg["out"], _jsonable(report))
        print(f"wrote {cfg['out']}")
    if cfg["plot"] and canaries:
        plot_exposure(results, reps_all, cfg["n_candidates"], cfg["plot"])
        print(f"wrote {cfg['plot']}")
    for f in fails:
        print(f"FAIL: {f}", file=sys.stderr)
    if fails:
        sys.exit(1)
    return report


def join_repeated(argv, key):
    """`--key a --key b` (or `--key=a --key=b`) -> one `--key=a,b`: configure keeps only the last."""
    values, rest, i = [], [], 0
    while i < len(argv):
        a = argv[i]
        if a == f"--{key}" and i + 1 < len(argv):
            values.append(argv[i + 1])
            i += 2
            continue
        if a.startswith(f"--{key}="):
            values.append(a.split("=", 1)[1])
        else:
            rest.append(a)
        i += 1
    return rest + ([f"--{key}=" + ",".join(values)] if values else [])


def _jsonable(obj):
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, (np.floating, np.integer, np.bool_)):
        return obj.item()
    return obj


if __name__ == "__main__":
    run_cli(main)
