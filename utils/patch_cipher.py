"""
Sealing and opening patches: AES-256-GCM per chunk under per-tensor HKDF subkeys, a key-check value and a
header MAC (PATCH_FORMAT.md sections 3, 7, 8).

open_patch() runs the checks in the order of PATCH_FORMAT.md section 8 (integrity before identity: a
damaged patch is exit 3 even when it belongs to another tenant) and decrypts into one SecureBuffer, or,
for the values a caller asks for, straight into its own locked tensors, or, for a one-shot open, in the
sealed image itself; any failure zeroes what was decrypted, wherever it went. A missing expected tenant
is refused before anything is read. Nothing here touches a model.
"""
import ctypes
import hashlib
import hmac
import secrets
import time
from dataclasses import dataclass

import torch
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from utils.patch_errors import (PatchFormatError, SwappedBlobError, TamperedError, WrongBaseError, WrongKeyError,
                                WrongTenantError)
from utils.patch_format import (DEFAULT_CHUNK_BYTES, DTYPES, FORMAT_VERSION, MAC_BYTES, MAX_CHUNK_BYTES,
                                NONCE_BYTES, RECORD_OVERHEAD, SALT_BYTES, TAG_BYTES, SealedPatch, check_header,
                                check_tenant, chunk_ad, encode_header, lay_out, payload_layout, record_sizes,
                                valid_name)
from utils.patch_keys import expected_tenant, header_mac, master_key, new_key_spec, subkey, tensor_key
from utils.patch_payload import set_bits
from utils.secure_memory import SecureBuffer, aligned, harden_process


def seal(tensors, key, *, tenant, base_fingerprint, structure=None, meta=None, generation=None,
         chunk_bytes=DEFAULT_CHUNK_BYTES, scrypt_params=None, consume=False):
    """Encrypt PlainTensors into a SealedPatch (the sealed file's bytes, in anonymous memory).
    structure: {"untie_weights": bool, "lora": None | {"rank", "alpha", "targets"}}, what applying must do
    to the base before the tensors fit. meta: non-secret JSON shown at apply time (authenticated).
    generation: the tenant's patch counter (a registry refuses one older than it has seen); default the
    creation time in nanoseconds, which grows from patch to patch on one clock without any state.

    `consume`: the caller needs the tensors no more. When they are the payloads of one PayloadArena
    (DeltaTracker.build's) and its layout allows (_arena_to_seal), each chunk is encrypted over its own
    plaintext, last chunk first, and moved up to its place; the header and MAC go in front and the arena
    becomes the patch's image, so no fresh memory is pre-faulted (most of a cold seal's cost:
    BENCHMARKS.md, "Throughput"). The tensors are consumed then (they refuse use). Otherwise, and
    without `consume`, the image is a fresh buffer and the tensors are left as they were."""
    check_tenant(tenant)
    if not 0 < chunk_bytes <= MAX_CHUNK_BYTES:
        raise PatchFormatError(f"chunk size must be in 1..{MAX_CHUNK_BYTES} bytes")
    generation = time.time_ns() if generation is None else generation
    if type(generation) is not int or generation < 0:
        raise PatchFormatError("generation must be a non-negative integer")
    names = [t.name for t in tensors]
    if len(set(names)) != len(names) or not all(valid_name(n) for n in names):
        raise ValueError("tensor names must be unique and made of A-Z a-z 0-9 _ .")
    salt = secrets.token_bytes(SALT_BYTES)
    key_spec = new_key_spec(key, scrypt_params)
    master = master_key(key, key_spec)
    header = {
        "format": "private-nanogpt sealed patch", "version": FORMAT_VERSION, "patch_id": secrets.token_hex(16),
        "tenant": tenant, "generation": generation, "cipher": "AES-256-GCM", "kdf": "HKDF-SHA256",
        "salt": salt.hex(), "key": key_spec, "key_check": subkey(master, salt, "key-check").hex(),
        "base_fingerprint": base_fingerprint, "structure": {"untie_weights": False, "lora": None, **(structure or {})},
        "chunk_bytes": chunk_bytes, "meta": meta or {},
        "tensors": [{**t.descriptor(), "plain_bytes": t.nbytes} for t in tensors],
    }
    header["blob_bytes"] = lay_out(header["tensors"], chunk_bytes)
    signed = encode_header(header)
    header_sha = hashlib.sha256(signed).hexdigest()
    blob_start = len(signed) + MAC_BYTES
    records = []  # (tensor index, chunk index, file position, offset in the payload, plaintext length)
    for ti, entry in enumerate(header["tensors"]):
        pos, start = blob_start + entry["offset"], 0
        for ci, n in enumerate(record_sizes(entry["plain_bytes"], chunk_bytes)):
            records.append((ti, ci, pos, start, n))
            pos, start = pos + RECORD_OVERHEAD + n, start + n
    image_bytes = blob_start + header["blob_bytes"]
    arena = _arena_to_seal(tensors, records, image_bytes) if consume else None
    if arena is not None:
        slots = [t.buffer for t in tensors]
        image = arena.consume(image_bytes)
    else:
        image = SecureBuffer(image_bytes, lock=False, wipe=False)  # ciphertext: not secret
    out = image.view()
    keys = [tensor_key(master, salt, t.name) for t in tensors]
    try:
        for ti, ci, pos, start, n in reversed(records) if arena is not None else records:
            nonce, ad = secrets.token_bytes(NONCE_BYTES), chunk_ad(header, header_sha, header["tensors"][ti], ci)
            if arena is not None:  # over its own plaintext, then up to its place (they may overlap: memmove)
                src = slots[ti].offset + start
                tag = _encrypt(keys[ti], nonce, ad, out[src:src + n], out[src:src + n])
                ctypes.memmove(image.address + pos + NONCE_BYTES, image.address + src, n)
            else:
                tag = _encrypt(keys[ti], nonce, ad, tensors[ti].buffer.view(start, n),
                               out[pos + NONCE_BYTES:pos + NONCE_BYTES + n])
            out[pos:pos + NONCE_BYTES] = nonce
            out[pos + NONCE_BYTES + n:pos + RECORD_OVERHEAD + n] = tag
        out[:len(signed)] = signed
        out[len(signed):blob_start] = header_mac(subkey(master, salt, "header-mac"), signed)
    except BaseException:
        del out
        if arena is not None:  # plaintext and ciphertext mixed: the tensors are gone either way
            image.zero()
        image.close()
        raise
    del out
    if arena is not None:
        image.mark_ciphertext()  # each plaintext byte was encrypted where it lay, the padding never held any
    return SealedPatch(image, header, len(signed))


def _encrypt(key, nonce, ad, plain, out):
    """One chunk, AES-256-GCM: `plain` encrypted into `out` (which may be `plain` itself); returns the tag."""
    enc = Cipher(algorithms.AES(key), modes.GCM(nonce)).encryptor()
    enc.authenticate_additional_data(ad)
    enc.update_into(plain, out)
    enc.finalize()
    return enc.tag


def _arena_to_seal(tensors, records, image_bytes):
    """The PayloadArena `tensors` lie in, when it can become their sealed image: they are all its open
    payloads (no other plaintext would be left in it), the image covers its payloads and fits its
    reserve, and each record's place (nonce, ciphertext, tag) lies at or after the end of every earlier
    chunk's plaintext, so that placing the records last first never overwrites plaintext not yet
    encrypted. True by construction of an arena filled in header order (the header comes first, each
    chunk adds 28 bytes); checked like _moves_down, else None (a fresh image)."""
    arena = getattr(tensors[0].buffer, "arena", None) if tensors else None
    if arena is None or arena.buffer is None or {id(t.buffer) for t in tensors} != {id(s) for s in arena.slots}:
        return None
    if not arena.buffer.nbytes <= image_bytes <= arena.buffer.capacity:
        return None
    end = 0
    for ti, _, pos, start, n in records:
        if pos < end:
            return None
        end = max(end, tensors[ti].buffer.offset + start + n)
    return arena


@dataclass
class OpenPatch:
    """A patch whose key, header and every chunk have been verified, decrypted into `plain` (and the values
    of the tensors in `values`, into the caller's tensors)."""
    header: dict
    plain: SecureBuffer
    offsets: list  # byte offset of each tensor's payload in `plain` (without the values of `values`' tensors)
    values: dict = None  # tensor index -> the caller's tensor its values were decrypted into

    def segments(self, i):
        """(row indices int64, values, exception bitmap uint8) tensors viewing `plain` (values: `values[i]`)."""
        e = self.header["tensors"][i]
        sizes = payload_layout(e["kind"], e["dtype"], e["stored_dtype"], e["shape"], e["rows"], e["exceptions"])
        out, off = [], self.offsets[i]
        for k, (size, dt) in enumerate(zip(sizes, (torch.int64, DTYPES[e["stored_dtype"]], torch.uint8))):
            if k == 1 and self.values and i in self.values:
                out.append(self.values[i].reshape(-1).view(dt))
                continue
            out.append(self.plain.tensor(dt, off, size // dt.itemsize))
            off += size
        return out


def authenticate(sealed, key):
    """Derive the keys and verify the header (PATCH_FORMAT.md 8.4-8.6). Returns the master key."""
    h = sealed.header
    master = master_key(key, h["key"])
    salt = bytes.fromhex(h["salt"])
    if not hmac.compare_digest(subkey(master, salt, "key-check"), bytes.fromhex(h["key_check"])):
        raise WrongKeyError("wrong key: this patch was sealed with another key")
    signed = sealed.image.view(0, sealed.signed_len)
    mac = sealed.image.view(sealed.signed_len, MAC_BYTES)
    if not hmac.compare_digest(header_mac(subkey(master, salt, "header-mac"), signed), bytes(mac)):
        raise TamperedError("patch header was modified (its MAC does not verify)")
    check_header(h)
    return master


def check_target(header, base_fp, tenant):
    """PATCH_FORMAT.md 8.9: the expected tenant (always given) and base."""
    if header["tenant"] != tenant:
        raise WrongTenantError(f"patch belongs to tenant {header['tenant']!r}, not {tenant!r}")
    if base_fp is not None and header["base_fingerprint"] != base_fp:
        raise WrongBaseError(f"patch was made for another base model (fingerprint {header['base_fingerprint'][:12]}..., "
                             f"this model {base_fp[:12]}...)")


def payload_offsets(header, direct=()):
    """Where each tensor's payload goes in the plaintext buffer (64-byte aligned), and the total; the
    values of the tensors in `direct` go elsewhere and take no room here."""
    offsets, pos = [], 0
    for i, e in enumerate(header["tensors"]):
        offsets.append(pos)
        rows_b, values_b, bitmap_b = payload_layout(e["kind"], e["dtype"], e["stored_dtype"], e["shape"], e["rows"],
                                                    e["exceptions"])
        pos += aligned(rows_b + bitmap_b if i in direct else rows_b + values_b + bitmap_b)
    return offsets, pos


def plaintext_bytes(header):
    return payload_offsets(header)[1]


def open_patch(sealed, key, tenant, base_fp=None, scratch=None, values_into=None, consume=False):
    """Authenticate, decrypt every chunk into locked anonymous memory (`scratch` when it is a large enough
    SecureBuffer, else a new one), check payloads, then tenant and base. `values_into(header)`, called
    once the header is authentic, may return {tensor index: tensor} to decrypt those tensors' values
    straight into (the caller's locked storage: one buffer and one pass fewer). Any failure zeroes what
    was decrypted, there too, and raises; the caller touches its model only after this returns. The
    process is hardened first: it is about to hold plaintext.

    `consume`: the caller needs neither `sealed` nor its bytes again (a one-shot open of a file just
    read). Where it pays (_in_place_pays), the sealed image itself becomes `plain`: it is made secret
    (locked, zeroed on close and at exit) before any plaintext enters it, each chunk is decrypted over
    its own ciphertext and, once its tag verified, moved down to its place; `sealed` is then consumed
    (opened again, tobytes() or export() it refuses; after a failure its image is all zeros). Its pages
    are resident already, so no fresh memory is touched: that pre-fault was most of a cold open's cost
    (BENCHMARKS.md, "Throughput")."""
    tenant = expected_tenant(tenant)
    sealed.check_intact()
    harden_process()
    master = authenticate(sealed, key)
    h = sealed.header
    direct = values_into(h) if values_into is not None else {}
    offsets, total = payload_offsets(h, direct)
    header_sha = hashlib.sha256(sealed.image.view(0, sealed.signed_len)).hexdigest()
    salt = bytes.fromhex(h["salt"])
    keys = [tensor_key(master, salt, e["name"]) for e in h["tensors"]]
    records = []  # (tensor index, chunk index, file position, plaintext length, pieces: see _decrypt_record)
    for ti, e in enumerate(h["tensors"]):
        rows_b, values_b, bitmap_b = payload_layout(e["kind"], e["dtype"], e["stored_dtype"], e["shape"], e["rows"],
                                                    e["exceptions"])
        at = offsets[ti]
        if ti in direct:  # values into the caller's tensor, row indices and bitmap into `plain`
            dst = memoryview(direct[ti].reshape(-1).view(torch.uint8).numpy())
            segments = [(rows_b, at), (values_b, dst), (bitmap_b, at + rows_b)]
        else:
            segments = [(e["plain_bytes"], at)]
        pos, start = sealed.blob_start + e["offset"], 0
        for ci, n in enumerate(record_sizes(e["plain_bytes"], h["chunk_bytes"])):
            records.append((ti, ci, pos, n, _scatter(segments, start, n)))
            pos, start = pos + NONCE_BYTES + n + TAG_BYTES, start + n
    in_place = consume and _in_place_pays(sealed, total) and _moves_down(records)
    if in_place:
        sealed.consumed = True
        sealed.image.make_secret()
        plain = sealed.image
    else:
        plain = scratch if scratch is not None and scratch.nbytes >= total else SecureBuffer(total)
    data, out = sealed.image.view(), None if in_place else plain.view()
    try:
        for ti, ci, pos, n, pieces in records:
            if not _decrypt_record(data, pos, n, keys[ti], chunk_ad(h, header_sha, h["tensors"][ti], ci), pieces, out):
                raise _diagnose(h, header_sha, keys, records, data, (ti, ci, pos, n), pieces, out)
            if in_place:
                _move_down(plain, pos, pieces)
        result = OpenPatch(h, plain, offsets, direct)
        _check_payloads(result)
        check_target(h, base_fp, tenant)
        return result
    except BaseException:
        del data, out, records
        for t in direct.values():
            t.zero_()
        if in_place or plain is scratch:  # in place: what was moved, and any chunk decrypted over its ciphertext
            plain.zero()
        else:
            plain.close()
        raise


def _in_place_pays(sealed, plain_bytes):
    """Whether decrypting in the image beats a fresh buffer: making the resident image secret and wiping
    it on close costs ~0.18 ns per image byte, a fresh locked buffer ~0.37 ns per plaintext byte, and
    the move ~0.05 (measured on the BENCHMARKS.md machine). A cold apply on the CPU decrypts the values
    into the patched storage and needs almost no plaintext buffer: there it does not pay."""
    return 2 * plain_bytes >= sealed.nbytes


def _moves_down(records):
    """Every piece's place in `plain` lies at or before its ciphertext in the file (the header and each
    chunk's nonce and tag come first), so moving verified chunks in file order never overwrites
    ciphertext not yet read. True by construction of the layout; checked, since an in-place open relies
    on it (otherwise the open takes a fresh buffer)."""
    return all(dst <= pos + NONCE_BYTES + off for _, _, pos, _, pieces in records
               for off, _, dst in pieces if isinstance(dst, int))


def _scatter(segments, start, n):
    """The pieces (offset in the chunk, length, destination) of payload bytes [start, start + n), given the
    payload's segments in order as (length, destination: a view, or an offset in `plain`)."""
    pieces, pos = [], 0
    for length, dst in segments:
        lo, hi = max(start, pos), min(start + n, pos + length)
        if lo < hi:
            pieces.append((lo - start, hi - lo, dst + lo - pos if isinstance(dst, int) else dst[lo - pos:hi - pos]))
        pos += length
    return pieces


def _landing(data, pos, pieces, out):
    """Where each piece is decrypted: the caller's view, its slot in `out` (the plaintext buffer) or, for
    an in-place open (out None), its own ciphertext."""
    body = pos + NONCE_BYTES
    return [dst if not isinstance(dst, int) else data[body + off:body + off + length] if out is None
            else out[dst:dst + length] for off, length, dst in pieces]


def _decrypt_record(data, pos, n, key, ad, pieces, out):
    """Decrypt one chunk into its pieces (offset in the chunk, length, destination: a view, or an offset
    in `plain`, see _landing). False when the tag does not verify: the destinations are zeroed, and what
    was decrypted over its own ciphertext is ciphertext again (for _diagnose)."""
    nonce = bytes(data[pos:pos + NONCE_BYTES])
    tag = bytes(data[pos + NONCE_BYTES + n:pos + NONCE_BYTES + n + TAG_BYTES])
    dec = Cipher(algorithms.AES(key), modes.GCM(nonce, tag)).decryptor()
    dec.authenticate_additional_data(ad)
    body = pos + NONCE_BYTES
    landed = _landing(data, pos, pieces, out)
    for (off, length, _), dst in zip(pieces, landed):  # GCM is a stream: one message may be decrypted piece by piece
        dec.update_into(data[body + off:body + off + length], dst)
    try:
        dec.finalize()
        return True
    except InvalidTag:
        pass
    if out is None:  # GCM is CTR mode: the same keystream XORed again gives the ciphertext back
        again = Cipher(algorithms.AES(key), modes.GCM(nonce)).encryptor()
        for dst in landed:  # every piece, to keep the keystream in step; the caller's views are zeroed next
            again.update_into(dst, dst)
    _zero(pieces, landed, out)
    return False


def _zero(pieces, landed, out):
    """Zero the pieces' destinations, except a chunk's own ciphertext."""
    for (_, _, dst), view in zip(pieces, landed):
        if out is not None or not isinstance(dst, int):
            view[:] = bytes(len(view))


def _move_down(image, pos, pieces):
    """An in-place open: move a verified chunk's pieces from over its ciphertext to their places (which
    may overlap it: memmove)."""
    for off, length, dst in pieces:
        if isinstance(dst, int):
            ctypes.memmove(image.address + dst, image.address + pos + NONCE_BYTES + off, length)


def _diagnose(h, header_sha, keys, records, data, failed, pieces, out):
    """A chunk failed: if it authenticates as another (tensor, chunk) of this patch, blobs were swapped or
    reordered; otherwise its bytes were modified."""
    ti, ci, pos, n = failed
    name = h["tensors"][ti]["name"]
    for tj, cj, _, m, _ in records:
        if m == n and (tj, cj) != (ti, ci):
            if _decrypt_record(data, pos, n, keys[tj], chunk_ad(h, header_sha, h["tensors"][tj], cj), pieces, out):
                for view in _landing(data, pos, pieces, out):
                    view[:] = bytes(len(view))
                return SwappedBlobError(f"blob of tensor {name} chunk {ci} was replaced by the blob of "
                                        f"{h['tensors'][tj]['name']} chunk {cj} (swapped or reordered)")
    return TamperedError(f"tensor {name} chunk {ci} does not authenticate (nonce, ciphertext or tag modified)")


def _check_payloads(opened):
    """PATCH_FORMAT.md 8.8: row indices in range and strictly increasing, bitmap popcount = exceptions and
    no bit past the last value (authentic, but an apply must never index out of bounds)."""
    for i, e in enumerate(opened.header["tensors"]):
        rows, values, bitmap = opened.segments(i)
        if e["kind"] == "rows" and rows.numel() and (rows[0] < 0 or rows[-1] >= e["shape"][0]
                                                     or (rows.numel() > 1 and not bool((rows[1:] > rows[:-1]).all()))):
            raise PatchFormatError(f"tensor {e['name']}: row indices out of range or not increasing")
        if e["exceptions"]:
            idx = set_bits(bitmap)
            if idx.numel() != e["exceptions"] or int(idx[-1]) >= values.numel():
                raise PatchFormatError(f"tensor {e['name']}: exception bitmap does not match its count")
