"""
The model a test looks at, and batched scoring and completion under it. Every test_pipeline script
goes through here, so that a checkpoint, a patched checkpoint and a wrong key behave the same everywhere.

- load_model_under_test: a checkpoint, optionally with a sealed patch applied with its key. Decrypting
  hardens the process (no core dumps, not attachable) and the patched weights live in locked,
  dump-excluded memory (utils/patch_apply.py). The expected tenant is the argument, or the tenant the
  key file is bound to; with neither the patch is refused before it is read (exit 4, like the `apply`
  CLI: no patch is accepted for whichever tenant it names). A refused patch is a one-line UserError
  carrying the patch error's exit code (2 bad input, 3 auth failure, 4 wrong base/tenant).
- sequence_logprobs: log p(target_t | prefix, target_<t) for many (prefix, target) pairs, one batched
  forward per batch (right padding: causal attention never lets a pad change an earlier position).
- continuation_logprobs: many continuations of ONE shared prefix (canary candidates): the prefix runs once
  into a KV cache that every batch of continuations reuses.
- complete: left-padded batched decoding of many prompts with the KV cache (greedy or sampled).
"""
import copy

import numpy as np
import torch
import torch.nn.functional as F

from utils.checkpoint import load_model
from utils.cli import UserError

# what a refused patch means, by the patch error's exit code (finetune_encrypt_memmap's contract)
PATCH_REFUSALS = {2: "bad patch or key input", 3: "auth failure", 4: "wrong or missing tenant, or wrong base model",
                  5: "older than a patch already accepted"}


def load_model_under_test(ckpt, patch=None, key_file=None, device="cpu", tenant=None):
    """(model in eval mode, checkpoint dict). With `patch`, the sealed patch of `tenant` (or of the tenant
    `key_file` is bound to) is applied with the key in `key_file`; any refusal becomes a UserError whose
    exit_code is the patch error's."""
    model, ckpt_dict = load_model(ckpt, device)
    if patch:
        if not key_file:
            raise UserError(f"--patch {patch} needs --key_file (the file holding the patch's key)")
        from utils.patch_apply import apply_sealed_patch  # only patched runs need the crypto modules
        from utils.patch_errors import PatchError
        from utils.patch_format import SealedPatch
        from utils.patch_keys import expected_tenant, load_key
        from utils.secure_memory import harden_process
        harden_process()  # before the key is read: this process is about to hold it and the plaintext
        try:
            expected = expected_tenant(tenant, key_file)  # neither given: refused before the patch is read
            sealed = SealedPatch.from_file(patch)
            try:
                apply_sealed_patch(model, sealed, load_key(key_file=key_file), expected, consume=True)
            finally:
                sealed.close()
        except PatchError as e:
            reason = PATCH_REFUSALS.get(e.exit_code, "patch error")
            raise UserError(f"patch {patch} refused ({reason}): {e}", exit_code=e.exit_code) from None
        model.eval()
    return model, ckpt_dict


def _device(model):
    return next(model.parameters()).device


def _fit(prefix, target, block_size):
    """Crop the prefix from the left so that prefix + target fits one forward of block_size tokens."""
    if len(target) == 0:
        raise ValueError("empty target")
    if len(target) > block_size:
        raise ValueError(f"target of {len(target)} tokens does not fit block_size {block_size}")
    if len(prefix) == 0:
        raise ValueError("the first target token needs at least one prefix token to be predicted from")
    keep = block_size + 1 - len(target)
    return list(prefix[-keep:]) + list(target)


@torch.no_grad()
def sequence_logprobs(model, prefix_ids_list, target_ids_list, batch_size=32, return_stats=False):
    """
    Per-token log-probs of each target given its prefix: a list of float64 arrays, one per pair.
    With return_stats, also (mu, sigma) lists: mean and standard deviation of log p(z) for z drawn from
    the model's own next-token distribution at each target position (Min-K%++).
    Pairs are sorted by length so that each batch pads little; one forward per batch.
    """
    if len(prefix_ids_list) != len(target_ids_list):
        raise ValueError("prefix and target lists differ in length")
    bs, dev = model.config.block_size, _device(model)
    seqs = [_fit(p, t, bs) for p, t in zip(prefix_ids_list, target_ids_list)]
    n_target = [len(t) for t in target_ids_list]
    order = sorted(range(len(seqs)), key=lambda i: -len(seqs[i]))
    out_lp = [None] * len(seqs)
    out_mu, out_sigma = [None] * len(seqs), [None] * len(seqs)
    for start in range(0, len(order), batch_size):
        rows = order[start:start + batch_size]
        T = max(len(seqs[i]) for i in rows) - 1
        x = torch.zeros(len(rows), T, dtype=torch.long)
        y = torch.full((len(rows), T), -1, dtype=torch.long)
        for j, i in enumerate(rows):
            s = torch.tensor(seqs[i])
            n, k = len(s) - 1, n_target[i]
            x[j, :n] = s[:-1]
            y[j, n - k:n] = s[1 + n - k:]  # only target tokens are scored
        x, y = x.to(dev), y.to(dev)
        logits, _ = model(x)
        scored = y >= 0
        lg = logits[scored].float()  # (n scored tokens, V): log_softmax over these rows only
        logp = F.log_softmax(lg, dim=-1)
        tok_lp = logp.gather(1, y[scored].unsqueeze(1)).squeeze(1).double().cpu().numpy()
        if return_stats:
            p = logp.exp()
            mu = (p * logp).sum(-1)
            var = (p * logp.square()).sum(-1) - mu.square()
            mu = mu.double().cpu().numpy()
            sigma = var.clamp(min=1e-12).sqrt().double().cpu().numpy()
        pos = 0
        for i in rows:  # scored tokens come out row by row, in order
            k = n_target[i]
            out_lp[i] = tok_lp[pos:pos + k]
            if return_stats:
                out_mu[i], out_sigma[i] = mu[pos:pos + k], sigma[pos:pos + k]
            pos += k
    return (out_lp, out_mu, out_sigma) if return_stats else out_lp


@torch.no_grad()
def continuation_logprobs(model, prefix_ids, continuations, batch_size=256):
    """
    Total log-prob of each continuation (a list of token lists) after one shared prefix: float64 array.
    The prefix is prefilled once into a KV cache, replicated once to batch_size rows; each batch of
    right-padded continuations then overwrites only the positions after the prefix (one forward per batch).
    """
    if not continuations:
        return np.zeros(0)
    bs, dev = model.config.block_size, _device(model)
    lengths = np.array([len(c) for c in continuations])
    L = int(lengths.max())
    if lengths.min() == 0:
        raise ValueError("empty continuation")
    prefix = list(prefix_ids)[-(bs + 1 - L):] if L <= bs else []
    if not prefix:
        raise ValueError(f"continuations of {L} tokens need a prefix and must fit block_size {bs}")
    P = len(prefix)
    toks = np.zeros((len(continuations), L), dtype=np.int64)
    for j, c in enumerate(continuations):
        toks[j, :len(c)] = c
    toks = torch.from_numpy(toks).to(dev)
    valid = torch.from_numpy(np.arange(L)[None, :] < lengths[:, None]).to(dev)
    cache = model.new_cache(1, max_len=P + L)
    logits, _ = model(torch.tensor([prefix], device=dev), cache=cache, last_only=True)
    first_logp = F.log_softmax(logits[0, -1].float(), dim=-1)
    rows = min(batch_size, len(continuations))
    shared = copy.copy(cache)  # its own tensors: the prefix replicated to `rows` rows, once
    shared.expand_rows(torch.zeros(rows, dtype=torch.long, device=dev))
    totals = np.empty(len(continuations))
    for start in range(0, len(continuations), rows):
        t, ok = toks[start:start + rows], valid[start:start + rows]
        n = t.size(0)
        lp = first_logp[t[:, 0]].unsqueeze(1)
        if L > 1:
            view = copy.copy(shared)  # the first n rows (views); positions >= P are overwritten per batch
            view.k, view.v, view.key_valid = shared.k[:, :n], shared.v[:, :n], shared.key_valid[:n]
            view.length = P
            lg, _ = model(t[:, :-1], cache=view)
            rest = F.log_softmax(lg.float(), dim=-1).gather(2, t[:, 1:].unsqueeze(2)).squeeze(2)
            lp = torch.cat([lp, rest], dim=1)
        totals[start:start + n] = (lp * ok).sum(1).double().cpu().numpy()
    return totals


@torch.no_grad()
def complete(model, prompt_ids_list, max_new_tokens, batch_size=64, greedy=True, temperature=1.0,
             top_k=None, top_p=None, generator=None, eot=None):
    """Continuations (token lists, cut at the first `eot` token) of many prompts: left padding with an
    attention mask, KV-cached decoding, prompts sorted by length so that batches pad little."""
    dev = _device(model)
    order = sorted(range(len(prompt_ids_list)), key=lambda i: len(prompt_ids_list[i]))
    out = [None] * len(prompt_ids_list)
    for start in range(0, len(order), batch_size):
        rows = order[start:start + batch_size]
        T = max(len(prompt_ids_list[i]) for i in rows)
        idx = torch.zeros(len(rows), T, dtype=torch.long)
        mask = torch.zeros(len(rows), T, dtype=torch.long)
        for j, i in enumerate(rows):
            p = prompt_ids_list[i]
            idx[j, T - len(p):], mask[j, T - len(p):] = torch.tensor(p), 1
        gen = model.generate(idx.to(dev), max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                             greedy=greedy, generator=generator, attention_mask=mask.to(dev))
        for j, i in enumerate(rows):
            new = gen[j, T:].tolist()
            if eot is not None and eot in new:
                new = new[:new.index(eot)]
            out[i] = new
    return out


# ---------------------------------------------------------------- reporting helpers shared by the scripts
def format_table(headers, rows):
    """A plain-text table: columns padded to their widest cell; columns of numbers right-aligned."""
    def cell(v):
        if v is None:
            return "-"
        if isinstance(v, float):
            return f"{v:.3f}" if v == 0 or 1e-3 <= abs(v) < 1e5 else f"{v:.3g}"
        return str(v)

    cells = [[cell(v) for v in r] for r in rows]
    widths = [max([len(str(h))] + [len(r[i]) for r in cells]) for i, h in enumerate(headers)]
    numeric = [bool(rows) and all(r[i] is None or isinstance(r[i], (int, float)) for r in rows)
               for i in range(len(headers))]

    def line(vals):
        return "  ".join(v.rjust(w) if num else v.ljust(w) for v, w, num in zip(vals, widths, numeric)).rstrip()
    return "\n".join([line([str(h) for h in headers]), "  ".join("-" * w for w in widths)] + [line(r) for r in cells])


def save_figure(fig, path):
    """Write a matplotlib figure as PNG atomically and close it."""
    import matplotlib.pyplot as plt
    from utils.atomic import atomic_path
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=120, bbox_inches="tight")
    plt.close(fig)


def pyplot():
    """matplotlib's pyplot on the Agg backend (no display needed)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt
