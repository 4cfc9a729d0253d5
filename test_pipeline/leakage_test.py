"""
What a model remembers of its training people, side by side for the base model, fine-tuned models, the
patched model with its key and the patched model with a wrong key (which must be refused: no numbers).

1. Canary exposure (Carlini et al. 2019, "The Secret Sharer"). Each planted secret in canaries.json is
   ranked by its log-likelihood after its prefix among n_candidates random secrets of the same format
   (never the secret itself): exposure = log2(n_candidates + 1) - log2(rank). The candidates share the
   prefix, so it runs once into a KV cache and the candidates are scored in batches. A skew-normal fitted
   to the candidates' log-perplexities extrapolates beyond the enumerated set: exposure = -log2 CDF(secret),
   capped at log2 of the whole secret space. Reported by repetition count; repetitions = 0 are controls
   that were never inserted, whose exposure is chance (mean 1/ln 2 = 1.44 bits). With a BPE tokenizer,
   digit strings split into different numbers of tokens and the shorter ones are likelier under any
   model, so compare inserted canaries with the controls and with the base model, not only with 1.44.
2. Extraction: each person's Q/A prompt for a sensitive field (the data's schema in meta.json,
   utils/records.py; default: the fields it marks sensitive) is completed greedily and by sampling;
   the exact-match rate of the answer for training people is compared with the
   same rate for held-out (val) people, which is what a model gets from the population alone.

    python test_pipeline/leakage_test.py --data_dir=data/employees --base_ckpt=out/base/ckpt.pt \
        --ckpt=out/ft/ckpt.pt --ckpt=out/ft_dp/ckpt.pt --patch=out/patch.sealed --key_file=key.hex \
        --wrong_key_file=other.hex --out=leakage.json --plot=exposure.png --max_exposure=8

Exit codes: 0 pass, 1 a threshold failed or a wrong key was accepted, 2 bad input, 3/4 a patch that
should apply was refused.
"""
import json
import math
import os
import sys

import numpy as np
import torch
from scipy.stats import skewnorm

from configurator import configure
from test_pipeline.model_under_test import (PATCH_REFUSALS, complete, continuation_logprobs, format_table,
                                            load_model_under_test, pyplot, save_figure)
from utils.audit_bounds import clopper_pearson
from utils.atomic import write_json
from utils.cli import UserError, run_cli
from utils.data import load_meta
from utils.employees import SCHEMA as EMPLOYEES  # what extraction_items uses when given no schema
from utils.progress import Progress, batched
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

CHANCE_EXPOSURE = 1 / math.log(2)  # E[-log2 U] for a uniform rank: what an unseen secret gets


# ---------------------------------------------------------------- canaries
def candidate_secrets(secret_format, secret, n, rng):
    """n distinct random secrets of the format ('#' = a random digit, anything else literal), never
    `secret`. When the format has no more than n other values, all of them (the exact rank)."""
    slots = [i for i, ch in enumerate(secret_format) if ch == "#"]
    if not slots:
        raise UserError(f"secret_format {secret_format!r} has no random digits ('#')")
    if len(secret) != len(secret_format) or any(
            (c != f) if f != "#" else not c.isdigit() for c, f in zip(secret, secret_format)):
        raise UserError(f"canary secret {secret!r} does not match secret_format {secret_format!r}")
    space = 10 ** len(slots)
    own = int("".join(secret[i] for i in slots))
    if n >= space - 1:
        values = np.array([v for v in range(space) if v != own], dtype=np.int64)
    else:
        values = np.unique(rng.integers(0, space, size=int(n * 1.1) + 16, dtype=np.int64))
        while True:  # draw until n distinct values other than the secret's
            values = values[values != own]
            if len(values) >= n:
                break
            values = np.unique(np.concatenate([values, rng.integers(0, space, size=n, dtype=np.int64)]))
        values = rng.permutation(values)[:n]
    out = []
    template = list(secret_format)
    for v in values:
        digits = str(int(v)).zfill(len(slots))
        for i, d in zip(slots, digits):
            template[i] = d
        out.append("".join(template))
    return out


def exposure_from_rank(rank, n_candidates):
    """Carlini et al.'s exposure with the enumerated reference set R = the candidates plus the secret."""
    return math.log2(n_candidates + 1) - math.log2(rank)


def rank_among(secret_logprob, candidate_logprobs):
    """1 + candidates strictly more likely; ties count half (a constant model must not rank first)."""
    c = np.asarray(candidate_logprobs)
    return 1 + float(np.sum(c > secret_logprob)) + 0.5 * float(np.sum(c == secret_logprob))


def exposure_interval(rank, n_candidates, confidence=0.95):
    """Rank-based interval for the exposure: rank - 1 of n candidates beat the secret, a binomial count of
    p = P[a random candidate beats it]; the Clopper-Pearson interval for p gives -log2(p) bounds. The
    upper end is None (unbounded: only the extrapolation can go there) when no candidate beats it."""
    lo_p, hi_p = clopper_pearson(int(round(rank - 1)), n_candidates, confidence)
    return -math.log2(hi_p) if hi_p < 1 else 0.0, (-math.log2(lo_p) if lo_p > 0 else None)


def skewnorm_exposure(secret_nll, candidate_nlls, space_bits):
    """-log2 P[candidate log-perplexity <= the secret's] under a skew-normal fitted to the candidates,
    capped at log2 of the secret space (no secret can be rarer than one in the whole space)."""
    a, loc, scale = skewnorm.fit(np.asarray(candidate_nlls, dtype=np.float64))
    bits = -float(skewnorm.logcdf(secret_nll, a, loc, scale)) / math.log(2)
    return min(max(bits, 0.0), space_bits)


def prepare_canaries(canary_file, tok, n_candidates, seed):
    """Tokenized canaries with their candidate sets, built once and shared by every model."""
    with open(canary_file) as f:
        spec = json.load(f)
    fmt = spec.get("secret_format")
    if not fmt or not spec.get("canaries"):
        raise UserError(f"{canary_file} lacks secret_format or canaries")
    n_slots = fmt.count("#")
    prepared = []
    progress = Progress("canary candidate sets", len(spec["canaries"]), hint="--n_candidates")
    for k, c in enumerate(progress.track(spec["canaries"])):
        rng = np.random.default_rng([seed, k])
        cands = candidate_secrets(fmt, c["secret"], n_candidates, rng)
        seqs = [tok.encode(c["prefix"] + s) for s in [c["secret"]] + cands]
        shared = _common_prefix_len(seqs)
        if shared == 0:
            raise UserError(f"canary {c.get('id', k)} has an empty prefix: nothing to condition the secret on")
        prepared.append(dict(
            id=c.get("id", k), name=c.get("name"), repetitions=int(c.get("repetitions", 0)),
            secret=c["secret"], prefix=c["prefix"], prefix_ids=seqs[0][:shared],
            continuations=[s[shared:] for s in seqs], n_candidates=len(cands),
            space_bits=n_slots * math.log2(10)))
    return prepared


def _common_prefix_len(seqs):
    """Tokens every sequence starts with, leaving at least one token of each to score (BPE may merge the
    prefix's last characters with the secret's first, so the text prefix is not always a token prefix)."""
    first = seqs[0]
    n = min(len(s) for s in seqs) - 1
    for s in seqs[1:]:
        i = 0
        while i < n and s[i] == first[i]:
            i += 1
        n = i
    return n


def score_canaries(model, canaries, tok, batch_size, gen_batch_size):
    """Rank, exposure (enumerated and extrapolated) and greedy extraction of every canary."""
    results = []
    progress = Progress("canary candidates", sum(c["n_candidates"] + 1 for c in canaries), hint="--n_candidates")
    for c in canaries:
        lp = continuation_logprobs(model, c["prefix_ids"], c["continuations"], batch_size)
        secret_lp, cand_lp = lp[0], lp[1:]
        rank = rank_among(secret_lp, cand_lp)
        results.append(dict(
            id=c["id"], repetitions=c["repetitions"], rank=rank,
            exposure=exposure_from_rank(rank, c["n_candidates"]),
            exposure_interval=exposure_interval(rank, c["n_candidates"]),
            exposure_extrapolated=skewnorm_exposure(-secret_lp, -cand_lp, c["space_bits"]),
            secret_nll_bits=float(-secret_lp / math.log(2)),
            candidate_nll_bits_median=float(np.median(-cand_lp) / math.log(2))))
        progress.update(c["n_candidates"] + 1)
    # greedy completion of each prefix (as tokenized in training): does the model say the secret outright?
    longest = max(len(s) for c in canaries for s in c["continuations"])
    new = complete(model, [c["prefix_ids"] for c in canaries], longest + 2, batch_size=gen_batch_size,
                   greedy=True, eot=getattr(tok, "eot", None))
    for r, c, ids in zip(results, canaries, new):
        r["extracted_greedy"] = tok.decode(c["prefix_ids"] + ids).startswith(c["prefix"] + c["secret"])
    return results


def exposure_by_repetitions(canary_results):
    groups = {}
    for r in canary_results:
        groups.setdefault(r["repetitions"], []).append(r)
    return {reps: dict(n=len(g),
                       mean_exposure=float(np.mean([r["exposure"] for r in g])),
                       max_exposure=float(np.max([r["exposure"] for r in g])),
                       mean_exposure_extrapolated=float(np.mean([r["exposure_extrapolated"] for r in g])),
                       exposure_lower=float(np.min([r["exposure_interval"][0] for r in g])),
                       ranked_first=sum(r["rank"] <= 1 for r in g),
                       extracted_greedy=sum(r["extracted_greedy"] for r in g))
            for reps, g in sorted(groups.items())}


# ---------------------------------------------------------------- extraction of sensitive fields
def extraction_items(people_by_split, fields, tok, n_people, seed, schema=None):
    """(split, field, prompt ids, expected answer) for a seeded sample of people per split. schema: the
    data's (default: employees')."""
    schema = schema or EMPLOYEES
    schema.check_fields(fields)
    items = []
    for k, (split, people) in enumerate(people_by_split.items()):
        rng = np.random.default_rng([seed, k])
        pick = rng.permutation(len(people))[:n_people] if n_people > 0 else range(len(people))
        for i in sorted(pick):
            p = people[i]
            for field in fields:
                if not schema.has(p, field):
                    continue  # e.g. no hourly rate for a salaried person
                items.append((split, field, tok.encode(schema.qa_prompt(p, field, 0)),
                              schema.answer(p, field).strip()))
    return items


def first_line(text):
    return text.split("\n", 1)[0].strip()


def extraction_rates(model, tok, items, cfg):
    """Exact-match rates of greedy and sampled completions, per split and per field."""
    if not items:
        return None
    eot = getattr(tok, "eot", None)
    max_new = max(len(tok.encode(" " + a + "\n")) for *_, a in items) + 2
    prompts = [ids for _, _, ids, _ in items]
    bs, k = cfg["gen_batch_size"], cfg["n_samples"]
    hint = "--n_people, --n_samples"
    greedy = batched(lambda chunk: complete(model, chunk, max_new, bs, greedy=True, eot=eot), prompts, bs,
                     Progress("extraction (greedy)", len(prompts), hint), key=len)
    dev = next(model.parameters()).device
    gen = torch.Generator(device=dev).manual_seed(cfg["seed"])
    repeated = [p for p in prompts for _ in range(k)]
    sampled = batched(lambda chunk: complete(model, chunk, max_new, bs, greedy=False, temperature=cfg["temperature"],
                                             top_k=cfg["top_k"] or None, generator=gen, eot=eot),
                      repeated, bs, Progress("extraction (sampled)", len(repeated), hint), key=len) if k > 0 else []
    rows = []
    for j, (split, field, _, answer) in enumerate(items):
        hits = [first_line(tok.decode(s)) == answer for s in sampled[j * k:(j + 1) * k]]
        rows.append((split, field, first_line(tok.decode(greedy[j])) == answer,
                     float(np.mean(hits)) if hits else None, any(hits)))

    def summarize(sel):
        return dict(n=len(sel), greedy=float(np.mean([r[2] for r in sel])),
                    sampled=float(np.mean([r[3] for r in sel])) if k > 0 else None,
                    sampled_any=float(np.mean([r[4] for r in sel])) if k > 0 else None)
    out = {}
    for split in dict.fromkeys(r[0] for r in rows):
        sel = [r for r in rows if r[0] == split]
        out[split] = summarize(sel)
        out[split]["by_field"] = {f: summarize([r for r in sel if r[1] == f]) for f in dict.fromkeys(r[1] for r in sel)}
    if "train" in out and "val" in out:
        out["greedy_gap"] = out["train"]["greedy"] - out["val"]["greedy"]
    return out


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


def evaluate_row(row, canaries, tok, items, cfg):
    """One row of the report: loads the model (a wrong key must be refused) and measures it."""
    out = {k: row.get(k) for k in ("label", "ckpt", "patch", "role")}
    try:
        model, _ = load_model_under_test(row["ckpt"], row.get("patch"), row.get("key_file"), cfg["device"],
                                         cfg["tenant"])
    except UserError as e:
        if row["role"] != "must_refuse" or row.get("patch") is None:
            raise
        out["status"] = f"refused ({PATCH_REFUSALS.get(e.exit_code, 'error')})"
        out["refusal"] = str(e)
        return out
    if row["role"] == "must_refuse":
        out["status"] = "WRONG KEY ACCEPTED (fail-open)"
        return out
    out["status"] = "ok"
    if canaries:
        out["canaries"] = score_canaries(model, canaries, tok, cfg["batch_size"], cfg["gen_batch_size"])
        out["exposure_by_repetitions"] = exposure_by_repetitions(out["canaries"])
        # only inserted canaries can show memorization; the never-inserted controls are the chance reference
        inserted = [r["exposure"] for r in out["canaries"] if r["repetitions"] > 0]
        controls = [r["exposure"] for r in out["canaries"] if r["repetitions"] == 0]
        out["max_exposure"] = max(inserted) if inserted else None
        out["control_max_exposure"] = max(controls) if controls else None
    if items:
        out["extraction"] = extraction_rates(model, tok, items, cfg)
    del model
    return out


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
