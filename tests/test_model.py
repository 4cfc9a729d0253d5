import math

import pytest
import torch

from model import GPT, GPTConfig, sample_next
from tests.conftest import tiny_model


def test_forward_shapes_and_loss():
    m = tiny_model()
    x = torch.randint(0, 257, (3, 16))
    logits, loss = m(x, targets=x)
    assert logits.shape == (3, 16, 257)
    assert loss.ndim == 0 and abs(loss.item() - math.log(257)) < 0.5  # near uniform at init
    last, none = m(x, last_only=True)
    assert last.shape == (3, 1, 257) and none is None
    assert torch.allclose(last[:, 0], logits[:, -1], atol=1e-6)


def test_positions_are_batch_shaped_and_contiguous():
    m = tiny_model()
    x = torch.zeros(4, 7, dtype=torch.long)
    pos = m.positions(x)
    assert pos.shape == (4, 7) and pos.is_contiguous()
    mask = torch.tensor([[0, 0, 1, 1, 1, 1, 1]] * 4)
    assert m.positions(x, mask)[0].tolist() == [0, 0, 0, 1, 2, 3, 4]


@pytest.mark.parametrize("pos_encoding", ["learned", "sinusoidal"])
def test_kv_cache_matches_full_recompute(pos_encoding):
    m = tiny_model(pos_encoding=pos_encoding).eval()
    x = torch.randint(0, 257, (2, 10))
    a, la = m.generate(x, 30, greedy=True, use_kv_cache=True, return_logits=True)
    b, lb = m.generate(x, 30, greedy=True, use_kv_cache=False, return_logits=True)
    assert torch.equal(a, b)
    assert (la - lb).abs().max().item() < 1e-5


def test_left_padded_batch_equals_each_prompt_alone():
    m = tiny_model().eval()
    prompts = [torch.randint(0, 257, (n,)) for n in (3, 9, 6)]
    T = max(len(p) for p in prompts)
    idx = torch.zeros(3, T, dtype=torch.long)
    mask = torch.zeros(3, T, dtype=torch.long)
    for i, p in enumerate(prompts):
        idx[i, T - len(p):], mask[i, T - len(p):] = p, 1
    for use_cache in (True, False):
        out, logits = m.generate(idx, 12, greedy=True, use_kv_cache=use_cache, attention_mask=mask, return_logits=True)
        for i, p in enumerate(prompts):
            alone, alone_logits = m.generate(p[None], 12, greedy=True, return_logits=True)
            assert torch.equal(out[i, T:], alone[0, len(p):])
            assert (logits[i] - alone_logits[0]).abs().max().item() < 1e-5


def test_generation_past_block_size_crops_context_in_both_modes():
    m = tiny_model(block_size=16).eval()
    x = torch.randint(0, 257, (2, 5))
    a, la = m.generate(x, 40, greedy=True, use_kv_cache=True, return_logits=True)
    b, lb = m.generate(x, 40, greedy=True, use_kv_cache=False, return_logits=True)
    assert a.shape == (2, 45) and torch.equal(a, b)
    assert (la - lb).abs().max().item() < 1e-5
    # the token after the crop depends only on the last block_size tokens
    ctx = a[:, -17:-1]
    nxt, _ = m(ctx, last_only=True)
    assert torch.equal(nxt[:, -1].argmax(-1), a[:, -1])
    with pytest.raises(ValueError, match="block_size"):
        m(torch.zeros(1, 17, dtype=torch.long))


def test_sampling_options_and_generator_reproducible():
    logits = torch.tensor([[0.0, 1.0, 2.0, 3.0]])
    assert sample_next(logits, greedy=True).item() == 3
    g = torch.Generator().manual_seed(0)
    draws = {sample_next(logits, top_k=2, generator=g).item() for _ in range(50)}
    assert draws <= {2, 3} and len(draws) == 2
    draws = {sample_next(logits, top_p=0.5, generator=g).item() for _ in range(50)}
    assert draws == {3}  # softmax mass of token 3 is 0.64 >= 0.5
    m = tiny_model().eval()
    x = torch.randint(0, 257, (1, 4))
    a = m.generate(x, 10, top_k=20, generator=torch.Generator().manual_seed(1))
    b = m.generate(x, 10, top_k=20, generator=torch.Generator().manual_seed(1))
    assert torch.equal(a, b)


def test_tied_untie_freeze_lora():
    m = tiny_model()
    assert m.weights_tied
    n_tied = m.get_num_params(non_embedding=False)
    m.untie_weights()
    assert not m.weights_tied and not m.config.tie_weights
    assert torch.equal(m.lm_head.weight, m.transformer.wte.weight)
    assert m.get_num_params(non_embedding=False) == n_tied + m.lm_head.weight.numel()
    m.freeze(embeddings=True, first_blocks=1)
    frozen = {n for n, p in m.named_parameters() if not p.requires_grad}
    assert "transformer.wte.weight" in frozen and "transformer.wpe.weight" in frozen
    assert any(n.startswith("transformer.h.0.") for n in frozen)
    assert not any(n.startswith("transformer.h.1.") for n in frozen)
    with pytest.raises(ValueError):
        m.freeze(first_blocks=5)

    m = tiny_model().eval()
    x = torch.randint(0, 257, (2, 8))
    before, _ = m(x)
    m.add_lora(4, 8.0, ("attn", "mlp"))
    after, _ = m(x)
    assert torch.allclose(before, after, atol=1e-6)  # B = 0: the adapter starts as the identity
    trainable = [n for n, p in m.named_parameters() if p.requires_grad]
    assert trainable and all(".lora_" in n for n in trainable)
    assert m.lora_config == {"rank": 4, "alpha": 8.0, "targets": ["attn", "mlp"]}


def test_configure_optimizers_decays_only_matrices():
    m = tiny_model()
    opt = m.configure_optimizers(0.1, 1e-3, (0.9, 0.95), "cpu")
    decay, no_decay = opt.param_groups
    assert all(p.dim() >= 2 for p in decay["params"]) and decay["weight_decay"] == 0.1
    assert all(p.dim() < 2 for p in no_decay["params"]) and no_decay["weight_decay"] == 0.0
    assert 0 < m.estimate_mfu(4, 1.0) < 1


def test_bad_config_refused():
    with pytest.raises(ValueError):
        GPTConfig(pos_encoding="rotary")
    with pytest.raises(ValueError):
        GPTConfig(n_embd=30, n_head=4)
    with pytest.raises(ValueError, match="unknown model args"):
        GPTConfig.from_dict({"n_layer": 2, "n_experts": 8})


def test_from_pretrained_matches_transformers(tmp_path):
    transformers = pytest.importorskip("transformers")
    cfg = transformers.GPT2Config(n_layer=2, n_head=2, n_embd=32, n_positions=64, vocab_size=300)
    torch.manual_seed(0)
    hf = transformers.GPT2LMHeadModel(cfg).eval()
    hf.save_pretrained(tmp_path / "gpt2-tiny")
    m = GPT.from_pretrained(str(tmp_path / "gpt2-tiny")).eval()
    x = torch.randint(0, 300, (2, 20))
    with torch.no_grad():
        ref = hf(x).logits
        ours, _ = m(x)
    assert (ours - ref).abs().max().item() < 1e-4
    assert m.weights_tied
