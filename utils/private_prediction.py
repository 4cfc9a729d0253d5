"""
Private prediction (Amin et al. 2024, "Private prediction for large-scale synthetic text generation"):
the mechanism, its accounting, the disjoint batching and the KV-cached batch decoder that
synthesize_dp.py runs. Nothing here reads records; the accounting depends on the configuration alone.

Per batch of records (each record in its own prompt, plus one public prompt that holds no record):
- Each step: clip each private logit vector with recentering, clip_c(z)_i = max(-c, z_i - max z + c),
  sum, divide by the *expected* batch size s (never the actual size), sample from softmax(z_bar / tau):
  an exponential mechanism whose log-probabilities move by at most 2c/(s tau) between neighbours.
- A mask of allowed tokens computed from public information only (the public logits' top k, or a
  value grammar: which tokens can continue a field value) is applied to every row *before* clipping:
  each row still lies in [-c, c]^V, so the bounds are unchanged, and the clip is centred on the best
  allowed token instead of one the mask removes anyway. A step with one allowed token is free.
- Sparse vector (svt=True): d = ||sum softmax(Z)/s - softmax(z_pub)||_1 (sensitivity 1/s); if
  d + Lap(2 sigma) >= theta + Lap(sigma) the token is private (and the threshold is redrawn), otherwise
  it is drawn from softmax(z_pub / tau_pub) and costs nothing. At most r private tokens per batch.
- Released tables (release_share > 0, structured records): the leading categorical fields' joint is not
  voted on record by record but released once per batch: each private row's probability vector over the
  fields' value combinations (it sums to 1, so one person moves the sum by at most 1 in L2), summed,
  plus N(0, sigma_rel^2) per cell, a Gaussian mechanism of rho_rel = 1 / (2 sigma_rel^2) (x4 capped).
  Every record of the batch then draws those fields from it, as post-processing: a query asked 50
  times with the same answer distribution is asked once. A numeric field in release_bands gets a table
  of its own the same way (each row one-hot: L2 1). The budget gives release_share of the batch's rho
  to the tables, split evenly, and the rest to the r private tokens; release_share = 1 leaves r = 0,
  for records whose every field is released.
- Accounting: rho = r (1/2 (c/(s tau))^2 + 2/(s sigma)^2) [+ tables x rho_rel] zCDP per batch (no SVT term without SVT);
  the batches are disjoint, so by parallel composition that is also the whole run's rho; converted to
  (epsilon, delta) with Canonne, Kamath & Steinke 2020 (Prop. 12 of arXiv:2004.00010v4). With
  max_batch_size > 0 a full batch keeps its records with the smallest HMAC order key, so adding one
  record can swap another out: the sensitivities double and rho is 4x (accounted for).
- Batches are disjoint: a record's batch is HMAC-SHA256(salt, label, text) mod n_batches, with
  n_batches fixed by the config, so it depends on that record only.
"""
import hashlib
import hmac
import math
import re
import secrets
from dataclasses import dataclass

import numpy as np
import torch
from torch.nn import functional as F

from utils.cli import UserError


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


def release_sigma(rho_release, capped=False):
    """Noise (per cell, in counts) of the released joint: the sum of the rows' probability vectors moves
    by at most 1 in L2 when one person is added or removed (2 when a batch cap can swap one out), and a
    Gaussian mechanism with sensitivity k and noise sigma is k^2 / (2 sigma^2)-zCDP."""
    return (2.0 if capped else 1.0) / math.sqrt(2.0 * rho_release)


def release_tables(cfg):
    """How many tables a batch releases: the categorical joint, and one per release_bands field."""
    return 1 + len(cfg.get("release_bands") or {}) if cfg.get("release_share", 0.0) > 0 else 0


def split_rho(cfg):
    """(rho for the r private tokens, rho for the released tables, all of them): the epsilon's rho,
    release_share of it to the tables. Without --epsilon (an explicit r) there is nothing to split: (None, 0)."""
    if cfg["epsilon"] <= 0:
        return None, 0.0
    share = cfg.get("release_share", 0.0)
    rho = max_rho_for_epsilon(cfg["epsilon"], cfg["delta"])
    return rho * (1.0 - share), rho * share


def planned_tau(cfg, private_tokens):
    """The sharpest tau (>= 2c / sharpness) whose budget at cfg's epsilon pays for `private_tokens` per
    batch, a count the plan takes from the config and the public drafter alone (never the records). A
    private token costs (c/(s tau))^2/2 (+ the SVT's 2/(s sigma)^2), so tau = c / (s sqrt(2 rho_token)).
    Why a floor: with records the model copies, a batch's vote puts log-odds (2c/tau) (f_a - f_b) between
    values held by fractions f_a, f_b, i.e. p ~ exp(2c f / tau), not p ~ f; past 2c/tau ~ 6 the output
    collapses onto the mode, so an abundant budget buys records, not sharpness. None if the SVT alone
    spends the budget."""
    k = 2.0 if cfg["max_batch_size"] > 0 else 1.0
    rho = split_rho(cfg)[0] / max(private_tokens, 1e-9)
    if cfg["svt"]:
        rho -= 2.0 * (k / (cfg["s"] * cfg["sigma"])) ** 2
    if rho <= 0:
        return None
    return max(2.0 * cfg["c"] / cfg["sharpness"], k * cfg["c"] / (cfg["s"] * math.sqrt(2.0 * rho)))


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
    share = cfg.get("release_share", 0.0)
    if not 0 <= share <= 1 or (share > 0 and cfg["epsilon"] <= 0):
        raise UserError(f"release_share must be in [0, 1] and needs --epsilon (it is a share of its rho), got {share}")
    if cfg.get("release_bands") and share == 0:
        raise UserError("release_bands are released tables: they need a release_share > 0")
    rho_tokens, rho_release = split_rho(cfg)
    tables = release_tables(cfg)
    if cfg["epsilon"] > 0:
        r = int(rho_tokens / per_token)
        while r > 0 and zcdp_to_epsilon(r * per_token + rho_release, delta) > cfg["epsilon"]:  # float rounding
            r -= 1
        if r < 1 and share < 1:  # share 1: every field released, no token to pay for
            raise UserError(f"epsilon={cfg['epsilon']} does not pay for one private token "
                            f"(rho {per_token:.3g} each): raise epsilon, s or tau, or lower c"
                            + (" or use a larger sigma" if cfg["svt"] else "")
                            + (" or a smaller release_share" if share > 0 else ""))
    else:
        r = cfg["r"]
    rho = r * per_token + rho_release
    release = None if share == 0 else {
        "share": share, "rho": rho_release, "tables": tables, "rho_per_table": rho_release / tables,
        "sigma": release_sigma(rho_release / tables, capped), "sensitivity": 2.0 if capped else 1.0,
        "mechanism": "Gaussian on the sum of the private rows' "
                     + ("one-hot vectors of their own values" if cfg.get("release_from") == "records" else
                        "probability vectors (the drafter's)")
                     + " over the leading categorical fields' value combinations (each sums to 1: L2 sensitivity "
                     "1), once per batch"
                     + ("; the same per release_bands field, on each row's one-hot (given values, band of its "
                        "value) read off its record" if tables > 1 else "")}
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
        "composition": "adaptive composition over the <= r private tokens of a batch (and its released tables); "
                       "parallel composition over disjoint batches",
        "release": release,
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


def masked(z, allowed):
    """z with the tokens outside `allowed` (a public mask; None = all) set to -inf."""
    return z if allowed is None else z.masked_fill(~allowed, float("-inf"))


def aggregate(Z, c, s, allowed=None):
    """z_bar = (1/s) * sum of the clipped, masked rows of Z (n, V); s is the expected batch size, not n.
    A masked token clips to -c in every row, so each row stays in [-c, c]^V."""
    return clip_recentered(masked(Z.float(), allowed), c).sum(0) / s


def svt_distance(Z, z_pub, s, allowed=None):
    """|| sum softmax(Z) / s - softmax(z_pub) ||_1 over the allowed tokens: one added row moves it by at
    most 1/s (each row is a probability vector)."""
    return (F.softmax(masked(Z.float(), allowed), -1).sum(0) / s
            - F.softmax(masked(z_pub.float(), allowed), -1)).abs().sum()


def private_log_probs(z_bar, tau, allowed=None):
    """log softmax(z_bar / tau), restricted to `allowed` (a mask from public information only) if given."""
    return F.log_softmax(masked(z_bar / tau, allowed), -1)


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
    threshold: float = None  # the SVT's current noisy threshold (start() draws it)

    @classmethod
    def from_config(cls, cfg):
        return cls(cfg["s"], cfg["c"], cfg["tau"], cfg["svt"], cfg["sigma"], cfg["theta"], cfg["tau_pub"],
                   cfg["public_top_k"])

    def noisy_threshold(self, gen):
        return self.theta + laplace(self.sigma, gen)

    def start(self, gen):
        """A new batch: a fresh noisy SVT threshold."""
        self.threshold = self.noisy_threshold(gen) if self.svt else None

    def wants_private(self, Z, z_pub, gen, allowed=None):
        """The SVT query: is the private aggregate far from the public prediction?"""
        d = float(svt_distance(Z, z_pub, self.s, allowed))
        return d + laplace(2 * self.sigma, gen) >= self.threshold

    def restrict(self, z_pub, allowed=None):
        """`allowed` narrowed to the public logits' top k (public_top_k > 0): data-independent."""
        if self.public_top_k <= 0:
            return allowed
        k = min(self.public_top_k, z_pub.numel() if allowed is None else int(allowed.sum()))
        top = torch.zeros_like(z_pub, dtype=torch.bool).scatter_(0, masked(z_pub, allowed).topk(k).indices, True)
        return top if allowed is None else top & allowed

    def private_token(self, Z, z_pub, gen, allowed=None, tau=None):
        """A token from softmax(z_bar / tau); a `tau` below the accounted self.tau is never used."""
        allowed = self.restrict(z_pub, allowed)
        tau = self.tau if tau is None else max(self.tau, tau)
        logp = private_log_probs(aggregate(Z, self.c, self.s, allowed), tau, allowed)
        return int(torch.multinomial(logp.exp().double().cpu(), 1, generator=gen))

    def public_token(self, z_pub, gen, allowed=None):
        probs = F.softmax(masked(z_pub.double().cpu(), None if allowed is None else allowed.cpu()) / self.tau_pub, -1)
        return int(torch.multinomial(probs, 1, generator=gen))

    def choose(self, Z, z_pub, gen, allowed=None, tau=None):
        """(token, private?): with SVT a token the public drafter predicts well enough is public and free;
        a private one spends one of the batch's r (and redraws the threshold). `tau`: see private_token."""
        if self.svt and not self.wants_private(Z, z_pub, gen, allowed):
            return self.public_token(z_pub, gen, allowed), False
        token = self.private_token(Z, z_pub, gen, allowed, tau)
        if self.svt:
            self.threshold = self.noisy_threshold(gen)
        return token, True


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
        return self.extend([token])

    def peek(self, tokens):
        """The logits after `tokens` (the same for every row), the decoder left as it was."""
        n = self.n
        logits = self.extend(tokens)
        self.rewind(n)
        return logits

    def rewind(self, n):
        """Back to the first `n` generated tokens (the cache forgets the rest)."""
        self.n = n
        if self.cache is not None:
            self.cache.truncate(self.P + n)

    def extend(self, tokens):
        """Append `tokens` (the same for every row, e.g. a field label) in one forward; the next logits."""
        pos, k = self.P + self.n, len(tokens)
        if pos + k > self.idx.size(1):
            raise ValueError(f"the decoder holds {self.idx.size(1) - self.P} new tokens, asked for {self.n + k}")
        self.idx[:, pos:pos + k] = torch.tensor(tokens, dtype=torch.long)
        self.n += k
        return self._forward(pos, pos + k) if self.cache is not None else self._forward(0, pos + k)


def synthesize_batch(decoder, n_private, mech, r, gen, eot, max_new_tokens, max_examples, vocab):
    """Free-text examples from one batch until r private tokens are spent or max_examples are tried.
    Rows 0..n_private-1 of the decoder are private prompts, row n_private the public one.
    Returns (examples, private_tokens_spent); each example is a dict with its tokens and counts."""
    examples, spent = [], 0
    mech.start(gen)
    while spent < r and len(examples) < max_examples:
        logits, toks, n_priv, finished = decoder.reset(), [], 0, False
        for _ in range(max_new_tokens):
            tok, private = mech.choose(logits[:n_private, :vocab], logits[n_private, :vocab], gen)
            spent, n_priv = spent + private, n_priv + private
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


