"""Stratified bootstrap intervals: they cover a known AUC, shrink with more records, and include
chance when the classes do not differ."""
import numpy as np

from utils import bootstrap
from utils.audit_bounds import roc_auc


def test_interval_covers_and_shrinks_with_more_records():
    rng = np.random.default_rng(0)
    widths = []
    for n in (20, 400):  # AUC of N(1, 1) vs N(0, 1) is Phi(1 / sqrt 2) = 0.760
        lo, hi = bootstrap.interval(roc_auc, rng.normal(1, 1, n), rng.normal(0, 1, n), resamples=300)
        assert lo < 0.760 < hi
        widths.append(hi - lo)
    assert widths[1] < widths[0] / 3


def test_same_distribution_is_too_few_to_tell_and_a_clear_effect_is_not():
    rng = np.random.default_rng(1)
    lo, hi = bootstrap.interval(roc_auc, rng.normal(0, 1, 12), rng.normal(0, 1, 12), resamples=300)
    assert not bootstrap.tells_apart(lo, hi)
    lo, hi = bootstrap.interval(roc_auc, rng.normal(3, 1, 12), rng.normal(0, 1, 12), resamples=300)
    assert bootstrap.tells_apart(lo, hi) and lo > 0.8
