"""
Fine-tune a GPT and keep what it learned only as an encrypted patch over the base model (seed 004, fixed).

    # fine-tune (utils.finetune's loop, DP-SGD by default with finetune_dp's settings) and seal
    python finetune_encrypt_memmap.py [config] --base_ckpt out/base/ckpt.pt --data_dir data/employees \
        --key_file key.hex [--tenant acme] [--export out/acme.patch] [--prompt_file prompts.txt]
    # apply it in another process, with the key; the tenant comes from --tenant or the key file
    python finetune_encrypt_memmap.py apply --base_ckpt out/base/ckpt.pt --patch out/acme.patch \
        --key_file key.hex [--tenant acme] [--prompt "Context: ..."]
    # a fresh random key readable by its owner only, bound to a tenant
    python finetune_encrypt_memmap.py keygen --out key.hex --tenant acme

- DP is on by default (utils.finetune.DEFAULTS: target_epsilon 8, the same as finetune_dp.py). --dp=False
  is a non-private patch: then any privacy setting given (target_epsilon, noise_multiplier, ...) is an
  error, not silently dropped. The authenticated header, the progress lines, the summary and
  EXPORT.privacy.json state DP on/off and the epsilon spent.
- What enters the patch: utils/delta_tracker.py (under DP, only data-independent structure decides).
- The fine-tuned weights never reach the disk: finetune runs with save=False, plaintext deltas live in
  locked anonymous memory and are zeroed once sealed, the trained model is zeroed after the round-trip
  check. --export writes header + ciphertext only and is checked before the fine-tune starts.
- Exit codes (PATCH_FORMAT.md section 8): 0 ok, 2 usage or bad input, 3 authentication failure (wrong
  key, tampered, truncated, swapped blobs), 4 patch for another base model or tenant, or no expected
  tenant at all (neither --tenant nor a key file bound to one).
"""
import copy
import os
import sys
import time

import torch

from configurator import configure
from utils.atomic import write_json
from utils.checkpoint import load_model
from utils.cli import UserError, run_cli
from utils.data import load_meta
from utils.delta_tracker import DeltaTracker
from utils.patch_apply import apply_sealed_patch, base_fingerprint, compare
from utils.patch_cipher import seal
from utils.patch_errors import PatchError, as_user_error
from utils.patch_format import DEFAULT_MAX_FILE_BYTES, SealedPatch, check_export_path
from utils.patch_keys import expected_tenant, generate_key_file, load_key
from utils.secure_memory import harden_process
from utils.timed_generation import generate
from utils.tokenizer import get_tokenizer

KEY_OPTIONS = dict(
    key_file="",  # file holding the 32-byte master key as 64 hex characters (keygen makes one)
    key_env="",  # NAME of an environment variable holding the hex key
    key_stdin=False,  # read the hex key from the first line of stdin
    key="",  # the hex key itself: works, but visible in the process list (warns)
    passphrase_file="",  # or a passphrase (scrypt-stretched; parameters stored in the patch header)
    passphrase_env="",  # NAME of an environment variable holding the passphrase
)
MAX_NEW_TOKENS = 4096  # generation is a sanity check here, not a sampler
# The fine-tune run takes every key of utils.finetune.DEFAULTS too (data_dir, dp, target_epsilon, lora_rank,
# ...): seal_main merges them, so DP defaults to finetune_dp's settings. utils.finetune (and Opacus) are
# imported only there, so that `apply` starts fast.
DEFAULTS = {
    "save": False,  # must stay False: the fine-tuned weights never reach the disk
    **KEY_OPTIONS,
    "tenant": "",  # whose patch this is (bound into every blob); '' = the tenant the key file is bound to
    "generation": 0,  # the tenant's patch counter in the header; 0 = creation time in ns (grows by itself)
    "export": "",  # write the sealed patch here (header + ciphertext only), atomically; checked before training
    "prompt_file": "",  # one prompt per line (UTF-8): base vs patched generations, timed
    "max_new_tokens": 48,  # tokens generated per prompt (0..4096)
    "delta_dtype": "exact",  # 'exact' (base dtype, bit-exact round trip) | 'bfloat16' | 'float16' (lossy)
    "chunk_mb": 64,  # AES-GCM chunk size for large tensors
    "scrypt_n": 1 << 15,  # scrypt cost for passphrases (a power of 2 <= 2^20)
}
# privacy settings that mean nothing without DP: giving one with --dp=False is an error
PRIVACY_KEYS = ("target_epsilon", "target_delta", "noise_multiplier", "max_grad_norm", "accountant", "secure_mode",
                "noise_quantization")
APPLY_DEFAULTS = dict(
    base_ckpt="",  # the base checkpoint the patch was made for...
    init_from="",  # ...or GPT-2 weights (a transformers save_pretrained dir)
    patch="",  # the sealed patch file (--export of a fine-tune run)
    tenant="",  # the tenant the patch must belong to; '' = the tenant the key file is bound to (else an error)
    **KEY_OPTIONS,
    prompt="",  # generate from this prompt with the base and the patched model
    prompt_file="",  # one prompt per line (UTF-8)
    data_dir="",  # for the tokenizer when the patch does not name one
    max_new_tokens=48,  # tokens generated per prompt (0..4096)
    max_patch_mb=DEFAULT_MAX_FILE_BYTES >> 20,  # refuse larger patch files before reading them
    device="cpu",  # where the model runs (patched tensors are locked host memory only on cpu)
)


# ----------------------------------------------------------------------------- CLI helpers
def key_from_cfg(cfg):
    return load_key(key_file=cfg["key_file"] or None, env_var=cfg["key_env"] or None, stdin=cfg["key_stdin"],
                    key_hex=cfg["key"] or None, passphrase_file=cfg["passphrase_file"] or None,
                    passphrase_env=cfg["passphrase_env"] or None)


def tenant_of(cfg):
    """--tenant, or the tenant the key file is bound to (patch_keys.expected_tenant: neither is exit 4)."""
    return expected_tenant(cfg["tenant"] or None, cfg["key_file"] or None)


def check_max_new_tokens(cfg):
    if not 0 <= cfg["max_new_tokens"] <= MAX_NEW_TOKENS:
        raise UserError(f"max_new_tokens must be in 0..{MAX_NEW_TOKENS}; got {cfg['max_new_tokens']}")


def read_prompts(cfg):
    prompts = [cfg["prompt"]] if cfg.get("prompt") else []
    if cfg.get("prompt_file"):
        path = cfg["prompt_file"]
        if not os.path.isfile(path):
            raise UserError(f"prompt file {path} does not exist")
        try:
            with open(path, encoding="utf-8") as f:
                prompts += [line.rstrip("\n").replace("\\n", "\n") for line in f if line.strip()]
        except UnicodeDecodeError as e:
            raise UserError(f"prompt file {path} is not UTF-8 text (byte {e.start}: {e.reason})") from None
    return prompts


def show_generations(prompts, base_runs, patched_runs):
    for prompt, (b, tb), (p, tp) in zip(prompts, base_runs, patched_runs):
        print(f"prompt: {prompt!r}")
        print(f"  base    ({tb * 1000:7.1f} ms): {b!r}")
        print(f"  patched ({tp * 1000:7.1f} ms): {p!r}")


def human(n):
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:,.0f} {unit}" if unit == "B" else f"{n:,.2f} {unit}"
        n /= 1024


def dp_line(privacy):
    return (f"DP on, epsilon {privacy['epsilon']:.3f} at delta {privacy['delta']:.3g}" if privacy
            else "DP OFF: this patch is not differentially private")


@torch.no_grad()
def wipe(model):
    """Zero a model's weights in place (the fine-tuned plaintext, once it is sealed)."""
    for p in model.parameters():
        p.zero_()


def privacy_keys_given(defaults, argv):
    """The privacy keys set by a config file or the command line (their defaults replaced by None, which
    the configurator passes through unchecked: whatever is not None was given)."""
    probe = configure({**defaults, **{k: None for k in PRIVACY_KEYS}}, argv)
    return [k for k in PRIVACY_KEYS if probe[k] is not None]


# ----------------------------------------------------------------------------- fine-tune and seal
def seal_main(argv):
    from utils import finetune as ft_loop
    defaults = {**ft_loop.DEFAULTS, **DEFAULTS}
    cfg = configure(defaults, argv)
    if not cfg["dp"] and privacy_keys_given(defaults, argv):
        raise UserError(f"--dp=False but privacy settings were given ({', '.join(privacy_keys_given(defaults, argv))}): "
                        "a non-private run would ignore them; drop them or keep DP on")
    if cfg["save"]:
        raise UserError("save=True would write the fine-tuned weights to disk in plaintext: this script keeps "
                        "them only as a sealed patch (use finetune_dp.py for a plaintext checkpoint)")
    if cfg["delta_dtype"] not in ("exact", "bfloat16", "float16"):
        raise UserError(f"delta_dtype must be exact, bfloat16 or float16; got {cfg['delta_dtype']!r}")
    if not 1 <= cfg["chunk_mb"] <= 1024:
        raise UserError("chunk_mb must be in 1..1024")
    if cfg["generation"] < 0:
        raise UserError("generation must be >= 0")
    check_max_new_tokens(cfg)
    tenant = tenant_of(cfg)
    if cfg["export"]:
        check_export_path(cfg["export"])
    key = key_from_cfg(cfg)
    prompts = read_prompts(cfg)
    tok = get_tokenizer(load_meta(cfg["data_dir"]))
    ft_cfg = {k: cfg[k] for k in ft_loop.DEFAULTS}
    ft_cfg["save"] = False
    ft_loop.check_config(ft_cfg)
    base = ft_loop.load_base(cfg)[0].eval()
    base_fp = base_fingerprint(base)
    tracker = DeltaTracker(base, dp=cfg["dp"])
    print(f"sealing a patch of tenant {tenant}: " + (
        f"DP on (target epsilon {cfg['target_epsilon']}, noise multiplier "
        f"{'calibrated' if cfg['noise_multiplier'] is None else cfg['noise_multiplier']}, clip {cfg['max_grad_norm']})"
        if cfg["dp"] else "DP OFF (--dp=False): the patch will not be differentially private"), flush=True)
    t0 = time.perf_counter()
    result = ft_loop.finetune(ft_cfg, model=copy.deepcopy(base).train(), on_model_ready=tracker)
    finetune_s = time.perf_counter() - t0
    train_s = result["train_time_s"]
    trained = result["model"].cpu()

    t0 = time.perf_counter()
    plain, rep = tracker.build(trained, cfg["delta_dtype"], chunk_bytes=cfg["chunk_mb"] << 20)
    privacy = result["privacy"]
    meta = {"tokenizer": tok.name if tok.name != "word" else None, "dp": bool(privacy),
            "epsilon": privacy["epsilon"] if privacy else None, "delta": privacy["delta"] if privacy else None,
            "delta_dtype": cfg["delta_dtype"], "steps": privacy["steps"] if privacy else None}
    locked = sum(t.buffer.locked for t in plain)
    lock_errors = {t.buffer.lock_error for t in plain if not t.buffer.locked}
    try:
        sealed = seal(plain, key, tenant=tenant, base_fingerprint=base_fp, structure=tracker.structure, meta=meta,
                      generation=cfg["generation"] or None, chunk_bytes=cfg["chunk_mb"] << 20,
                      scrypt_params={"n": cfg["scrypt_n"]}, consume=True)  # encrypted where they lie
    finally:
        for t in plain:
            t.close()
    seal_s = time.perf_counter() - t0

    # the round trip, through the real apply path: patched base == fine-tuned model?
    applied = apply_sealed_patch(base, sealed, key, tenant, base_fp=base_fp)
    n_params, differ, worst = compare(base, trained)
    wipe(trained)  # the plaintext fine-tuned weights are no longer needed
    del trained, result

    blobs = sealed.blobs()
    payload = sum(e["plain_bytes"] for e in sealed.header["tensors"])
    itemsize = torch.empty(0, dtype=tracker.default_dtype).element_size()
    print(f"tenant {tenant}, patch {sealed.header['patch_id']}, generation {sealed.header['generation']}: "
          + dp_line(privacy))
    print(f"modified tensors: {len(plain)} of {rep['trainable']} trainable ({rep['frozen']} frozen, "
          f"{len(rep['untouched'])} without gradient, {len(rep['zero_delta'])} with an exactly zero delta, "
          f"{rep['new_tensors']} new, stored whole)")
    for name, (kept, total) in rep["rows"].items():
        print(f"  {name}: {kept} of {total} rows")
    if cfg["dp"]:
        print("  (DP: every trainable tensor and embedding row is in the patch, whatever the sampled records were)")
    print(f"patch bytes: {sealed.nbytes:,} ({human(sealed.nbytes)}); payload {payload:,} = "
          f"{payload / max(1, rep['changed_values'] * itemsize):.3f}x the {rep['changed_values']:,} changed "
          f"parameters x {itemsize} B")
    if blobs:
        big = max(blobs, key=lambda b: b[2])
        print(f"blobs: {len(blobs)}, largest {big[0]} {big[2]:,} B, average {sum(b[2] for b in blobs) / len(blobs):,.0f} B")
    if rep["exceptions"]:
        print(f"exact round trip: {rep['exceptions']:,} values where base + delta would not round back hold the "
              f"fine-tuned value instead (flagged in a bitmap: 1 bit per value of those tensors)")
    if rep["drift_values"]:
        print(f"left out: {rep['drift_values']:,} values that moved without receiving a gradient "
              f"(max |change| {rep['drift_max']:.3g})")
    if cfg["delta_dtype"] != "exact":
        print(f"{cfg['delta_dtype']} deltas: max |patched - fine-tuned| {rep['max_error']:.3g}")
    print(f"fine-tune {finetune_s:.1f} s (training steps {train_s:.1f} s), seal {seal_s * 1000:.0f} ms, "
          f"plaintext buffers mlocked: {locked}/{len(plain)}"
          + (f" ({'; '.join(sorted(lock_errors))})" if lock_errors else ""))
    if not differ:
        print(f"round trip: patched == fine-tuned, bit for bit, on all {n_params} parameters")
    else:
        print(f"round trip: {len(differ)} of {n_params} parameters differ from the fine-tuned model "
              f"(max |difference| {worst:.3g}): " + ", ".join(differ[:4]) + (" ..." if len(differ) > 4 else ""))

    if prompts:
        patched_runs = [generate(base, tok, p, cfg["max_new_tokens"]) for p in prompts]
        applied.revert()
        base_runs = [generate(base, tok, p, cfg["max_new_tokens"]) for p in prompts]
        show_generations(prompts, base_runs, patched_runs)
    applied.revert()
    if cfg["export"]:
        sealed.export(cfg["export"])
        write_json(cfg["export"] + ".privacy.json", {"tenant": tenant, "patch_id": sealed.header["patch_id"],
                                                     "dp": bool(privacy), "privacy": privacy})
        print(f"exported {cfg['export']} ({sealed.nbytes:,} bytes: header + ciphertext) and "
              f"{cfg['export']}.privacy.json ({dp_line(privacy)})")
    else:
        print("not exported: the patch lived in anonymous memory and ends with this process (--export PATH keeps it)")
    sealed.close()
    return {"report": rep, "patch_bytes": sealed.nbytes, "differ": differ, "header": sealed.header}


# ----------------------------------------------------------------------------- apply in a fresh process
def apply_main(argv):
    cfg = configure(APPLY_DEFAULTS, argv)
    if not cfg["patch"]:
        raise UserError("--patch is required (a file written by --export)")
    if not (cfg["base_ckpt"] or cfg["init_from"]):
        raise UserError("--base_ckpt is required (the base model the patch was made for)")
    check_max_new_tokens(cfg)
    if cfg["max_patch_mb"] <= 0:
        raise UserError("max_patch_mb must be positive")
    tenant = tenant_of(cfg)
    key = key_from_cfg(cfg)
    prompts = read_prompts(cfg)
    sealed = SealedPatch.from_file(cfg["patch"], max_bytes=cfg["max_patch_mb"] << 20)
    if cfg["init_from"]:
        from utils import finetune as ft_loop
        base = ft_loop.load_base({**ft_loop.DEFAULTS, "base_ckpt": "", "init_from": cfg["init_from"]})[0]
    else:
        base, _ = load_model(cfg["base_ckpt"])
    base = base.to(cfg["device"]).eval()
    t0 = time.perf_counter()
    base_fp = base_fingerprint(base)
    fp_s = time.perf_counter() - t0
    applied = apply_sealed_patch(base, sealed, key, tenant, base_fp=base_fp, consume=True)  # read for this apply only
    h = applied.header
    m = h["meta"]
    print(f"applied patch {h['patch_id']} of tenant {h['tenant']} (generation {h['generation']}): "
          f"{len(h['tensors'])} tensors, {sealed.nbytes:,} bytes, "
          + (f"DP on, epsilon {m['epsilon']:.3f}" if m.get("dp") and m.get("epsilon") is not None else "DP OFF")
          + f"; verify + decrypt + apply {applied.apply_s * 1000:.0f} ms (base fingerprint {fp_s * 1000:.0f} ms); "
          f"plaintext mlocked: {applied.plain_status['mlocked']}, patched weights mlocked: "
          f"{applied.storage_status.get('mlocked')}"
          + (f" ({applied.plain_status['mlock_error']})" if not applied.plain_status["mlocked"] else ""))
    if prompts:
        if cfg["data_dir"]:
            tok = get_tokenizer(load_meta(cfg["data_dir"]))
        elif m.get("tokenizer"):
            tok = get_tokenizer(m["tokenizer"])
        else:
            raise UserError("the patch names no tokenizer: give --data_dir")
        patched_runs = [generate(base, tok, p, cfg["max_new_tokens"]) for p in prompts]
        applied.revert()
        base_runs = [generate(base, tok, p, cfg["max_new_tokens"]) for p in prompts]
        show_generations(prompts, base_runs, patched_runs)
    sealed.close()
    return applied


def keygen_main(argv):
    cfg = configure(dict(
        out="",  # the key file to write (64 hex characters, owner-only)
        force=False,  # overwrite an existing key file
        tenant="",  # bind the key to this tenant: apply then accepts only that tenant's patches ('' = unbound)
    ), argv)
    if not cfg["out"]:
        raise UserError("--out PATH is required")
    if os.path.exists(cfg["out"]) and not cfg["force"]:
        raise UserError(f"{cfg['out']} exists; --force overwrites it")
    generate_key_file(cfg["out"], tenant=cfg["tenant"] or None)
    print(f"wrote a random 256-bit key to {cfg['out']} (mode 600)"
          + (f", bound to tenant {cfg['tenant']}" if cfg["tenant"] else ""))


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    command = {"apply": apply_main, "keygen": keygen_main}.get(argv[0] if argv else None)
    try:
        return command(argv[1:]) if command else seal_main(argv)
    except PatchError as e:  # library errors become the CLI's one-line errors here, with their exit codes
        raise as_user_error(e) from None


if __name__ == "__main__":
    harden_process()  # this process will hold keys and plaintext: no core dumps, no ptrace by other processes
    run_cli(main)
