"""
Sealed parameter patches: a fine-tuned model's changes, encrypted, applied to a base model only with the key.

The file format and key schedule are specified in PATCH_FORMAT.md (version 1). In short:

    magic "NGPTPTCH" | u16 version | u32 header length | header JSON | HMAC-SHA256(header)
    then per tensor, per chunk: nonce (12) | AES-256-GCM ciphertext | tag (16)

- Keys: a 32-byte master key (key file / environment / stdin, hex) or a passphrase stretched by scrypt
  (parameters in the header). HKDF-SHA256 with the patch's random salt derives one subkey per purpose:
  a key-check value (tells a wrong key from tampering), the header MAC key, and one AES key per tensor.
- Every chunk's associated data names the format version, patch id, tenant, base-model fingerprint, the
  header's SHA-256, the tensor (name, kind, dtypes, shape, row and exception counts) and "chunk i/n", so
  a blob cannot be moved to another tensor, position, patch, tenant or base, and truncation is caught.
- Embedding row indices are encrypted with their tensor's values (they reveal which tokens the tenant's
  data contains); the header carries only their count.
- Plaintext (deltas being sealed, decrypted payloads) lives in SecureBuffer: anonymous private memory,
  excluded from core dumps, mlock'ed where RLIMIT_MEMLOCK allows, zeroed before release.
- apply_sealed_patch() authenticates and decrypts everything before it touches the model (all or
  nothing); it never writes into the base tensors: patched tensors are swapped in and revert() swaps the
  base tensors back, so the base weights come back bit for bit.

Library API: load_key, generate_key_file, base_fingerprint, delta_tensor, whole_tensor, seal,
SealedPatch, apply_sealed_patch, AppliedPatch, and the PatchError classes (exit codes 2 / 3 / 4).
"""
import ctypes
import errno
import hashlib
import hmac
import json
import math
import mmap
import os
import re
import resource
import secrets
import struct
import sys
import time
from dataclasses import dataclass, field

import torch
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives import hmac as crypto_hmac
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from cryptography.hazmat.primitives.kdf.scrypt import Scrypt

from utils.atomic import atomic_path
from utils.cli import UserError

FORMAT_VERSION = 1
MAGIC = b"NGPTPTCH"
PREFIX = struct.Struct("<8sHI")  # magic, format version, header length
MAC_BYTES, NONCE_BYTES, TAG_BYTES, KEY_BYTES, SALT_BYTES = 32, 12, 16, 32, 32
LABEL = "private-nanogpt sealed-patch v1"
DEFAULT_CHUNK_BYTES = 64 << 20
MAX_CHUNK_BYTES = 1 << 30  # one AES-GCM call must stay under 2^31 bytes
MAX_HEADER_BYTES = 64 << 20
SCRYPT_DEFAULT = {"n": 1 << 15, "r": 8, "p": 1}  # ~32 MiB, ~0.1 s
SCRYPT_MAX = {"n": 1 << 20, "r": 32, "p": 16}  # bounds on header values (a header must not be a memory bomb)
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16, "float64": torch.float64}
BITS = {2: torch.int16, 4: torch.int32, 8: torch.int64}  # same-size integer views for bitwise comparison
KINDS = ("delta", "rows", "whole")
TENANT_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._@-]{0,63}$")
NAME_RE = re.compile(r"^[A-Za-z0-9_.]{1,256}$")

if sys.byteorder != "little":  # payloads are little-endian and written straight from tensor memory
    raise ImportError("sealed patches need a little-endian machine")


# ----------------------------------------------------------------------------- errors
class PatchError(UserError):
    """Base class of every patch failure; `exit_code` is the CLI's: 2 bad input, 3 authentication, 4 mismatch."""
    exit_code = 2


class PatchFormatError(PatchError):
    """Not a sealed patch, an unsupported version, or an authenticated header this reader cannot use."""


class KeyInputError(PatchError):
    """Key material given in the wrong form (the message never contains it)."""


class PatchAuthError(PatchError):
    """Authentication failed: nothing was applied."""
    exit_code = 3


class WrongKeyError(PatchAuthError):
    pass


class TamperedError(PatchAuthError):
    pass


class TruncatedError(PatchAuthError):
    pass


class SwappedBlobError(PatchAuthError):
    pass


class PatchMismatchError(PatchError):
    """An authentic patch, made for another base model or tenant."""
    exit_code = 4


class WrongBaseError(PatchMismatchError):
    pass


class WrongTenantError(PatchMismatchError):
    pass


# ----------------------------------------------------------------------------- anonymous memory
_libc = ctypes.CDLL(None, use_errno=True)
_libc.mlock.argtypes = _libc.munlock.argtypes = (ctypes.c_void_p, ctypes.c_size_t)


def memlock_limit():
    soft, _ = resource.getrlimit(resource.RLIMIT_MEMLOCK)
    return None if soft == resource.RLIM_INFINITY else soft


class SecureBuffer:
    """Anonymous private memory (MAP_PRIVATE|MAP_ANONYMOUS: never backed by a file), excluded from core
    dumps (MADV_DONTDUMP), mlock'ed when `lock` and RLIMIT_MEMLOCK allow (else `lock_error` says why),
    pre-faulted (MAP_POPULATE) and zeroed on close()."""

    def __init__(self, nbytes, lock=True):
        self.nbytes = int(nbytes)
        self._size = max(1, self.nbytes)
        flags = mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | getattr(mmap, "MAP_POPULATE", 0)
        self.mm = mmap.mmap(-1, self._size, flags=flags, prot=mmap.PROT_READ | mmap.PROT_WRITE)
        self.dontdump = self._madvise(getattr(mmap, "MADV_DONTDUMP", None))
        self.wipeonfork = self._madvise(getattr(mmap, "MADV_WIPEONFORK", 18))  # Linux >= 4.14: a forked child sees zeros
        probe = (ctypes.c_char * self._size).from_buffer(self.mm)
        self.address = ctypes.addressof(probe)
        del probe  # a live export would keep the mmap from closing
        self.locked, self.lock_error = False, "not requested"
        if lock:
            if _libc.mlock(self.address, self._size) == 0:
                self.locked, self.lock_error = True, None
            else:
                err, limit = ctypes.get_errno(), memlock_limit()
                self.lock_error = (f"mlock refused ({errno.errorcode.get(err, err)}; RLIMIT_MEMLOCK "
                                   f"{'unlimited' if limit is None else f'{limit:,} bytes'} for {self._size:,})")

    def _madvise(self, option):
        try:
            self.mm.madvise(option)
            return True
        except (AttributeError, OSError, ValueError, TypeError):
            return False

    def view(self, offset=0, nbytes=None):
        nbytes = self.nbytes - offset if nbytes is None else nbytes
        return memoryview(self.mm)[offset:offset + nbytes]

    def tensor(self, dtype, offset, count):
        """A torch view of `count` elements at byte `offset` (no copy). It holds a buffer export (through
        the memoryview), so the mapping cannot be unmapped under it: close() then only zeroes it."""
        if count == 0:
            return torch.empty(0, dtype=dtype)
        return torch.frombuffer(memoryview(self.mm), dtype=dtype, count=count, offset=offset)

    def zero(self, offset=0, nbytes=None):
        if self.mm is not None and not self.mm.closed:
            ctypes.memset(self.address + offset, 0, self._size - offset if nbytes is None else nbytes)

    def close(self):
        """Zero, unlock and unmap. Views still alive keep the mapping until they go, already zeroed."""
        if self.mm is None or self.mm.closed:
            return
        self.zero()
        if self.locked:
            _libc.munlock(self.address, self._size)
            self.locked = False
        try:
            self.mm.close()
        except BufferError:
            pass

    def status(self):
        return {"bytes": self.nbytes, "anonymous": True, "dontdump": self.dontdump, "wipeonfork": self.wipeonfork,
                "mlocked": self.locked, "mlock_error": self.lock_error}

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass


def harden_process():
    """For CLI processes holding secrets: no core dumps, and not ptrace-attachable by other processes of
    the same user (PR_SET_DUMPABLE=0 also makes /proc/PID/mem unreadable to them)."""
    try:
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    except (ValueError, OSError):
        pass
    try:
        _libc.prctl(4, 0, 0, 0, 0)  # PR_SET_DUMPABLE = 4
    except (AttributeError, OSError):
        pass


# ----------------------------------------------------------------------------- keys
class Passphrase:
    """A passphrase (bytes). Sealing stretches it with scrypt; the parameters and salt go in the header."""
    __slots__ = ("secret",)

    def __init__(self, secret):
        self.secret = secret.encode() if isinstance(secret, str) else bytes(secret)
        if not self.secret:
            raise KeyInputError("the passphrase is empty")

    def __repr__(self):
        return "Passphrase(<hidden>)"


def parse_key(data, source):
    """32 key bytes from 64 hex characters (surrounding whitespace ignored) or from exactly 32 raw bytes."""
    text = data.strip() if isinstance(data, (bytes, bytearray)) else data.strip().encode()
    if len(text) == 2 * KEY_BYTES:
        try:
            return bytes.fromhex(text.decode("ascii"))
        except (ValueError, UnicodeDecodeError):
            pass
    if isinstance(data, (bytes, bytearray)) and len(data) == KEY_BYTES:
        return bytes(data)
    raise KeyInputError(f"{source} does not hold a key: expected 32 bytes written as 64 hex characters")


def load_key(key_file=None, env_var=None, passphrase=None, *, stdin=False, key_hex=None, passphrase_file=None,
             passphrase_env=None, warn=None):
    """The master key from exactly one source: key_file (64 hex chars or 32 raw bytes), env_var (the NAME
    of an environment variable holding hex), stdin (one hex line), key_hex (a command-line value: works,
    but `warn` is told it shows in the process list), or a passphrase (passphrase / passphrase_file /
    passphrase_env). Returns 32 bytes, or a Passphrase that seal/apply stretch with scrypt."""
    warn = warn or (lambda msg: print(f"warning: {msg}", file=sys.stderr))
    given = {k: v for k, v in dict(key_file=key_file, env_var=env_var, passphrase=passphrase, stdin=stdin,
                                   key_hex=key_hex, passphrase_file=passphrase_file,
                                   passphrase_env=passphrase_env).items() if v}
    if len(given) != 1:
        names = "--key_file, --key_env, --key_stdin, --passphrase_file, --passphrase_env (or --key)"
        raise KeyInputError(f"give exactly one key source: {names}" + (f"; got {', '.join(sorted(given))}" if given else ""))
    if key_file:
        if not os.path.isfile(key_file):
            raise KeyInputError(f"key file {key_file} does not exist")
        if os.stat(key_file).st_mode & 0o077:
            warn(f"key file {key_file} is readable by other users (chmod 600 it)")
        with open(key_file, "rb") as f:
            return parse_key(f.read(4096), f"key file {key_file}")
    if env_var:
        if env_var not in os.environ:
            raise KeyInputError(f"environment variable {env_var} is not set")
        return parse_key(os.environ[env_var], f"environment variable {env_var}")
    if stdin:
        return parse_key(sys.stdin.readline(), "stdin")
    if key_hex:
        warn("a key given with --key is visible to every user in the process list (ps, /proc/PID/cmdline); "
             "use --key_file, --key_env or --key_stdin")
        return parse_key(key_hex, "--key")
    if passphrase_file:
        if not os.path.isfile(passphrase_file):
            raise KeyInputError(f"passphrase file {passphrase_file} does not exist")
        with open(passphrase_file, "rb") as f:
            return Passphrase(f.read().rstrip(b"\r\n"))
    if passphrase_env:
        if passphrase_env not in os.environ:
            raise KeyInputError(f"environment variable {passphrase_env} is not set")
        return Passphrase(os.environ[passphrase_env])
    return Passphrase(passphrase)


def generate_key_file(path):
    """Write a fresh random key (64 hex chars) readable by its owner only, atomically."""
    with atomic_path(path) as tmp:  # mkstemp creates the file with mode 0600
        with open(tmp, "w") as f:
            f.write(secrets.token_hex(KEY_BYTES) + "\n")
        os.chmod(tmp, 0o600)
    return path


def _master_key(key, key_spec):
    """The 32-byte HKDF input: the raw key, or scrypt(passphrase) with the header's parameters."""
    if key_spec["source"] == "raw":
        if isinstance(key, Passphrase):
            raise KeyInputError("this patch was sealed with a raw key, not a passphrase: give --key_file/--key_env")
        if not isinstance(key, (bytes, bytearray)) or len(key) != KEY_BYTES:
            raise KeyInputError("a key must be 32 bytes")
        return bytes(key)
    if not isinstance(key, Passphrase):
        raise KeyInputError("this patch was sealed with a passphrase: give --passphrase_file or --passphrase_env")
    return Scrypt(salt=bytes.fromhex(key_spec["salt"]), length=KEY_BYTES, n=key_spec["n"], r=key_spec["r"],
                  p=key_spec["p"]).derive(key.secret)


def _subkey(master, salt, purpose):
    return HKDF(algorithm=hashes.SHA256(), length=KEY_BYTES, salt=salt,
                info=f"{LABEL} {purpose}".encode()).derive(master)


def tensor_key(master, salt, name):
    return _subkey(master, salt, f"tensor {name}")


def _header_mac(mac_key, signed):
    h = crypto_hmac.HMAC(mac_key, hashes.SHA256())
    h.update(signed)
    return h.finalize()


# ----------------------------------------------------------------------------- base fingerprint
def dtype_name(dtype):
    return str(dtype).replace("torch.", "")


def tensor_bytes(t):
    """A tensor's raw little-endian bytes (a view when it is contiguous on the CPU)."""
    return t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy()


def base_fingerprint(model):
    """SHA-256 over the model's state_dict in name order: for each entry "tensor NAME DTYPE SHAPE\\n" + its
    bytes, or "alias NAME OTHER\\n" when it shares memory with an earlier entry (tied weights). So a tied
    and an untied model differ, as do models that differ in any name, shape, dtype or bit."""
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


# ----------------------------------------------------------------------------- plaintext payloads
def n_values(kind, shape, rows):
    numel = math.prod(shape)
    return rows * (numel // shape[0] if shape and shape[0] else 0) if kind == "rows" else numel


def payload_layout(kind, dtype, stored_dtype, shape, rows, exceptions):
    """Byte sizes of a tensor's plaintext segments, in order: row indices (int64), values (stored_dtype),
    and, when exceptions > 0, the exception bitmap (one bit per value, least significant bit first)."""
    n = n_values(kind, shape, rows)
    return 8 * rows, n * DTYPES[stored_dtype].itemsize, (-(-n // 8) if exceptions else 0)


def pack_bits(mask):
    """Bool tensor -> uint8, bit k of byte j = element 8j + k."""
    m = mask.reshape(-1).to(torch.uint8)
    m = torch.cat([m, m.new_zeros(-m.numel() % 8)]).view(-1, 8)
    return (m << torch.arange(8, dtype=torch.uint8)).sum(1, dtype=torch.uint8)


def unpack_bits(packed, n):
    return ((packed.unsqueeze(1) >> torch.arange(8, dtype=torch.uint8, device=packed.device)) & 1).view(-1)[:n].bool()


def set_bits(packed):
    """Indices of the set bits of a packed bitmap (cheap when few bytes are nonzero)."""
    nz = packed.nonzero().squeeze(1)
    hit = (packed[nz].unsqueeze(1) >> torch.arange(8, dtype=torch.uint8, device=packed.device)) & 1
    return (nz.unsqueeze(1) * 8 + torch.arange(8, device=packed.device))[hit.bool()]


@dataclass
class PlainTensor:
    """One tensor's plaintext payload, held in its own SecureBuffer."""
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


def _bits(t):
    return t.view(BITS[t.element_size()])


def _fill(name, kind, dtype, stored, shape, rows_idx, values, exc_mask=None, max_error=0.0):
    """Copy the segments into a fresh SecureBuffer, then zero `values` (it held fine-tuned data)."""
    n_rows = 0 if rows_idx is None else rows_idx.numel()
    n_exc = 0 if exc_mask is None else int(exc_mask.sum())
    sizes = payload_layout(kind, dtype, stored, shape, n_rows, n_exc)
    buf = SecureBuffer(sum(sizes))
    off = 0
    for seg, size, seg_dtype in zip((rows_idx, values, pack_bits(exc_mask) if n_exc else None), sizes,
                                    (torch.int64, DTYPES[stored], torch.uint8)):
        if size:
            buf.tensor(seg_dtype, off, size // seg_dtype.itemsize).copy_(seg.reshape(-1))
        off += size
    values.zero_()
    return PlainTensor(name, kind, dtype, stored, tuple(shape), n_rows, n_exc, buf, max_error)


@torch.no_grad()
def delta_tensor(name, base, finetuned, rows=None, stored_dtype=None):
    """The payload of `finetuned - base` (same shape and dtype, CPU or not), or None when they are
    bit-identical. `rows`: candidate row indices (embeddings): rows whose delta is exactly zero are
    dropped, and when every row remains the tensor is stored dense. `stored_dtype` None = exact: the
    delta in the base dtype; where base + delta would not round back to the fine-tuned value (it
    crossed zero, or shrank a lot) the value slot holds the fine-tuned value itself and the exception
    bitmap flags it, so applying is bit-exact for at most 1 bit per value. 'bfloat16' / 'float16' halve
    the size; max_error then reports the largest |patched - fine-tuned|."""
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
        changed = (_bits(f_rows) != _bits(b_rows)).reshape(len(rows), -1).any(1)
        rows = rows[changed]
        if rows.numel() and rows.numel() < b.shape[0]:
            kind, rows_idx = "rows", rows
            if own_f:
                f.zero_()
            b, f, own_f = b_rows[changed], f_rows[changed], True
        f_rows.zero_()
        if rows.numel() == 0:
            return None
    elif torch.equal(_bits(f), _bits(b)):
        return None
    d = f - b
    exc_mask, max_error = None, 0.0
    if stored == dtype:
        roundtrip = b + d
        miss = _bits(roundtrip) != _bits(f)
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
    return _fill(name, kind, dtype, stored, finetuned.shape, rows_idx, d, exc_mask, max_error)


@torch.no_grad()
def whole_tensor(name, value, stored_dtype=None):
    """The payload of a tensor the base does not have (e.g. LoRA adapters): its values, stored whole."""
    v = value.detach().cpu()
    dtype = dtype_name(v.dtype)
    stored = dtype if stored_dtype in (None, "exact", dtype) else stored_dtype
    values = v.to(DTYPES[stored]) if stored != dtype else v.clone()
    max_error = float((values.to(v.dtype) - v).abs().max()) if stored != dtype and v.numel() else 0.0
    return _fill(name, "whole", dtype, stored, v.shape, None, values, None, max_error)


# ----------------------------------------------------------------------------- sealing
def _record_sizes(plain_bytes, chunk_bytes):
    """Plaintext length of each chunk (at least one chunk)."""
    n = max(1, -(-plain_bytes // chunk_bytes))
    return [min(chunk_bytes, plain_bytes - i * chunk_bytes) for i in range(n)]


def chunk_ad(header, header_sha256, entry, index):
    """The associated data of one chunk (PATCH_FORMAT.md, 'Associated data')."""
    lines = [LABEL, f"patch_id={header['patch_id']}", f"tenant={header['tenant']}",
             f"base={header['base_fingerprint']}", f"header_sha256={header_sha256}",
             f"tensor={entry['name']}", f"kind={entry['kind']}", f"dtype={entry['dtype']}",
             f"stored_dtype={entry['stored_dtype']}", f"shape={','.join(map(str, entry['shape']))}",
             f"rows={entry['rows']}", f"exceptions={entry['exceptions']}", f"plain_bytes={entry['plain_bytes']}",
             f"chunk={index}/{entry['chunks']}"]
    return ("\n".join(lines) + "\n").encode()


def check_tenant(tenant):
    if not isinstance(tenant, str) or not TENANT_RE.match(tenant):
        raise UserError(f"tenant id {tenant!r} must be 1-64 characters of A-Z a-z 0-9 . _ @ - (starting alphanumeric)")
    return tenant


def seal(tensors, key, *, tenant, base_fingerprint, structure=None, meta=None, chunk_bytes=DEFAULT_CHUNK_BYTES,
         scrypt_params=None):
    """Encrypt PlainTensors into a SealedPatch (the sealed file's bytes, in anonymous memory).
    structure: {"untie_weights": bool, "lora": None | {"rank", "alpha", "targets"}}, what applying must do
    to the base before the tensors fit. meta: non-secret JSON shown at apply time (authenticated)."""
    check_tenant(tenant)
    if not 0 < chunk_bytes <= MAX_CHUNK_BYTES:
        raise UserError(f"chunk size must be in 1..{MAX_CHUNK_BYTES} bytes")
    names = [t.name for t in tensors]
    if len(set(names)) != len(names) or not all(NAME_RE.match(n) for n in names):
        raise ValueError("tensor names must be unique and made of A-Z a-z 0-9 _ .")
    salt = secrets.token_bytes(SALT_BYTES)
    if isinstance(key, Passphrase):
        p = {**SCRYPT_DEFAULT, **(scrypt_params or {})}
        key_spec = {"source": "scrypt", "salt": secrets.token_hex(16), "n": p["n"], "r": p["r"], "p": p["p"]}
    else:
        key_spec = {"source": "raw"}
    master = _master_key(key, key_spec)
    header = {
        "format": "private-nanogpt sealed patch", "version": FORMAT_VERSION, "patch_id": secrets.token_hex(16),
        "tenant": tenant, "cipher": "AES-256-GCM", "kdf": "HKDF-SHA256", "salt": salt.hex(), "key": key_spec,
        "key_check": _subkey(master, salt, "key-check").hex(), "base_fingerprint": base_fingerprint,
        "structure": {"untie_weights": False, "lora": None, **(structure or {})},
        "chunk_bytes": chunk_bytes, "meta": meta or {}, "tensors": [],
    }
    offset = 0
    for t in tensors:
        sizes = _record_sizes(t.nbytes, chunk_bytes)
        header["tensors"].append({**t.descriptor(), "plain_bytes": t.nbytes, "chunks": len(sizes), "offset": offset})
        offset += t.nbytes + len(sizes) * (NONCE_BYTES + TAG_BYTES)
    header["blob_bytes"] = offset
    header_json = json.dumps(header, separators=(",", ":")).encode()
    signed = PREFIX.pack(MAGIC, FORMAT_VERSION, len(header_json)) + header_json
    header_sha = hashlib.sha256(signed).hexdigest()
    blob_start = len(signed) + MAC_BYTES
    image = SecureBuffer(blob_start + offset, lock=False)  # ciphertext: kept out of dumps, not locked
    out = image.view()
    out[:len(signed)] = signed
    out[len(signed):blob_start] = _header_mac(_subkey(master, salt, "header-mac"), signed)
    for t, entry in zip(tensors, header["tensors"]):
        cipher_key = tensor_key(master, salt, t.name)
        pos, src = blob_start + entry["offset"], 0
        plain = t.buffer.view(0, t.nbytes)
        for i, n in enumerate(_record_sizes(t.nbytes, chunk_bytes)):
            nonce = secrets.token_bytes(NONCE_BYTES)
            enc = Cipher(algorithms.AES(cipher_key), modes.GCM(nonce)).encryptor()
            enc.authenticate_additional_data(chunk_ad(header, header_sha, entry, i))
            out[pos:pos + NONCE_BYTES] = nonce
            enc.update_into(plain[src:src + n], out[pos + NONCE_BYTES:pos + NONCE_BYTES + n])
            enc.finalize()
            out[pos + NONCE_BYTES + n:pos + NONCE_BYTES + n + TAG_BYTES] = enc.tag
            pos, src = pos + NONCE_BYTES + n + TAG_BYTES, src + n
        del plain
    del out
    return SealedPatch(image)


# ----------------------------------------------------------------------------- reading
class SealedPatch:
    """A sealed patch file's bytes in anonymous memory, with its header parsed (not yet authenticated:
    that needs the key, in open_patch / apply_sealed_patch)."""

    def __init__(self, image):
        self.image = image
        self.header, self.signed_len = _parse_header(image.view())

    @classmethod
    def from_file(cls, path):
        path = os.fspath(path)
        if not os.path.isfile(path):
            raise PatchFormatError(f"patch file {path} does not exist")
        size = os.path.getsize(path)
        image = SecureBuffer(size, lock=False)
        with open(path, "rb") as f:
            got = f.readinto(image.view()) if size else 0
        if got != size:
            image.close()
            raise TruncatedError(f"patch file {path} changed while it was read")
        try:
            return cls(image)
        except PatchError as e:
            image.close()
            raise type(e)(f"{path}: {e}") from None

    @classmethod
    def from_bytes(cls, data):
        image = SecureBuffer(len(data), lock=False)
        image.view()[:] = data
        return cls(image)

    @classmethod
    def coerce(cls, patch):
        """(SealedPatch, owned): accept a SealedPatch, a path, or the file's bytes."""
        if isinstance(patch, SealedPatch):
            return patch, False
        if isinstance(patch, (bytes, bytearray, memoryview)):
            return cls.from_bytes(patch), True
        return cls.from_file(patch), True

    @property
    def nbytes(self):
        return self.image.nbytes

    @property
    def tenant(self):
        return self.header.get("tenant")  # unauthenticated until open_patch

    @property
    def blob_start(self):
        return self.signed_len + MAC_BYTES

    def blobs(self):
        """(tensor name, byte offset in the file, bytes) per tensor: its chunks' nonces, ciphertexts, tags."""
        return [(e["name"], self.blob_start + e["offset"], e["plain_bytes"] + e["chunks"] * (NONCE_BYTES + TAG_BYTES))
                for e in self.header["tensors"]]

    def tobytes(self):
        return bytes(self.image.view())

    def export(self, path):
        """Write the sealed file atomically (temp file beside it, fsync, rename): header + ciphertext only."""
        with atomic_path(path) as tmp, open(tmp, "wb") as f:
            f.write(self.image.view())
        return os.fspath(path)

    def close(self):
        self.image.close()


def _parse_header(data):
    """(header dict, length of prefix + header JSON). Format checks only: no key yet."""
    n = len(data)
    if n < PREFIX.size:
        if n and MAGIC.startswith(bytes(data[:min(n, len(MAGIC))])):
            raise TruncatedError(f"patch truncated: {n} bytes")
        raise PatchFormatError("not a sealed patch (file too short)")
    magic, version, header_len = PREFIX.unpack_from(data)
    if magic != MAGIC:
        raise PatchFormatError("not a sealed patch (bad magic)")
    if version != FORMAT_VERSION:
        raise PatchFormatError(f"unsupported sealed-patch version {version} (this reader knows {FORMAT_VERSION})")
    if header_len > MAX_HEADER_BYTES:
        raise TamperedError("header length field is corrupt")
    signed_len = PREFIX.size + header_len
    if n < signed_len + MAC_BYTES:
        raise TruncatedError(f"patch truncated inside its header ({n} bytes)")
    try:
        header = json.loads(bytes(data[PREFIX.size:signed_len]))
        key_spec = header["key"]
        assert isinstance(header, dict) and len(bytes.fromhex(header["salt"])) == SALT_BYTES
        assert len(bytes.fromhex(header["key_check"])) == KEY_BYTES
        if key_spec["source"] == "scrypt":
            assert len(bytes.fromhex(key_spec["salt"])) >= 16
            for k, hi in SCRYPT_MAX.items():
                assert isinstance(key_spec[k], int) and 1 <= key_spec[k] <= hi
        else:
            assert key_spec["source"] == "raw"
    except Exception:
        raise TamperedError("patch header is corrupt and cannot be authenticated") from None
    return header, signed_len


def _check_header(header):
    """Structural checks of an authenticated header (a failure means a broken writer, not an attacker)."""
    try:
        assert header["format"] == "private-nanogpt sealed patch" and header["version"] == FORMAT_VERSION
        assert header["cipher"] == "AES-256-GCM" and header["kdf"] == "HKDF-SHA256"
        assert TENANT_RE.match(header["tenant"]) and len(header["base_fingerprint"]) == 64
        assert 0 < header["chunk_bytes"] <= MAX_CHUNK_BYTES
        s = header["structure"]
        assert isinstance(s["untie_weights"], bool)
        if s["lora"] is not None:
            assert s["lora"]["rank"] > 0 and isinstance(s["lora"]["targets"], list)
        offset, names = 0, set()
        for e in header["tensors"]:
            assert NAME_RE.match(e["name"]) and e["name"] not in names and e["kind"] in KINDS
            names.add(e["name"])
            assert e["dtype"] in DTYPES and e["stored_dtype"] in DTYPES
            assert all(isinstance(d, int) and d >= 0 for d in e["shape"])
            assert e["rows"] >= 0 and e["exceptions"] >= 0 and (e["kind"] == "rows") == (e["rows"] > 0)
            assert e["kind"] != "rows" or (e["shape"] and e["rows"] <= e["shape"][0])
            assert e["plain_bytes"] == sum(payload_layout(e["kind"], e["dtype"], e["stored_dtype"], e["shape"],
                                                          e["rows"], e["exceptions"]))
            assert e["chunks"] == len(_record_sizes(e["plain_bytes"], header["chunk_bytes"]))
            assert e["offset"] == offset
            offset += e["plain_bytes"] + e["chunks"] * (NONCE_BYTES + TAG_BYTES)
        assert header["blob_bytes"] == offset
    except (AssertionError, KeyError, TypeError, ValueError):
        raise PatchFormatError("authenticated patch header is malformed (written by a broken or newer writer)") from None


@dataclass
class OpenPatch:
    """A patch whose key and header have been verified and whose payloads are decrypted into `plain`."""
    header: dict
    plain: SecureBuffer
    offsets: list  # byte offset of each tensor's payload in `plain`

    def segments(self, i):
        """(row indices int64, values, exception bitmap uint8) tensors viewing `plain`."""
        e = self.header["tensors"][i]
        sizes = payload_layout(e["kind"], e["dtype"], e["stored_dtype"], e["shape"], e["rows"], e["exceptions"])
        out, off = [], self.offsets[i]
        for size, dt in zip(sizes, (torch.int64, DTYPES[e["stored_dtype"]], torch.uint8)):
            out.append(self.plain.tensor(dt, off, size // dt.itemsize))
            off += size
        return out


def authenticate(sealed, key):
    """Derive the keys and verify the header. Returns the master key. WrongKeyError when the key-check
    value differs (wrong key or passphrase), TamperedError when the key is right but the header MAC fails."""
    h = sealed.header
    master = _master_key(key, h["key"])
    salt = bytes.fromhex(h["salt"])
    if not hmac.compare_digest(_subkey(master, salt, "key-check"), bytes.fromhex(h["key_check"])):
        raise WrongKeyError("wrong key: this patch was sealed with another key")
    signed = sealed.image.view(0, sealed.signed_len)
    mac = sealed.image.view(sealed.signed_len, MAC_BYTES)
    if not hmac.compare_digest(_header_mac(_subkey(master, salt, "header-mac"), signed), bytes(mac)):
        raise TamperedError("patch header was modified (its MAC does not verify)")
    _check_header(h)
    return master


def check_target(header, base_fp, tenant=None):
    if tenant is not None and header["tenant"] != tenant:
        raise WrongTenantError(f"patch belongs to tenant {header['tenant']!r}, not {tenant!r}")
    if base_fp is not None and header["base_fingerprint"] != base_fp:
        raise WrongBaseError(f"patch was made for another base model (fingerprint {header['base_fingerprint'][:12]}..., "
                             f"this model {base_fp[:12]}...)")


def _payload_offsets(header):
    """Where each tensor's payload goes in the plaintext buffer: 64-byte aligned for the tensor views."""
    offsets, pos = [], 0
    for e in header["tensors"]:
        offsets.append(pos)
        pos += -(-e["plain_bytes"] // 64) * 64
    return offsets, pos


def plaintext_bytes(header):
    """Size of the plaintext buffer open_patch needs for this header."""
    return _payload_offsets(header)[1]


def open_patch(sealed, key, tenant=None, base_fp=None, scratch=None):
    """Authenticate, check tenant and base, and decrypt every chunk into locked anonymous memory
    (`scratch` when it is a large enough SecureBuffer, else a new one). Any failure zeroes what was
    decrypted and raises; the caller touches its model only after this returns."""
    master = authenticate(sealed, key)
    h = sealed.header
    check_target(h, base_fp, tenant)
    expected = sealed.blob_start + h["blob_bytes"]
    if sealed.nbytes < expected:
        raise TruncatedError(f"patch truncated: {sealed.nbytes:,} of {expected:,} bytes")
    if sealed.nbytes > expected:
        raise TamperedError(f"patch has {sealed.nbytes - expected:,} unexpected trailing bytes")
    offsets, total = _payload_offsets(h)
    plain = scratch if scratch is not None and scratch.nbytes >= total else SecureBuffer(total)
    header_sha = hashlib.sha256(sealed.image.view(0, sealed.signed_len)).hexdigest()
    salt = bytes.fromhex(h["salt"])
    keys = [tensor_key(master, salt, e["name"]) for e in h["tensors"]]
    data, out = sealed.image.view(), plain.view()
    records = []  # (tensor index, chunk index, file position, plaintext length)
    for ti, e in enumerate(h["tensors"]):
        pos = sealed.blob_start + e["offset"]
        for ci, n in enumerate(_record_sizes(e["plain_bytes"], h["chunk_bytes"])):
            records.append((ti, ci, pos, n))
            pos += NONCE_BYTES + n + TAG_BYTES
    try:
        dst_of = {}
        for ti, ci, pos, n in records:
            dst = dst_of.get(ti, offsets[ti])
            dst_of[ti] = dst + n
            if not _decrypt_record(data, pos, n, keys[ti], chunk_ad(h, header_sha, h["tensors"][ti], ci), out[dst:dst + n]):
                raise _diagnose(h, header_sha, keys, records, data, (ti, ci, pos, n), out[dst:dst + n])
        result = OpenPatch(h, plain, offsets)
        _check_payloads(result)
        return result
    except BaseException:
        del data, out
        if plain is scratch:
            plain.zero()
        else:
            plain.close()
        raise


def _decrypt_record(data, pos, n, key, ad, dst):
    """Decrypt one chunk record into dst; False (dst zeroed) when the tag does not verify."""
    nonce = bytes(data[pos:pos + NONCE_BYTES])
    tag = bytes(data[pos + NONCE_BYTES + n:pos + NONCE_BYTES + n + TAG_BYTES])
    dec = Cipher(algorithms.AES(key), modes.GCM(nonce, tag)).decryptor()
    dec.authenticate_additional_data(ad)
    dec.update_into(data[pos + NONCE_BYTES:pos + NONCE_BYTES + n], dst)
    try:
        dec.finalize()
        return True
    except InvalidTag:
        dst[:] = bytes(n)
        return False


def _diagnose(h, header_sha, keys, records, data, failed, dst):
    """A chunk failed: if it authenticates as another (tensor, chunk) of this patch, blobs were swapped or
    reordered; otherwise its bytes were modified."""
    ti, ci, pos, n = failed
    name = h["tensors"][ti]["name"]
    for tj, cj, _, m in records:
        if m == n and (tj, cj) != (ti, ci):
            if _decrypt_record(data, pos, n, keys[tj], chunk_ad(h, header_sha, h["tensors"][tj], cj), dst):
                dst[:] = bytes(n)
                return SwappedBlobError(f"blob of tensor {name} chunk {ci} was replaced by the blob of "
                                        f"{h['tensors'][tj]['name']} chunk {cj} (swapped or reordered)")
    return TamperedError(f"tensor {name} chunk {ci} does not authenticate (nonce, ciphertext or tag modified)")


def _check_payloads(opened):
    """Row indices in range and increasing, bitmap popcount = exceptions (authentic, but an apply must
    never index out of bounds)."""
    for i, e in enumerate(opened.header["tensors"]):
        rows, values, bitmap = opened.segments(i)
        if e["kind"] == "rows" and rows.numel() and (rows[0] < 0 or rows[-1] >= e["shape"][0]
                                                     or (rows.numel() > 1 and not bool((rows[1:] > rows[:-1]).all()))):
            raise PatchFormatError(f"tensor {e['name']}: row indices out of range or not increasing")
        if e["exceptions"]:
            idx = set_bits(bitmap)
            if idx.numel() != e["exceptions"] or int(idx[-1]) >= values.numel():
                raise PatchFormatError(f"tensor {e['name']}: exception bitmap does not match its count")


# ----------------------------------------------------------------------------- applying
@dataclass
class AppliedPatch:
    """What apply_sealed_patch did to a model, so that revert() restores the base exactly."""
    model: object
    header: dict
    swapped: list  # (parameter, base tensor it held, patched tensor now in it)
    structure: dict  # {"untie": bool, "lora": [(parent module, attr, original Linear)], "requires_grad": {...}}
    apply_s: float = 0.0
    plain_status: dict = None
    active: bool = True

    @property
    def tenant(self):
        return self.header["tenant"]

    def revert(self, zero=True):
        """Put the base tensors (never written to) back, undo untie / LoRA, zero the patched tensors."""
        if not self.active:
            return
        with torch.no_grad():
            for param, base, patched in reversed(self.swapped):
                param.data = base
                if zero:
                    patched.zero_()
            _undo_structure(self.model, self.structure)
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


def _patched_tensor(param, e, segs, workspace):
    """The patched values of one parameter in a fresh (or reused workspace) tensor; base is read only."""
    rows, values, bitmap = segs
    base = param.data
    dev, dt = base.device, base.dtype
    if list(base.shape) != e["shape"] or dtype_name(dt) != e["dtype"]:
        raise WrongBaseError(f"tensor {e['name']}: model has {dtype_name(dt)}{list(base.shape)}, "
                             f"patch {e['dtype']}{e['shape']}")
    key = (e["name"], tuple(base.shape), dt, dev)
    out = workspace.get(key) if workspace is not None else None
    if out is None:
        out = torch.empty_like(base)
        if workspace is not None:
            workspace[key] = out
    vals = values.to(device=dev).to(dt)  # no copy when the dtype and device already match
    exc = set_bits(bitmap).to(dev) if e["exceptions"] else None  # indices of values that replace
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
    return out


def apply_sealed_patch(model, patch, key, tenant=None, *, base_fp=None, scratch=None, workspace=None,
                       before_swap=None):
    """Apply a sealed patch (a path, the file's bytes or a SealedPatch) to `model` in place, with the key
    from load_key(). Every chunk is authenticated and decrypted before the model is touched; any failure
    raises a PatchError subclass and leaves the model bit-exactly as it was. `tenant`: refuse a patch of
    any other tenant. `base_fp`: the model's base_fingerprint() when already known (else computed).
    Registries pass `scratch` (a SecureBuffer), `workspace` (reused patched tensors) and `before_swap`
    (called after verification, before the model changes). Returns an AppliedPatch: .revert()."""
    t0 = time.perf_counter()
    sealed, owned = SealedPatch.coerce(patch)
    try:
        if base_fp is None:
            base_fp = base_fingerprint(model)
        opened = open_patch(sealed, key, tenant=tenant, base_fp=base_fp, scratch=scratch)
    finally:
        if owned:
            sealed.close()
    plain_status = opened.plain.status()
    undo, swapped = None, []
    try:
        if before_swap is not None:
            before_swap()
        with torch.no_grad():
            undo = _prepare_structure(model, opened.header["structure"])
            params = dict(model.named_parameters())
            staged = []
            for i, e in enumerate(opened.header["tensors"]):
                if e["name"] not in params:
                    raise WrongBaseError(f"tensor {e['name']} is not a parameter of this model")
                staged.append((params[e["name"]], _patched_tensor(params[e["name"]], e, opened.segments(i), workspace)))
            for param, patched in staged:  # nothing above wrote to the model's tensors
                swapped.append((param, param.data, patched))
                param.data = patched
    except BaseException:
        with torch.no_grad():
            for param, base, patched in reversed(swapped):
                param.data = base
            if undo is not None:
                _undo_structure(model, undo)
        raise
    finally:
        if opened.plain is scratch:
            opened.plain.zero()
        else:
            opened.plain.close()
    return AppliedPatch(model, opened.header, swapped, undo, time.perf_counter() - t0, plain_status)
