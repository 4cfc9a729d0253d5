"""utils/export_hf.py: transformers' GPT2LMHeadModel loads the export and computes our logits (tied and
untied heads, no biases, sinusoidal positions, LoRA merged); the GPT-2 tokenizer files come from the
tiktoken cache and tokenize like tiktoken; a non-DP sealed patch is not exported in plaintext without the
explicit flag; bad --out is refused before anything is loaded."""
import copy
import json
import os

import pytest
import torch

from tests.conftest import tiny_model
from utils.checkpoint import save_checkpoint
from utils.cli import UserError
from utils.export_hf import DEFAULTS, export


def write_ckpt(path, model, tokenizer="byte"):
    save_checkpoint(path, model, config={"tokenizer": {"tokenizer": tokenizer, "vocab_size": 257}})
    return str(path)


def hf_logits(folder, idx):
    from transformers import GPT2LMHeadModel
    hf = GPT2LMHeadModel.from_pretrained(folder).eval()
    with torch.no_grad():
        return hf(idx).logits


def our_logits(model, idx):
    with torch.no_grad():
        return model.eval()(idx)[0]


IDX = torch.randint(0, 257, (2, 40), generator=torch.Generator().manual_seed(0))


def randomized(model, seed=1):
    """Nonzero biases and LayerNorm gains everywhere, so that a wrong mapping cannot hide behind init values."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    return model


@pytest.mark.parametrize("overrides", [
    dict(),                                              # tied head, learned positions, biases
    dict(tie_weights=False),                             # untied head
    dict(bias=False, pos_encoding="sinusoidal"),         # what GPT-2 lacks, written exactly
], ids=["tied", "untied", "nobias-sinusoidal"])
def test_transformers_loads_the_export_with_our_logits(tmp_path, overrides):
    model = randomized(tiny_model(**overrides))
    ckpt = write_ckpt(tmp_path / "ckpt.pt", model)
    out = export({**DEFAULTS, "ckpt": ckpt, "out": str(tmp_path / "hf")}, log=lambda *a: None)
    assert {"config.json", "model.safetensors", "private_nanogpt.json"} <= set(os.listdir(out))
    config = json.load(open(os.path.join(out, "config.json")))
    assert config["tie_word_embeddings"] is model.weights_tied
    ours, theirs = our_logits(model, IDX), hf_logits(out, IDX)
    assert theirs.shape == ours.shape
    assert (theirs - ours).abs().max() < 1e-4


def test_lora_is_merged_first_with_the_same_outputs(tmp_path):
    model = randomized(tiny_model(tie_weights=False))
    model.add_lora(4, alpha=8.0, targets=("attn", "mlp"))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1)  # B starts at zero; make the adapters matter
    ckpt = write_ckpt(tmp_path / "ckpt.pt", model)
    before = our_logits(model, IDX)
    merged = copy.deepcopy(model)
    merged.merge_lora()
    assert merged.lora_config is None and not any("lora" in n for n, _ in merged.named_parameters())
    assert (our_logits(merged, IDX) - before).abs().max() < 1e-5
    assert (our_logits(model, IDX) - before).abs().max() < 1e-6  # merging a copy leaves the original alone
    out = export({**DEFAULTS, "ckpt": ckpt, "out": str(tmp_path / "hf")}, log=lambda *a: None)
    assert (hf_logits(out, IDX) - before).abs().max() < 1e-4
    assert json.load(open(os.path.join(out, "private_nanogpt.json")))["lora_merged"] is True


def test_gpt2_tokenizer_files_come_from_the_tiktoken_cache(tmp_path):
    from utils.tiktoken_cache import cached_ranks_ok
    if not cached_ranks_ok():
        pytest.skip("GPT-2's BPE ranks are not cached (make setup seeds them)")
    from transformers import AutoTokenizer

    from utils.tokenizer import GPT2Tokenizer
    model = tiny_model(vocab_size=50304, n_embd=16, n_head=2)
    ckpt = write_ckpt(tmp_path / "ckpt.pt", model, tokenizer="gpt2")
    out = export({**DEFAULTS, "ckpt": ckpt, "out": str(tmp_path / "hf")}, log=lambda *a: None)
    assert {"vocab.json", "merges.txt"} <= set(os.listdir(out))
    with open(os.path.join(out, "merges.txt"), encoding="utf-8") as f:
        lines = f.read().split("\n")
    assert lines[0].startswith("#version")
    merges = [line for line in lines[1:] if line]
    assert len(merges) == 50000  # GPT-2's merges.txt has exactly 50,000 merges
    hf_tok = AutoTokenizer.from_pretrained(out)
    enc = GPT2Tokenizer()  # tiktoken, offline
    text = ("Maria Lopez's annual salary is $84,000.\n  def f(x):\n\treturn x ** 2  # café, naïve, 東京 🙂 "
            "don't they'll I'm 12345678 ... !!! <tag>")
    assert hf_tok(text)["input_ids"] == enc.encode(text)
    assert hf_tok.decode(enc.encode(text)) == text
    assert json.load(open(os.path.join(out, "config.json")))["eos_token_id"] == 50256


def test_a_dp_checkpoint_exports_with_its_privacy_report_and_no_tokenizer_files_for_bytes(tmp_path):
    privacy = {"epsilon": 3.0, "delta": 1e-5, "accountant": "rdp", "privacy_unit": "person"}
    path = str(tmp_path / "ckpt.pt")
    save_checkpoint(path, tiny_model(), config={"tokenizer": {"tokenizer": "byte", "vocab_size": 257}},
                    privacy=privacy)  # as utils/finetune.py saves a DP run
    lines = []
    out = export({**DEFAULTS, "ckpt": path, "out": str(tmp_path / "hf")}, log=lines.append)
    assert "vocab.json" not in os.listdir(out)
    assert any("no Hugging Face tokenizer files" in line and "byte" in line for line in lines)
    meta = json.load(open(os.path.join(out, "private_nanogpt.json")))
    assert meta["tokenizer"]["tokenizer"] == "byte" and meta["privacy"] == privacy


@pytest.fixture
def sealed_non_dp_patch(tmp_path):
    """A base checkpoint and a sealed, non-DP patch of a changed copy of it, with its key file."""
    from utils import patch_apply, patch_cipher, patch_keys, patch_payload
    base = tiny_model().eval()
    tuned = randomized(copy.deepcopy(base), seed=7)
    tuned_params = dict(tuned.named_parameters())
    plain = [t for name, p in base.named_parameters()  # a tied head is one parameter, the embedding
             if (t := patch_payload.delta_tensor(name, p, tuned_params[name])) is not None]
    key_file = str(tmp_path / "key.hex")
    patch_keys.generate_key_file(key_file, tenant="alice")
    sealed = patch_cipher.seal(plain, patch_keys.load_key(key_file=key_file), tenant="alice",
                               base_fingerprint=patch_apply.base_fingerprint(base),
                               meta={"dp": False, "tokenizer": "byte"})
    for t in plain:
        t.close()
    patch = sealed.export(str(tmp_path / "alice.patch"))
    return dict(ckpt=write_ckpt(tmp_path / "base.pt", base), patch=patch, key_file=key_file, tuned=tuned)


def test_a_non_dp_patch_is_not_exported_in_plaintext_without_the_flag(tmp_path, sealed_non_dp_patch):
    s = sealed_non_dp_patch
    cfg = {**DEFAULTS, "ckpt": s["ckpt"], "patch": s["patch"], "key_file": s["key_file"], "out": str(tmp_path / "hf")}
    with pytest.raises(UserError, match="not differentially private.*plaintext.*--allow_plaintext_export"):
        export(cfg, log=lambda *a: None)
    assert not os.path.exists(tmp_path / "hf")
    out = export({**cfg, "allow_plaintext_export": True}, log=lambda *a: None)
    assert (hf_logits(out, IDX) - our_logits(s["tuned"], IDX)).abs().max() < 1e-4  # the patched weights
    assert json.load(open(os.path.join(out, "private_nanogpt.json")))["patch_dp"] is False


def test_bad_out_is_refused_before_the_checkpoint_is_read(tmp_path):
    missing_ckpt = str(tmp_path / "no-such-ckpt.pt")  # reading it would fail differently
    a_file = tmp_path / "file"
    a_file.write_text("x")
    full = tmp_path / "full"
    full.mkdir()
    (full / "keep.txt").write_text("mine")
    for out, message in ((str(a_file), "is a file"), (str(full), "not empty"), ("", "--out DIR is required")):
        with pytest.raises(UserError, match=message):
            export({**DEFAULTS, "ckpt": missing_ckpt, "out": out})
    assert (full / "keep.txt").read_text() == "mine" and a_file.read_text() == "x"
