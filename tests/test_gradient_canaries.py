"""Gradient canaries on a stand-in for Opacus's DPOptimizer: each included, sampled canary adds exactly
max_grad_norm to its coordinate before the noise, the records' own sum does not move the scores, and
the scores tell included from excluded canaries when the noise is small."""
import numpy as np
import pytest
import torch

from utils.cli import UserError
from utils.gradient_canaries import GradientCanaries


class NoisyOptimizer:
    """What the canaries rely on: .params with .summed_grad, and add_noise() setting p.grad."""

    def __init__(self, shapes, std, seed=0):
        self.params = [torch.nn.Parameter(torch.zeros(s)) for s in shapes]
        self.std, self.gen, self.calls = std, torch.Generator().manual_seed(seed), 0

    def add_noise(self):
        self.calls += 1
        for p in self.params:
            p.grad = p.summed_grad + self.std * torch.randn(p.summed_grad.shape, generator=self.gen)

    def step(self, records=0.0):
        for p in self.params:
            p.summed_grad = torch.full(p.shape, records)
        self.add_noise()


def test_included_canaries_add_exactly_the_clip_norm_before_the_noise():
    opt = NoisyOptimizer([(10, 30), (50,)], std=0.0 + 1e-12)
    c = GradientCanaries(opt, 300, sample_rate=1.0, noise_multiplier=1e-12, max_grad_norm=0.5, seed=0)
    opt.step()
    added = torch.cat([p.summed_grad.reshape(-1) for p in opt.params])
    assert opt.calls == 1 and c.steps == 1  # the wrapped noise draw ran once
    assert float(added.sum()) == pytest.approx(0.5 * c.included.sum()) and set(added.unique().tolist()) <= {0.0, 0.5}


def test_scores_ignore_the_records_and_separate_included_canaries():
    scores = []
    for records in (0.0, 3.0):  # the records' clipped sum on the canaries' coordinates is subtracted
        opt = NoisyOptimizer([(40, 40)], std=0.5)
        c = GradientCanaries(opt, 400, sample_rate=0.5, noise_multiplier=0.5, max_grad_norm=1.0, seed=1)
        for _ in range(10):
            opt.step(records)
        scores.append(c.scores())
    assert np.allclose(scores[0], scores[1], atol=1e-4)
    s, inc = scores[0], c.included
    assert s[inc].mean() > s[~inc].mean() + 3 and 150 < inc.sum() < 250


def test_bad_settings():
    opt = NoisyOptimizer([(5,)], std=1.0)
    for kwargs in (dict(noise_multiplier=0.0), dict(m=10), dict(sample_rate=0.0)):
        with pytest.raises(UserError):
            GradientCanaries(opt, **{**dict(m=3, sample_rate=1.0, noise_multiplier=1.0, max_grad_norm=1.0), **kwargs})
