"""Audit estimators: Steinke's closed form and anchor, the Gaussian tradeoff against dp-accounting,
Mahloujifar's f-DP bound (tighter than Steinke's, valid for a Gaussian mechanism at its claim), the
guesses, AUC, TPR at FPR, Clopper-Pearson."""
import math

import numpy as np
import pytest

from utils import audit_bounds as ab


def logit(p):
    return math.log(p / (1 - p))


def test_steinke_perfect_guesses_without_delta_match_the_closed_form():
    for r in (10, 40, 100):  # P[Bin(r, q) >= r] = q^r = 0.05  ->  eps = logit(0.05^(1/r))
        assert ab.steinke_epsilon(r, r, 1000) == pytest.approx(logit(0.05 ** (1 / r)), abs=1e-4)


def test_steinke_anchor_100_perfect_guesses_certify_about_3_5():
    eps = ab.steinke_epsilon(100, 100, 1000, delta=1e-5)
    assert 3.3 < eps < ab.steinke_epsilon(100, 100, 1000) < 3.5  # the delta term only lowers the bound
    assert ab.steinke_epsilon(100, 50, 1000, 1e-5) == 0.0 and ab.steinke_epsilon(0, 0, 10) == 0.0


def test_gaussian_mu_matches_dp_accounting():
    dp_accounting = pytest.importorskip("dp_accounting")
    for eps in (1.0, 4.0, 8.0):
        sigma = dp_accounting.get_sigma_gaussian(eps, 1e-5)
        assert ab.gaussian_mu(eps, 1e-5) == pytest.approx(1 / sigma, rel=1e-4)


def test_fdp_is_tighter_than_steinke_and_grows_with_correct_guesses():
    m, d = 1000, 1e-5
    f = [ab.fdp_epsilon(200, v, m, d) for v in (110, 150, 190, 200)]
    s = [ab.steinke_epsilon(200, v, m, d) for v in (110, 150, 190, 200)]
    assert all(a <= b for a, b in zip(f, f[1:])) and f[0] < 0.5 and f[-1] > 4
    assert all(fi >= si for fi, si in zip(f, s)) and f[2] > s[2] + 0.3


def ideal_gaussian_audits(eps, m, runs, seed):
    """Bounds from `runs` audits of the mechanism that is exactly (eps, 1e-5)-DP Gaussian: the worst
    case the f-DP estimator allows."""
    mu, rng = ab.gaussian_mu(eps, 1e-5), np.random.default_rng(seed)
    out = []
    for _ in range(runs):
        inc = rng.random(m) < 0.5
        out.append(ab.audit(rng.normal(size=m) + mu * inc, inc, 1e-5, ks=[m // 20]))
    return out


def test_fdp_bound_is_valid_for_the_gaussian_mechanism_at_its_claim():
    """At eps = 1 with 200 canaries a bound above the claim must be rare (<= 5% nominal): 60 audits."""
    above = [a["epsilon"] > 1.0 for a in ideal_gaussian_audits(1.0, 200, 60, seed=0)]
    assert sum(above) <= 6  # P[Bin(60, 0.05) > 6] < 5%


def test_audit_reports_the_guesses_and_the_most_this_m_can_show():
    rng = np.random.default_rng(1)
    inc = rng.random(400) < 0.5
    perfect = ab.audit(inc.astype(float), inc, 1e-5, ks=[20])
    assert perfect["v"] == perfect["r"] == 40 and perfect["epsilon"] == pytest.approx(perfect["max_certifiable"])
    blind = ab.audit(rng.normal(size=400), inc, 1e-5, estimator="steinke")
    assert blind["epsilon"] < 1 and blind["ks"] == ab.k_grid(400) and blind["max_certifiable"] > 3


def test_guesses_take_the_top_and_bottom_scores():
    scores = np.array([0.9, 0.1, 0.5, 0.8, 0.2, 0.4])
    included = np.array([True, False, True, False, False, True])
    assert ab.guesses(scores, included, 2, 2) == (4, 3)  # in: 0.9 (yes), 0.8 (no); out: 0.1, 0.2 (both yes)
    assert ab.guesses(scores, included, 0, 1) == (1, 1)


def test_auc_and_tpr_at_fpr():
    assert ab.roc_auc([3, 4], [1, 2]) == 1.0 and ab.roc_auc([1, 2], [1, 2]) == 0.5
    neg = np.arange(1000) / 1000.0
    pos = np.array([0.995, 0.9985, 2.0, 3.0, 0.5])
    assert ab.tpr_at_fpr(pos, neg, 0.01) == 0.8  # threshold at the 10th highest negative (0.989)
    assert ab.tpr_at_fpr(pos, neg, 0.001) == 0.6  # one false positive allowed: above 0.998
    assert ab.tpr_at_fpr(pos, neg, 0.0) == 0.4  # none: above every negative


def test_clopper_pearson():
    lo, hi = ab.clopper_pearson(5, 10)
    assert lo == pytest.approx(0.187086, abs=1e-5) and hi == pytest.approx(0.812914, abs=1e-5)
    assert ab.clopper_pearson(0, 10)[0] == 0.0 and ab.clopper_pearson(10, 10)[1] == 1.0
