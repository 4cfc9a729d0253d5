"""
Epsilon lower bounds from a one-run audit's guesses, and the rates a membership attack reaches.

An audit has m canaries, each included in the run with probability 1/2; after the run the auditor
guesses "in" for some canaries and "out" for others (r guesses, v correct) from scores alone. Two
estimators turn (m, r, v) into "the run is not (eps, delta)-DP" at a chosen confidence:

- steinke_epsilon: Steinke, Nasr & Jagielski 2023, "Privacy Auditing with One (1) Training Run"
  (arXiv 2305.08846), Theorem 3.3: under (eps, delta)-DP, v is dominated by Binomial(r, e^eps/(1+e^eps))
  up to a delta term. Valid for ANY (eps, delta)-DP mechanism.
- fdp_epsilon: Mahloujifar, Melis & Chaudhuri 2024, "Auditing f-Differential Privacy in One Run"
  (arXiv 2410.22235), the recursive bound on the chance of v correct guesses under an f-DP mechanism
  (their Algorithm 'audit_rh' with the cap), with f the tradeoff curve of the Gaussian mechanism that is
  exactly (eps, delta)-DP. It is tighter than Steinke's bound for the same guesses, but it assumes the
  run is at least as private as that Gaussian mechanism: exact for full-batch DP-SGD (a composition of
  Gaussian mechanisms is Gaussian, Dong, Roth & Su 2019), a central-limit approximation under Poisson
  subsampling. The estimator's definition follows jax_privacy's auditing.py (epsilon_one_run_fdp).

Guesses are made for the k highest scores ("in") and the k lowest ("out"). The best k is searched over a
fixed grid with a Bonferroni correction (confidence spread over the grid), so the search costs validity
nothing. Rates: roc_auc (Mann-Whitney, ties count 1/2), tpr_at_fpr (the largest TPR at a threshold whose
empirical FPR is at most the target: conservative, no interpolation), clopper_pearson (exact binomial
interval).
"""
import math

import numpy as np
from scipy.optimize import brentq
from scipy.special import expit, ndtr, ndtri
from scipy.stats import beta, binom, norm, rankdata

K_FRACTIONS = (0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5)  # guesses per side, as fractions of m


# ---------------------------------------------------------------- Steinke, Nasr & Jagielski 2023
def steinke_p_value(eps, r, v, m, delta=0.0):
    """P-value of "the run is (eps, delta)-DP" after v correct out of r guesses on m canaries."""
    if not 0 <= v <= r <= m:
        raise ValueError(f"need 0 <= v <= r <= m, got v={v}, r={r}, m={m}")
    q = expit(eps)  # accuracy of eps-DP randomized response
    p = float(binom.sf(v - 1, r, q))  # P[Binomial(r, q) >= v]
    if delta > 0 and v > 0:
        below = np.cumsum(binom.pmf(np.arange(v - 1, -1, -1), r, q))  # P[v - i <= B < v], i = 1..v
        p += 2 * m * delta * float(np.max(below / np.arange(1, v + 1)))
    return min(p, 1.0)


def _largest_rejected(p_value, alpha):
    """The largest eps >= 0 with p_value(eps) <= alpha (p grows with eps); 0 when none is rejected."""
    if p_value(0.0) > alpha:
        return 0.0
    hi = 1.0
    while p_value(hi) <= alpha:
        hi *= 2
        if hi > 1e3:
            return math.inf
    return brentq(lambda e: p_value(e) - alpha - 1e-15, 0.0, hi, xtol=1e-5)


def steinke_epsilon(r, v, m, delta=0.0, confidence=0.95):
    """Steinke et al.'s lower bound: the largest eps rejected at `confidence` (0 if none)."""
    _check_confidence(confidence)
    if r == 0:
        return 0.0
    return _largest_rejected(lambda e: steinke_p_value(e, r, v, m, delta), 1 - confidence)


# ---------------------------------------------------------------- Mahloujifar et al. 2024 (f-DP)
def gaussian_delta(eps, mu):
    """delta(eps) of mu-GDP (Dong, Roth & Su 2019, Corollary 2.13)."""
    if mu <= 0:
        return 0.0
    return float(norm.cdf(-eps / mu + mu / 2) - math.exp(eps) * norm.cdf(-eps / mu - mu / 2))


def gaussian_mu(eps, delta):
    """The mu of the Gaussian mechanism that is exactly (eps, delta)-DP."""
    if not 0 < delta < 1:
        raise ValueError("the Gaussian tradeoff needs 0 < delta < 1")
    if gaussian_delta(eps, 1e-6) >= delta:
        return 1e-6
    return brentq(lambda mu: gaussian_delta(eps, mu) - delta, 1e-6, 200.0, xtol=1e-10)


def fdp_rejects(mu, r, v, m, alpha):
    """True when v correct out of r guesses on m canaries is less likely than alpha under mu-GDP.
    Mahloujifar et al.'s recursion: (c, h) bound the chance mass of correct / wrong guesses; each step
    uses the tradeoff's inverse blow-up x -> Phi(Phi^-1(x) - mu)."""
    correct, wrong = alpha * v / m, alpha * (r - v) / m
    for i in range(v - 1, -1, -1):
        wrong_next = max(wrong, float(ndtr(ndtri(min(correct, 1.0)) - mu)))  # scalar ufuncs: fast
        if wrong_next == wrong:
            break  # a fixed point: nothing moves again
        correct = min(correct + i / (r - i) * (wrong_next - wrong), 1.0)
        wrong = wrong_next
    return correct + wrong > r / m


def fdp_epsilon(r, v, m, delta, confidence=0.95):
    """Mahloujifar et al.'s lower bound with the Gaussian tradeoff: the largest eps whose (eps, delta)
    Gaussian mechanism is rejected at `confidence` (0 if none)."""
    _check_confidence(confidence)
    if not 0 <= v <= r <= m:
        raise ValueError(f"need 0 <= v <= r <= m, got v={v}, r={r}, m={m}")
    if r == 0 or v == 0:
        return 0.0
    alpha = 1 - confidence
    return _largest_rejected(lambda e: 0.0 if fdp_rejects(gaussian_mu(e, delta), r, v, m, alpha) else 1.0, alpha)


ESTIMATORS = {"steinke": steinke_epsilon, "fdp": fdp_epsilon}


# ---------------------------------------------------------------- guesses and the k search
def guesses(scores, included, k_plus, k_minus):
    """(r, v): guess "in" for the k_plus highest scores, "out" for the k_minus lowest; count the correct."""
    scores, included = np.asarray(scores), np.asarray(included, bool)
    if k_plus + k_minus > len(scores):
        raise ValueError("more guesses than canaries")
    order = np.argsort(scores, kind="stable")
    top, bottom = order[len(order) - k_plus:] if k_plus else order[:0], order[:k_minus]
    return k_plus + k_minus, int(included[top].sum() + (~included[bottom]).sum())


def k_grid(m):
    """Guesses per side tried by audit(): K_FRACTIONS of m, at least 1, distinct."""
    return sorted({max(1, int(round(f * m))) for f in K_FRACTIONS})


def audit(scores, included, delta, confidence=0.95, estimator="fdp", ks=None):
    """The best bound over k guesses per side, k in ks (default k_grid(m)), Bonferroni-corrected.
    Returns dict(epsilon, k, r, v, max_certifiable): max_certifiable is the bound if every guess at every
    k were right, the most this m can show."""
    bound_fn = ESTIMATORS[estimator]
    m = len(scores)
    ks = ks or k_grid(m)
    conf = 1 - (1 - confidence) / len(ks)
    best = dict(epsilon=0.0, k=ks[0], r=2 * ks[0], v=guesses(scores, included, ks[0], ks[0])[1])
    for k in ks:
        r, v = guesses(scores, included, k, k)
        eps = bound_fn(r, v, m, delta, conf)
        if eps > best["epsilon"]:
            best = dict(epsilon=eps, k=k, r=r, v=v)
    best["max_certifiable"] = max(bound_fn(2 * k, 2 * k, m, delta, conf) for k in ks)
    best.update(estimator=estimator, m=m, delta=delta, confidence=confidence, ks=list(ks))
    return best


# ---------------------------------------------------------------- attack rates
def roc_auc(pos, neg):
    """P[score(member) > score(non-member)], ties 1/2 (Mann-Whitney U / (n_pos n_neg))."""
    pos, neg = np.asarray(pos, float), np.asarray(neg, float)
    if not len(pos) or not len(neg):
        raise ValueError("need at least one member and one non-member")
    ranks = rankdata(np.concatenate([pos, neg]))
    return float((ranks[:len(pos)].sum() - len(pos) * (len(pos) + 1) / 2) / (len(pos) * len(neg)))


def tpr_at_fpr(pos, neg, fpr):
    """The largest TPR over thresholds t ("member" when score > t) whose empirical FPR is <= fpr."""
    pos, neg = np.sort(np.asarray(pos, float)), np.sort(np.asarray(neg, float))
    allowed = int(math.floor(fpr * len(neg) + 1e-9))  # false positives allowed
    t = neg[len(neg) - allowed - 1] if allowed < len(neg) else -np.inf  # the lowest threshold allowed
    return float((pos > t).mean())


def clopper_pearson(k, n, confidence=0.95):
    """Exact two-sided binomial interval for k successes out of n."""
    a = (1 - confidence) / 2
    lo = float(beta.ppf(a, k, n - k + 1)) if k > 0 else 0.0
    hi = float(beta.ppf(1 - a, k + 1, n - k)) if k < n else 1.0
    return lo, hi


def _check_confidence(confidence):
    if not 0 < confidence < 1:
        raise ValueError("confidence must be in (0, 1)")
