"""utils/patch_cipher.py: the order of checks of PATCH_FORMAT.md section 8 (integrity before identity), the
authenticated generation, the in-place open (open_patch(consume=True)) and the in-place seal of a
PayloadArena (seal(consume=True))."""
import os

import pytest
import torch

from tests.sealed_fixtures import sealed_patch, tiny_pair
from utils.patch_apply import base_fingerprint
from utils.patch_cipher import open_patch, seal
from utils.patch_errors import (PatchFormatError, SwappedBlobError, TamperedError, WrongBaseError,
                                WrongTenantError)
from utils.patch_format import DEFAULT_CHUNK_BYTES, NONCE_BYTES, TAG_BYTES, SealedPatch
from utils.patch_payload import PayloadArena, delta_tensor, whole_tensor


@pytest.fixture(scope="module")
def patch():
    base, ft = tiny_pair()
    key = os.urandom(32)
    sealed = sealed_patch(base, ft, key, generation=7)
    return base, key, sealed.tobytes(), sealed.blobs()


def flip(raw, pos):
    b = bytearray(raw)
    b[pos] ^= 1
    return bytes(b)


def test_a_damaged_patch_of_another_tenant_is_reported_as_damaged(patch):
    base, key, raw, blobs = patch
    _, pos, size = blobs[-1]
    damaged = flip(raw, pos + size - 1)  # the last tag
    for tenant, fp in (("bob", None), ("alice", "0" * 64)):  # another tenant; another base
        with pytest.raises(TamperedError) as info:
            open_patch(SealedPatch.from_bytes(damaged), key, tenant, fp)
        assert info.value.exit_code == 3
    with pytest.raises(WrongTenantError):  # intact: then, and only then, identity
        open_patch(SealedPatch.from_bytes(raw), key, "bob")
    with pytest.raises(WrongBaseError):
        open_patch(SealedPatch.from_bytes(raw), key, "alice", "0" * 64)


def test_the_generation_is_in_the_authenticated_header(patch):
    base, key, raw, _ = patch
    opened = open_patch(SealedPatch.from_bytes(raw), key, "alice", base_fingerprint(base))
    assert opened.header["generation"] == 7
    opened.plain.close()
    at = raw.index(b'"generation":7')
    with pytest.raises(TamperedError, match="MAC"):
        open_patch(SealedPatch.from_bytes(raw[:at] + b'"generation":9' + raw[at + 14:]), key, "alice")


# ----------------------------------------------------------------------------- in-place (consuming) open
def every_kind(seed=0, arena=None):
    """PlainTensors of every kind: a delta with exceptions (bitmap), embedding rows, a whole tensor, and
    a bfloat16 (lossy) delta; in `arena` when given, else each in its own buffer."""
    g = torch.Generator().manual_seed(seed)
    base, emb, other = (torch.randn(shape, generator=g) for shape in ((40, 24), (50, 24), (30, 10)))
    ft = base + 1e-3 * torch.randn(base.shape, generator=g)
    ft[:3] = base[:3] * 1e-9  # base + delta cannot give these back: stored whole, flagged in the bitmap
    ft_emb = emb.clone()
    ft_emb[[1, 5, 7]] += 0.5
    plain = [delta_tensor("a", base, ft, arena=arena), delta_tensor("emb", emb, ft_emb, rows=[1, 5, 7, 9], arena=arena),
             whole_tensor("lora.A", torch.randn((8, 24), generator=g), arena=arena),
             delta_tensor("b", other, other + 0.01, stored_dtype="bfloat16", arena=arena)]
    assert [t.kind for t in plain] == ["delta", "rows", "whole", "delta"] and plain[0].exceptions
    return plain


@pytest.fixture(scope="module", params=[100, 1000, DEFAULT_CHUNK_BYTES], ids=lambda c: f"chunk{c}")
def kinds(request):
    key, plain = os.urandom(32), every_kind()
    try:
        sealed = seal(plain, key, tenant="alice", base_fingerprint="0" * 64, chunk_bytes=request.param)
    finally:
        for t in plain:
            t.close()
    return key, sealed.tobytes(), sealed.header


def payloads(opened):
    return [bytes(opened.plain.view(off, e["plain_bytes"])) for off, e in zip(opened.offsets, opened.header["tensors"])]


def test_an_in_place_open_gives_the_same_payloads_and_consumes_the_patch(kinds, tmp_path):
    key, raw, header = kinds
    assert any(e["chunks"] > 1 for e in header["tensors"]) or header["chunk_bytes"] == DEFAULT_CHUNK_BYTES
    normal = open_patch(SealedPatch.from_bytes(raw), key, "alice")
    sealed = SealedPatch.from_bytes(raw)
    opened = open_patch(sealed, key, "alice", consume=True)
    assert sealed.consumed and opened.plain is sealed.image  # decrypted in the image, not in a new buffer
    assert payloads(opened) == payloads(normal)
    for i in range(len(header["tensors"])):
        assert all(torch.equal(a, b) for a, b in zip(opened.segments(i), normal.segments(i)))
    with pytest.raises(PatchFormatError, match="consumed"):  # a second open would decrypt plaintext
        open_patch(sealed, key, "alice")
    with pytest.raises(PatchFormatError, match="consumed"):  # and exported, it would be plaintext on disk
        sealed.export(tmp_path / "again.patch")
    with pytest.raises(PatchFormatError, match="consumed"):
        sealed.tobytes()
    assert not (tmp_path / "again.patch").exists()
    normal.plain.close()
    opened.plain.close()


def swap(raw, a, b, n):
    out = bytearray(raw)
    out[a:a + n], out[b:b + n] = raw[b:b + n], raw[a:a + n]
    return bytes(out)


def test_a_failed_in_place_open_raises_as_before_and_leaves_nothing_decrypted(kinds):
    key, raw, header = kinds
    sealed = SealedPatch.from_bytes(raw)
    (_, pos, size), last = sealed.blobs()[0], sealed.blobs()[-1]
    rec = NONCE_BYTES + header["chunk_bytes"] + TAG_BYTES
    cases = [(flip(raw, last[1] + last[2] - 20), "alice", TamperedError),  # the last chunk: all others were moved
             (raw, "bob", WrongTenantError)]  # every chunk verified and moved, then refused
    if size >= 2 * rec:  # two full chunks of the first tensor, swapped: they still authenticate, elsewhere
        cases.append((swap(raw, pos, pos + rec, rec), "alice", SwappedBlobError))
    for data, tenant, error in cases:
        with pytest.raises(error):
            open_patch(SealedPatch.from_bytes(data), key, tenant)  # the normal open: the same class
        sealed = SealedPatch.from_bytes(data)
        with pytest.raises(error) as info:
            open_patch(sealed, key, tenant, consume=True)
        assert type(info.value) is error and sealed.consumed
        assert not any(sealed.image.view())  # nothing decrypted (nor moved) is left in the image
        sealed.close()


# ----------------------------------------------------------------------------- in-place (consuming) seal
def seal_every_kind(plain, key, chunk_bytes, consume):
    return seal(plain, key, tenant="alice", base_fingerprint="0" * 64, chunk_bytes=chunk_bytes, generation=3,
                consume=consume)


def opened_payloads(sealed, key):
    opened = open_patch(SealedPatch.from_bytes(sealed.tobytes()), key, "alice")  # the normal open
    try:
        return payloads(opened)
    finally:
        opened.plain.close()


def unsealed(header):
    """The header without what differs from one seal to the next."""
    return {k: v for k, v in header.items() if k not in ("patch_id", "salt", "key_check")}


@pytest.mark.parametrize("chunk_bytes", [100, 1000, DEFAULT_CHUNK_BYTES])
def test_an_in_place_seal_opens_to_the_payloads_of_a_fresh_seal_and_consumes_the_arena(chunk_bytes):
    key, arena = os.urandom(32), PayloadArena(1 << 20, 4, chunk_bytes)
    plain = every_kind(arena=arena)
    before = [bytes(t.buffer.view()) for t in plain]
    fresh = seal_every_kind(plain, key, chunk_bytes, consume=False)  # leaves the payloads as they were
    address = arena.buffer.address
    sealed = seal_every_kind(plain, key, chunk_bytes, consume=True)
    assert sealed.image.address == address and arena.buffer is None  # the arena is the image: no fresh buffer
    assert any(e["chunks"] > 1 for e in sealed.header["tensors"]) or chunk_bytes == DEFAULT_CHUNK_BYTES
    assert opened_payloads(sealed, key) == opened_payloads(fresh, key) == before
    assert sealed.nbytes == fresh.nbytes and sealed.signed_len == fresh.signed_len
    assert unsealed(sealed.header) == unsealed(fresh.header)
    image = sealed.tobytes()
    assert not any(p[:32] in image for p in before)  # no plaintext left in it (it is not wiped on close)
    assert not sealed.image.wipe
    for t in plain:  # consumed: reading them would give ciphertext
        with pytest.raises(PatchFormatError, match="consumed"):
            t.buffer.view()
        with pytest.raises(PatchFormatError, match="consumed"):
            t.buffer.tensor(torch.uint8, 0, 1)
        t.close()  # a no-op: the bytes are the patch's now
    with pytest.raises(PatchFormatError, match="consumed"):
        seal_every_kind(plain, key, chunk_bytes, consume=True)
    assert sealed.tobytes() == image
    opened = open_patch(sealed, key, "alice", consume=True)  # and the one-shot open in place on top of it
    assert opened.plain is sealed.image and payloads(opened) == before
    opened.plain.close()
    fresh.close()


def test_a_seal_of_tensors_not_all_in_one_arena_takes_a_fresh_image_and_leaves_them():
    key, arena = os.urandom(32), PayloadArena(1 << 20, 4, 100)
    own, in_arena = every_kind(), every_kind(arena=arena)
    for plain in (own, in_arena[:3]):  # own buffers; or an arena with a payload not sealed here
        before = [bytes(t.buffer.view()) for t in plain]
        sealed = seal_every_kind(plain, key, 100, consume=True)
        assert [bytes(t.buffer.view()) for t in plain] == before  # still usable, still plaintext
        assert opened_payloads(sealed, key) == before
        sealed.close()
    assert arena.buffer is not None and len(arena.slots) == 4
    for t in own + in_arena:
        t.close()
    assert arena.buffer is None  # released with its last payload
