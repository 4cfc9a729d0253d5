"""Tiny sealed patches made in memory in milliseconds (no training), shared by the patch modules' tests."""
import copy

import torch

from tests.conftest import tiny_model
from utils.patch_apply import base_fingerprint
from utils.patch_cipher import seal
from utils.patch_payload import delta_tensor


def finetuned_copy(base, seed=0, scale=1e-2):
    """A copy of `base` with every parameter moved (a stand-in for a fine-tune)."""
    ft = copy.deepcopy(base)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in ft.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g))
    return ft


def sealed_patch(base, ft, key, tenant="alice", **kw):
    """SealedPatch of ft - base for every parameter (tied weights stay tied)."""
    bp = dict(base.named_parameters())
    plain = [t for t in (delta_tensor(n, bp[n], p) for n, p in ft.named_parameters()) if t is not None]
    try:
        return seal(plain, key, tenant=tenant, base_fingerprint=base_fingerprint(base), **kw)
    finally:
        for t in plain:
            t.close()


def tiny_pair(seed=0):
    base = tiny_model(seed=seed).eval()
    return base, finetuned_copy(base, seed)
