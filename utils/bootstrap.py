"""
Percentile bootstrap intervals for two-sample attack statistics (AUC, TPR at a fixed FPR).

Members and non-members are resampled separately, with replacement, at their own sizes (a stratified
bootstrap: the class balance is the design's, not a random quantity), `resamples` times; the interval is
the (1 - confidence)/2 and (1 + confidence)/2 quantiles of the statistic over the resamples (Efron &
Tibshirani 1993, ch. 13). The resamples are drawn from numpy's generator with `seed`: an interval is
a statement about the sampling of people, not a secret, so a fixed seed is fine here.
"""
import numpy as np

RESAMPLES = 1000


def interval(statistic, pos, neg, resamples=RESAMPLES, confidence=0.95, seed=0):
    """(low, high) of statistic(pos, neg) over stratified bootstrap resamples."""
    if not 0 < confidence < 1:
        raise ValueError("confidence must be in (0, 1)")
    pos, neg = np.asarray(pos, float), np.asarray(neg, float)
    rng = np.random.default_rng(seed)
    values = np.array([statistic(pos[rng.integers(0, len(pos), len(pos))], neg[rng.integers(0, len(neg), len(neg))])
                       for _ in range(resamples)])
    a = (1 - confidence) / 2
    return float(np.quantile(values, a)), float(np.quantile(values, 1 - a))


def tells_apart(low, high, chance=0.5):
    """False when the interval includes chance: too few records to tell the attack from guessing."""
    return not low <= chance <= high
