"""finetune_dp's DP-SGD update against a naive loop, microbatch invariance, empty Poisson batches,
int8 noise quantization, and what must never move (frozen weights, untouched embedding rows)."""
import copy

import pytest
import torch
import torch.nn.functional as F
from scipy import stats

from conftest import tiny_model
from utils.finetune import build_run, finetune, quantize_int8_
from utils.secure_rng import RunSecret



TINY = dict(n_layer=2, n_embd=32, block_size=48)
CASES = {  # what is trained -> finetune_dp keys
    "full": dict(),
    "frozen": dict(freeze_embeddings=True, freeze_first_blocks=1),
    "last_block": dict(train_last_blocks=1),
    "lora": dict(lora_rank=2, lora_targets=("attn", "mlp")),
    "tied": dict(untie_weights=False),
}


def base_cfg(records_dir, **kw):
    """One exact step: SGD at lr 1 (update = -gradient), float64, noise 0, no target."""
    return {**dict(data_dir=records_dir, dp=True, noise_multiplier=0.0, target_epsilon=None, optimizer="sgd",
                   learning_rate=1.0, dtype="float64", batch_size=4, microbatch_size=2, max_steps=1, save=False), **kw}


def randomize_lora(gpt):
    """LoRA's B starts at zero, which hides A's gradient: give it values so both matter."""
    g = torch.Generator().manual_seed(7)
    for name, p in gpt.named_parameters():
        if name.endswith("lora_B.weight"):
            with torch.no_grad():
                p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * 0.05)


def snapshot_when_ready(ready, lora=False):
    """An on_model_ready callback: (LoRA B randomized, then) a reference copy and the weights before the step."""
    def keep_copy(gpt):
        if lora:
            randomize_lora(gpt)
        ready["ref"] = copy.deepcopy(gpt)
        ready["before"] = {n: p.detach().clone() for n, p in gpt.named_parameters()}
    return keep_copy


def fixed_batch(run, k):
    ds = run.trainer.loader.dataset
    return torch.stack([ds[i][0] for i in range(k)]), torch.stack([ds[i][1] for i in range(k)])


def naive_clipped_sum(ref, x, y, clip):
    """Per-record gradients by plain backward on an unwrapped copy, each clipped to `clip` as Opacus
    does (factor min(1, C / (norm + 1e-6))), summed. Returns (sum per parameter name, norms)."""
    params = {n: p for n, p in ref.named_parameters() if p.requires_grad}
    total = {n: torch.zeros_like(p) for n, p in params.items()}
    norms = []
    for i in range(x.size(0)):
        ref.zero_grad(set_to_none=True)
        logits, _ = ref(x[i:i + 1])
        F.cross_entropy(logits[0], y[i], ignore_index=-1).backward()  # mean over this record's targets
        norm = torch.sqrt(sum((p.grad ** 2).sum() for p in params.values()))
        norms.append(float(norm))
        factor = min(1.0, clip / (float(norm) + 1e-6)) if clip else 1.0
        for n, p in params.items():
            total[n] += factor * p.grad
    return total, norms


def one_step(run, x, y, splits):
    """Drive one logical step on a known batch, split into microbatches as BatchMemoryManager does."""
    tr = run.trainer
    start = 0
    for j, size in enumerate(splits):
        tr.optimizer.signal_skip_step(do_skip=j < len(splits) - 1)
        tr.train_microbatch(x[start:start + size], y[start:start + size])
        start += size
    assert tr.steps == 1


def relative_error(got, want):
    g = torch.cat([v.flatten() for v in got.values()])
    w = torch.cat([v.flatten() for v in want.values()])
    return float((g - w).norm() / w.norm())


@pytest.mark.parametrize("case,mode", [("full", "ghost"), ("full", "hooks"), ("frozen", "ghost"), ("frozen", "hooks"),
                                       ("last_block", "ghost"), ("lora", "ghost"), ("lora", "hooks"),
                                       ("tied", "hooks")])
def test_update_equals_naive_clipped_mean(records_dir, case, mode):
    k = 5  # records in the batch, while the expected batch size is 4: the divisor must be 4
    cfg = base_cfg(records_dir, grad_sample_mode=mode, **CASES[case])
    ready = {}
    keep_copy = snapshot_when_ready(ready, lora=case == "lora")

    # Choose C between the records' gradient norms so that some are clipped and some are not.
    probe = build_run({**cfg, "max_grad_norm": 1.0}, tiny_model(**TINY), keep_copy, log=lambda *a: None)
    x, y = fixed_batch(probe, k)
    _, norms = naive_clipped_sum(ready["ref"], x, y, clip=None)
    clip = sorted(norms)[k // 2]

    run = build_run({**cfg, "max_grad_norm": clip}, tiny_model(**TINY), keep_copy, log=lambda *a: None)
    assert run.trainer.mode == mode
    assert run.gpt.weights_tied == (case in ("tied", "lora", "last_block"))
    want, norms = naive_clipped_sum(ready["ref"], x, y, clip)
    assert min(norms) < clip < max(norms)
    want = {n: v / cfg["batch_size"] for n, v in want.items()}

    one_step(run, x, y, splits=[2, 3])
    for n, p in run.gpt.named_parameters():  # Opacus tracks the trainable ones only; frozen get nothing
        if n in want:
            assert hasattr(p, "grad_sample"), n
        else:
            assert not hasattr(p, "grad_sample") and not hasattr(p, "_norm_sample") and p.grad is None, n
    gpt, before = run.trainer.close(), ready["before"]
    got = {n: before[n] - p.detach() for n, p in gpt.named_parameters() if n in want}
    assert set(got) == set(want) and len(want) > 0
    assert relative_error(got, want) < 1e-6
    for n, p in gpt.named_parameters():  # frozen: bit-identical
        if n not in want:
            assert torch.equal(p.detach(), before[n]), n


def test_ghost_with_trainable_tie_falls_back_to_hooks(records_dir):
    lines = []
    run = build_run(base_cfg(records_dir, untie_weights=False, grad_sample_mode="ghost"), tiny_model(**TINY),
                    log=lines.append)
    assert run.gpt.weights_tied and run.trainer.mode == "hooks"
    assert any("falling back to grad_sample_mode=hooks" in line for line in lines)


def test_microbatch_size_and_clipping_mode_do_not_change_the_update(records_dir):
    """Same reproducible_noise_seed (the explicit opt-in) -> same Poisson batches and same noise (drawn once
    per logical batch): the weights after a few noisy steps agree whatever the physical batch and whether
    ghost or hooks clipped them."""
    results = []
    for mode, micro in (("ghost", 1), ("ghost", 4), ("hooks", 3)):
        cfg = dict(data_dir=records_dir, dp=True, noise_multiplier=0.8, target_epsilon=None, dtype="float64",
                   batch_size=4, microbatch_size=micro, max_steps=3, grad_sample_mode=mode, max_grad_norm=0.5,
                   save=False, eval_interval=0, learning_rate=1e-2, reproducible_noise_seed=0)
        out = finetune(cfg, model=tiny_model(**TINY), log=lambda *a: None)
        results.append(torch.cat([p.detach().flatten() for p in out["model"].parameters()]))
    base = tiny_model(**TINY)
    base.untie_weights()
    start = torch.cat([p.detach().double().flatten() for p in base.parameters()])
    assert not torch.allclose(results[0], start)  # it trained
    for other in results[1:]:
        assert float((other - results[0]).norm() / (results[0] - start).norm()) < 1e-6


@pytest.mark.parametrize("mode", ["ghost", "hooks"])
def test_empty_poisson_batch_still_takes_a_noise_only_step(records_dir, mode):
    cfg = base_cfg(records_dir, grad_sample_mode=mode, noise_multiplier=1.0, optimizer="sgd", learning_rate=0.1)
    run = build_run(cfg, tiny_model(**TINY), log=lambda *a: None)
    before = [p.detach().clone() for p in run.trainer.trainable]
    x = torch.zeros(0, TINY["block_size"], dtype=torch.long)
    run.trainer.optimizer.signal_skip_step(do_skip=False)
    run.trainer.train_microbatch(x, x)
    assert run.trainer.steps == 1
    assert len(run.trainer.engine.accountant.history) == 1  # the empty step is accounted for
    assert all(not torch.equal(b, p.detach()) for b, p in zip(before, run.trainer.trainable))  # noise moved it


def test_int8_quantization_is_unbiased_on_a_255_level_grid():
    g = torch.linspace(-1.0, 0.3, 50, dtype=torch.float64)
    gen = RunSecret.reproducible(0).stream("rounding")
    draws = []
    for _ in range(2000):
        q = g.clone()
        quantize_int8_(q, gen)
        levels = q / (g.abs().max() / 127)
        assert torch.allclose(levels, levels.round(), atol=1e-9) and levels.abs().max() <= 127
        draws.append(q)
    mean = torch.stack(draws).mean(0)
    step = float(g.abs().max() / 127)
    assert float((mean - g).abs().max()) < 5 * 0.5 * step / 2000 ** 0.5  # 5 sigma of the rounding noise
    assert float((draws[0] - g).abs().max()) <= step  # each draw rounds to a neighbouring level


def test_int8_noise_quantization_reaches_the_update(records_dir):
    cfg = base_cfg(records_dir, noise_quantization="int8", noise_multiplier=0.5, max_grad_norm=1.0)
    ready = {}
    run = build_run(cfg, tiny_model(**TINY), lambda g: ready.update(before={n: p.detach().clone() for n, p in
                                                                            g.named_parameters()}),
                    log=lambda *a: None)
    x, y = fixed_batch(run, 4)
    one_step(run, x, y, splits=[4])
    for n, p in run.trainer.close().named_parameters():
        update = ready["before"][n] - p.detach()  # SGD at lr 1: the quantized gradient itself
        levels = update / (update.abs().max() / 127)
        assert torch.allclose(levels, levels.round(), atol=1e-6), n


def test_nonprivate_run_leaves_untouched_rows_and_frozen_blocks_bit_identical(records_dir, tmp_path):
    """The encrypted-delta patch relies on this: no weight decay or noise moves what got no gradient,
    and with save=False nothing reaches the disk."""
    model = tiny_model(**TINY)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    cfg = dict(data_dir=records_dir, dp=False, freeze_first_blocks=1, batch_size=4, microbatch_size=2,
               max_steps=3, weight_decay=0.1, save=False, eval_interval=0, out_dir=str(tmp_path / "out"))
    gpt = finetune(cfg, model=model, log=lambda *a: None)["model"]
    assert [p.name for p in tmp_path.iterdir()] == ["records"]  # the data only: no out_dir, no files
    after = dict(gpt.named_parameters())
    assert not torch.equal(after["transformer.h.1.mlp.c_fc.weight"], before["transformer.h.1.mlp.c_fc.weight"])
    for n in before:
        if n.startswith("transformer.h.0."):
            assert torch.equal(after[n], before[n]), n
    used = torch.zeros(257, dtype=torch.bool)  # byte tokens of the training records' inputs
    for x, _ in run_inputs(records_dir):
        used[x] = True
    wte_b, wte_a = before["transformer.wte.weight"], after["transformer.wte.weight"].detach()
    assert torch.equal(wte_a[~used], wte_b[~used]) and (~used).sum() > 100
    assert not torch.equal(wte_a[used], wte_b[used])


def run_inputs(records_dir):
    from utils.data import RecordDataset
    ds = RecordDataset(records_dir, "train", TINY["block_size"])
    return [ds[i] for i in range(len(ds))]


def noisy_runs(records_dir, **kw):
    cfg = dict(data_dir=records_dir, dp=True, noise_multiplier=1.0, target_epsilon=None, batch_size=4,
               microbatch_size=2, max_steps=2, save=False, eval_interval=0, **kw)
    return [torch.cat([p.detach().flatten() for p in finetune(cfg, model=tiny_model(**TINY), log=lambda *a: None)
                       ["model"].parameters()]) for _ in range(2)]


def test_runs_draw_fresh_secret_randomness_unless_a_reproducible_seed_is_given(records_dir):
    """Same config (and seed) twice: different batches and noise by default, bit-identical with the opt-in."""
    a, b = noisy_runs(records_dir)
    assert not torch.equal(a, b)
    run1, run2 = (build_run(dict(data_dir=records_dir, noise_multiplier=1.0, target_epsilon=None, batch_size=4,
                                 microbatch_size=2, max_steps=200, save=False), tiny_model(**TINY), log=lambda *a: None)
                  for _ in range(2))
    draws = [[tuple(i) for _, i in zip(range(20), r.trainer.loader.batch_sampler)] for r in (run1, run2)]
    assert draws[0] != draws[1]  # the Poisson batches differ too
    c, d = noisy_runs(records_dir, reproducible_noise_seed=7)
    assert torch.equal(c, d)


@pytest.mark.parametrize("mode", ["bk", "ghost", "hooks"])
def test_noise_is_secure_normal_with_std_sigma_c_over_b(records_dir, mode, monkeypatch):
    """An empty logical batch under SGD at lr 1: the update is the noise on the averaged gradient, which must
    be N(0, (sigma C / B)^2) (KS) and must not come from torch's generator (torch.normal is disabled), for
    every Opacus optimizer class the modes use."""
    sigma, clip, B = 1.3, 0.5, 4
    cfg = base_cfg(records_dir, grad_sample_mode=mode, noise_multiplier=sigma, max_grad_norm=clip, batch_size=B,
                   dtype="float32", reproducible_noise_seed=5)  # the same ChaCha20 path, fixed: no flaky KS
    run = build_run(cfg, tiny_model(**TINY), log=lambda *a: None)
    before = [p.detach().clone() for p in run.trainer.trainable]

    def refuse(*a, **k):
        raise AssertionError("noise drawn from torch.normal (a seedable, public generator)")
    monkeypatch.setattr(torch, "normal", refuse)
    x = torch.zeros(0, TINY["block_size"], dtype=torch.long)
    run.trainer.optimizer.signal_skip_step(do_skip=False)
    run.trainer.train_microbatch(x, x)
    assert run.trainer.steps == 1
    noise = torch.cat([(b - p.detach()).flatten() for b, p in zip(before, run.trainer.trainable)]).double()
    std = sigma * clip / B
    assert noise.numel() > 20000
    assert abs(float(noise.std()) / std - 1) < 0.03
    assert stats.kstest((noise / std).numpy(), "norm").pvalue > 1e-3


def test_lora_over_a_freezing_config_is_refused_with_the_overrides_that_fix_it():
    """The shipped DP config freezes blocks and embeddings (the recipe); LoRA freezes every base weight
    itself, so `--lora_rank` on top of it is refused, naming exactly the keys to switch off."""
    from utils.cli import UserError
    from utils.finetune import prepare_model
    cfg = dict(lora_rank=2, lora_alpha=16.0, lora_targets=("attn",), freeze_embeddings=True, freeze_first_blocks=2,
               train_last_blocks=0)
    with pytest.raises(UserError, match=r"add --freeze_embeddings=False --freeze_first_blocks=0$"):
        prepare_model(tiny_model(**TINY), cfg)
    gpt = tiny_model(**TINY)
    prepare_model(gpt, {**cfg, "freeze_embeddings": False, "freeze_first_blocks": 0})
    assert gpt.lora_config["rank"] == 2
