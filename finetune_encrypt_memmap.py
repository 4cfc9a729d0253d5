"""
Fine-tune a GPT and keep what it learned only as an encrypted patch over the base model (seed 004, fixed).

    # fine-tune (finetune_dp's loop; --dp=True for a patch that is also differentially private) and seal
    python finetune_encrypt_memmap.py [config] --base_ckpt out/base/ckpt.pt --data_dir data/employees \
        --key_file key.hex --tenant acme [--export out/acme.patch] [--prompt_file prompts.txt]
    # apply it in another process, with the key
    python finetune_encrypt_memmap.py apply --base_ckpt out/base/ckpt.pt --patch out/acme.patch \
        --key_file key.hex [--tenant acme] [--prompt "Context: ..."]
    # a fresh random key, readable by its owner only
    python finetune_encrypt_memmap.py keygen --out key.hex

What goes into the patch (DeltaTracker, the on_model_ready callback of utils.finetune.finetune):
- tensor hooks record which trainable parameters receive a gradient and, for embedding tables, which
  rows; frozen parameters, parameters that never receive a gradient, untouched embedding rows and
  exactly-zero deltas stay out. The delta is fine-tuned - base in the base dtype (exact: applying gives
  the fine-tuned bits back) or, with --delta_dtype=bfloat16|float16, half the size (lossy; the error is
  reported). Parameters the base does not have (LoRA adapters) are stored whole; the patch records the
  LoRA config and whether lm_head was untied, and applying rebuilds that structure first.
- With --dp=True, Gaussian noise reaches every trainable tensor and every embedding row, so all of them
  change and all are stored: the selection is then made from the released (noised) weights only, never
  from the gradient pattern, which would reveal which tokens the private data contains.
- The fine-tuned weights never reach the disk: finetune runs with save=False, the plaintext deltas live
  in locked anonymous memory (utils/sealed_patch.SecureBuffer) and are zeroed once sealed, and the
  trained model's weights are zeroed after the patch has been checked. --export writes header +
  ciphertext only. Exit codes: 0 ok, 2 usage or bad input, 3 authentication failure (wrong key,
  tampered, truncated, swapped blobs), 4 patch for another base model or tenant.

Library (re-exported from utils/sealed_patch.py): load_key, apply_sealed_patch, PatchError and its
subclasses; here: DeltaTracker, TenantRegistry.
"""
import copy
import os
import sys
import time

import torch

from configurator import configure
from utils.checkpoint import load_model
from utils.cli import UserError, run_cli
from utils.data import load_meta
from utils.sealed_patch import (  # noqa: F401  (re-exported library API)
    AppliedPatch, KeyInputError, Passphrase, PatchAuthError, PatchError, PatchFormatError, PatchMismatchError,
    SealedPatch, SecureBuffer, SwappedBlobError, TamperedError, TruncatedError, WrongBaseError, WrongKeyError,
    WrongTenantError, apply_sealed_patch, base_fingerprint, check_tenant, delta_tensor, generate_key_file,
    harden_process, load_key, plaintext_bytes, seal, whole_tensor)
from utils.tokenizer import get_tokenizer

KEY_OPTIONS = dict(
    key_file="",  # file holding the 32-byte master key as 64 hex characters (keygen makes one)
    key_env="",  # NAME of an environment variable holding the hex key
    key_stdin=False,  # read the hex key from the first line of stdin
    key="",  # the hex key itself: works, but visible in the process list (warns)
    passphrase_file="",  # or a passphrase (scrypt-stretched; parameters stored in the patch header)
    passphrase_env="",
)
# The fine-tune run takes every key of utils.finetune.DEFAULTS too (data_dir, learning_rate, lora_rank, ...):
# seal_main merges them. utils.finetune (and Opacus) are imported only there, so that `apply` and the
# library users (test_pipeline) start fast.
DEFAULTS = {
    "dp": False,  # --dp=True: the patch is also differentially private
    "save": False,  # must stay False: the fine-tuned weights never reach the disk
    **KEY_OPTIONS,
    "tenant": "default",  # whose patch this is (bound into every blob; apply --tenant refuses others)
    "export": "",  # write the sealed patch here (header + ciphertext only), atomically
    "prompt_file": "",  # one prompt per line: base vs patched generations, timed
    "max_new_tokens": 48,
    "delta_dtype": "exact",  # 'exact' (base dtype, bit-exact round trip) | 'bfloat16' | 'float16' (lossy)
    "chunk_mb": 64,  # AES-GCM chunk size for large tensors
    "scrypt_n": 1 << 15,  # scrypt cost for passphrases
}
APPLY_DEFAULTS = dict(
    base_ckpt="",  # the base checkpoint the patch was made for...
    init_from="",  # ...or GPT-2 weights (a transformers save_pretrained dir)
    patch="",  # the sealed patch file (--export of a fine-tune run)
    tenant="",  # refuse a patch of any other tenant ('' = accept the patch's own)
    **KEY_OPTIONS,
    prompt="",  # generate from this prompt with the base and the patched model
    prompt_file="",
    data_dir="",  # for the tokenizer when the patch does not name one
    max_new_tokens=48,
    device="cpu",
)


# ----------------------------------------------------------------------------- tracking what changed
class DeltaTracker:
    """on_model_ready callback for utils.finetune.finetune. When called with the prepared model (untied,
    frozen or LoRA-wrapped, not yet trained) it snapshots the trainable parameters and puts a gradient
    hook on each: embedding tables record which rows receive a nonzero gradient, other tensors whether
    any gradient arrives. build() then turns the trained model into patch payloads."""

    def __init__(self, base_model, dp=False):
        sd = base_model.state_dict()
        self.base_dtypes = {k: v.dtype for k, v in sd.items()}
        self.default_dtype = base_model.transformer.wte.weight.dtype
        self.base_tied = base_model.weights_tied
        self.dp = dp
        self.model = None

    def __call__(self, model):
        self.model = model
        self.structure = {"untie_weights": bool(self.base_tied and not model.weights_tied),
                          "lora": copy.deepcopy(model.lora_config)}
        embeddings = {id(m.weight) for m in model.modules() if isinstance(m, torch.nn.Embedding)}
        self.trainable, self.frozen, self.snapshot = [], [], {}
        self.touched, self.row_masks, self.handles = set(), {}, []
        for name, p in model.named_parameters():
            if not p.requires_grad:
                self.frozen.append(name)
                continue
            self.trainable.append(name)
            if name in self.base_dtypes:
                self.snapshot[name] = p.detach().clone()
            if id(p) in embeddings:
                self.row_masks[name] = torch.zeros(p.shape[0], dtype=torch.bool, device=p.device)
            self.handles.append(p.register_hook(self._hook(name)))

    def _hook(self, name):
        mask = self.row_masks.get(name)

        def record(grad):  # returns None: the gradient itself is left alone
            self.touched.add(name)
            if mask is not None:
                mask.logical_or_(grad.detach().ne(0).flatten(1).any(1))
        return record

    def remove_hooks(self):
        for h in self.handles:
            h.remove()
        self.handles = []

    @torch.no_grad()
    def build(self, trained, delta_dtype="exact"):
        """(list of PlainTensor, report dict). The snapshot is zeroed and dropped afterwards."""
        if self.model is None:
            raise RuntimeError("DeltaTracker was never called: pass it as on_model_ready")
        self.remove_hooks()
        stored = None if delta_dtype == "exact" else delta_dtype
        params = dict(trained.named_parameters())
        entries, rep = [], dict(trainable=len(self.trainable), frozen=len(self.frozen), untouched=[], zero_delta=[],
                                rows={}, changed_values=0, stored_values=0, drift_values=0, drift_max=0.0,
                                exceptions=0, max_error=0.0, new_tensors=0)
        for name in self.trainable:
            p = params[name]
            dtype = self.base_dtypes.get(name, self.default_dtype)
            ft = p.detach().to(dtype)  # the parameter itself when the dtypes agree (no copy)
            if name not in self.snapshot:  # not in the base (a LoRA adapter): stored whole, always
                entry = whole_tensor(name, ft, stored)
                rep["new_tensors"] += 1
                rep["changed_values"] += ft.numel()
            else:
                base = self.snapshot[name].to(dtype)
                changed = _bits(ft) != _bits(base)
                rep["changed_values"] += int(changed.sum())
                if self.dp:  # noise moved everything: select from the released weights only
                    keep = None
                    rows = torch.arange(ft.shape[0]) if name in self.row_masks else None
                elif name in self.row_masks:
                    keep = self.row_masks[name].view(-1, *([1] * (ft.dim() - 1))).expand_as(ft)
                    rows = self.row_masks[name].nonzero().squeeze(1).cpu()
                else:
                    keep = None if name in self.touched else torch.zeros_like(changed)
                    rows = None
                if keep is not None:  # values that moved without a gradient (weight decay): left out
                    drift = changed & ~keep
                    if drift.any():
                        rep["drift_values"] += int(drift.sum())
                        rep["drift_max"] = max(rep["drift_max"], float((ft - base)[drift].abs().max()))
                if not self.dp and name not in self.touched:
                    rep["untouched"].append(name)
                    continue
                entry = delta_tensor(name, base, ft, rows=rows, stored_dtype=stored)
                if entry is None:
                    rep["zero_delta"].append(name)
                    continue
                if name in self.row_masks:
                    rep["rows"][name] = (entry.rows if entry.kind == "rows" else ft.shape[0], ft.shape[0])
            entries.append(entry)
            rep["stored_values"] += _values(entry)
            rep["exceptions"] += entry.exceptions
            rep["max_error"] = max(rep["max_error"], entry.max_error)
        for t in self.snapshot.values():
            t.zero_()
        self.snapshot = {}
        return entries, rep


def _bits(t):
    return t.view({2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()])


def _values(entry):
    n = 1
    for d in entry.shape[1:]:
        n *= d
    return entry.rows * n if entry.kind == "rows" else n * (entry.shape[0] if entry.shape else 1)


@torch.no_grad()
def wipe(model):
    """Zero a model's weights in place (the fine-tuned plaintext, once it is sealed)."""
    for p in model.parameters():
        p.zero_()


# ----------------------------------------------------------------------------- many tenants, one base
class TenantRegistry:
    """Sealed patches of many tenants over one base model, held in anonymous memory (ciphertext only);
    at most one is applied at a time. apply(tenant, key) verifies the whole patch before the model
    changes (a failure leaves the current state as it was), then swaps the previous tenant out;
    revert() restores the exact base. The base fingerprint is computed once, when the registry is made:
    the model must not be modified behind the registry's back."""

    def __init__(self, model):
        self.model = model
        self.base_fp = base_fingerprint(model)
        self.patches = {}
        self.applied = None
        self.workspace = {}  # patched tensors, reused from tenant to tenant (zeroed when reverted)
        self.scratch = None  # locked plaintext buffer, reused (zeroed after every apply)

    def add(self, patch, tenant=None):
        """Hold a sealed patch (path, bytes or SealedPatch). Tenant and base are checked here against the
        unauthenticated header (an early refusal) and again, authenticated, at apply time."""
        sealed, owned = SealedPatch.coerce(patch)
        if not owned:
            sealed = SealedPatch.from_bytes(sealed.image.view())
        tenant = tenant or sealed.tenant
        if sealed.tenant != tenant:
            sealed.close()
            raise WrongTenantError(f"patch belongs to tenant {sealed.tenant!r}, not {tenant!r}")
        if sealed.header.get("base_fingerprint") != self.base_fp:
            sealed.close()
            raise WrongBaseError("patch was made for another base model")
        if tenant in self.patches:
            self.remove(tenant)
        self.patches[tenant] = sealed
        return tenant

    def remove(self, tenant):
        if self.active == tenant:
            self.revert()
        self.patches.pop(tenant).close()

    @property
    def active(self):
        return self.applied.tenant if self.applied is not None else None

    def apply(self, tenant, key):
        """Switch the model to `tenant`'s patch (reverting the current one once the new one verified)."""
        if tenant not in self.patches:
            raise UserError(f"no patch for tenant {tenant!r}; known: {', '.join(sorted(self.patches)) or 'none'}")
        sealed = self.patches[tenant]
        need = plaintext_bytes(sealed.header)
        if self.scratch is None or self.scratch.nbytes < need:
            if self.scratch is not None:
                self.scratch.close()
            self.scratch = SecureBuffer(need)
        self.applied = apply_sealed_patch(self.model, sealed, key, tenant=tenant, base_fp=self.base_fp,
                                          scratch=self.scratch, workspace=self.workspace, before_swap=self.revert)
        return self.applied

    switch = apply

    def revert(self):
        if self.applied is not None:
            self.applied.revert()
            self.applied = None

    def memory_bytes(self):
        return {"sealed": sum(p.nbytes for p in self.patches.values()),
                "workspace": sum(t.numel() * t.element_size() for t in self.workspace.values()),
                "scratch": self.scratch.nbytes if self.scratch is not None else 0}

    def close(self):
        self.revert()
        for t in self.workspace.values():
            t.zero_()
        self.workspace = {}
        for p in self.patches.values():
            p.close()
        self.patches = {}
        if self.scratch is not None:
            self.scratch.close()


# ----------------------------------------------------------------------------- CLI helpers
def key_from_cfg(cfg):
    return load_key(key_file=cfg["key_file"] or None, env_var=cfg["key_env"] or None, stdin=cfg["key_stdin"],
                    key_hex=cfg["key"] or None, passphrase_file=cfg["passphrase_file"] or None,
                    passphrase_env=cfg["passphrase_env"] or None)


def read_prompts(cfg):
    prompts = [cfg["prompt"]] if cfg.get("prompt") else []
    if cfg.get("prompt_file"):
        if not os.path.isfile(cfg["prompt_file"]):
            raise UserError(f"prompt file {cfg['prompt_file']} does not exist")
        with open(cfg["prompt_file"], encoding="utf-8") as f:
            prompts += [line.rstrip("\n").replace("\\n", "\n") for line in f if line.strip()]
    return prompts


@torch.no_grad()
def generate(model, tok, prompt, max_new_tokens):
    """(greedy continuation text, seconds)."""
    device = next(model.parameters()).device
    ids = tok.encode(prompt)[-model.config.block_size:] or [tok.eot]
    t0 = time.perf_counter()
    out = model.generate(torch.tensor([ids], device=device), max_new_tokens, greedy=True)[0, len(ids):].tolist()
    dt = time.perf_counter() - t0
    if tok.eot in out:
        out = out[:out.index(tok.eot)]
    return tok.decode(out), dt


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


@torch.no_grad()
def compare(patched, trained):
    """(parameters compared, names that differ, max |difference|)."""
    mine = dict(patched.named_parameters())
    differ, worst = [], 0.0
    for name, p in trained.named_parameters():
        q = mine.get(name)
        if q is None or q.shape != p.shape or not torch.equal(_bits(q.to(p.dtype)), _bits(p)):
            differ.append(name)
            if q is not None and q.shape == p.shape:
                worst = max(worst, float((q.to(p.dtype) - p).abs().max()))
    return len(mine), differ, worst


# ----------------------------------------------------------------------------- fine-tune and seal
def seal_main(argv):
    from utils import finetune as ft_loop
    cfg = configure({**ft_loop.DEFAULTS, **DEFAULTS}, argv)
    if cfg["save"]:
        raise UserError("save=True would write the fine-tuned weights to disk in plaintext: this script keeps "
                        "them only as a sealed patch (use finetune_dp.py for a plaintext checkpoint)")
    if cfg["delta_dtype"] not in ("exact", "bfloat16", "float16"):
        raise UserError(f"delta_dtype must be exact, bfloat16 or float16; got {cfg['delta_dtype']!r}")
    if not 1 <= cfg["chunk_mb"] <= 1024:
        raise UserError("chunk_mb must be in 1..1024")
    check_tenant(cfg["tenant"])
    key = key_from_cfg(cfg)
    prompts = read_prompts(cfg)
    tok = get_tokenizer(load_meta(cfg["data_dir"]))
    base = ft_loop.load_base(cfg).eval()
    base_fp = base_fingerprint(base)
    tracker = DeltaTracker(base, dp=cfg["dp"])
    ft_cfg = {k: cfg[k] for k in ft_loop.DEFAULTS}
    ft_cfg["save"] = False
    t0 = time.perf_counter()
    result = ft_loop.finetune(ft_cfg, model=copy.deepcopy(base).train(), on_model_ready=tracker)
    finetune_s = time.perf_counter() - t0
    train_s = result["train_time_s"]
    trained = result["model"].cpu()

    t0 = time.perf_counter()
    plain, rep = tracker.build(trained, cfg["delta_dtype"])
    privacy = result["privacy"]
    meta = {"tokenizer": tok.name if tok.name != "word" else None, "dp": bool(cfg["dp"]),
            "epsilon": privacy["epsilon"] if privacy else None, "delta": privacy["delta"] if privacy else None,
            "delta_dtype": cfg["delta_dtype"], "steps": privacy["steps"] if privacy else None}
    locked = sum(t.buffer.locked for t in plain)
    lock_errors = {t.buffer.lock_error for t in plain if not t.buffer.locked}
    try:
        sealed = seal(plain, key, tenant=cfg["tenant"], base_fingerprint=base_fp, structure=tracker.structure,
                      meta=meta, chunk_bytes=cfg["chunk_mb"] << 20, scrypt_params={"n": cfg["scrypt_n"]})
    finally:
        for t in plain:
            t.close()
    seal_s = time.perf_counter() - t0

    # the round trip, through the real apply path: patched base == fine-tuned model?
    applied = apply_sealed_patch(base, sealed, key, tenant=cfg["tenant"], base_fp=base_fp)
    n_params, differ, worst = compare(base, trained)
    wipe(trained)  # the plaintext fine-tuned weights are no longer needed
    del trained, result

    blobs = sealed.blobs()
    payload = sum(e["plain_bytes"] for e in sealed.header["tensors"])
    itemsize = torch.empty(0, dtype=tracker.default_dtype).element_size()
    print(f"tenant {cfg['tenant']}, patch {sealed.header['patch_id']}"
          + (f", DP epsilon {privacy['epsilon']:.3f} at delta {privacy['delta']:.3g}" if privacy else ", not DP"))
    print(f"modified tensors: {len(plain)} of {rep['trainable']} trainable ({rep['frozen']} frozen, "
          f"{len(rep['untouched'])} without gradient, {len(rep['zero_delta'])} with an exactly zero delta, "
          f"{rep['new_tensors']} new, stored whole)")
    for name, (kept, total) in rep["rows"].items():
        print(f"  {name}: {kept} of {total} rows")
    if cfg["dp"]:
        print("  (DP: noise reaches every trainable tensor and embedding row, so all of them are in the patch)")
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
        print(f"exported {cfg['export']} ({sealed.nbytes:,} bytes: header + ciphertext)")
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
    key = key_from_cfg(cfg)
    prompts = read_prompts(cfg)
    sealed = SealedPatch.from_file(cfg["patch"])
    if cfg["init_from"]:
        from utils import finetune as ft_loop
        base = ft_loop.load_base({**ft_loop.DEFAULTS, "base_ckpt": "", "init_from": cfg["init_from"]})
    else:
        base, _ = load_model(cfg["base_ckpt"])
    base = base.to(cfg["device"]).eval()
    t0 = time.perf_counter()
    base_fp = base_fingerprint(base)
    fp_s = time.perf_counter() - t0
    applied = apply_sealed_patch(base, sealed, key, tenant=cfg["tenant"] or None, base_fp=base_fp)
    h = applied.header
    m = h["meta"]
    print(f"applied patch {h['patch_id']} of tenant {h['tenant']}: {len(h['tensors'])} tensors, {sealed.nbytes:,} bytes"
          + (f", DP epsilon {m['epsilon']:.3f}" if m.get("dp") and m.get("epsilon") is not None else "")
          + f"; verify + decrypt + apply {applied.apply_s * 1000:.0f} ms (base fingerprint {fp_s * 1000:.0f} ms); "
          f"plaintext mlocked: {applied.plain_status['mlocked']}"
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
    cfg = configure({"out": "", "force": False}, argv)
    if not cfg["out"]:
        raise UserError("--out PATH is required")
    if os.path.exists(cfg["out"]) and not cfg["force"]:
        raise UserError(f"{cfg['out']} exists; --force overwrites it")
    generate_key_file(cfg["out"])
    print(f"wrote a random 256-bit key to {cfg['out']} (mode 600)")


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["apply"]:
        return apply_main(argv[1:])
    if argv[:1] == ["keygen"]:
        return keygen_main(argv[1:])
    return seal_main(argv)


if __name__ == "__main__":
    harden_process()  # this process will hold keys and plaintext: no core dumps, no ptrace by other processes
    run_cli(main)
