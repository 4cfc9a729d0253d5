"""
Plaintext payloads of a sealed patch (PATCH_FORMAT.md section 4): what a fine-tune changed, as
`delta` / `rows` / `whole` tensors, each in its own SecureBuffer (locked, dump-excluded, zeroed on close),
or all of a patch's back to back in one PayloadArena, which seal(consume=True) encrypts where they lie.

Exact mode stores fine-tuned - base in the base dtype; where base + delta would not round back to the
fine-tuned value, the fine-tuned value itself is stored and a bitmap flags it, so applying is bit-exact.
"""
from dataclasses import dataclass, field

import torch

from utils.patch_errors import PatchFormatError
from utils.patch_format import (DEFAULT_CHUNK_BYTES, DTYPES, MAC_BYTES, MAX_HEADER_BYTES, PREFIX, RECORD_OVERHEAD,
                                dtype_name, n_values, payload_layout)
from utils.secure_memory import ALIGN, SecureBuffer, aligned

BITS = {2: torch.int16, 4: torch.int32, 8: torch.int64}  # same-size integer views for bitwise comparison


def pack_bits(mask):
    """Bool tensor -> uint8, bit k of byte j = element 8j + k."""
    m = mask.reshape(-1).to(torch.uint8)
    m = torch.cat([m, m.new_zeros(-m.numel() % 8)]).view(-1, 8)
    return (m << torch.arange(8, dtype=torch.uint8)).sum(1, dtype=torch.uint8)


def set_bits(packed):
    """Indices of the set bits of a packed bitmap (cheap when few bytes are nonzero)."""
    nz = packed.nonzero().squeeze(1)
    hit = (packed[nz].unsqueeze(1) >> torch.arange(8, dtype=torch.uint8, device=packed.device)) & 1
    return (nz.unsqueeze(1) * 8 + torch.arange(8, device=packed.device))[hit.bool()]


@dataclass
class PlainTensor:
    """One tensor's plaintext payload, held in its own SecureBuffer or a PayloadArena's slot."""
    name: str
    kind: str  # 'delta' (values = fine-tuned - base), 'rows' (the same for some rows), 'whole' (new tensor)
    dtype: str  # the parameter's dtype
    stored_dtype: str  # dtype of the stored values (dtype, or bfloat16/float16 when compressed)
    shape: tuple
    rows: int
    exceptions: int  # values that hold the fine-tuned value itself (base + delta would not round back)
    buffer: SecureBuffer = field(repr=False)
    max_error: float = 0.0  # max |patched - fine-tuned| this payload gives (0 in exact mode)

    @property
    def nbytes(self):
        return self.buffer.nbytes

    def descriptor(self):
        return {"name": self.name, "kind": self.kind, "dtype": self.dtype, "stored_dtype": self.stored_dtype,
                "shape": list(self.shape), "rows": self.rows, "exceptions": self.exceptions}

    def close(self):
        self.buffer.close()


class PayloadArena:
    """One locked SecureBuffer holding a patch's payloads back to back, in the order they are made (the
    header's order), with address space reserved behind them for what sealing adds (header, MAC, 28
    bytes per chunk in chunks of at least `chunk_bytes`), so seal(consume=True) can encrypt them where
    they lie instead of pre-faulting a fresh image. Mapped for `payload_bound` (the most the payloads can
    take, known before the deltas are computed): pages are locked as payloads take them, and the room
    never used costs nothing. Released (zeroed) when its last payload is closed."""

    def __init__(self, payload_bound, n_tensors, chunk_bytes=DEFAULT_CHUNK_BYTES):
        records = -(-payload_bound // max(1, chunk_bytes)) + n_tensors
        seal_room = PREFIX.size + MAX_HEADER_BYTES + MAC_BYTES + records * RECORD_OVERHEAD
        self.buffer = SecureBuffer(0, reserve=payload_bound + ALIGN * n_tensors + seal_room)
        self.slots = set()  # open ArenaSlots

    def take(self, nbytes):
        start = aligned(self.buffer.nbytes)
        self.buffer.grow(start + nbytes)
        slot = ArenaSlot(self, start, nbytes)
        self.slots.add(slot)
        return slot

    def consume(self, image_bytes):
        """Hand the buffer, grown to `image_bytes`, to the seal encrypting it in place: the payloads refuse
        use from now on (they would read ciphertext)."""
        buffer, self.buffer, self.slots = self.buffer, None, set()
        buffer.grow(image_bytes)
        return buffer

    def release(self, slot=None):
        """Forget `slot`; with no payload left, the arena is zeroed and unmapped."""
        self.slots.discard(slot)
        if not self.slots and self.buffer is not None:
            self.buffer.close()
            self.buffer = None


class ArenaSlot:
    """A payload's bytes in a PayloadArena; reads like a SecureBuffer of its own."""

    def __init__(self, arena, offset, nbytes):
        self.arena, self.offset, self.nbytes = arena, offset, nbytes

    def _buffer(self):
        if self.arena.buffer is None or self not in self.arena.slots:
            raise PatchFormatError("this payload was consumed by an in-place seal (or closed): its bytes are "
                                   "ciphertext now")
        return self.arena.buffer

    @property
    def locked(self):
        return self._buffer().locked

    @property
    def lock_error(self):
        return self._buffer().lock_error

    def view(self, offset=0, nbytes=None):
        nbytes = self.nbytes - offset if nbytes is None else nbytes
        return self._buffer().view(self.offset + offset, nbytes)

    def tensor(self, dtype, offset, count, shape=None):
        return self._buffer().tensor(dtype, self.offset + offset, count, shape)

    def close(self):
        """Zero this payload; the arena goes with its last one. A consumed payload is the patch's now."""
        if self.arena.buffer is not None and self in self.arena.slots:
            self.arena.buffer.zero(self.offset, self.nbytes)
            self.arena.release(self)


def payload_bound(shape, dtype, stored_dtype, rows=None):
    """The most bytes the payload of a `shape` tensor can take (every candidate row kept, every value an
    exception), for sizing a PayloadArena before the deltas are computed. `rows`: the number of
    candidate rows, or None for a dense payload."""
    kind = "delta" if rows is None else "rows"
    exceptions = n_values(kind, shape, rows or 0) if stored_dtype == dtype else 0
    return aligned(sum(payload_layout(kind, dtype, stored_dtype, shape, rows or 0, exceptions)))


def bits(t):
    return t.view(BITS[t.element_size()])


def _fill(name, kind, dtype, stored, shape, rows_idx, values, exc_mask=None, max_error=0.0, arena=None):
    """Copy the segments into the next slot of `arena`, or a fresh SecureBuffer, then zero `values` (it
    held fine-tuned data)."""
    n_rows = 0 if rows_idx is None else rows_idx.numel()
    n_exc = 0 if exc_mask is None else int(exc_mask.sum())
    sizes = payload_layout(kind, dtype, stored, shape, n_rows, n_exc)
    buf = SecureBuffer(sum(sizes)) if arena is None else arena.take(sum(sizes))
    off = 0
    for seg, size, seg_dtype in zip((rows_idx, values, pack_bits(exc_mask) if n_exc else None), sizes,
                                    (torch.int64, DTYPES[stored], torch.uint8)):
        if size:
            buf.tensor(seg_dtype, off, size // seg_dtype.itemsize).copy_(seg.reshape(-1))
        off += size
    values.zero_()
    return PlainTensor(name, kind, dtype, stored, tuple(shape), n_rows, n_exc, buf, max_error)


@torch.no_grad()
def delta_tensor(name, base, finetuned, rows=None, stored_dtype=None, arena=None):
    """The payload of `finetuned - base` (same shape and dtype, CPU or not), or None when they are
    bit-identical. `rows`: candidate row indices (embeddings): rows whose delta is exactly zero are
    dropped, and when every row remains the tensor is stored dense. `stored_dtype` None = exact: the
    delta in the base dtype; where base + delta would not round back to the fine-tuned value (it
    crossed zero, or shrank a lot) the value slot holds the fine-tuned value itself and the exception
    bitmap flags it, so applying is bit-exact for at most 1 bit per value. 'bfloat16' / 'float16' halve
    the size; max_error then reports the largest |patched - fine-tuned|. `arena`: a PayloadArena to put
    the payload in (default: its own SecureBuffer)."""
    if base.shape != finetuned.shape:
        raise ValueError(f"{name}: base {tuple(base.shape)} vs fine-tuned {tuple(finetuned.shape)}")
    b = base.detach().cpu()
    f = finetuned.detach().to(device="cpu", dtype=b.dtype)
    own_f = f.data_ptr() != finetuned.data_ptr()  # f is our copy: zero it when done
    dtype = dtype_name(b.dtype)
    stored = dtype if stored_dtype in (None, "exact", dtype) else stored_dtype
    if stored not in DTYPES:
        raise ValueError(f"unknown stored dtype {stored_dtype!r}")
    kind, rows_idx = "delta", None
    if rows is not None:
        rows = torch.as_tensor(rows, dtype=torch.int64).cpu().unique()  # sorted, unique
        if rows.numel() == 0:  # no candidate row: nothing to store
            if own_f:
                f.zero_()
            return None
        f_rows, b_rows = f[rows], b[rows]
        changed = (bits(f_rows) != bits(b_rows)).reshape(len(rows), -1).any(1)
        rows = rows[changed]
        if rows.numel() and rows.numel() < b.shape[0]:
            kind, rows_idx = "rows", rows
            if own_f:
                f.zero_()
            b, f, own_f = b_rows[changed], f_rows[changed], True
        f_rows.zero_()
        if rows.numel() == 0:
            return None
    elif torch.equal(bits(f), bits(b)):
        return None
    d = f - b
    exc_mask, max_error = None, 0.0
    if stored == dtype:
        roundtrip = b + d
        miss = bits(roundtrip) != bits(f)
        roundtrip.zero_()
        if miss.any():
            d[miss] = f[miss]
            exc_mask = miss
    else:
        lossy = d.to(DTYPES[stored])
        if not torch.isfinite(lossy).all():
            raise ValueError(f"{name}: the delta overflows {stored}; use bfloat16 or exact")
        max_error = float((b + lossy.to(b.dtype) - f).abs().max())
        d.zero_()
        d = lossy
    if own_f:
        f.zero_()
    return _fill(name, kind, dtype, stored, finetuned.shape, rows_idx, d, exc_mask, max_error, arena)


@torch.no_grad()
def whole_tensor(name, value, stored_dtype=None, arena=None):
    """The payload of a tensor the base does not have (e.g. LoRA adapters): its values, stored whole."""
    v = value.detach().cpu()
    dtype = dtype_name(v.dtype)
    stored = dtype if stored_dtype in (None, "exact", dtype) else stored_dtype
    values = v.to(DTYPES[stored]) if stored != dtype else v.clone()
    max_error = float((values.to(v.dtype) - v).abs().max()) if stored != dtype and v.numel() else 0.0
    return _fill(name, "whole", dtype, stored, v.shape, None, values, None, max_error, arena)
