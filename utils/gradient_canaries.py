"""
White-box gradient canaries for a one-run audit of DP-SGD (Steinke, Nasr & Jagielski 2023, section 6.2:
"Dirac canaries" whose clipped gradient is max_grad_norm on one coordinate, zero elsewhere).

install(optimizer, ...) wraps an Opacus DPOptimizer INSTANCE's add_noise (whatever noise draw is
installed there: Opacus's, or a secure generator's override). At each logical step, just before the
noise, every included canary that its own Poisson coin samples (rate q, the records' rate) adds its
already-clipped contribution, max_grad_norm on its coordinate, to p.summed_grad; then the noise is drawn
as for any record. This is the "already-clipped contribution just before the noise" route: a canary's
clipped gradient has norm exactly max_grad_norm, so to the mechanism it is one more unit, whatever the
clipping mode (ghost, hooks, bk) computed for the real records.

Scores come from the per-step privatized gradient sums (which the accountant releases, so reading them
is post-processing): on canary i's coordinate, z_t = (noised sum - the records' clipped sum) /
(sigma C) ~ s_t / sigma + N(0, 1), with s_t the canary's sampled-and-included indicator. Subtracting the
records' sum uses what the audit's adversary knows (every other unit and, canary by canary, nothing
about the canary's own coin or the noise). Each canary's score is the Neyman-Pearson statistic of its
subsampled Gaussian: sum_t log(1 - q + q exp(z_t / sigma - 1 / (2 sigma^2))); at q = 1 it is the
sum of z_t (up to an affine map). sigma is the CLAIMED noise multiplier: a run that secretly uses less
noise scores higher, which is what the audit is meant to catch.

The canaries' inclusion coins and per-step coins come from numpy's generator seeded with `seed`; seed
None takes fresh OS entropy. A fixed seed makes the audit reproducible, and a reproducible coin is
known to whoever knows the seed: fine for testing an implementation, void as a guarantee.
"""
import math

import numpy as np
import torch

from utils.cli import UserError


class GradientCanaries:
    """m Dirac canaries on distinct coordinates of the optimizer's parameters, each included with
    probability 1/2. .included (bool array) and .scores() after training; .steps counts noised steps."""

    def __init__(self, optimizer, m, sample_rate, noise_multiplier, max_grad_norm, seed=None):
        if noise_multiplier <= 0:
            raise UserError("gradient canaries need noise_multiplier > 0 (a run without noise certifies nothing)")
        if not 0 < sample_rate <= 1:
            raise UserError(f"sample rate must be in (0, 1]; got {sample_rate}")
        self.params = list(optimizer.params)
        sizes = np.array([p.numel() for p in self.params])
        if m < 2 or m > sizes.sum():
            raise UserError(f"need 2 <= m <= {int(sizes.sum())} (trainable coordinates); got m={m}")
        self.m, self.q, self.sigma, self.clip = m, sample_rate, float(noise_multiplier), float(max_grad_norm)
        self.rng = np.random.default_rng(seed)
        flat = self.rng.choice(int(sizes.sum()), size=m, replace=False)
        self.included = self.rng.random(m) < 0.5
        starts = np.concatenate([[0], np.cumsum(sizes)])
        owner = np.searchsorted(starts, flat, side="right") - 1
        self.where = [(int(i), torch.from_numpy(flat[owner == i] - starts[i]), np.flatnonzero(owner == i))
                      for i in np.unique(owner)]
        self.llr, self.steps = np.zeros(m), 0
        self._noise = optimizer.add_noise
        optimizer.add_noise = self._add_noise

    def _add_noise(self):
        sampled = self.included & (self.rng.random(self.m) < self.q)
        records = []
        for i, offsets, ids in self.where:
            summed = self.params[i].summed_grad.view(-1)
            records.append(summed[offsets].clone())
            summed[offsets] += self.clip * torch.from_numpy(sampled[ids]).to(summed.dtype)
        self._noise()
        z = np.empty(self.m)
        for (i, offsets, ids), rec in zip(self.where, records):
            z[ids] = ((self.params[i].grad.reshape(-1)[offsets] - rec) / (self.sigma * self.clip)).double().numpy()
        shift = z / self.sigma - 0.5 / self.sigma ** 2
        self.llr += shift if self.q == 1 else np.logaddexp(math.log1p(-self.q), math.log(self.q) + shift)
        self.steps += 1

    def scores(self):
        """Each canary's log-likelihood ratio "included" vs "excluded", summed over the noised steps."""
        return self.llr.copy()


def install(optimizer, m, sample_rate, noise_multiplier, max_grad_norm, seed=None):
    return GradientCanaries(optimizer, m, sample_rate, noise_multiplier, max_grad_norm, seed)
