"""utils/dp_audit on real (tiny) runs: white-box gradient canaries reach half of the claim at claimed 4 and
8 in one run and never go above it over repeated runs, in every clipping mode; the planted bug (10x less
noise than claimed) certifies more than the claim while the claim stays the calibrated one; a memorizing
non-private run is caught by the black-box new-token canaries. The k choice is checked on the exactly
Gaussian mechanism, the estimators themselves in test_audit_bounds.py, the CLI in test_privacy_audit.py."""
import numpy as np
import pytest

from tests.test_leakage import build_employees, save_base
from utils import audit_bounds, dp_audit
from utils import finetune as ft_loop
from utils.cli import UserError

COMMON = dict(eval_interval=0, log_interval=1000, microbatch_size=64, learning_rate=1e-3, max_steps=20, m_input=0)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("dp_audit")
    data_dir = build_employees(root / "employees", n_train=20, n_val=10, canary_reps=())
    return dict(root=root, base_ckpt=save_base(root / "base" / "ckpt.pt"), data_dir=str(data_dir))


def audit(setup, **kw):
    cfg = {**ft_loop.DEFAULTS, **dp_audit.DEFAULTS, "base_ckpt": setup["base_ckpt"], "data_dir": setup["data_dir"],
           "save": False, **COMMON, **kw}
    return dp_audit.run_audit(cfg, log=lambda *a, **k: None)


@pytest.mark.parametrize("claim, seed", [(4.0, 3), (8.0, 4)])
def test_white_box_audit_reaches_half_the_claim_in_one_run(setup, claim, seed):
    """Seeds where the previous setting (m = 2,000, k = 0.05 m / 0.4 m) certified 1.98 of 4 and 3.89 of 8."""
    # replayable DP noise and coins (issue 11's opt-in): a fixed test instance, no guarantee
    rep = audit(setup, target_epsilon=claim, accountant="prv", audit_seed=seed, seed=seed, reproducible_noise_seed=seed)
    wb = rep["white_box"]
    assert rep["passed"] and 0.5 * claim <= wb["epsilon_lower"] <= rep["claimed_epsilon"] <= claim
    assert wb["epsilon_lower"] > wb["epsilon_lower_steinke"] > 0  # f-DP is the tighter of the two
    assert wb["max_certifiable"] > claim and wb["m"] == 30000 and len(wb["scores"]) == 30000
    assert wb["ks"] == [600, 12000] and wb["route"] == dp_audit.ROUTE
    assert rep["privacy"]["sample_rate"] == 1.0 and rep["privacy"]["steps"] == 20


@pytest.mark.parametrize("mode", ["ghost", "hooks", "bk"])
def test_white_box_bound_never_exceeds_the_claim_over_repeated_runs(setup, mode):
    """Small instance (claimed 2, 4,000 canaries), three runs with fresh coins and noise per clipping mode:
    nine runs in all, each above its claim with probability <= 5% if the implementation is right."""
    for seed in range(3):
        rep = audit(setup, target_epsilon=2.0, m=4000, grad_sample_mode=mode, audit_seed=10 + seed, seed=seed,
                    reproducible_noise_seed=seed)  # fixed instances (issue 11's opt-in)
        assert rep["privacy"]["grad_sample_mode"] == mode
        assert rep["epsilon_lower_bound"] <= rep["claimed_epsilon"] and rep["passed"]
        assert rep["white_box"]["epsilon_lower"] > 0.5  # the canaries are seen: the bound is not vacuous by accident


def test_planted_bug_certifies_more_than_the_calibrated_claim(setup):
    rep = audit(setup, target_epsilon=8.0, noise_bug_factor=0.1, audit_seed=1, m=30000)
    wb = rep["white_box"]
    assert rep["privacy"]["noise_bug_factor"] == 0.1 and 7.5 < rep["claimed_epsilon"] <= 8.0  # the calibrated claim
    assert wb["epsilon_lower"] > rep["claimed_epsilon"] and not rep["passed"] and wb["k"] == 12000


class Noisy:
    """Stand-in for a DP optimizer's noise draw: records the multiplier it saw."""
    noise_multiplier, seen = 1.5, []

    def add_noise(self):
        self.seen.append(self.noise_multiplier)


def test_plant_noise_bug_scales_only_the_draw():
    opt = Noisy()
    dp_audit.plant_noise_bug(opt, 0.1)
    opt.add_noise()
    assert opt.seen == [pytest.approx(0.15)] and opt.noise_multiplier == 1.5  # the accountant reads 1.5


def test_planned_ks_reach_half_the_claim_on_the_exact_gaussian_mechanism():
    """The guesses planned in DEFAULTS on m = 30,000 exactly-Gaussian canaries at claims 4 and 8 (the
    audit's full-batch case): every run reaches half the claim and none goes above it."""
    rng = np.random.default_rng(5)
    for claim in (4.0, 8.0):
        mu, m = audit_bounds.gaussian_mu(claim, 1e-5), dp_audit.DEFAULTS["m"]
        for _ in range(4):
            inc = rng.random(m) < 0.5
            ks = [round(f * m) for f in dp_audit.DEFAULTS["k_fractions"]]
            eps = audit_bounds.audit(rng.normal(size=m) + mu * inc, inc, 1e-5, ks=ks)["epsilon"]
            assert 0.5 * claim <= eps <= claim


def test_black_box_new_token_canaries_catch_a_memorizing_run(setup):
    rep = audit(setup, dp=False, m_input=100, max_steps=40, learning_rate=1e-2, audit_seed=0)
    bb = rep["black_box"]
    assert rep["white_box"] is None and rep["passed"] and rep["claimed_epsilon"] == float("inf")
    assert bb["epsilon_lower"] > 1 and bb["auc_interval"][0] > 0.5 and bb["tpr_at_0.01"] > 0.1
    assert bb["resamples"] == 1000 and bb["m"] == 100


def test_bad_settings_are_user_errors():
    base = {**dp_audit.DEFAULTS, "dp": True}
    for kw, words in ((dict(m=1), "m must be"), (dict(dp=False, m_input=0), "nothing to audit"),
                      (dict(noise_bug_factor=2.0), "noise_bug_factor"), (dict(k_fractions=(0.9,)), "k_fractions"),
                      (dict(confidence=1.5), "confidence"), (dict(dp=False, noise_bug_factor=0.5), "needs a DP run")):
        with pytest.raises(UserError, match=words):
            dp_audit.check_settings({**base, **kw})
