"""Export a checkpoint as a Hugging Face GPT-2 directory that transformers loads offline.

    python -m utils.export_hf --ckpt out/base/ckpt.pt --out out/base-hf          # a base model
    python -m utils.export_hf --ckpt out/dp/ckpt.pt --out out/dp-hf              # a DP fine-tune (LoRA merged)
    python -m utils.export_hf --ckpt out/base/ckpt.pt --patch out/acme.patch --key_file key.hex \
        --tenant acme --out out/acme-hf [--allow_plaintext_export]               # base + sealed patch

    from transformers import GPT2LMHeadModel; GPT2LMHeadModel.from_pretrained("out/base-hf")

Writes config.json and model.safetensors (transformers' own save_pretrained), the GPT-2 tokenizer
files (vocab.json, merges.txt, tokenizer.json, ...) when the model uses GPT-2 BPE, and
private_nanogpt.json (source, tokenizer, the privacy report of a DP run). The directory appears whole
or not at all (written beside it, then renamed).

How our GPT maps onto GPT-2 (logits equal within float error; tests/test_export.py):
- LoRA adapters are merged first (GPT.merge_lora); an untied head becomes tie_word_embeddings=False.
- bias=False: GPT-2 always has biases, so they are written as zeros (exact).
- sinusoidal positions: GPT-2 has a learned position table; the fixed table is written into it (exact
  for inference; a further fine-tune in transformers would then train it).
- The tokenizer files come from what is on disk: tiktoken's cached r50k_base ranks (= GPT-2's), turned
  into vocab.json and merges.txt by replaying byte-pair merging; nothing is downloaded. Byte and word
  tokenizers have no GPT-2 equivalent: the export says so and private_nanogpt.json names them.

A sealed patch holds fine-tuned weights only encrypted. Applying it and exporting the result writes
those weights to disk in plaintext, readable by anyone who can read the folder. That is refused for a
patch that is not differentially private unless --allow_plaintext_export is given; a DP patch's
weights are already a DP release.
"""
import hashlib
import json
import os
import shutil
import tempfile

import torch

from configurator import configure
from utils.atomic import write_json
from utils.checkpoint import load_model
from utils.cli import UserError, run_cli

DEFAULTS = dict(
    ckpt="",  # the checkpoint to export (train.py, finetune_dp.py; for --patch, the base it was made for)
    patch="",  # a sealed patch to apply to ckpt first (finetune_encrypt_memmap.py --export)
    key_file="",  # the patch's key file
    tenant="",  # the patch's tenant ('' = the tenant the key file is bound to)
    out="",  # the directory to write; must not exist yet (or be empty)
    allow_plaintext_export=False,  # export a non-DP patched model anyway: its fine-tuned weights go to disk in clear
    tokenizer_files=True,  # write the GPT-2 tokenizer files when the model uses GPT-2 BPE
)

# our parameter name -> GPT-2's, for one block; GPT-2's Conv1D stores (in, out), so matmul weights transpose
BLOCK_NAMES = {"ln_1.weight": "ln_1.weight", "ln_1.bias": "ln_1.bias", "ln_2.weight": "ln_2.weight",
               "ln_2.bias": "ln_2.bias", "attn.c_attn.weight": "attn.c_attn.weight",
               "attn.c_attn.bias": "attn.c_attn.bias", "attn.c_proj.weight": "attn.c_proj.weight",
               "attn.c_proj.bias": "attn.c_proj.bias", "mlp.c_fc.weight": "mlp.c_fc.weight",
               "mlp.c_fc.bias": "mlp.c_fc.bias", "mlp.c_proj.weight": "mlp.c_proj.weight",
               "mlp.c_proj.bias": "mlp.c_proj.bias"}
CONV1D = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")


def hf_config(gpt, eot):
    """The transformers GPT2Config that computes what `gpt` computes."""
    from transformers import GPT2Config
    c = gpt.config
    return GPT2Config(vocab_size=c.vocab_size, n_positions=c.block_size, n_embd=c.n_embd, n_layer=c.n_layer,
                      n_head=c.n_head, activation_function="gelu_new", layer_norm_epsilon=1e-5,
                      resid_pdrop=c.dropout, embd_pdrop=c.dropout, attn_pdrop=c.dropout,
                      tie_word_embeddings=gpt.weights_tied, bos_token_id=eot, eos_token_id=eot)


def hf_state_dict(gpt):
    """GPT-2 weights equal to gpt's (LoRA must be merged already)."""
    if gpt.lora_config:
        raise UserError("merge LoRA before exporting (GPT.merge_lora)")
    t = gpt.transformer
    wpe = t.wpe.weight if "wpe" in t else gpt.pe_table  # the fixed sinusoidal table becomes a learned one
    out = {"transformer.wte.weight": t.wte.weight, "transformer.wpe.weight": wpe}
    for i, block in enumerate(t.h):
        ours = dict(block.named_parameters())
        for name, hf_name in BLOCK_NAMES.items():
            if name in ours:
                value = ours[name].t() if name in CONV1D else ours[name]
            else:  # bias=False: GPT-2's biases are zeros (one per output of the weight beside it)
                weight = ours[name.replace(".bias", ".weight")]
                value = torch.zeros(weight.shape[0], dtype=weight.dtype)
            out[f"transformer.h.{i}.{hf_name}"] = value
    out["transformer.ln_f.weight"] = t.ln_f.weight
    out["transformer.ln_f.bias"] = t.ln_f.bias if t.ln_f.bias is not None else torch.zeros_like(t.ln_f.weight)
    if not gpt.weights_tied:
        out["lm_head.weight"] = gpt.lm_head.weight
    return {k: v.detach().float().contiguous().clone() for k, v in out.items()}


def to_hf(gpt, eot):
    """A transformers GPT2LMHeadModel with gpt's weights (strict: any name GPT-2 lacks is refused)."""
    from transformers import GPT2LMHeadModel
    hf = GPT2LMHeadModel(hf_config(gpt, eot))
    expected = set(hf.state_dict()) - ({"lm_head.weight"} if gpt.weights_tied else set())
    ours = hf_state_dict(gpt)
    if set(ours) != expected:
        raise UserError(f"this model has weights GPT-2 cannot express: {sorted(set(ours) ^ expected)[:4]}")
    hf.load_state_dict(ours, strict=False)
    return hf.eval()


def require_cached_ranks():
    from utils.tiktoken_cache import cached_ranks_ok
    if not cached_ranks_ok():
        raise UserError("GPT-2's BPE ranks are not in the tiktoken cache, so the tokenizer files cannot be made "
                        "offline: run `python -m utils.tiktoken_cache` once, or pass --tokenizer_files=False")


def gpt2_vocab_and_merges():
    """(vocab {token: id}, merges [("a", "b"), ...]) of GPT-2 from tiktoken's cached r50k_base ranks. A token of
    rank r is the merge of the two parts that byte-pair merging with the ranks below r leaves of it."""
    from tiktoken.load import load_tiktoken_bpe
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    from utils.tiktoken_cache import cache_file
    require_cached_ranks()
    ranks = load_tiktoken_bpe(cache_file())
    to_text = {b: c for b, c in bytes_to_unicode().items()}

    def text(token):
        return "".join(to_text[b] for b in token)

    merges = []
    for token, rank in sorted(ranks.items(), key=lambda kv: kv[1]):
        if len(token) == 1:
            continue
        parts = [bytes([b]) for b in token]
        while len(parts) > 2:
            pairs = [(ranks.get(parts[i] + parts[i + 1], rank), i) for i in range(len(parts) - 1)]
            best, i = min(pairs)
            if best >= rank:
                break
            parts[i:i + 2] = [parts[i] + parts[i + 1]]
        if len(parts) != 2:
            raise UserError(f"the cached BPE ranks are inconsistent at rank {rank}")
        merges.append((text(parts[0]), text(parts[1])))
    vocab = {text(token): rank for token, rank in ranks.items()}
    vocab["<|endoftext|>"] = len(ranks)
    return vocab, merges


def save_gpt2_tokenizer(folder):
    from transformers import GPT2Tokenizer
    vocab, merges = gpt2_vocab_and_merges()
    tokenizer = GPT2Tokenizer(vocab=vocab, merges=merges)
    tokenizer.save_pretrained(folder)  # tokenizer.json, tokenizer_config.json
    tokenizer.backend_tokenizer.model.save(folder)  # vocab.json, merges.txt: what other GPT-2 readers expect


def check_out(out):
    """Refuse a bad --out before any weights are read or decrypted."""
    if not out:
        raise UserError("--out DIR is required (the directory to write)")
    if os.path.isfile(out):
        raise UserError(f"--out {out} is a file; give a directory that does not exist yet")
    if os.path.isdir(out) and os.listdir(out):
        raise UserError(f"--out {out} exists and is not empty; give a new directory")
    parent = os.path.dirname(os.path.abspath(out))
    while not os.path.isdir(parent):
        parent = os.path.dirname(parent)
    if not os.access(parent, os.W_OK | os.X_OK):
        raise UserError(f"--out {out}: cannot write in {parent}")


def check_patch_release(cfg):
    """A non-DP patch's weights leave the encrypted form only with --allow_plaintext_export. Returns the
    patch's (unauthenticated until applied) meta: dp, privacy."""
    from utils.patch_format import SealedPatch
    sealed = SealedPatch.from_file(cfg["patch"])
    try:
        meta = dict(sealed.header.get("meta") or {})
    finally:
        sealed.close()
    dp = bool(meta.get("dp"))
    if not dp and not cfg["allow_plaintext_export"]:
        raise UserError(f"refusing to export {cfg['patch']} applied: it is not differentially private, and the "
                        "export would write its fine-tuned weights to disk in plaintext, which the sealed patch "
                        "exists to prevent; pass --allow_plaintext_export if that is what you want")
    return {"dp": dp, "privacy": meta.get("privacy")}


def export(cfg, log=print):
    """Write cfg['out']; returns its path. Every check runs before the model is loaded."""
    check_out(cfg["out"])
    if not cfg["ckpt"]:
        raise UserError("--ckpt is required (the checkpoint to export, or the base of --patch)")
    if cfg["patch"] and not cfg["key_file"]:
        raise UserError(f"--patch {cfg['patch']} needs --key_file (the file holding the patch's key)")
    patch_meta = check_patch_release(cfg) if cfg["patch"] else {}
    if cfg["patch"]:
        from utils.model_under_test import load_model_under_test
        gpt, ckpt = load_model_under_test(cfg["ckpt"], cfg["patch"], cfg["key_file"], tenant=cfg["tenant"] or None)
    else:
        gpt, ckpt = load_model(cfg["ckpt"])
    tokenizer = (ckpt.get("config") or {}).get("tokenizer") or {}
    name = tokenizer.get("tokenizer") if isinstance(tokenizer, dict) else None
    write_tokenizer = cfg["tokenizer_files"] and name == "gpt2"
    if write_tokenizer:
        require_cached_ranks()
    gpt.merge_lora()
    eot = {"gpt2": 50256, "byte": 256, "word": 0}.get(name)
    hf = to_hf(gpt, eot)
    out = os.path.abspath(cfg["out"])
    os.makedirs(os.path.dirname(out), exist_ok=True)
    tmp = tempfile.mkdtemp(dir=os.path.dirname(out), prefix="." + os.path.basename(out) + ".")
    try:
        hf.save_pretrained(tmp, safe_serialization=True)
        if write_tokenizer:
            save_gpt2_tokenizer(tmp)
        with open(cfg["ckpt"], "rb") as f:
            ckpt_sha = hashlib.sha256(f.read()).hexdigest()
        write_json(os.path.join(tmp, "private_nanogpt.json"), {
            "source_ckpt": os.path.abspath(cfg["ckpt"]), "source_sha256": ckpt_sha,
            "patch": os.path.abspath(cfg["patch"]) if cfg["patch"] else None, "patch_dp": patch_meta.get("dp"),
            "tokenizer": tokenizer or None, "hf_tokenizer_files": bool(write_tokenizer),
            "privacy": patch_meta.get("privacy") or ckpt.get("privacy"), "lora_merged": bool(ckpt.get("lora"))})
        if os.path.isdir(out):
            os.rmdir(out)  # empty (checked above)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    files = ", ".join(sorted(os.listdir(out)))
    log(f"wrote {out}: {files}")
    if not write_tokenizer:
        how = {"byte": "UTF-8 bytes 0-255, 256 = end of text", "word": "its word list is in private_nanogpt.json, "
               "id 0 = end of text"}.get(name, "see private_nanogpt.json")
        log(f"note: no Hugging Face tokenizer files: the model uses the {name or 'unrecorded'} tokenizer ({how})")
    return out


def main(argv=None):
    export(configure(DEFAULTS, argv or []))


if __name__ == "__main__":
    run_cli(main)
