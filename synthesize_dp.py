"""
DP synthetic text by private prediction (Amin et al. 2024, "Private prediction for large-scale
synthetic text generation"). Inference only: the model is never trained on the sensitive records.

    python synthesize_dp.py config/synthesize_employees.py --ckpt out/base/ckpt.pt \
        --data_dir data/employees --epsilon 1 --delta 1e-6 --out out/synthetic/synthetic.jsonl

How it works, per batch of records:
- Each record sits in its own prompt (`prompt_template`); one extra public prompt holds no record.
  Batches are disjoint: a record's batch is HMAC-SHA256(salt, label, text) mod n_batches, with
  n_batches fixed by the config, so it depends on that record only.
- The s private prompts + the public prompt are prefilled once into a KV cache (left padding); for
  each new synthetic example the cache is truncated back to the prompts and the example is decoded
  token by token, every generated token being appended to every row.
- Each step: clip each private logit vector with recentering, clip_c(z)_i = max(-c, z_i - max z + c),
  sum, divide by the *expected* batch size s (never the actual size), sample from softmax(z_bar / tau):
  an exponential mechanism whose log-probabilities move by at most 2c/(s tau) between neighbours.
- Sparse vector (svt=True): d = ||sum softmax(Z)/s - softmax(z_pub)||_1 (sensitivity 1/s); if
  d + Lap(2 sigma) >= theta + Lap(sigma) the token is private (and the threshold is redrawn), otherwise
  it is drawn from softmax(z_pub / tau_pub) and costs nothing. At most r private tokens per batch.
- Accounting from the config alone, before any data is read:
  rho = r (1/2 (c/(s tau))^2 + 2/(s sigma)^2) zCDP per batch (no SVT term without SVT); the batches are
  disjoint, so by parallel composition that is also the whole run's rho; converted to (epsilon, delta)
  with Canonne, Kamath & Steinke 2020 (Prop. 12 of arXiv:2004.00010v4). With max_batch_size > 0 a full
  batch keeps its records with the smallest HMAC order key, so adding one record can swap another out:
  the sensitivities double and rho is 4x (accounted for).
The checkpoint must be public with respect to the records (e.g. pretrained on another corpus):
the guarantee covers the records in the prompts, not whatever the model was trained on.
"""
import hashlib
import hmac
import json
import math
import os
import re
import secrets
import time
from dataclasses import dataclass

import numpy as np
import torch
from torch.nn import functional as F

from configurator import configure
from utils.atomic import write_bytes, write_json
from utils.checkpoint import load_model
from utils.cli import UserError, run_cli
from utils import employees
from utils.data import RecordDataset, load_meta
from utils.tokenizer import get_tokenizer

DEFAULTS = dict(
    # inputs and outputs
    ckpt="out/base/ckpt.pt",        # the public model (never trained on data_dir)
    data_dir="data/employees",
    split="train",
    out="out/synthetic/synthetic.jsonl",
    report="",                      # privacy report JSON; '' = beside out as <name>.privacy.json
    # privacy budget: set exactly one of epsilon (r is solved) or r (epsilon is computed)
    epsilon=0.0,
    delta=1e-6,
    r=0,                            # private tokens per batch
    # mechanism
    s=250,                          # expected batch size: the divisor of the aggregate
    n_batches=8,                    # fixed in advance (about N / s), never derived from the data
    max_batch_size=0,               # 0 = no cap; a cap truncates full batches and quadruples rho
    batch_salt="",                  # '' = a fresh random salt (written to the report)
    label="",                       # the records' label (class), part of the batch hash
    c=10.0,                         # clipping range of the recentred logits
    tau=2.0,                        # temperature of the private exponential mechanism
    svt=True,                       # public drafter + sparse vector technique
    sigma=0.5,                      # SVT Laplace scale: Lap(sigma) on the threshold, Lap(2 sigma) on d
    theta=0.8,                      # SVT threshold on d in [0, 2]
    tau_pub=1.0,                    # temperature of the free public tokens
    public_top_k=0,                 # >0: private sampling restricted to the public logits' top k
    # prompts and decoding
    prompt_template="Here is a record:\n{record}\n\nWrite another record like it:\n",
    public_prompt="Write a record:\n",
    max_new_tokens=128,             # per synthetic example
    max_examples_per_batch=16,      # also ends a batch whose tokens are all public
    keep_unfinished=False,          # keep examples that hit max_new_tokens before end-of-text
    use_kv_cache=True,
    seed=-1,                        # -1 = seeded from the OS CSPRNG; a fixed seed makes the noise predictable
    device="cpu",
    # utility check: fine-tune the same base on synthetic vs real records, compare on real val
    utility_check=False,
    utility_steps=200,
    utility_batch_size=8,
    utility_learning_rate=3e-4,
)


# ----------------------------------------------------------------------------- accounting
def zcdp_to_epsilon(rho, delta):
    """epsilon of a rho-zCDP mechanism at delta (Canonne, Kamath, Steinke 2020): the minimum over
    alpha > 1 of alpha*rho + log(1 - 1/alpha) - (log delta + log alpha)/(alpha - 1). Every alpha gives a
    valid bound, so minimising over a grid is valid; the grid is refined around its best point."""
    if rho <= 0:
        return 0.0
    def eps_at(a):
        return a * rho + np.log1p(-1.0 / a) - (math.log(delta) + np.log(a)) / (a - 1.0)
    alphas = 1.0 + np.logspace(-4, 6, 2001)
    best = alphas[np.argmin(eps_at(alphas))]
    fine = np.linspace(max(1.0 + 1e-6, best / 1.02), best * 1.02, 2001)
    return float(max(0.0, min(eps_at(alphas).min(), eps_at(fine).min())))


def zcdp_to_epsilon_simple(rho, delta):
    """The classic conversion (Bun & Steinke 2016): rho + 2 sqrt(rho log(1/delta)); looser."""
    return rho + 2.0 * math.sqrt(rho * math.log(1.0 / delta))


def max_rho_for_epsilon(epsilon, delta):
    """The largest rho whose epsilon at delta stays <= epsilon (bisection; epsilon grows with rho)."""
    lo, hi = 0.0, max(1.0, epsilon)
    while zcdp_to_epsilon(hi, delta) <= epsilon:
        hi *= 2
    for _ in range(100):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if zcdp_to_epsilon(mid, delta) <= epsilon else (lo, mid)
    return lo


def rho_per_private_token(s, c, tau, sigma=None, svt=True, capped=False):
    """zCDP cost of one private token: the exponential mechanism (bounded range 2c/(s tau), hence
    (1/2)(c/(s tau))^2) plus, with SVT, one above-threshold answer (pure 2/(s sigma)-DP, hence
    2/(s sigma)^2). `capped`: a batch cap lets one added record swap another out, doubling both
    sensitivities (4x rho)."""
    k = 2.0 if capped else 1.0
    rho = 0.5 * (k * c / (s * tau)) ** 2
    if svt:
        rho += 2.0 * (k / (s * sigma)) ** 2
    return rho


def privacy_budget(cfg):
    """Everything the guarantee depends on, computed from the config alone (no data is read)."""
    s, c, tau, sigma, delta = cfg["s"], cfg["c"], cfg["tau"], cfg["sigma"], cfg["delta"]
    if s <= 0 or cfg["n_batches"] <= 0:
        raise UserError(f"s and n_batches must be positive (got s={s}, n_batches={cfg['n_batches']})")
    if c <= 0 or tau <= 0 or cfg["tau_pub"] <= 0:
        raise UserError(f"c, tau and tau_pub must be positive (got c={c}, tau={tau}, tau_pub={cfg['tau_pub']})")
    if cfg["svt"] and sigma <= 0:
        raise UserError(f"sigma must be positive with svt=True (got {sigma})")
    if not 0 < delta < 1:
        raise UserError(f"delta must be in (0, 1), got {delta}")
    if cfg["max_batch_size"] < 0:
        raise UserError(f"max_batch_size must be >= 0, got {cfg['max_batch_size']}")
    capped = cfg["max_batch_size"] > 0
    per_token = rho_per_private_token(s, c, tau, sigma, cfg["svt"], capped)
    if (cfg["epsilon"] > 0) == (cfg["r"] > 0):
        raise UserError("set exactly one of --epsilon (r is solved from it) or --r (epsilon is computed), "
                        f"got epsilon={cfg['epsilon']}, r={cfg['r']}")
    if cfg["epsilon"] > 0:
        r = int(max_rho_for_epsilon(cfg["epsilon"], delta) / per_token)
        while r > 0 and zcdp_to_epsilon(r * per_token, delta) > cfg["epsilon"]:  # float rounding
            r -= 1
        if r < 1:
            raise UserError(f"epsilon={cfg['epsilon']} does not pay for one private token "
                            f"(rho {per_token:.3g} each): raise epsilon, s or tau, or lower c"
                            + (" or use a larger sigma" if cfg["svt"] else ""))
    else:
        r = cfg["r"]
    rho = r * per_token
    return {
        "epsilon": zcdp_to_epsilon(rho, delta),
        "delta": delta,
        "rho": rho,
        "rho_per_private_token": per_token,
        "epsilon_target": cfg["epsilon"] or None,
        "epsilon_simple_conversion": zcdp_to_epsilon_simple(rho, delta),
        "conversion": "zCDP -> (eps, delta): Canonne, Kamath, Steinke 2020 (arXiv:2004.00010v4, Prop. 12)",
        "r": r, "s": s, "c": c, "tau": tau, "svt": cfg["svt"],
        "sigma": sigma if cfg["svt"] else None, "theta": cfg["theta"] if cfg["svt"] else None,
        "tau_pub": cfg["tau_pub"] if cfg["svt"] else None,
        "public_top_k": cfg["public_top_k"],
        "adjacency": "add/remove one record (one person); one record sits in exactly one prompt",
        "composition": "adaptive composition over the <= r private tokens of a batch; parallel composition "
                       "over disjoint batches",
        "batching": {
            "rule": "batch = int(HMAC-SHA256(key=salt, msg=len(label)||label||text)[:8]) mod n_batches",
            "n_batches": cfg["n_batches"], "salt": cfg["batch_salt"], "label": cfg["label"],
            "max_batch_size": cfg["max_batch_size"] or None,
            "truncation": ("a batch over max_batch_size keeps the records with the smallest HMAC order key; "
                           "neighbouring batches then differ by a swap, so sensitivities are doubled (rho x4)")
            if capped else "none: every record of a batch is used",
        },
        "aggregate": "sum of recentred clipped logits divided by the expected batch size s",
    }


# ----------------------------------------------------------------------------- the mechanism
def clip_recentered(z, c):
    """clip_c(z)_i = max(-c, z_i - max_j z_j + c): the top logit becomes c, all lie in [-c, c]."""
    return (z - (z.amax(dim=-1, keepdim=True) - c)).clamp_(min=-c)  # one new tensor: rows are ~50k wide


def aggregate(Z, c, s):
    """z_bar = (1/s) * sum of clipped rows of Z (n, V); s is the expected batch size, not n."""
    return clip_recentered(Z.float(), c).sum(0) / s


def svt_distance(Z, z_pub, s):
    """|| sum softmax(Z) / s - softmax(z_pub) ||_1: one added row moves it by at most 1/s."""
    return (F.softmax(Z.float(), -1).sum(0) / s - F.softmax(z_pub.float(), -1)).abs().sum()


def private_log_probs(z_bar, tau, allowed=None):
    """log softmax(z_bar / tau), restricted to `allowed` (a mask from public logits only) if given."""
    z = z_bar / tau
    if allowed is not None:
        z = z.masked_fill(~allowed, float("-inf"))
    return F.log_softmax(z, -1)


def laplace(scale, generator):
    """Lap(scale) as the difference of two Exp(1) draws from `generator`."""
    e = torch.empty(2, dtype=torch.float64).exponential_(generator=generator)
    return float(scale * (e[0] - e[1]))


@dataclass
class Mechanism:
    s: float
    c: float
    tau: float
    svt: bool
    sigma: float
    theta: float
    tau_pub: float
    public_top_k: int = 0

    @classmethod
    def from_config(cls, cfg):
        return cls(cfg["s"], cfg["c"], cfg["tau"], cfg["svt"], cfg["sigma"], cfg["theta"], cfg["tau_pub"],
                   cfg["public_top_k"])

    def noisy_threshold(self, gen):
        return self.theta + laplace(self.sigma, gen)

    def wants_private(self, Z, z_pub, threshold, gen):
        """The SVT query: is the private aggregate far from the public prediction?"""
        d = float(svt_distance(Z, z_pub, self.s))
        return d + laplace(2 * self.sigma, gen) >= threshold

    def private_token(self, Z, z_pub, gen):
        allowed = None
        if self.public_top_k > 0:  # a mask from the public logits only: data-independent
            k = min(self.public_top_k, z_pub.numel())
            allowed = torch.zeros_like(z_pub, dtype=torch.bool).scatter_(0, z_pub.topk(k).indices, True)
        logp = private_log_probs(aggregate(Z, self.c, self.s), self.tau, allowed)
        return int(torch.multinomial(logp.exp().double().cpu(), 1, generator=gen))

    def public_token(self, z_pub, gen):
        return int(torch.multinomial(F.softmax(z_pub.double().cpu() / self.tau_pub, -1), 1, generator=gen))


# ----------------------------------------------------------------------------- batching
def _hmac(salt, label, text, purpose=b""):
    lab = label.encode()
    msg = purpose + len(lab).to_bytes(8, "big") + lab + text.encode()
    return int.from_bytes(hmac.new(salt.encode(), msg, hashlib.sha256).digest()[:8], "big")


def batch_of(text, label, salt, n_batches):
    """A record's batch: depends on that record (and the public salt, label, n_batches) only."""
    return _hmac(salt, label, text) % n_batches


def assign_batches(texts, label, salt, n_batches, max_batch_size=0):
    """Record indices per batch (each batch in HMAC order-key order). With max_batch_size > 0 a
    full batch keeps its records with the smallest order keys. Returns (batches, n_dropped)."""
    batches = [[] for _ in range(n_batches)]
    for i, t in enumerate(texts):
        batches[batch_of(t, label, salt, n_batches)].append(i)
    dropped = 0
    for b in batches:
        b.sort(key=lambda i: (_hmac(salt, label, texts[i], b"order\0"), texts[i]))
        if max_batch_size and len(b) > max_batch_size:
            dropped += len(b) - max_batch_size
            del b[max_batch_size:]
    return batches, dropped


# ----------------------------------------------------------------------------- prompts and decoding
def encode_template(template, tok, record_ids=()):
    """Token ids of a template: literal text, `{record}` (the record's tokens), `{eot}` (end-of-text)."""
    ids = []
    for part in re.split(r"(\{record\}|\{eot\})", template):
        if part == "{record}":
            ids += list(record_ids)
        elif part == "{eot}":
            ids.append(tok.eot)
        elif part:
            ids += tok.encode(part)
    return ids


class BatchDecoder:
    """Logits of a batch of left-padded prompts that all continue with the same generated tokens.
    With the KV cache the prompts are prefilled once; reset() truncates the cache back to them.
    Without it every step recomputes the whole context (nanoGPT's way; for checks and benchmarks)."""

    def __init__(self, model, prompts, max_new_tokens, use_kv_cache=True):
        self.model, self.use_kv_cache = model, use_kv_cache
        device = model.lm_head.weight.device
        B, P = len(prompts), max(len(p) for p in prompts)
        if P + max_new_tokens > model.config.block_size:
            raise UserError(f"prompt ({P} tokens) + max_new_tokens ({max_new_tokens}) exceed the model's "
                            f"block_size {model.config.block_size}")
        self.idx = torch.zeros(B, P + max_new_tokens, dtype=torch.long, device=device)
        self.mask = torch.ones(B, P + max_new_tokens, dtype=torch.bool, device=device)
        for i, p in enumerate(prompts):
            self.idx[i, P - len(p):P] = torch.tensor(p, dtype=torch.long)
            self.mask[i, :P - len(p)] = False
        self.P, self.n = P, 0
        self.cache, self.first_logits = None, None
        if use_kv_cache:
            self.cache = model.new_cache(B, max_len=P + max_new_tokens)
            self.first_logits = self._forward(0, P)

    @torch.no_grad()
    def _forward(self, start, end):
        logits, _ = self.model(self.idx[:, start:end], attention_mask=self.mask[:, :end], cache=self.cache,
                               last_only=True)
        return logits[:, -1].float()

    def reset(self):
        """Back to the prompts alone; the logits for the first generated token."""
        self.n = 0
        if self.cache is None:
            return self._forward(0, self.P)
        self.cache.truncate(self.P)
        return self.first_logits

    def step(self, token):
        """Append `token` to every row; the logits for the next one."""
        pos = self.P + self.n
        self.idx[:, pos] = token
        self.n += 1
        return self._forward(pos, pos + 1) if self.cache is not None else self._forward(0, pos + 1)


def synthesize_batch(decoder, n_private, mech, r, gen, eot, max_new_tokens, max_examples, vocab):
    """Synthetic examples from one batch until r private tokens are spent or max_examples are tried.
    Rows 0..n_private-1 of the decoder are private prompts, row n_private the public one.
    Returns (examples, private_tokens_spent); each example is a dict with its tokens and counts."""
    examples, spent = [], 0
    threshold = mech.noisy_threshold(gen) if mech.svt else None
    while spent < r and len(examples) < max_examples:
        logits, toks, n_priv, finished = decoder.reset(), [], 0, False
        for _ in range(max_new_tokens):
            Z, z_pub = logits[:n_private, :vocab], logits[n_private, :vocab]
            if not mech.svt or mech.wants_private(Z, z_pub, threshold, gen):
                tok = mech.private_token(Z, z_pub, gen)
                spent, n_priv = spent + 1, n_priv + 1
                if mech.svt:
                    threshold = mech.noisy_threshold(gen)
            else:
                tok = mech.public_token(z_pub, gen)
            if tok == eot:
                finished = True
                break
            toks.append(tok)
            if spent >= r:  # the budget is spent: the SVT halts, no more private queries
                break
            logits = decoder.step(tok)
        examples.append({"tokens": toks, "finished": finished, "private_tokens": n_priv,
                         "public_tokens": len(toks) + finished - n_priv})
    return examples, spent


def make_generator(seed):
    """A CPU torch.Generator, seeded from the OS CSPRNG unless a seed >= 0 is given."""
    gen = torch.Generator()
    gen.manual_seed(secrets.randbits(63) if seed < 0 else seed)
    return gen


# ----------------------------------------------------------------------------- the whole run
def load_records(data_dir, split, block_size):
    """(texts, token lists without the trailing end-of-text, tokenizer, meta)."""
    meta = load_meta(data_dir)
    ds = RecordDataset(data_dir, split, block_size, meta=meta)
    tok = get_tokenizer(meta)
    recs = []
    for i in range(len(ds)):
        ids = ds.record(i).tolist()
        recs.append(ids[:-1] if ids and ids[-1] == tok.eot else ids)
    return [tok.decode(ids) for ids in recs], recs, tok, meta


def synthesize(cfg, model=None, log=print):
    """Run the mechanism. Returns {"examples": [dict], "privacy": report dict}. Nothing is written."""
    cfg = {**DEFAULTS, **cfg}
    privacy = privacy_budget(cfg)  # before any data is read
    if not cfg["batch_salt"]:
        cfg["batch_salt"] = privacy["batching"]["salt"] = secrets.token_hex(16)
    if cfg["max_new_tokens"] <= 0 or cfg["max_examples_per_batch"] <= 0:
        raise UserError("max_new_tokens and max_examples_per_batch must be positive")
    if "{record}" not in cfg["prompt_template"]:
        raise UserError("prompt_template must contain {record}")
    if "{record}" in cfg["public_prompt"]:
        raise UserError("public_prompt must not contain {record}: it is the prompt without any record")
    log(f"privacy: epsilon={privacy['epsilon']:.4g} delta={privacy['delta']:.3g} rho={privacy['rho']:.4g} "
        f"r={privacy['r']} private tokens per batch (rho {privacy['rho_per_private_token']:.3g} each)")
    if model is None:
        model, ckpt = load_model(cfg["ckpt"], cfg["device"])
        seen = str((ckpt.get("config") or {}).get("data_dir") or (ckpt.get("config") or {}).get("dataset") or "")
        if seen and os.path.basename(os.path.normpath(seen)) == os.path.basename(os.path.normpath(cfg["data_dir"])):
            log(f"warning: {cfg['ckpt']} was trained on '{seen}'; the guarantee covers only the prompts, "
                "not what the model memorised in training")
    model.eval()
    block_size = model.config.block_size
    texts, recs, tok, meta = load_records(cfg["data_dir"], cfg["split"], block_size)
    if meta["vocab_size"] > model.config.vocab_size:
        raise UserError(f"the data's vocabulary ({meta['vocab_size']}) is larger than the model's "
                        f"({model.config.vocab_size}): use a checkpoint trained with this tokenizer")
    vocab = tok.vocab_size  # sampling never picks the model's padding ids
    public_ids = encode_template(cfg["public_prompt"], tok) or [tok.eot]
    overhead = len(encode_template(cfg["prompt_template"], tok))
    record_budget = block_size - cfg["max_new_tokens"] - overhead
    if record_budget <= 0 or len(public_ids) + cfg["max_new_tokens"] > block_size:
        raise UserError(f"max_new_tokens={cfg['max_new_tokens']} leaves no room for the prompts in "
                        f"block_size {block_size}: lower it")
    n_cut = sum(len(ids) > record_budget for ids in recs)
    batches, n_dropped = assign_batches(texts, cfg["label"], cfg["batch_salt"], cfg["n_batches"],
                                        cfg["max_batch_size"])
    sizes = [len(b) for b in batches]
    if cfg["delta"] >= 1 / len(texts):
        log(f"warning: delta={cfg['delta']:.3g} is not below 1/N = {1 / len(texts):.3g}: the guarantee allows "
            "releasing a whole record; use a smaller delta")
    if cfg["seed"] >= 0:
        log(f"warning: seed={cfg['seed']} fixes the noise; whoever knows it can replay the sampling "
            "(keep the default -1 for a release)")
    log(f"{len(texts)} records in {cfg['n_batches']} batches (sizes {min(sizes)}..{max(sizes)}, mean "
        f"{np.mean(sizes):.1f}, s={cfg['s']}); {n_cut} records cut to {record_budget} tokens; "
        f"{n_dropped} dropped by max_batch_size")
    mech, gen = Mechanism.from_config(cfg), make_generator(cfg["seed"])
    examples, t0 = [], time.time()
    for b, members in enumerate(batches):  # empty batches run too: skipping them would reveal they are empty
        prompts = [encode_template(cfg["prompt_template"], tok, recs[i][:record_budget]) for i in members]
        decoder = BatchDecoder(model, prompts + [public_ids], cfg["max_new_tokens"], cfg["use_kv_cache"])
        found, spent = synthesize_batch(decoder, len(prompts), mech, privacy["r"], gen, tok.eot,
                                        cfg["max_new_tokens"], cfg["max_examples_per_batch"], vocab)
        assert spent <= privacy["r"]
        for ex in found:
            examples.append({"text": tok.decode(ex["tokens"]), "batch": b, **{k: v for k, v in ex.items()
                                                                              if k != "tokens"}})
        log(f"batch {b + 1}/{cfg['n_batches']}: {len(found)} examples, {spent} private tokens")
    dt = time.time() - t0
    n_priv = sum(e["private_tokens"] for e in examples)
    n_pub = sum(e["public_tokens"] for e in examples)
    kept = [e for e in examples if e["finished"] or cfg["keep_unfinished"]]
    # Only counts read off the released output go into the report; batch sizes and timings depend on
    # the data without noise, so they are logged for the operator and never written.
    privacy["diagnostics"] = {
        "note": "realised counts read off the output (the SVT's answers); not parameters of the guarantee",
        "examples": len(examples), "examples_kept": len(kept), "private_tokens": n_priv,
        "public_tokens": n_pub, "private_share": n_priv / max(1, n_priv + n_pub),
        "seed": "fixed by the config (noise reproducible by whoever knows it)" if cfg["seed"] >= 0
        else "OS CSPRNG",
    }
    log(f"{len(kept)} synthetic examples kept of {len(examples)}; {n_priv} private + {n_pub} public tokens "
        f"({privacy['diagnostics']['private_share']:.0%} private) in {dt:.1f}s, "
        f"{(n_priv + n_pub) / max(dt, 1e-9):.0f} tokens/s")
    return {"examples": kept, "privacy": privacy}


# ----------------------------------------------------------------------------- utility check
def _record_dataset(folder, meta, train, val):
    from utils.data import write_meta, write_split
    splits = {}
    for split, recs in (("train", train), ("val", val)):
        n_tok, n_rec = write_split(folder, split, recs, meta["vocab_size"])
        splits[split] = {"tokens": n_tok, "records": n_rec}
    write_meta(folder, {**meta, "splits": splits})


def utility_check(cfg, texts, log=print):
    """Fine-tune the base checkpoint non-privately on the synthetic records and, separately, on as many
    real train records, and score the base and both models on the real validation split: perplexity and,
    where the data has {val}_people.jsonl (employees), held-out field accuracy. The real records only
    pass through a temporary folder, removed afterwards. NOT differentially private: for the operator."""
    import tempfile

    from utils import finetune as ft_loop
    from test_pipeline import eval as ev

    meta = load_meta(cfg["data_dir"])
    tok = get_tokenizer(meta)
    synthetic = [tok.encode(t) + [tok.eot] for t in texts if t.strip()]
    if not synthetic:
        raise UserError("the utility check needs at least one non-empty synthetic record")
    real_train = RecordDataset(cfg["data_dir"], cfg["split"], 1, meta=meta)
    pick = np.random.default_rng(0).permutation(len(real_train))[:len(synthetic)]
    real = [real_train.record(int(i)).tolist() for i in sorted(pick)]
    val = [r.tolist() for r in ev.split_records(cfg["data_dir"], "val")]
    people = employees.load_people(cfg["data_dir"], "val")[:50] \
        if os.path.isfile(os.path.join(cfg["data_dir"], "val_people.jsonl")) else None
    fields = meta.get("fields")  # the fields the records ask about (employees' --fields)

    def score(model):
        model.eval()
        out = {"val_ppl": ev.perplexity(model, val)["ppl"]}
        if people:
            qa = ev.qa_accuracy(ev.make_completer(model, tok, 32), people, fields)
            out["field_accuracy"] = qa["exact_match"]
        return out

    results = {"base": score(load_model(cfg["ckpt"], cfg["device"])[0])}
    for name, train in (("synthetic", synthetic), ("real", real)):
        with tempfile.TemporaryDirectory(prefix="synth_utility_") as folder:
            _record_dataset(folder, meta, train, val)
            log(f"utility: fine-tuning on {len(train)} {name} records for {cfg['utility_steps']} steps ...")
            batch = min(cfg["utility_batch_size"], len(train))
            run = ft_loop.finetune({
                "base_ckpt": cfg["ckpt"], "data_dir": folder, "save": False, "dp": False, "sampling": "shuffle",
                "max_steps": cfg["utility_steps"], "batch_size": batch,
                "microbatch_size": batch, "learning_rate": cfg["utility_learning_rate"],
                "eval_interval": 0, "device": cfg["device"], "seed": 0}, log=lambda *a, **k: None)
            results[name] = {"train_records": len(train), **score(run["model"])}
    rows = [f"{k:10s} val ppl {v['val_ppl']:8.3f}" + (f"  field accuracy {v['field_accuracy']:.3f}"
                                                      if "field_accuracy" in v else "") for k, v in results.items()]
    log("utility on the real val split (base / tuned on synthetic / tuned on as many real records):\n  "
        + "\n  ".join(rows))
    return {"note": "computed on real records without privacy: for the operator, not for release",
            "steps": cfg["utility_steps"], "val_records": len(val), "qa_people": len(people or []), **results}


def report_path(cfg):
    return cfg["report"] or os.path.splitext(cfg["out"])[0] + ".privacy.json"


def main(argv=None):
    cfg = configure(DEFAULTS, argv or [])
    result = synthesize(cfg)
    privacy = result["privacy"]
    lines = "".join(json.dumps({"text": e["text"], "batch": e["batch"], "private_tokens": e["private_tokens"],
                                "public_tokens": e["public_tokens"]}) + "\n" for e in result["examples"])
    write_bytes(cfg["out"], lines.encode())
    write_json(report_path(cfg), privacy)
    print(f"wrote {len(result['examples'])} synthetic records to {cfg['out']} and the privacy report to "
          f"{report_path(cfg)} (epsilon={privacy['epsilon']:.4g}, delta={privacy['delta']:.3g})")
    if cfg["utility_check"]:
        result["utility"] = utility_check(cfg, [e["text"] for e in result["examples"]])
        path = os.path.splitext(cfg["out"])[0] + ".utility.json"
        write_json(path, result["utility"])
        print(f"wrote the utility check to {path} (not private: keep it with the real data)")
    return result


if __name__ == "__main__":
    run_cli(main)
