"""utils.dp_sampling: one global Poisson draw per step at exactly rate q, dealt to ranks, every step
yielded (empty ones too)."""
import math

import torch

from utils.dp_sampling import PoissonBatchSampler, poisson_loader
from utils.secure_rng import RunSecret


def test_ranks_partition_one_global_draw_and_yield_every_step():
    n, q, world = 10, 0.2, 2
    ranks = [PoissonBatchSampler(n, q, RunSecret.reproducible(1).stream("sampling"), r, world, steps_per_epoch=3000)
             for r in range(world)]
    single = PoissonBatchSampler(n, q, RunSecret.reproducible(1).stream("sampling"), steps_per_epoch=3000)
    counts, empty_local = torch.zeros(n), 0
    steps = list(zip(single, *ranks))
    assert len(steps) == 3000  # every rank yields every step
    for whole, *parts in steps:
        assert sorted(sum(parts, [])) == whole  # the ranks' shares are exactly the one-process batch
        assert max(map(len, parts)) - min(map(len, parts)) <= 1
        empty_local += sum(len(p) == 0 for p in parts)
        counts[whole] += 1
    rate = counts / len(steps)
    se = math.sqrt(q * (1 - q) / len(steps))
    assert float((rate - q).abs().max()) < 4 * se  # each record at q (4 SE: 10 records tested at once)
    assert abs(float(rate.mean()) - q) < 3 * se / math.sqrt(n)
    assert empty_local > 0  # empty local batches happen and are kept


def test_loader_gives_empty_batches_the_record_shape():
    ds = [(torch.arange(5), torch.arange(5) + 1) for _ in range(4)]
    loader = poisson_loader(ds, 1e-9, RunSecret.fresh().stream("sampling"))
    x, y = next(iter(loader))
    assert x.shape == (0, 5) and y.shape == (0, 5) and x.dtype == torch.long
    full = poisson_loader(ds, 1.0, RunSecret.fresh().stream("sampling"))
    x, y = next(iter(full))
    assert x.shape == (4, 5) and torch.equal(y[0], torch.arange(5) + 1)
