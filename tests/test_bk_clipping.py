"""utils/bk_clipping.py: book-keeping clipping gives the naive per-record clip-and-sum update (fp32, 1e-5
relative) in one backward, tied weights included. Opacus style: TestClippingModes runs one suite per
grad_sample_mode (bk, ghost, hooks) against the same naive loop, through the project's Trainer."""
import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from conftest import tiny_model
from test_dp_update import (CASES, fixed_batch, naive_clipped_sum, one_step, relative_error,
                            snapshot_when_ready)
from utils.bk_clipping import BookKeeping
from utils.finetune import build_run, check_config, DEFAULTS, finetune, record_losses

TINY = dict(n_layer=2, n_embd=32, block_size=48)
QUIET = dict(log=lambda *a: None)
BK_CASES = {**CASES, "untied": dict(untie_weights=True), "frozen_embeddings": dict(freeze_embeddings=True),
            "frozen_first_block": dict(freeze_first_blocks=1), "answers_only": dict(loss_on="answer")}
del BK_CASES["full"]  # = untied


def cfg_for(records_dir, mode, **kw):
    """One exact step in fp32: SGD at lr 1 (update = -gradient), noise 0, no target, expected batch 4.
    The tie stays, except under ghost clipping, which refuses it."""
    return {**dict(data_dir=records_dir, dp=True, noise_multiplier=0.0, target_epsilon=None, optimizer="sgd",
                   learning_rate=1.0, dtype="float32", batch_size=4, microbatch_size=2, max_steps=1, save=False,
                   grad_sample_mode=mode, untie_weights=mode == "ghost"), **kw}


def update_and_naive(records_dir, mode, case, splits, k=5):
    """(update of one step on k records split into `splits`, the naive per-record clipped sum / 4, clip)."""
    ready = {}
    keep_copy = snapshot_when_ready(ready, lora=case == "lora")

    cfg = cfg_for(records_dir, mode, **BK_CASES[case])
    probe = build_run(cfg, tiny_model(**TINY), keep_copy, **QUIET)
    x, y = fixed_batch(probe, k)
    _, norms = naive_clipped_sum(ready["ref"], x, y, clip=None)
    clip = sorted(norms)[k // 2]  # some records clipped, some not
    run = build_run({**cfg, "max_grad_norm": clip}, tiny_model(**TINY), keep_copy, **QUIET)
    want, _ = naive_clipped_sum(ready["ref"], x, y, clip)
    one_step(run, x, y, splits)
    gpt = run.trainer.close()
    got = {n: ready["before"][n] - p.detach() for n, p in gpt.named_parameters() if n in want}
    frozen_moved = [n for n, p in gpt.named_parameters() if n not in want and not torch.equal(p, ready["before"][n])]
    return got, {n: v / cfg["batch_size"] for n, v in want.items()}, run, frozen_moved


class TestClippingModes:
    mode = "bk"

    @pytest.mark.parametrize("case", sorted(BK_CASES))
    def test_update_equals_naive_per_record_clip_and_sum(self, records_dir, case):
        if self.mode == "ghost" and case == "tied":
            pytest.skip("Opacus's ghost clipping refuses a trainable tied weight (falls back to hooks)")
        got, want, run, frozen_moved = update_and_naive(records_dir, self.mode, case, splits=[2, 3])
        assert run.trainer.mode == self.mode
        assert set(got) == set(want) and want
        assert relative_error(got, want) < 1e-5
        assert not frozen_moved  # frozen weights bit-identical

    def test_microbatch_1_equals_whole_batch(self, records_dir):
        case = "tied" if self.mode != "ghost" else "untied"
        ones, _, _, _ = update_and_naive(records_dir, self.mode, case, splits=[1, 1, 1, 1, 1])
        whole, want, _, _ = update_and_naive(records_dir, self.mode, case, splits=[5])
        assert relative_error(ones, whole) < 1e-5 and relative_error(whole, want) < 1e-5


class TestGhost(TestClippingModes):
    mode = "ghost"


class TestHooks(TestClippingModes):
    mode = "hooks"


# ----------------------------------------------------------------------------- book-keeping itself
@pytest.mark.parametrize("case", ["tied", "untied", "lora"])
def test_bk_update_equals_opacus_hooks(records_dir, case):
    bk, _, _, _ = update_and_naive(records_dir, "bk", case, splits=[2, 3])
    hooks, _, _, _ = update_and_naive(records_dir, "hooks", case, splits=[2, 3])
    assert relative_error(bk, hooks) < 1e-5


def naive_per_record(model, x, y):
    """Per-record gradients (name -> (B, *shape)) by one plain backward per record."""
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    out = {n: [] for n in params}
    for i in range(x.size(0)):
        model.zero_grad(set_to_none=True)
        logits, _ = model(x[i:i + 1])
        record_losses(logits, y[i:i + 1]).sum().backward()
        for n, p in params.items():
            out[n].append(p.grad.clone())
    return {n: torch.stack(v) for n, v in out.items()}


def padded_batch(vocab, b=4, t=24, seed=0):
    """Random records with ignored targets of different lengths, and repeated tokens (so the embedding's
    ghost norm meets equal ids, and the tie's cross term picks the same row twice)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, 12, (b, t), generator=g)
    y = torch.randint(0, vocab, (b, t), generator=g)
    for i, keep in enumerate((t, t - 5, 7, 1)[:b]):
        y[i, keep:] = -1
    return x, y


@pytest.mark.parametrize("method", ["ghost", "materialize", "auto"])
@pytest.mark.parametrize("tied", [True, False])
def test_norms_and_clipped_sum_by_either_per_layer_rule(method, tied):
    """Ghost norms (incl. the tie's cross term) and materialised per-record gradients both give every
    record's exact norm and the exact clipped sum (float64, straight on the module)."""
    model = tiny_model(**TINY).double()
    if not tied:
        model.untie_weights()
    x, y = padded_batch(model.config.vocab_size)
    per_record = naive_per_record(copy.deepcopy(model), x, y)
    norms = torch.sqrt(sum((g.flatten(1) ** 2).sum(1) for g in per_record.values()))
    clip = float(norms.median())
    factor = (clip / (norms + 1e-6)).clamp(max=1.0)
    bk = BookKeeping(model, clip, norm_method=method)
    logits, _ = bk(x)
    record_losses(logits, y).sum().backward()
    bk.clip_and_sum()
    assert torch.allclose(bk.last_norms, norms, rtol=1e-10, atol=0)
    for n, p in model.named_parameters():
        want = torch.tensordot(factor, per_record[n], dims=1)
        assert torch.allclose(p.grad, want, rtol=1e-9, atol=1e-12), n
    assert bk.close() is model and "forward" not in vars(model.lm_head)  # own forward back


def test_tied_norm_needs_the_cross_term():
    """The tie is why ghost clipping gives up: the per-record norm of the shared weight is not the sum of
    its two uses' norms. Untying a copy gives E_i and H_i separately; ||E_i + H_i||^2 != ||E||^2 + ||H||^2."""
    tied = tiny_model(**TINY).double()
    untied = copy.deepcopy(tied)
    untied.untie_weights()
    x, y = padded_batch(tied.config.vocab_size)
    both = naive_per_record(untied, x, y)
    e, h = both["transformer.wte.weight"], both["lm_head.weight"]
    bk = BookKeeping(tied, 1.0, norm_method="ghost")
    logits, _ = bk(x)
    record_losses(logits, y).sum().backward()
    bk.clip_and_sum()
    rest = sum((g.flatten(1) ** 2).sum(1) for n, g in both.items() if n not in ("transformer.wte.weight", "lm_head.weight"))
    with_cross = torch.sqrt(rest + ((e + h).flatten(1) ** 2).sum(1))
    without = torch.sqrt(rest + (e.flatten(1) ** 2).sum(1) + (h.flatten(1) ** 2).sum(1))
    assert torch.allclose(bk.last_norms, with_cross, rtol=1e-10)
    assert not torch.allclose(bk.last_norms, without, rtol=1e-6)  # a norm without it would fail above


def test_one_backward_and_no_weight_gradient_from_autograd():
    """Autograd never forms a weight gradient (no parameter hook fires, p.grad stays None) until
    clip_and_sum writes the clipped sum; the embedding output still carries the input gradients."""
    model = tiny_model(**TINY)
    fired = []
    for n, p in model.named_parameters():
        p.register_hook(lambda g, n=n: fired.append(n) if g is not None else None)  # None: nothing formed
    x, y = padded_batch(model.config.vocab_size)
    bk = BookKeeping(model, 1.0)
    logits, _ = bk(x)
    record_losses(logits, y).sum().backward()
    assert fired == [] and all(p.grad is None for p in model.parameters())
    bk.clip_and_sum()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)
    assert float(bk.last_norms.max()) > 0


def test_frozen_layers_are_not_booked_and_keep_their_forward():
    model = tiny_model(**TINY)
    model.freeze(embeddings=True, first_blocks=1)
    bk = BookKeeping(model, 1.0)
    assert "forward" not in vars(model.transformer.h[0].attn.c_attn)  # frozen: autograd's own op
    assert "forward" in vars(model.transformer.h[1].attn.c_attn)
    x, y = padded_batch(model.config.vocab_size)
    logits, _ = bk(x)
    record_losses(logits, y).sum().backward()
    assert {id(p) for p in bk.uses} == {id(p) for p in model.parameters() if p.requires_grad}
    bk.clip_and_sum()
    assert all(p.grad is None for p in model.transformer.h[0].parameters())


def test_a_layer_the_forward_skips_gets_a_zero_gradient():
    """Opacus's optimizer sums p.grad for every trainable parameter: one the forward never reached must
    get zeros (its per-record gradients are 0), not None."""
    used, unused = nn.Linear(3, 2), nn.Linear(3, 2)
    bk = BookKeeping(nn.ModuleDict(dict(used=used, unused=unused)), 1.0)
    used(torch.randn(4, 5, 3)).pow(2).sum().backward()
    bk.clip_and_sum()
    assert used.weight.grad.abs().sum() > 0
    assert torch.equal(unused.weight.grad, torch.zeros(2, 3)) and torch.equal(unused.bias.grad, torch.zeros(2))


def test_unsupported_trainable_layer_is_refused():
    with pytest.raises(ValueError, match="no rule for trainable Conv1d"):
        BookKeeping(nn.Sequential(nn.Linear(3, 3), nn.Conv1d(3, 3, 1)), 1.0)
    with pytest.raises(ValueError, match="norm_method"):
        BookKeeping(nn.Linear(3, 3), 1.0, norm_method="fast")


# ----------------------------------------------------------------------------- in the training loop
def test_bk_is_the_default_and_a_choice(records_dir):
    assert DEFAULTS["grad_sample_mode"] == "bk"
    check_config({**DEFAULTS, "grad_sample_mode": "bk"})
    run = build_run(cfg_for(records_dir, "bk"), tiny_model(**TINY), **QUIET)
    assert run.gpt.weights_tied and run.trainer.mode == "bk"  # the tie stays: bk clips it exactly


def test_noisy_steps_agree_across_modes_and_microbatches(records_dir):
    """Same seed -> same Poisson batches and the same noise, drawn once per logical batch by Opacus's
    optimizer: bk (microbatch 1 and 4) and hooks give the same weights after a few noisy steps."""
    results = []
    for mode, micro in (("bk", 1), ("bk", 4), ("hooks", 3)):
        cfg = dict(data_dir=records_dir, dp=True, noise_multiplier=0.8, target_epsilon=None, dtype="float64",
                   batch_size=4, microbatch_size=micro, max_steps=3, grad_sample_mode=mode, max_grad_norm=0.5,
                   save=False, eval_interval=0, learning_rate=1e-2, untie_weights=False,
                   reproducible_noise_seed=0)  # the explicit opt-in to replayable DP randomness (issue 11)
        out = finetune(cfg, model=tiny_model(**TINY), **QUIET)
        assert out["privacy"]["grad_sample_mode"] == mode and out["privacy"]["steps"] == 3
        results.append(torch.cat([p.detach().flatten() for p in out["model"].parameters()]))
    start = torch.cat([p.detach().double().flatten() for p in tiny_model(**TINY).parameters()])
    assert not torch.allclose(results[0], start)
    for other in results[1:]:
        assert float((other - results[0]).norm() / (results[0] - start).norm()) < 1e-6


def test_empty_poisson_batch_takes_a_noise_only_accounted_step(records_dir):
    run = build_run(cfg_for(records_dir, "bk", noise_multiplier=1.0, learning_rate=0.1), tiny_model(**TINY), **QUIET)
    before = [p.detach().clone() for p in run.trainer.trainable]
    x = torch.zeros(0, TINY["block_size"], dtype=torch.long)
    run.trainer.optimizer.signal_skip_step(do_skip=False)
    run.trainer.train_microbatch(x, x)
    assert run.trainer.steps == 1 and len(run.trainer.engine.accountant.history) == 1
    assert all(not torch.equal(b, p.detach()) for b, p in zip(before, run.trainer.trainable))
