"""
Canary exposure (Carlini et al. 2019, "The Secret Sharer"): how much more likely a model finds a planted
secret than other secrets of the same format.

Each planted secret in canaries.json is ranked by its log-likelihood after its prefix among n_candidates
random secrets of the same format (never the secret itself): exposure = log2(n_candidates + 1) - log2(rank),
with a rank-based interval from the exact rank. The candidates share the prefix, so it runs once into a KV
cache and the candidates are scored in batches. A skew-normal fitted to the candidates' log-perplexities
extrapolates beyond the enumerated set: exposure = -log2 CDF(secret), capped at log2 of the whole secret
space (a fitted model, not a measurement). Canaries with repetitions = 0 are controls that were never
inserted, whose exposure is chance (mean 1/ln 2 = 1.44 bits). With a BPE tokenizer, digit strings split
into different numbers of tokens and the shorter ones are likelier under any model, so compare inserted
canaries with the controls and with the base model, not only with 1.44.
"""
import json
import math

import numpy as np
from scipy.stats import skewnorm

from utils.model_under_test import complete, continuation_logprobs
from utils.audit_bounds import clopper_pearson
from utils.cli import UserError
from utils.progress import Progress


CHANCE_EXPOSURE = 1 / math.log(2)  # E[-log2 U] for a uniform rank: what an unseen secret gets


def chance_gap_sd(n_inserted, n_controls):
    """Standard deviation of (mean exposure of n_inserted canaries - mean of n_controls controls) when
    the model learned nothing: -log2 U is exponential with sd 1/ln 2, so the gap's sd is
    (1/ln 2) sqrt(1/n_inserted + 1/n_controls). A gap is evidence of memorization only well above it."""
    return CHANCE_EXPOSURE * math.sqrt(1 / n_inserted + 1 / n_controls)


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
