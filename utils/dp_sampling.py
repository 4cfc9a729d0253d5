"""Poisson sampling of persons at exactly rate q per logical step, in one process or under torchrun.

Why not Opacus's samplers: its DistributedUniformWithReplacementSampler draws per rank and skips a rank's
empty draws, so under DDP a record is included with probability q / (1 - (1-q)^(N/W)) > q (1.58 q at
W=2, N=190), above what the accountant assumes; and both of its samplers draw from a torch.Generator,
which a public seed makes replayable.

Here every logical step draws ONE global Bernoulli(q) mask over the N records from the sampling
keystream (utils.secure_rng), which every rank derives from the same run secret, so all ranks see the
same draw without exchanging it. The selected indices are dealt to ranks round-robin (balanced to within
one record). Every rank yields every step, an empty list included: an empty local batch contributes a
zero gradient and the step still happens (rank 0 adds the noise once). One process with the same
secret draws the same global batches, which is what makes 2 processes reproduce the weights of 1.
"""
import torch
from torch.utils.data import DataLoader, Sampler
from torch.utils.data._utils.collate import default_collate


class PoissonBatchSampler(Sampler):
    """Yields, per logical step, this rank's share of a global Poisson(q) sample of range(n)."""

    def __init__(self, n, sample_rate, stream, rank=0, world_size=1, steps_per_epoch=None):
        if n <= 0 or not 0 < sample_rate <= 1:
            raise ValueError(f"need n > 0 and 0 < sample_rate <= 1; got n={n}, sample_rate={sample_rate}")
        self.n, self.sample_rate, self.stream = n, sample_rate, stream
        self.rank, self.world_size = rank, world_size
        self.steps_per_epoch = steps_per_epoch or max(1, round(1 / sample_rate))

    def global_batch(self):
        """The next step's global sample (the same on every rank)."""
        return torch.nonzero(self.stream.poisson_mask(self.n, self.sample_rate)).flatten()

    def __iter__(self):
        for _ in range(self.steps_per_epoch):
            yield self.global_batch()[self.rank::self.world_size].tolist()

    def __len__(self):
        return self.steps_per_epoch


def collate_records(example):
    """default_collate, and for an empty batch the (0, T) input/target pair of the record shape."""
    def collate(batch):
        if not batch:
            x, y = example
            return x.new_empty((0, *x.shape)), y.new_empty((0, *y.shape))
        return default_collate(batch)
    return collate


def poisson_loader(dataset, sample_rate, stream, rank=0, world_size=1):
    """A DataLoader over `dataset` whose batches are this rank's part of each step's Poisson sample."""
    sampler = PoissonBatchSampler(len(dataset), sample_rate, stream, rank, world_size)
    return DataLoader(dataset, batch_sampler=sampler, collate_fn=collate_records(dataset[0]))
