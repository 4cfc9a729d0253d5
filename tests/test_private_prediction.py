"""Private prediction (utils/private_prediction.py): the sensitivity bounds the guarantee rests on, the
public masks, the accounting, the batching and the KV-cached decoder."""
import math
import random

import numpy as np
import pytest
import torch
from torch.nn import functional as F

import synthesize_dp as S
import utils.private_prediction as P
from tests.conftest import tiny_model


def peaked_rows(n, V, favourite, gap=50.0, seed=0):
    """n logit rows that all strongly prefer `favourite` (random elsewhere)."""
    g = torch.Generator().manual_seed(seed)
    Z = torch.randn(n, V, generator=g)
    Z[:, favourite] += gap
    return Z


# ----------------------------------------------------------------------------- clipping
def test_clip_recentered_invariants():
    g = torch.Generator().manual_seed(0)
    c = 3.0
    Z = torch.randn(50, 40, generator=g) * torch.tensor([0.1, 1.0, 10.0, 100.0, 1000.0]).repeat(10)[:, None]
    out = P.clip_recentered(Z, c)
    assert torch.allclose(out.max(-1).values, torch.full((50,), c))  # the top logit becomes c
    assert out.min() >= -c
    assert torch.allclose(P.clip_recentered(Z + 123.4, c), out, atol=1e-4)  # shift invariant like softmax
    near = Z >= Z.max(-1, keepdim=True).values - 2 * c  # within 2c of the top: only shifted, not clipped
    assert torch.allclose(out[near], (Z - Z.max(-1, keepdim=True).values + c)[near])
    assert torch.all(out[~near] == -c)
    order = Z.argsort(-1)  # monotone: the clipped row never reorders the logits
    assert torch.all(out.gather(-1, order).diff(dim=-1) >= 0)


# ----------------------------------------------------------------------------- sensitivity
@pytest.mark.parametrize("n", [0, 3, 8, 20])
def test_one_added_record_moves_aggregate_by_c_over_s_and_distance_by_1_over_s(n):
    s, c, V = 8, 4.0, 30
    Z = peaked_rows(n, V, favourite=0, seed=n)
    z_pub = peaked_rows(1, V, favourite=0, seed=99)[0]
    adversaries = [peaked_rows(1, V, favourite=j, gap=1e4)[0] for j in (0, 1, 7)] + \
                  [torch.randn(V, generator=torch.Generator().manual_seed(k)) * 30 for k in range(5)]
    for x in adversaries:
        Zx = torch.cat([Z, x[None]])
        moved = (P.aggregate(Zx, c, s) - P.aggregate(Z, c, s)).abs().max().item()
        assert moved <= c / s + 1e-5
        d_moved = abs(P.svt_distance(Zx, z_pub, s).item() - P.svt_distance(Z, z_pub, s).item())
        assert d_moved <= 1 / s + 1e-5
    # The bound is about dividing by s: the same adversary moves an actual-size mean by up to
    # 2c/(n+1), which breaks c/s for every n < 2s - 1 (so this test would catch that mistake).
    if n:
        x = adversaries[1]  # all mass on token 1, which every row disfavours
        Zx = torch.cat([Z, x[None]])
        naive_moved = (P.clip_recentered(Zx, c).mean(0) - P.clip_recentered(Z, c).mean(0)).abs().max().item()
        naive_d = ((F.softmax(Zx, -1).mean(0) - F.softmax(z_pub, -1)).abs().sum()
                   - (F.softmax(Z, -1).mean(0) - F.softmax(z_pub, -1)).abs().sum()).abs().item()
        if n + 1 < 2 * s:
            assert naive_moved > c / s
            assert naive_d > 1 / s


def test_log_prob_ratio_between_neighbouring_batches_is_at_most_2c_over_s_tau():
    s, c, tau, V = 10, 5.0, 0.7, 50
    bound = 2 * c / (s * tau)
    worst = 0.0
    for seed in range(20):
        g = torch.Generator().manual_seed(seed)
        Z = torch.randn(seed % 13, V, generator=g) * (1 + seed)
        for j in range(0, V, 7):
            x = torch.randn(V, generator=g)
            x[j] += 1e4  # +c at j, -c elsewhere after clipping: the worst case
            for allowed in (None, torch.arange(V) % 3 == 0):
                # the public mask is applied to every row before clipping: rows stay in [-c, c]
                p = P.private_log_probs(P.aggregate(Z, c, s, allowed), tau, allowed)
                q = P.private_log_probs(P.aggregate(torch.cat([Z, x[None]]), c, s, allowed), tau, allowed)
                finite = torch.isfinite(p)
                assert torch.equal(finite, torch.isfinite(q))
                worst = max(worst, (p - q)[finite].abs().max().item())
    assert worst <= bound + 1e-5
    assert worst > 0.8 * bound  # the adversaries come close: the check is not vacuous


def test_private_tokens_follow_softmax_of_aggregate_and_respect_the_public_mask():
    s, c, V = 4, 2.0, 6
    mech = P.Mechanism(s=s, c=c, tau=1.5, svt=False, sigma=1.0, theta=0.0, tau_pub=1.0)
    Z = torch.randn(3, V, generator=torch.Generator().manual_seed(1))
    z_pub = torch.tensor([5.0, 4.0, 0.0, 0.0, 0.0, 0.0])
    gen = torch.Generator().manual_seed(0)
    counts = np.bincount([mech.private_token(Z, z_pub, gen) for _ in range(2000)], minlength=V) / 2000
    expected = P.private_log_probs(P.aggregate(Z, c, s), 1.5).exp().numpy()
    assert np.abs(counts - expected).max() < 0.04  # ~4 standard errors
    mech.public_top_k = 2
    assert {mech.private_token(Z, z_pub, gen) for _ in range(300)} <= {0, 1}


def test_laplace_has_the_right_scale():
    gen = torch.Generator().manual_seed(0)
    x = np.array([P.laplace(0.5, gen) for _ in range(20000)])
    assert abs(x.mean()) < 0.02 and abs(np.abs(x).mean() - 0.5) < 0.02  # E|Lap(b)| = b


# ----------------------------------------------------------------------------- batching
def test_removing_one_record_changes_exactly_one_batch():
    rng = random.Random(0)
    texts = [f"person {i}: salary {rng.randint(1000, 9999)}" for i in range(60)]
    before, _ = P.assign_batches(texts, "lbl", "salt", 7)
    as_sets = lambda batches, ts: [sorted(ts[i] for i in b) for b in batches]
    for k in (0, 17, 59):
        rest = texts[:k] + texts[k + 1:]
        after, _ = P.assign_batches(rest, "lbl", "salt", 7)
        changed = [b for b in range(7) if as_sets(before, texts)[b] != as_sets(after, rest)[b]]
        assert changed == [P.batch_of(texts[k], "lbl", "salt", 7)]
    shuffled = texts[:]
    rng.shuffle(shuffled)  # a record's batch depends on the record, not on the others or their order
    assert as_sets(P.assign_batches(shuffled, "lbl", "salt", 7)[0], shuffled) == as_sets(before, texts)
    salted = lambda salt: [P.batch_of(t, "lbl", salt, 7) for t in texts]
    assert salted("salt") != salted("other salt")  # the salt matters


def test_capped_batches_differ_by_at_most_a_swap_and_cost_four_times_rho():
    texts = [f"r{i}" for i in range(40)]
    full, dropped = P.assign_batches(texts, "", "s", 2, max_batch_size=5)
    assert dropped == 30 and all(len(b) == 5 for b in full)
    for extra in (f"new{i}" for i in range(20)):
        grown, _ = P.assign_batches(texts + [extra], "", "s", 2, max_batch_size=5)
        for b0, b1 in zip(full, grown):
            a, b = {texts[i] for i in b0}, {(texts + [extra])[i] for i in b1}
            assert len(a - b) <= 1 and len(b - a) <= 1  # one in, one out at most
    base = P.rho_per_private_token(250, 10, 2, 0.5, svt=True)
    assert math.isclose(P.rho_per_private_token(250, 10, 2, 0.5, svt=True, capped=True), 4 * base)


# ----------------------------------------------------------------------------- accounting
def test_rho_per_private_token_anchor():
    assert math.isclose(P.rho_per_private_token(250, 10.0, 2.0, svt=False), 2e-4, rel_tol=1e-12)
    assert math.isclose(P.rho_per_private_token(250, 10.0, 2.0, sigma=0.5, svt=True), 2e-4 + 2 / 125 ** 2)
    cfg = {**S.DEFAULTS, "s": 250, "c": 10.0, "tau": 2.0, "svt": False, "r": 100, "epsilon": 0.0}
    report = P.privacy_budget(cfg)
    assert math.isclose(report["rho"], 100 * 2e-4) and report["sigma"] is None


def test_zcdp_conversion_matches_dp_accounting_and_beats_the_simple_bound():
    from dp_accounting.rdp.rdp_privacy_accountant import compute_epsilon
    orders = np.concatenate([np.linspace(1.02, 10, 500), np.linspace(10, 2000, 2000)])
    for rho in (1e-4, 0.01, 0.05, 0.3, 2.0):
        for delta in (1e-5, 1e-6):
            ours = P.zcdp_to_epsilon(rho, delta)
            theirs, _ = compute_epsilon(orders, orders * rho, delta)  # rho-zCDP = RDP alpha * rho
            assert ours <= theirs + 1e-9 and ours >= 0.99 * theirs
            assert ours < P.zcdp_to_epsilon_simple(rho, delta)


def test_r_solved_from_epsilon_is_the_largest_that_fits():
    for svt in (False, True):
        cfg = {**S.DEFAULTS, "epsilon": 1.0, "r": 0, "s": 250, "c": 10.0, "tau": 2.0, "svt": svt, "sigma": 0.5}
        rep = P.privacy_budget(cfg)
        assert rep["epsilon"] <= 1.0 and rep["r"] >= 1
        assert P.zcdp_to_epsilon((rep["r"] + 1) * rep["rho_per_private_token"], cfg["delta"]) > 1.0


def test_the_released_joint_takes_its_share_of_rho_and_the_tokens_the_rest():
    """release_share=0.5 at epsilon 8: the joint's Gaussian gets half the rho of the target (sigma =
    1/sqrt(2 rho), doubled with a batch cap), the r private tokens the largest count that fits beside it,
    and the whole stays at the target. Without --epsilon (an explicit r) a share is refused."""
    for capped in (0, 300):
        cfg = {**S.DEFAULTS, "epsilon": 8.0, "r": 0, "s": 250, "c": 3.0, "tau": 1.0, "svt": False,
               "release_share": 0.5, "max_batch_size": capped}
        rep, rho_max = P.privacy_budget(cfg), P.max_rho_for_epsilon(8.0, cfg["delta"])
        release, per_token = rep["release"], rep["rho_per_private_token"]
        assert release["rho"] == pytest.approx(0.5 * rho_max)
        assert release["sigma"] == pytest.approx((2.0 if capped else 1.0) / math.sqrt(2 * release["rho"]))
        assert rep["rho"] == pytest.approx(rep["r"] * per_token + release["rho"]) and rep["epsilon"] <= 8.0
        assert P.zcdp_to_epsilon((rep["r"] + 1) * per_token + release["rho"], cfg["delta"]) > 8.0
        without = P.privacy_budget({**cfg, "release_share": 0.0})
        assert without["release"] is None and rep["r"] == pytest.approx(without["r"] / 2, abs=1)
    with pytest.raises(Exception, match="release_share"):
        P.privacy_budget({**cfg, "epsilon": 0.0, "r": 100})


def test_released_bands_split_the_release_evenly_and_a_whole_share_leaves_no_token():
    """release_bands add one table each: the tables share the release's rho evenly (each sigma =
    1/sqrt(2 rho / tables)); release_share=1 gives every table its part of the whole rho and r = 0, and
    dp-accounting's RDP accountant, composing the tables' Gaussians, finds the same epsilon, at the target.
    Bands without a share are refused."""
    from dp_accounting import GaussianDpEvent, SelfComposedDpEvent
    from dp_accounting.rdp import RdpAccountant
    cfg = {**S.DEFAULTS, "epsilon": 8.0, "r": 0, "s": 250, "c": 3.0, "tau": 1.0, "svt": False,
           "release_share": 1.0, "release_bands": {"Annual Salary": ["Full or Part-Time"]}}
    rep, rho_max = P.privacy_budget(cfg), P.max_rho_for_epsilon(8.0, cfg["delta"])
    release = rep["release"]
    assert rep["r"] == 0 and release["tables"] == 2 and release["rho"] == pytest.approx(rho_max)
    assert release["sigma"] == pytest.approx(1.0 / math.sqrt(rho_max))  # 1 / sqrt(2 * rho_max / 2)
    assert rep["rho"] == pytest.approx(rho_max) and rep["epsilon"] <= 8.0
    accountant = RdpAccountant(list(np.concatenate([np.linspace(1.02, 10, 500), np.linspace(10, 2000, 2000)])))
    accountant.compose(SelfComposedDpEvent(GaussianDpEvent(release["sigma"]), 2))
    assert accountant.get_epsilon(cfg["delta"]) == pytest.approx(rep["epsilon"], rel=0.01)
    half = P.privacy_budget({**cfg, "release_share": 0.5})
    assert half["release"]["rho_per_table"] == pytest.approx(rho_max / 4) and half["r"] >= 1
    with pytest.raises(Exception, match="release_share > 0"):
        P.privacy_budget({**cfg, "release_share": 0.0})


def test_the_release_noise_is_a_gaussian_mechanism_dp_accounting_agrees_on():
    """The released joint's rho = sensitivity^2 / (2 sigma^2): dp-accounting's RDP accountant, given the
    same Gaussian (noise multiplier sigma / sensitivity), finds the same epsilon as our zCDP conversion."""
    from dp_accounting import GaussianDpEvent
    from dp_accounting.rdp import RdpAccountant
    orders = np.concatenate([np.linspace(1.02, 10, 500), np.linspace(10, 2000, 2000)])
    for rho in (0.01, 0.5):
        for capped in (False, True):
            sigma, k = P.release_sigma(rho, capped), (2.0 if capped else 1.0)
            accountant = RdpAccountant(list(orders))
            accountant.compose(GaussianDpEvent(sigma / k))
            theirs = accountant.get_epsilon(1e-6)
            ours = P.zcdp_to_epsilon(rho, 1e-6)
            assert ours <= theirs + 1e-9 and ours >= 0.99 * theirs


# ----------------------------------------------------------------------------- decoding
def left_padded_prompts():
    g = torch.Generator().manual_seed(3)
    return [torch.randint(0, 256, (n,), generator=g).tolist() for n in (5, 11, 8, 3)]


def test_kv_cached_logits_equal_full_recompute_and_each_prompt_alone():
    model = tiny_model(block_size=64).eval()
    prompts = left_padded_prompts()
    cached = P.BatchDecoder(model, prompts, max_new_tokens=20, use_kv_cache=True)
    full = P.BatchDecoder(model, prompts, max_new_tokens=20, use_kv_cache=False)
    g = torch.Generator().manual_seed(0)
    for example in range(2):  # several examples: reset() must truncate the cache back to the prompts
        gen_tokens = torch.randint(0, 256, (8 + example,), generator=g).tolist()
        a, b = cached.reset(), full.reset()
        for t, tok in enumerate(gen_tokens):
            assert (a - b).abs().max().item() < 1e-5
            for i, p in enumerate(prompts):  # padding changes nothing: same as the prompt alone
                alone, _ = model(torch.tensor([p + gen_tokens[:t]]), last_only=True)
                assert (a[i] - alone[0, -1]).abs().max().item() < 1e-5
            a, b = cached.step(tok), full.step(tok)


def run_batch(svt, theta, r, seed=0, max_examples=50):
    model = tiny_model(block_size=64).eval()
    prompts = left_padded_prompts()
    decoder = P.BatchDecoder(model, prompts, max_new_tokens=10)
    mech = P.Mechanism(s=3, c=2.0, tau=1.0, svt=svt, sigma=0.1, theta=theta, tau_pub=1.0)
    return P.synthesize_batch(decoder, len(prompts) - 1, mech, r, torch.Generator().manual_seed(seed),
                              eot=256, max_new_tokens=10, max_examples=max_examples, vocab=257)


@pytest.mark.parametrize("svt,theta", [(False, 0.0), (True, 0.2), (True, -1e9)])
def test_private_token_count_never_exceeds_r(svt, theta):
    for r in (1, 7, 23):
        examples, spent = run_batch(svt, theta, r, seed=r)
        assert spent == sum(e["private_tokens"] for e in examples)
        assert spent == r  # ran until the budget was spent (max_examples is large), never past it
        assert all(len(e["tokens"]) + e["finished"] == e["private_tokens"] + e["public_tokens"] for e in examples)


def test_public_tokens_cost_nothing():
    examples, spent = run_batch(svt=True, theta=1e9, r=5, max_examples=6)
    assert spent == 0 and len(examples) == 6
    assert sum(e["public_tokens"] for e in examples) > 6




def test_masked_rows_keep_the_bounds_and_centre_the_clip_on_an_allowed_token():
    s, c, V = 5, 2.0, 12
    allowed = torch.arange(V) >= 6
    Z = torch.randn(4, V, generator=torch.Generator().manual_seed(0))
    Z[:, 0] += 100  # a disallowed favourite: clipping around it would flatten every allowed token to -c
    for x in (peaked_rows(1, V, j, gap=1e4)[0] for j in (0, 7)):
        moved = (P.aggregate(torch.cat([Z, x[None]]), c, s, allowed) - P.aggregate(Z, c, s, allowed)).abs().max()
        assert moved <= c / s + 1e-5
        d = P.svt_distance(torch.cat([Z, x[None]]), Z[0], s, allowed) - P.svt_distance(Z, Z[0], s, allowed)
        assert abs(float(d)) <= 1 / s + 1e-5
    rows = P.clip_recentered(P.masked(Z, allowed), c)
    assert torch.allclose(rows.max(-1).values, torch.full((4,), c)) and torch.all(rows[:, ~allowed] == -c)
    unmasked_first = P.clip_recentered(Z, c)  # the old order: every allowed token flattened to -c
    assert torch.all(unmasked_first[:, allowed] == -c) and torch.all(rows[:, allowed].max(-1).values == c)


def test_extend_equals_one_token_at_a_time_with_and_without_the_cache():
    model = tiny_model(block_size=64).eval()
    prompts = left_padded_prompts()
    chunk = [5, 17, 99, 3]
    for cache in (True, False):
        one, many = P.BatchDecoder(model, prompts, 12, cache), P.BatchDecoder(model, prompts, 12, cache)
        for _ in range(2):  # after a reset too
            one.reset(), many.reset()
            for t in chunk:
                a = one.step(t)
            b = many.extend(chunk)
            assert (a - b).abs().max().item() < 1e-5
    with pytest.raises(ValueError, match="holds"):
        many.extend(list(range(20)))
