"""utils/canary_exposure.py: candidate secrets, ranks, exposure and its rank-based interval, the
skew-normal extrapolation. (On a memorizing model, through the CLI: tests/test_leakage.py.)"""
import numpy as np
import pytest

from utils import canary_exposure as ce
from utils.cli import UserError


def test_candidates_have_the_format_exclude_the_secret_and_are_distinct():
    rng = np.random.default_rng(0)
    cands = ce.candidate_secrets("###-####", "555-0123", 5000, rng)
    assert len(cands) == len(set(cands)) == 5000 and "555-0123" not in cands
    assert all(len(c) == 8 and c[3] == "-" and (c[:3] + c[4:]).isdigit() for c in cands)
    everything = ce.candidate_secrets("##", "42", 10000, rng)  # small space: every other value, exact rank
    assert sorted(everything) == sorted(f"{i:02d}" for i in range(100) if i != 42)
    with pytest.raises(UserError):
        ce.candidate_secrets("###-####", "55-01234", 10, rng)


def test_rank_and_exposure():
    cands = np.array([-5.0, -4.0, -3.0, -2.0])
    assert ce.rank_among(-1.0, cands) == 1 and ce.rank_among(-3.5, cands) == 3
    assert ce.rank_among(-4.0, np.array([-4.0, -4.0, -4.0])) == 2.5  # ties: a constant model is not "first"
    assert ce.exposure_from_rank(1, 1023) == pytest.approx(10.0)
    assert ce.exposure_from_rank(1024, 1023) == pytest.approx(0.0)
    # skew-normal: a secret at the candidates' median has ~1 bit; far in the tail, many (capped)
    nll = np.random.default_rng(0).normal(30, 2, 10000)
    assert ce.skewnorm_exposure(np.median(nll), nll, 23.0) == pytest.approx(1.0, abs=0.1)
    assert ce.skewnorm_exposure(10.0, nll, 23.0) == 23.0


def test_exposure_interval_from_the_exact_rank():
    lo, hi = ce.exposure_interval(1, 10000)  # nothing beat the secret: at least log2(10^4 / 3.7), no upper end
    assert 11 < lo < ce.exposure_from_rank(1, 10000) and hi is None
    lo, hi = ce.exposure_interval(5000, 10000)  # half the candidates beat it: about 1 bit
    assert 0.9 < lo < 1.0 < hi < 1.1


def test_the_chance_gap_spread_matches_ranks_drawn_at_random():
    """What a model that memorized nothing shows: ranks uniform among the candidates for 4 canaries and
    8 controls; the closed form must match a simulation (and shrink with more canaries)."""
    rng = np.random.default_rng(0)
    n_candidates = 1000
    exposure = lambda k: np.log2(n_candidates + 1) - np.log2(rng.integers(1, n_candidates + 2, size=(200_000, k)))
    gaps = exposure(4).mean(1) - exposure(8).mean(1)
    assert abs(gaps.mean()) < 0.01
    assert ce.chance_gap_sd(4, 8) == pytest.approx(gaps.std(), rel=0.03)
    assert ce.chance_gap_sd(16, 32) == pytest.approx(ce.chance_gap_sd(4, 8) / 2)
