"""DP synthetic text by private prediction (synthesize_dp.py): the sensitivity bounds the guarantee
rests on, the accounting, the batching, the KV-cached decoding and the CLI."""
import json
import math
import os
import random
import subprocess
import sys

import numpy as np
import pytest
import torch
from torch.nn import functional as F

import synthesize_dp as S
from tests.conftest import REPO, make_record_dataset, tiny_model
from utils.checkpoint import save_checkpoint
from utils.cli import UserError


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
    out = S.clip_recentered(Z, c)
    assert torch.allclose(out.max(-1).values, torch.full((50,), c))  # the top logit becomes c
    assert out.min() >= -c
    assert torch.allclose(S.clip_recentered(Z + 123.4, c), out, atol=1e-4)  # shift invariant like softmax
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
        moved = (S.aggregate(Zx, c, s) - S.aggregate(Z, c, s)).abs().max().item()
        assert moved <= c / s + 1e-5
        d_moved = abs(S.svt_distance(Zx, z_pub, s).item() - S.svt_distance(Z, z_pub, s).item())
        assert d_moved <= 1 / s + 1e-5
    # The bound is about dividing by s: the same adversary moves an actual-size mean by up to
    # 2c/(n+1), which breaks c/s for every n < 2s - 1 (so this test would catch that mistake).
    if n:
        x = adversaries[1]  # all mass on token 1, which every row disfavours
        Zx = torch.cat([Z, x[None]])
        naive_moved = (S.clip_recentered(Zx, c).mean(0) - S.clip_recentered(Z, c).mean(0)).abs().max().item()
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
                p = S.private_log_probs(S.aggregate(Z, c, s), tau, allowed)
                q = S.private_log_probs(S.aggregate(torch.cat([Z, x[None]]), c, s), tau, allowed)
                finite = torch.isfinite(p)
                assert torch.equal(finite, torch.isfinite(q))
                worst = max(worst, (p - q)[finite].abs().max().item())
    assert worst <= bound + 1e-5
    assert worst > 0.8 * bound  # the adversaries come close: the check is not vacuous


def test_private_tokens_follow_softmax_of_aggregate_and_respect_the_public_mask():
    s, c, V = 4, 2.0, 6
    mech = S.Mechanism(s=s, c=c, tau=1.5, svt=False, sigma=1.0, theta=0.0, tau_pub=1.0)
    Z = torch.randn(3, V, generator=torch.Generator().manual_seed(1))
    z_pub = torch.tensor([5.0, 4.0, 0.0, 0.0, 0.0, 0.0])
    gen = torch.Generator().manual_seed(0)
    counts = np.bincount([mech.private_token(Z, z_pub, gen) for _ in range(2000)], minlength=V) / 2000
    expected = S.private_log_probs(S.aggregate(Z, c, s), 1.5).exp().numpy()
    assert np.abs(counts - expected).max() < 0.04  # ~4 standard errors
    mech.public_top_k = 2
    assert {mech.private_token(Z, z_pub, gen) for _ in range(300)} <= {0, 1}


def test_laplace_has_the_right_scale():
    gen = torch.Generator().manual_seed(0)
    x = np.array([S.laplace(0.5, gen) for _ in range(20000)])
    assert abs(x.mean()) < 0.02 and abs(np.abs(x).mean() - 0.5) < 0.02  # E|Lap(b)| = b


# ----------------------------------------------------------------------------- batching
def test_removing_one_record_changes_exactly_one_batch():
    rng = random.Random(0)
    texts = [f"person {i}: salary {rng.randint(1000, 9999)}" for i in range(60)]
    before, _ = S.assign_batches(texts, "lbl", "salt", 7)
    as_sets = lambda batches, ts: [sorted(ts[i] for i in b) for b in batches]
    for k in (0, 17, 59):
        rest = texts[:k] + texts[k + 1:]
        after, _ = S.assign_batches(rest, "lbl", "salt", 7)
        changed = [b for b in range(7) if as_sets(before, texts)[b] != as_sets(after, rest)[b]]
        assert changed == [S.batch_of(texts[k], "lbl", "salt", 7)]
    shuffled = texts[:]
    rng.shuffle(shuffled)  # a record's batch depends on the record, not on the others or their order
    assert as_sets(S.assign_batches(shuffled, "lbl", "salt", 7)[0], shuffled) == as_sets(before, texts)
    salted = lambda salt: [S.batch_of(t, "lbl", salt, 7) for t in texts]
    assert salted("salt") != salted("other salt")  # the salt matters


def test_capped_batches_differ_by_at_most_a_swap_and_cost_four_times_rho():
    texts = [f"r{i}" for i in range(40)]
    full, dropped = S.assign_batches(texts, "", "s", 2, max_batch_size=5)
    assert dropped == 30 and all(len(b) == 5 for b in full)
    for extra in (f"new{i}" for i in range(20)):
        grown, _ = S.assign_batches(texts + [extra], "", "s", 2, max_batch_size=5)
        for b0, b1 in zip(full, grown):
            a, b = {texts[i] for i in b0}, {(texts + [extra])[i] for i in b1}
            assert len(a - b) <= 1 and len(b - a) <= 1  # one in, one out at most
    base = S.rho_per_private_token(250, 10, 2, 0.5, svt=True)
    assert math.isclose(S.rho_per_private_token(250, 10, 2, 0.5, svt=True, capped=True), 4 * base)


# ----------------------------------------------------------------------------- accounting
def test_rho_per_private_token_anchor():
    assert math.isclose(S.rho_per_private_token(250, 10.0, 2.0, svt=False), 2e-4, rel_tol=1e-12)
    assert math.isclose(S.rho_per_private_token(250, 10.0, 2.0, sigma=0.5, svt=True), 2e-4 + 2 / 125 ** 2)
    cfg = {**S.DEFAULTS, "s": 250, "c": 10.0, "tau": 2.0, "svt": False, "r": 100, "epsilon": 0.0}
    report = S.privacy_budget(cfg)
    assert math.isclose(report["rho"], 100 * 2e-4) and report["sigma"] is None


def test_zcdp_conversion_matches_dp_accounting_and_beats_the_simple_bound():
    from dp_accounting.rdp.rdp_privacy_accountant import compute_epsilon
    orders = np.concatenate([np.linspace(1.02, 10, 500), np.linspace(10, 2000, 2000)])
    for rho in (1e-4, 0.01, 0.05, 0.3, 2.0):
        for delta in (1e-5, 1e-6):
            ours = S.zcdp_to_epsilon(rho, delta)
            theirs, _ = compute_epsilon(orders, orders * rho, delta)  # rho-zCDP = RDP alpha * rho
            assert ours <= theirs + 1e-9 and ours >= 0.99 * theirs
            assert ours < S.zcdp_to_epsilon_simple(rho, delta)


def test_r_solved_from_epsilon_is_the_largest_that_fits():
    for svt in (False, True):
        cfg = {**S.DEFAULTS, "epsilon": 1.0, "r": 0, "s": 250, "c": 10.0, "tau": 2.0, "svt": svt, "sigma": 0.5}
        rep = S.privacy_budget(cfg)
        assert rep["epsilon"] <= 1.0 and rep["r"] >= 1
        assert S.zcdp_to_epsilon((rep["r"] + 1) * rep["rho_per_private_token"], cfg["delta"]) > 1.0


def test_accounting_needs_no_data_and_refuses_bad_budgets(tmp_path):
    missing = str(tmp_path / "nowhere")
    argv = [f"--data_dir={missing}", f"--ckpt={missing}/ckpt.pt", f"--out={tmp_path}/o.jsonl"]
    with pytest.raises(UserError, match="does not pay for one private token"):
        S.main(argv + ["--epsilon=1e-4", "--s=10"])
    with pytest.raises(UserError, match="exactly one of"):
        S.main(argv + ["--epsilon=1", "--r=5"])
    with pytest.raises(UserError, match="exactly one of"):
        S.main(argv)
    with pytest.raises(UserError, match="delta"):
        S.main(argv + ["--r=5", "--delta=1.5"])
    assert not os.listdir(tmp_path)  # nothing written


# ----------------------------------------------------------------------------- decoding
def left_padded_prompts():
    g = torch.Generator().manual_seed(3)
    return [torch.randint(0, 256, (n,), generator=g).tolist() for n in (5, 11, 8, 3)]


def test_kv_cached_logits_equal_full_recompute_and_each_prompt_alone():
    model = tiny_model(block_size=64).eval()
    prompts = left_padded_prompts()
    cached = S.BatchDecoder(model, prompts, max_new_tokens=20, use_kv_cache=True)
    full = S.BatchDecoder(model, prompts, max_new_tokens=20, use_kv_cache=False)
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
    decoder = S.BatchDecoder(model, prompts, max_new_tokens=10)
    mech = S.Mechanism(s=3, c=2.0, tau=1.0, svt=svt, sigma=0.1, theta=theta, tau_pub=1.0)
    return S.synthesize_batch(decoder, len(prompts) - 1, mech, r, torch.Generator().manual_seed(seed),
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


# ----------------------------------------------------------------------------- end to end
@pytest.fixture
def synth_setup(tmp_path):
    rng = random.Random(0)
    texts = [f"name: P{i}; dept: {rng.choice(['POLICE', 'FIRE'])}; pay: {rng.randint(10, 99)}" for i in range(24)]
    data = make_record_dataset(tmp_path / "rec", texts)
    ckpt = tmp_path / "base" / "ckpt.pt"
    save_checkpoint(ckpt, tiny_model(block_size=128), config={"dataset": "pydocs"})
    return data, str(ckpt), tmp_path


def synth_args(data, ckpt, tmp_path, *extra):
    return [f"--ckpt={ckpt}", f"--data_dir={data}", f"--out={tmp_path}/out/syn.jsonl", "--r=6", "--s=6",
            "--n_batches=6", "--max_new_tokens=16", "--max_examples_per_batch=2", "--keep_unfinished=True",
            "--batch_salt=test", "--seed=0", *extra]


def test_cached_and_uncached_synthesis_give_the_same_text(synth_setup):
    data, ckpt, tmp = synth_setup
    a = S.main(synth_args(data, ckpt, tmp, "--n_batches=3", "--use_kv_cache=True"))["examples"]
    b = S.main(synth_args(data, ckpt, tmp, "--n_batches=3", "--use_kv_cache=False"))["examples"]
    assert [e["text"] for e in a] == [e["text"] for e in b] and len(a) > 0


def test_cli_end_to_end(synth_setup):
    data, ckpt, tmp = synth_setup
    cmd = [sys.executable, os.path.join(REPO, "synthesize_dp.py"), *synth_args(data, ckpt, tmp, "--n_batches=10")]
    done = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp)
    assert done.returncode == 0, done.stderr
    rows = [json.loads(line) for line in open(tmp / "out" / "syn.jsonl")]
    report = json.load(open(tmp / "out" / "syn.privacy.json"))
    assert report["r"] == 6 and report["s"] == 6 and report["batching"]["n_batches"] == 10
    assert math.isclose(report["rho"], 6 * S.rho_per_private_token(6, 10.0, 2.0, S.DEFAULTS["sigma"], svt=True))
    assert report["epsilon"] == S.zcdp_to_epsilon(report["rho"], report["delta"])
    assert {row["batch"] for row in rows} == set(range(10))  # empty batches run too (24 records, 10 batches)
    for b in range(10):
        assert sum(row["private_tokens"] for row in rows if row["batch"] == b) <= 6
    assert report["diagnostics"]["private_tokens"] == sum(row["private_tokens"] for row in rows)
    assert "batch_sizes" not in json.dumps(report)  # nothing data-dependent without noise is reported

    bad = subprocess.run(cmd + ["--ckpt=" + str(tmp / "missing.pt"), f"--out={tmp}/bad.jsonl"],
                         capture_output=True, text=True, cwd=tmp)
    assert bad.returncode == 2 and bad.stderr.startswith("error:") and "Traceback" not in bad.stderr
    assert not os.path.exists(tmp / "bad.jsonl")


def test_vocabulary_mismatch_is_refused(synth_setup):
    data, _, tmp = synth_setup
    small = tmp / "small" / "ckpt.pt"
    save_checkpoint(small, tiny_model(vocab_size=100, block_size=128))
    with pytest.raises(UserError, match="vocabulary"):
        S.main(synth_args(data, str(small), tmp))


def test_utility_check_scores_synthetic_against_real_records(tmp_path, monkeypatch):
    import glob
    import tempfile
    data = tmp_path / "employees"
    subprocess.run([sys.executable, os.path.join(REPO, "data", "employees", "prepare.py"), f"--out_dir={data}",
                    "--tokenizer=byte", "--n_people=40", "--fields=Annual Salary", "--canary_reps=()",
                    "--n_control_canaries=0"], check=True, capture_output=True)
    ckpt = tmp_path / "base" / "ckpt.pt"
    save_checkpoint(ckpt, tiny_model(block_size=128))
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
    os.makedirs(tmp_path / "tmp")
    synthetic = ["Context: Ana Lee. Question: What is Ana Lee's annual salary? Answer: 1.00"] * 3 + ["  "]
    cfg = {**S.DEFAULTS, "ckpt": str(ckpt), "data_dir": str(data), "utility_steps": 2, "utility_batch_size": 2}
    result = S.utility_check(cfg, synthetic, log=lambda *a: None)
    assert result["synthetic"]["train_records"] == result["real"]["train_records"] == 3  # blank one skipped
    for name in ("base", "synthetic", "real"):
        assert math.isfinite(result[name]["val_ppl"]) and result[name]["val_ppl"] > 1
        assert 0.0 <= result[name]["field_accuracy"] <= 1.0
    assert result["qa_people"] > 0 and result["val_records"] > 0
    assert result["synthetic"]["val_ppl"] != result["real"]["val_ppl"]  # trained on different records
    assert not glob.glob(str(tmp_path / "tmp" / "synth_utility_*"))  # the real copies are gone
