"""One-run privacy audit: the epsilon lower bound (closed form, the anchor, validity under an eps-DP
mechanism), the guesses, and real runs: a non-private memorizing fine-tune certifies eps > 1, a DP
fine-tune stays below its claim, and a bound above the claim exits non-zero."""
import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest

from tests.conftest import REPO
from utils.cli import run_cli
from tests.test_leakage import build_employees, save_base
from test_pipeline import privacy_audit as pa

PY = sys.executable


def logit(p):
    return math.log(p / (1 - p))


# ---------------------------------------------------------------- the bound
def test_perfect_guesses_without_delta_match_the_closed_form():
    for r in (10, 40, 100):  # P[Bin(r, q) >= r] = q^r = 0.05  ->  eps = logit(0.05^(1/r))
        assert pa.epsilon_lower_bound(r, r) == pytest.approx(logit(0.05 ** (1 / r)), abs=1e-9)
    assert pa.epsilon_lower_bound(100, 100, confidence=0.99) == pytest.approx(logit(0.01 ** (1 / 100)), abs=1e-9)


def test_anchor_perfect_guesses_on_100_certify_only_about_3_5():
    eps = pa.epsilon_lower_bound(100, 100, delta=1e-5, m=1000)
    assert 3.3 < eps < pa.epsilon_lower_bound(100, 100) < 3.5  # the delta term only lowers the bound
    with pytest.raises(ValueError):
        pa.epsilon_lower_bound(100, 100, delta=1e-5)  # the delta term needs m


def test_bound_grows_with_correct_guesses_and_is_zero_at_chance():
    bounds = [pa.epsilon_lower_bound(100, v, delta=1e-5, m=1000) for v in range(50, 101, 5)]
    assert bounds[0] == 0.0 and all(a <= b for a, b in zip(bounds, bounds[1:])) and bounds[-1] > 3
    assert pa.epsilon_lower_bound(0, 0) == 0.0


def test_bound_is_valid_for_an_eps_dp_mechanism():
    """Guesses against eps-DP randomized response are right with probability e^eps / (1 + e^eps): the
    bound may exceed eps in at most 5% of audits."""
    eps, r = 1.0, 100
    rng = np.random.default_rng(0)
    v = rng.binomial(r, 1 / (1 + math.exp(-eps)), size=4000)
    bound = {k: pa.epsilon_lower_bound(r, int(k)) for k in np.unique(v)}
    above = np.mean([bound[k] > eps for k in v])
    assert 0.005 < above <= 0.05  # close to the nominal 5%, never above it


def test_guesses_take_the_top_and_bottom_scores():
    scores = np.array([0.9, 0.1, 0.5, 0.8, 0.2, 0.4])
    included = np.array([True, False, True, False, False, True])
    assert pa.guesses(scores, included, 2, 2) == (4, 3)  # in: 0.9 (yes), 0.8 (no); out: 0.1, 0.2 (both yes)
    assert pa.guesses(scores, included, 0, 1) == (1, 1)


def test_canaries_are_seeded_and_about_half_are_included():
    a, inc_a = pa.draw_canaries(1000, 12, seed=3)
    b, inc_b = pa.draw_canaries(1000, 12, seed=3)
    assert a == b and np.array_equal(inc_a, inc_b) and len(set(a)) == 1000
    assert 430 < inc_a.sum() < 570


# ---------------------------------------------------------------- real runs
AUDIT = ["--m=200", "--k_plus=20", "--k_minus=20", "--batch_size=16", "--microbatch_size=16", "--max_steps=150",
         "--learning_rate=5e-3", "--block_size=48", "--eval_interval=0", "--log_interval=1000", "--seed=0"]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("audit")
    data_dir = build_employees(root / "employees", n_train=20, n_val=10, canary_reps=())
    return dict(root=root, data_dir=data_dir, base=save_base(root / "base" / "ckpt.pt"))


@pytest.fixture(scope="module")
def nonprivate(setup):
    out = setup["root"] / "nonprivate.json"
    report = pa.main([f"--base_ckpt={setup['base']}", f"--data_dir={setup['data_dir']}", "--dp=False",
                      "--sampling=shuffle", f"--out={out}", *AUDIT])
    return report, json.loads(out.read_text())


def test_nonprivate_memorizing_run_certifies_eps_above_1(nonprivate):
    report, saved = nonprivate
    assert report["epsilon_lower_bound"] > 1 and report["passed"]  # no claim, nothing to violate
    assert saved["claimed_epsilon"] is None and saved["r"] == 40 and saved["v"] == report["v"]
    assert len(saved["scores"]) == 200 and saved["included"] == sum(saved["included_mask"])


def test_a_bound_above_the_claim_exits_non_zero(nonprivate, setup, monkeypatch, capsys):
    report, _ = nonprivate
    monkeypatch.setattr(pa, "run_audit", lambda cfg, log=print: {**report, "claimed_epsilon": 0.5, "claimed_delta": 1e-5,
                                                                 "dp": True, "privacy": {"epsilon": 0.5}})
    with pytest.raises(SystemExit) as e:
        pa.main([f"--base_ckpt={setup['base']}", f"--data_dir={setup['data_dir']}"])
    assert e.value.code == 1 and "FAIL: the audit's lower bound" in capsys.readouterr().err


def test_dp_run_stays_below_its_claim_from_the_cli(setup):
    out, plot = setup["root"] / "dp.json", setup["root"] / "dp.png"
    cmd = [PY, os.path.join(REPO, "test_pipeline", "privacy_audit.py"), f"--base_ckpt={setup['base']}",
           f"--data_dir={setup['data_dir']}", "--dp=True", "--target_epsilon=1.0", "--grad_sample_mode=hooks", f"--out={out}", f"--plot={plot}",
           *AUDIT, "--max_steps=50"]  # fewer steps: per-sample gradients make DP steps dearer
    r = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=600)
    assert r.returncode == 0, r.stderr
    assert "eps lower bound" in r.stdout and "claimed eps" in r.stdout
    rep = json.loads(out.read_text())
    assert rep["dp"] and 0 < rep["claimed_epsilon"] <= 1.0 and rep["delta"] == rep["privacy"]["delta"] > 0
    assert rep["epsilon_lower_bound"] < rep["claimed_epsilon"] and rep["passed"]
    assert plot.read_bytes()[:4] == b"\x89PNG"


def test_bad_audit_settings_are_one_line_errors(setup, capsys):
    common = [f"--base_ckpt={setup['base']}", f"--data_dir={setup['data_dir']}"]
    for argv, words in ((["--m=10", "--k_plus=8", "--k_minus=8"], "k_plus + k_minus"),
                        (["--confidence=1.5"], "confidence"), (["--mm=3"], "unknown config key")):
        with pytest.raises(SystemExit) as e:
            run_cli(pa.main, common + argv)
        err = capsys.readouterr().err
        assert e.value.code == 2 and err.startswith("error:") and words in err and err.count("\n") == 1
