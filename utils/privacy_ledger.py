"""The privacy ledger of a model: which DP-SGD segments it went through, on which private data, and what
they add up to: epsilon under either neighbouring relation, calibration to a target over the whole
history, and the guarantee for a group of k records (a canary planted k times).

A segment is a JSON dict: noise_multiplier, sample_rate, steps, max_grad_norm, adjacency,
dataset_fingerprint. Checkpoints carry the list ("privacy_history"); a run resumed, or fine-tuned again
from a DP checkpoint on the same data, composes its own segment with the earlier ones (adaptive
composition of the subsampled Gaussian, Abadi et al. 2016; Mironov 2017).

Adjacency (which datasets are neighbours):
- 'add_remove': D and D' differ by one person present in one of them. N, hence q = B/N, the step count
  and the default delta, are computed from N, which differs by one between neighbours: they are treated
  as public, as Opacus and dp-accounting do. The gradient sum is divided by the public constant B (the
  configured expected batch size), never by a count from the private N (Opacus #571 / #819).
- 'replace_one': D and D' have the same N and differ in one person's record: N is public by definition.
  Only dp-accounting's PLD accountant handles Poisson sampling under this relation, so it needs
  accountant='pld'. Roughly a group of 2 under add/remove: the shipped config's 8.00 (add/remove, 900
  persons) is about 16 here.

Group privacy: k copies of one record (prepare's canaries) are each Poisson-sampled, so the group moves
the noisy sum by j*C with j ~ Binomial(k, q). By joint convexity of the hockey-stick divergence the
worst case is j identical clipped gradients, i.e. a mixture of Gaussians with sensitivities 0..k and
binomial weights: dp-accounting's MixtureOfGaussiansDpEvent, composed over the steps by its PLD
accountant (add/remove of the whole group). This is exact for the mechanism, far tighter than the
generic (k eps, k e^((k-1) eps) delta) conversion, which at eps = 8 is void for k >= 2.

The dataset fingerprint is HMAC-SHA256 of the train split's token and offset files under a random salt
kept in the data folder (.fingerprint_salt, beside the records it protects). A plain SHA-256 would be a
non-private release: an adversary who knows every record but one could test candidates for the last
one against it. The salt never leaves data_dir.
"""
import hashlib
import hmac
import math
import os
import secrets
import tempfile

ADJACENCIES = ("add_remove", "replace_one")
ACCOUNTANTS = ("rdp", "prv", "pld")
SALT_FILE = ".fingerprint_salt"


def other_adjacency(adjacency):
    return "replace_one" if adjacency == "add_remove" else "add_remove"


def public_quantities(adjacency):
    """What the epsilon treats as public, for privacy.json."""
    if adjacency == "replace_one":
        return ("N (dataset_size) is public by the relation; sample_rate = batch_size / N, the step count, "
                "noise_multiplier, max_grad_norm, delta and the divisor batch_size are public")
    return ("sample_rate = batch_size / N, the step count and the default delta are computed from N, which "
            "differs by one between add/remove neighbours: N is treated as public (Opacus, dp-accounting "
            "convention); noise_multiplier, max_grad_norm and the divisor batch_size are public constants")


def check_accountant(adjacency, accountant):
    if adjacency not in ADJACENCIES:
        raise ValueError(f"adjacency must be one of {', '.join(ADJACENCIES)}; got {adjacency!r}")
    if accountant not in ACCOUNTANTS:
        raise ValueError(f"accountant must be one of {', '.join(ACCOUNTANTS)}; got {accountant!r}")
    if adjacency == "replace_one" and accountant != "pld":
        raise ValueError("adjacency='replace_one' needs accountant='pld' (dp-accounting's PLD is the one "
                         "accountant here that handles Poisson sampling under replace-one)")


def segment(noise_multiplier, sample_rate, steps, max_grad_norm, adjacency, dataset_fingerprint):
    return dict(noise_multiplier=float(noise_multiplier), sample_rate=float(sample_rate), steps=int(steps),
                max_grad_norm=float(max_grad_norm), adjacency=adjacency, dataset_fingerprint=dataset_fingerprint)


def _pld_epsilon(triples, delta, adjacency, discretization):
    from dp_accounting import dp_event
    from dp_accounting.pld import pld_privacy_accountant
    from dp_accounting.privacy_accountant import NeighboringRelation

    relation = (NeighboringRelation.REPLACE_ONE if adjacency == "replace_one"
                else NeighboringRelation.ADD_OR_REMOVE_ONE)
    acc = pld_privacy_accountant.PLDAccountant(relation, value_discretization_interval=discretization)
    acc.compose(dp_event.ComposedDpEvent([
        dp_event.SelfComposedDpEvent(dp_event.PoissonSampledDpEvent(q, dp_event.GaussianDpEvent(sigma)), steps)
        for sigma, q, steps in triples]))
    return float(acc.get_epsilon(delta))


def epsilon(segments, delta, adjacency="add_remove", accountant="rdp", discretization=1e-4):
    """Epsilon at `delta` of the composition of `segments` (dicts, or (sigma, q, steps) triples).
    `discretization`: the PLD's value grid (pessimistic: coarser is faster and still an upper bound)."""
    check_accountant(adjacency, accountant)
    triples = [(s["noise_multiplier"], s["sample_rate"], s["steps"]) if isinstance(s, dict) else tuple(s)
               for s in segments]
    triples = [t for t in triples if t[2] > 0 and t[1] > 0]
    if not triples:
        return 0.0
    if any(sigma == 0 for sigma, _, _ in triples):
        return math.inf
    if accountant == "pld":
        return _pld_epsilon(triples, delta, adjacency, discretization)
    from opacus.accountants import create_accountant
    acc = create_accountant(mechanism=accountant)
    acc.history = list(triples)
    return float(acc.get_epsilon(delta=delta))


def steps_within(target, before, sigma, q, max_steps, delta, adjacency, accountant):
    """The most steps s <= max_steps of (sigma, q) that keep epsilon(before + s steps) <= target."""
    def eps(s):
        return epsilon(list(before) + [(sigma, q, s)], delta, adjacency, accountant)
    if eps(max_steps) <= target:
        return max_steps
    lo, hi = 0, max_steps  # epsilon grows with steps
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if eps(mid) <= target:
            lo = mid
        else:
            hi = mid - 1
    return lo


def calibrate_noise(target, before, q, steps, delta, adjacency, accountant, rel_tol=1e-3):
    """The smallest noise multiplier (to rel_tol) whose `steps` steps, composed after `before`, stay within
    `target`; None if even sigma = 1e4 cannot (the earlier segments spent it all)."""
    def eps(sigma):
        return epsilon(list(before) + [(sigma, q, steps)], delta, adjacency, accountant)
    hi = 1.0
    while eps(hi) > target:
        hi *= 2
        if hi > 1e4:
            return None
    lo = hi / 2
    while eps(lo) <= target and lo > 1e-3:
        hi, lo = lo, lo / 2
    while hi / lo > 1 + rel_tol:
        mid = math.sqrt(lo * hi)
        lo, hi = (lo, mid) if eps(mid) <= target else (mid, hi)
    return hi


def group_epsilon(segments, k, delta, discretization=1e-2):
    """Epsilon at `delta` for adding/removing k copies of one record (module docstring's method). The PLD
    is discretized coarsely (its pessimistic estimate stays an upper bound; 1e-4 costs minutes at k=16)."""
    from dp_accounting import dp_event
    from dp_accounting.pld import pld_privacy_accountant

    events = []
    for s in segments:
        sigma, q, steps = s["noise_multiplier"], s["sample_rate"], s["steps"]
        if steps == 0:
            continue
        if sigma == 0:
            return math.inf
        probs = [math.comb(k, j) * q ** j * (1 - q) ** (k - j) for j in range(k + 1)]
        mixture = dp_event.MixtureOfGaussiansDpEvent(sigma, [float(j) for j in range(k + 1)], probs)
        events.append(dp_event.SelfComposedDpEvent(mixture, steps))
    if not events:
        return 0.0
    acc = pld_privacy_accountant.PLDAccountant(value_discretization_interval=discretization)
    acc.compose(dp_event.ComposedDpEvent(events))
    return float(acc.get_epsilon(delta))


GROUP_METHOD = ("k Poisson-sampled copies as a mixture of Gaussians with sensitivities 0..k C and "
                "Binomial(k, q) weights (dp-accounting MixtureOfGaussiansDpEvent, PLD, add/remove of the group)")


def fingerprint_salt(data_dir):
    """The data folder's random salt, created once (atomically; concurrent ranks agree on one)."""
    path = os.path.join(data_dir, SALT_FILE)
    if not os.path.isfile(path):
        fd, tmp = tempfile.mkstemp(dir=data_dir, prefix=SALT_FILE + ".", suffix=".tmp")
        try:
            os.write(fd, secrets.token_bytes(32))
            os.fsync(fd)
            os.close(fd)
            try:
                os.link(tmp, path)  # atomic; fails if another process made it first: keep theirs
            except FileExistsError:
                pass
        finally:
            os.remove(tmp)
    with open(path, "rb") as f:
        return f.read()


def dataset_fingerprint(data_dir, split="train"):
    """'hmac-sha256:<hex>' of the split's token and offset files under the data folder's salt."""
    mac = hmac.new(fingerprint_salt(data_dir), digestmod=hashlib.sha256)
    for name in (f"{split}.bin", f"{split}_offsets.bin"):
        with open(os.path.join(data_dir, name), "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                mac.update(block)
        mac.update(b"|")
    return "hmac-sha256:" + mac.hexdigest()
