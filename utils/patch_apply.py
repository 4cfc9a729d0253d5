"""
Applying a sealed patch to a base model, and reverting it exactly (PATCH_FORMAT.md sections 5 and 6).

- Every chunk is authenticated and decrypted (patch_cipher.open_patch) before the model is touched: all
  or nothing. The base tensors are never written: patched tensors are swapped in and revert() swaps the
  base tensors back, so the base comes back bit for bit.
- The patched tensors ARE the fine-tuned model, so on the CPU they live in one SecureBuffer (torch
  tensors made over it: locked where RLIMIT_MEMLOCK allows, excluded from core dumps), zeroed on revert
  and, if still applied, at interpreter exit. CUDA tensors cannot live there; their host-side payload
  still does.
- A cold apply on the CPU decrypts the values of `delta` / `whole` tensors straight into that storage
  (laid out once the header is authentic) and adds the base in place: no second, plaintext copy of the
  model, and one pass fewer over fresh memory, whose first touch is most of a cold apply's cost
  (BENCHMARKS.md, "Apply latency"). A registry's reused storage holds the applied tenant until the next
  patch verified, so a registry decrypts into its plaintext scratch buffer instead.
- A patch given as a path or bytes is read here for this apply only: its image may be decrypted in
  place (open_patch(consume=True)) where a plaintext buffer would be needed (rows, lossy values, CUDA
  models). A SealedPatch the caller passes (a registry's, say) is consumed only when it says so.
- Applying hardens the process (secure_memory.harden_process): whoever holds the key and the plaintext
  gets no core dumps and cannot be attached to.
"""
import hashlib
import time
from dataclasses import dataclass

import torch

from utils.patch_cipher import open_patch
from utils.patch_errors import PatchFormatError, WrongBaseError
from utils.patch_format import DEFAULT_MAX_FILE_BYTES, DTYPES, SealedPatch, dtype_name
from utils.patch_keys import LABEL, expected_tenant
from utils.patch_payload import bits, set_bits
from utils.secure_memory import harden_process, secure_empty


def tensor_bytes(t):
    """A tensor's raw little-endian bytes in C order (a copy only for non-contiguous or non-CPU tensors)."""
    return t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy()


def base_fingerprint(model):
    """SHA-256 over the model's state_dict (PATCH_FORMAT.md section 6)."""
    h = hashlib.sha256(f"{LABEL} base-fingerprint\n".encode())
    seen = {}
    for name, t in sorted(model.state_dict().items()):
        ident = (t.device, t.data_ptr(), t.dtype, tuple(t.shape), t.stride())
        if t.numel() and ident in seen:
            h.update(f"alias {name} {seen[ident]}\n".encode())
            continue
        seen[ident] = name
        h.update(f"tensor {name} {dtype_name(t.dtype)} {','.join(map(str, t.shape))}\n".encode())
        h.update(tensor_bytes(t))
    return h.hexdigest()


class PatchedStorage:
    """Locked, dump-excluded memory for the patched tensors of one layout; a registry keeps one and reuses
    it from tenant to tenant."""

    def __init__(self):
        self.layout, self.buffer, self.tensors = None, None, []

    def tensors_for(self, layout):
        """Empty tensors of `layout` [(shape, dtype), ...] in this storage (the previous ones when the
        layout is the same)."""
        layout = tuple((tuple(shape), dtype) for shape, dtype in layout)
        if layout != self.layout:
            self.close()
            self.buffer, self.tensors = secure_empty(layout)
            self.layout = layout
        return self.tensors

    def zero(self):
        if self.buffer is not None:
            self.buffer.zero()

    def close(self):
        if self.buffer is not None:
            self.buffer.close()
        self.layout, self.buffer, self.tensors = None, None, []

    @property
    def nbytes(self):
        return self.buffer.nbytes if self.buffer is not None else 0


@dataclass
class AppliedPatch:
    """What apply_sealed_patch did to a model, so that revert() restores the base exactly."""
    model: object
    header: dict
    swapped: list  # (parameter, base tensor it held, patched tensor now in it)
    structure: dict  # {"untie": bool, "lora": [(parent module, attr, original Linear)], "requires_grad": {...}}
    storage: PatchedStorage
    owns_storage: bool
    apply_s: float = 0.0
    plain_status: dict = None
    active: bool = True

    @property
    def tenant(self):
        return self.header["tenant"]

    @property
    def storage_status(self):
        return self.storage.buffer.status() if self.storage.buffer is not None else {"bytes": 0}

    def revert(self):
        """Put the base tensors (never written to) back, undo untie / LoRA, zero the patched tensors."""
        if not self.active:
            return
        with torch.no_grad():
            for param, base, patched in reversed(self.swapped):
                param.data = base
                if patched.device.type != "cpu":
                    patched.zero_()
            _undo_structure(self.model, self.structure)
        self.storage.zero()
        if self.owns_storage:
            self.storage.close()
        self.model.__dict__.pop("_sealed_patch_storage", None)
        self.swapped = []
        self.active = False


def _prepare_structure(model, structure):
    """Untie / add LoRA as the patch needs; return what undoing takes. The global RNG is left as it was."""
    lora = structure.get("lora")
    if lora and model.lora_config:
        raise PatchFormatError("the model already carries LoRA adapters: revert the other patch first")
    undo = {"untie": False, "lora": [], "lora_config": model.lora_config, "tie_config": model.config.tie_weights,
            "requires_grad": {id(p): p.requires_grad for p in model.parameters()}}
    if structure.get("untie_weights") and model.weights_tied:
        model.untie_weights()
        undo["untie"] = True
    if lora:
        from model import LoRALinear
        before = dict(model.named_modules())
        with torch.random.fork_rng(devices=[]):  # add_lora's random init must not move the caller's RNG
            model.add_lora(lora["rank"], lora["alpha"], tuple(lora["targets"]))
        for name, m in model.named_modules():
            if isinstance(m, LoRALinear):
                parent_name, attr = name.rsplit(".", 1)
                undo["lora"].append((before[parent_name], attr, m.base))
                m.to(device=m.base.weight.device, dtype=m.base.weight.dtype)
    return undo


def _undo_structure(model, undo):
    for parent, attr, linear in reversed(undo["lora"]):
        setattr(parent, attr, linear)
    model.lora_config = undo["lora_config"]
    if undo["untie"]:
        model.lm_head.weight = model.transformer.wte.weight
    model.config.tie_weights = undo["tie_config"]
    for p in model.parameters():
        if id(p) in undo["requires_grad"]:
            p.requires_grad_(undo["requires_grad"][id(p)])


def _check_fits(param, e):
    base = param.data
    if list(base.shape) != e["shape"] or dtype_name(base.dtype) != e["dtype"]:
        raise WrongBaseError(f"tensor {e['name']}: model has {dtype_name(base.dtype)}{list(base.shape)}, "
                             f"patch {e['dtype']}{e['shape']}")


def _patch_into(out, base, e, segs, direct=False):
    """Write the patched values of one parameter into `out`; base is only read. `direct`: the values were
    decrypted into `out` itself (kind delta or whole, stored in the parameter's dtype)."""
    rows, values, bitmap = segs
    dev, dt = base.device, base.dtype
    exc = set_bits(bitmap).to(dev) if e["exceptions"] else None  # indices of values that replace
    if direct:
        if e["kind"] == "delta":
            flat = out.view(-1)
            kept = None
            if exc is not None:  # the flagged values, kept in locked memory while the sum overwrites them
                kept_buf, (kept,) = secure_empty([((exc.numel(),), dt)])
                torch.index_select(flat, 0, exc, out=kept)
            torch.add(base, out, out=out)  # base + delta, in place: the same IEEE sums as into a new tensor
            if kept is not None:
                flat.index_copy_(0, exc, kept)
                kept_buf.close()
        return
    vals = values.to(device=dev).to(dt)  # no copy when the dtype and device already match
    if e["kind"] == "whole":
        out.copy_(vals.view(base.shape))
    elif e["kind"] == "delta":
        torch.add(base, vals.view(base.shape), out=out)
        if exc is not None:
            out.view(-1)[exc] = vals[exc]
    else:
        out.copy_(base)
        r = rows.to(dev)
        patched_rows = base[r].add_(vals.view(len(rows), *base.shape[1:]))
        if exc is not None:
            patched_rows.view(-1)[exc] = vals[exc]
        out.index_copy_(0, r, patched_rows)
        patched_rows.zero_()
    if vals.data_ptr() != values.data_ptr():
        vals.zero_()


def _decrypts_in_place(e):
    """Whether a tensor's values can be decrypted straight into its patched tensor."""
    return e["kind"] != "rows" and e["stored_dtype"] == e["dtype"]


def apply_sealed_patch(model, patch, key, tenant, *, base_fp=None, scratch=None, storage=None, before_swap=None,
                       max_bytes=DEFAULT_MAX_FILE_BYTES, consume=None):
    """Apply a sealed patch (a path, the file's bytes or a SealedPatch) of `tenant` to `model` in place,
    with the key from patch_keys.load_key(). Any failure raises a PatchError subclass and leaves the model
    bit-exactly as it was. `tenant` is required: a patch of any other tenant is refused, and no tenant
    at all is refused before the patch is read (there is no "accept any tenant"). `base_fp`: the model's
    base_fingerprint() when already known. Registries pass `scratch` (a SecureBuffer for the plaintext),
    `storage` (a PatchedStorage reused for the patched tensors: it holds the applied tenant's weights
    until the new patch verified) and `before_swap` (called after verification, before the model
    changes). `consume`: the patch is not needed again, so its image may be decrypted in place
    (open_patch(consume=True)); default: only a patch this call read itself (a path or bytes). Returns
    an AppliedPatch: .revert().

    Without `storage`, on a CPU model, the patched tensors are laid out in fresh locked storage once the
    header is authentic, and the values of `delta` / `whole` tensors are decrypted straight into them
    and summed with the base in place: one buffer the size of the model instead of two, and one pass
    fewer over it (the first touch of fresh memory is most of a cold apply's cost)."""
    tenant = expected_tenant(tenant)
    harden_process()
    t0 = time.perf_counter()
    owns_storage = storage is None
    storage = PatchedStorage() if storage is None else storage
    in_place = owns_storage and all(p.device.type == "cpu" for p in model.parameters())
    outs = []

    def values_into(header):  # authentic: lay the patched tensors out, and take the values straight in
        outs.extend(storage.tensors_for([(e["shape"], DTYPES[e["dtype"]]) for e in header["tensors"]]))
        return {i: out for i, (e, out) in enumerate(zip(header["tensors"], outs)) if _decrypts_in_place(e)}

    sealed, owned = SealedPatch.coerce(patch, max_bytes)
    consume = owned if consume is None else consume
    opened = None
    try:
        if base_fp is None:
            base_fp = base_fingerprint(model)
        opened = open_patch(sealed, key, tenant=tenant, base_fp=base_fp, scratch=scratch,
                            values_into=values_into if in_place else None, consume=consume)
    except BaseException:
        if owns_storage:
            storage.close()
        raise
    finally:
        if owned and (opened is None or opened.plain is not sealed.image):
            sealed.close()  # an image decrypted in place is `opened.plain` now: closed (and zeroed) below
    plain_status = opened.plain.status()
    undo, swapped = None, []
    try:
        if before_swap is not None:
            before_swap()
        with torch.no_grad():
            undo = _prepare_structure(model, opened.header["structure"])
            params = dict(model.named_parameters())
            entries = opened.header["tensors"]
            for e in entries:
                if e["name"] not in params:
                    raise WrongBaseError(f"tensor {e['name']} is not a parameter of this model")
                _check_fits(params[e["name"]], e)
            bases = [params[e["name"]].data for e in entries]
            if not in_place:
                on_cpu = [(b.shape, b.dtype) for b in bases if b.device.type == "cpu"]
                secure = iter(storage.tensors_for(on_cpu))
                outs = [next(secure) if b.device.type == "cpu" else torch.empty_like(b) for b in bases]
            for i, (e, base, out) in enumerate(zip(entries, bases, outs)):
                _patch_into(out, base, e, opened.segments(i), direct=in_place and _decrypts_in_place(e))
            for e, base, out in zip(entries, bases, outs):  # nothing above wrote to the model's tensors
                param = params[e["name"]]
                swapped.append((param, base, out))
                param.data = out
    except BaseException:
        with torch.no_grad():
            for param, base, patched in reversed(swapped):
                param.data = base
            if undo is not None:
                _undo_structure(model, undo)
        storage.zero()
        if owns_storage:
            storage.close()
        raise
    finally:
        if opened.plain is scratch:
            opened.plain.zero()
        else:
            opened.plain.close()
    # the model holds its patched storage: dropping the AppliedPatch must not zero the weights in use
    model.__dict__["_sealed_patch_storage"] = storage
    return AppliedPatch(model, opened.header, swapped, undo, storage, owns_storage, time.perf_counter() - t0,
                        plain_status)


@torch.no_grad()
def compare(patched, trained):
    """(parameters compared, names that differ bitwise, max |difference|): a round trip check."""
    mine = dict(patched.named_parameters())
    differ, worst = [], 0.0
    for name, p in trained.named_parameters():
        q = mine.get(name)
        if q is None or q.shape != p.shape or not torch.equal(bits(q.to(p.dtype)), bits(p)):
            differ.append(name)
            if q is not None and q.shape == p.shape:
                worst = max(worst, float((q.to(p.dtype) - p).abs().max()))
    return len(mine), differ, worst
