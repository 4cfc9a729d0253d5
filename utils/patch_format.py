"""
The sealed-patch file format, version 1 (PATCH_FORMAT.md): layout, header, associated data, and reading a
file into memory with every size checked BEFORE anything is allocated.

    magic "NGPTPTCH" | u16 version | u32 header length | header JSON | HMAC-SHA256(header)
    then per tensor, per chunk: nonce (12) | AES-256-GCM ciphertext | tag (16)

Nothing here needs a key: patch_cipher authenticates what this module parsed.
"""
import json
import math
import os
import re
import struct
import sys

import torch

from utils.atomic import atomic_path
from utils.patch_errors import PatchFormatError, TamperedError, TruncatedError
from utils.patch_keys import KEY_BYTES, LABEL, SCRYPT_MAX, SCRYPT_SALT_BYTES
from utils.secure_memory import SecureBuffer

FORMAT_VERSION = 1
MAGIC = b"NGPTPTCH"
PREFIX = struct.Struct("<8sHI")  # magic, format version, header length
MAC_BYTES, NONCE_BYTES, TAG_BYTES, SALT_BYTES = 32, 12, 16, 32
RECORD_OVERHEAD = NONCE_BYTES + TAG_BYTES
DEFAULT_CHUNK_BYTES = 64 << 20
MAX_CHUNK_BYTES = 1 << 30  # one AES-GCM call must stay under 2^31 bytes
MAX_HEADER_BYTES = 16 << 20
DEFAULT_MAX_FILE_BYTES = 8 << 30  # readers' default limit (PATCH_FORMAT.md section 8); configurable
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16, "float64": torch.float64}
KINDS = ("delta", "rows", "whole")
TENANT_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._@-]{0,63}")  # always fullmatch: `$` would accept a final "\n"
NAME_RE = re.compile(r"[A-Za-z0-9_.]{1,256}")

if sys.byteorder != "little":  # payloads are little-endian and written straight from tensor memory
    raise ImportError("sealed patches need a little-endian machine")


def check_tenant(tenant):
    if not isinstance(tenant, str) or not TENANT_RE.fullmatch(tenant):
        raise PatchFormatError(f"tenant id {tenant!r} must be 1-64 characters of A-Z a-z 0-9 . _ @ - "
                               "(starting alphanumeric)")
    return tenant


def valid_name(name):
    return isinstance(name, str) and NAME_RE.fullmatch(name) is not None


def dtype_name(dtype):
    return str(dtype).replace("torch.", "")


# ----------------------------------------------------------------------------- payload layout
def n_values(kind, shape, rows):
    numel = math.prod(shape)
    return rows * (numel // shape[0] if shape and shape[0] else 0) if kind == "rows" else numel


def payload_layout(kind, dtype, stored_dtype, shape, rows, exceptions):
    """Byte sizes of a tensor's plaintext segments, in order: row indices (int64), values (stored_dtype),
    and, when exceptions > 0, the exception bitmap (one bit per value, least significant bit first)."""
    n = n_values(kind, shape, rows)
    return 8 * rows, n * DTYPES[stored_dtype].itemsize, (-(-n // 8) if exceptions else 0)


def record_sizes(plain_bytes, chunk_bytes):
    """Plaintext length of each chunk (at least one chunk)."""
    n = max(1, -(-plain_bytes // chunk_bytes))
    return [min(chunk_bytes, plain_bytes - i * chunk_bytes) for i in range(n)]


def chunk_ad(header, header_sha256, entry, index):
    """The associated data of one chunk (PATCH_FORMAT.md section 7)."""
    lines = [LABEL, f"patch_id={header['patch_id']}", f"tenant={header['tenant']}",
             f"base={header['base_fingerprint']}", f"header_sha256={header_sha256}",
             f"tensor={entry['name']}", f"kind={entry['kind']}", f"dtype={entry['dtype']}",
             f"stored_dtype={entry['stored_dtype']}", f"shape={','.join(map(str, entry['shape']))}",
             f"rows={entry['rows']}", f"exceptions={entry['exceptions']}", f"plain_bytes={entry['plain_bytes']}",
             f"chunk={index}/{entry['chunks']}"]
    return ("\n".join(lines) + "\n").encode()


def lay_out(entries, chunk_bytes):
    """Give each tensor entry its `chunks` and `offset`; return blob_bytes."""
    offset = 0
    for e in entries:
        e["chunks"] = len(record_sizes(e["plain_bytes"], chunk_bytes))
        e["offset"] = offset
        offset += e["plain_bytes"] + e["chunks"] * RECORD_OVERHEAD
    return offset


def encode_header(header):
    """The signed header S = prefix + header JSON."""
    header_json = json.dumps(header, separators=(",", ":")).encode()
    if len(header_json) > MAX_HEADER_BYTES:
        raise PatchFormatError(f"header of {len(header_json):,} bytes exceeds {MAX_HEADER_BYTES:,}")
    return PREFIX.pack(MAGIC, FORMAT_VERSION, len(header_json)) + header_json


# ----------------------------------------------------------------------------- parsing (no key yet)
def _no_duplicate_keys(pairs):
    obj = {}
    for k, v in pairs:
        if k in obj:
            raise ValueError(f"duplicate key {k!r}")
        obj[k] = v
    return obj


def read_prefix(data, file_bytes):
    """Header length H from the first 14 bytes, checked against the file size (PATCH_FORMAT.md 8.1)."""
    if file_bytes < PREFIX.size or len(data) < PREFIX.size:
        raise PatchFormatError(f"not a sealed patch (file of {file_bytes} bytes, shorter than {PREFIX.size})")
    magic, version, header_len = PREFIX.unpack_from(data)
    if magic != MAGIC:
        raise PatchFormatError("not a sealed patch (bad magic)")
    if version != FORMAT_VERSION:
        raise PatchFormatError(f"unsupported sealed-patch version {version} (this reader knows {FORMAT_VERSION})")
    if header_len > MAX_HEADER_BYTES:
        raise TamperedError(f"header length field is corrupt ({header_len:,} > {MAX_HEADER_BYTES:,} bytes)")
    if file_bytes < PREFIX.size + header_len + MAC_BYTES:
        raise TruncatedError(f"patch truncated inside its header ({file_bytes} bytes)")
    return header_len


def parse_header(data, file_bytes):
    """(header dict, signed length) from the start of a file of `file_bytes` bytes; the file size must be
    exactly what the header declares. Format checks only: nothing here is trusted before the MAC."""
    signed_len = PREFIX.size + read_prefix(data, file_bytes)
    try:
        header = json.loads(bytes(data[PREFIX.size:signed_len]).decode("utf-8"), object_pairs_hook=_no_duplicate_keys)
        assert isinstance(header, dict)
        assert len(bytes.fromhex(header["salt"])) == SALT_BYTES and len(bytes.fromhex(header["key_check"])) == KEY_BYTES
        key_spec = header["key"]
        if key_spec["source"] == "scrypt":
            assert len(bytes.fromhex(key_spec["salt"])) == SCRYPT_SALT_BYTES
            for k, hi in SCRYPT_MAX.items():
                assert type(key_spec[k]) is int and 1 <= key_spec[k] <= hi
            assert key_spec["n"] & (key_spec["n"] - 1) == 0 and key_spec["n"] > 1
        else:
            assert key_spec["source"] == "raw"
        blob_bytes = header["blob_bytes"]
        assert type(blob_bytes) is int and blob_bytes >= 0
    except Exception:
        raise TamperedError("patch header is corrupt and cannot be authenticated") from None
    expected = signed_len + MAC_BYTES + blob_bytes
    if file_bytes < expected:
        raise TruncatedError(f"patch truncated: {file_bytes:,} of {expected:,} bytes")
    if file_bytes > expected:
        raise TamperedError(f"patch has {file_bytes - expected:,} unexpected trailing bytes")
    return header, signed_len


def check_header(header):
    """Structural checks of an AUTHENTICATED header (PATCH_FORMAT.md 8.6): a failure means a broken or
    newer writer, exit 2."""
    try:
        assert header["format"] == "private-nanogpt sealed patch" and header["version"] == FORMAT_VERSION
        assert header["cipher"] == "AES-256-GCM" and header["kdf"] == "HKDF-SHA256"
        assert TENANT_RE.fullmatch(header["tenant"]) and re.fullmatch(r"[0-9a-f]{64}", header["base_fingerprint"])
        assert re.fullmatch(r"[0-9a-f]{32}", header["patch_id"])
        header.setdefault("generation", 0)  # written before generations existed: the oldest possible
        assert type(header["generation"]) is int and header["generation"] >= 0
        assert type(header["chunk_bytes"]) is int and 0 < header["chunk_bytes"] <= MAX_CHUNK_BYTES
        assert isinstance(header["meta"], dict)
        s = header["structure"]
        assert isinstance(s["untie_weights"], bool)
        if s["lora"] is not None:
            lora = s["lora"]
            assert type(lora["rank"]) is int and lora["rank"] > 0 and isinstance(lora["alpha"], (int, float))
            assert isinstance(lora["targets"], list) and set(lora["targets"]) <= {"attn", "mlp"}
        offset, names = 0, set()
        for e in header["tensors"]:
            assert valid_name(e["name"]) and e["name"] not in names and e["kind"] in KINDS
            names.add(e["name"])
            assert e["dtype"] in DTYPES and e["stored_dtype"] in DTYPES
            assert all(type(d) is int and d >= 0 for d in e["shape"])
            assert type(e["rows"]) is int and type(e["exceptions"]) is int and e["rows"] >= 0 and e["exceptions"] >= 0
            assert (e["kind"] == "rows") == (e["rows"] > 0)
            assert e["kind"] != "rows" or (e["shape"] and e["rows"] <= e["shape"][0])
            assert e["exceptions"] <= n_values(e["kind"], e["shape"], e["rows"])
            assert e["exceptions"] == 0 or e["stored_dtype"] == e["dtype"]  # only exact payloads carry a bitmap
            assert e["plain_bytes"] == sum(payload_layout(e["kind"], e["dtype"], e["stored_dtype"], e["shape"],
                                                          e["rows"], e["exceptions"]))
            assert e["chunks"] == len(record_sizes(e["plain_bytes"], header["chunk_bytes"]))
            assert e["offset"] == offset
            offset += e["plain_bytes"] + e["chunks"] * RECORD_OVERHEAD
        assert header["blob_bytes"] == offset
    except (AssertionError, KeyError, TypeError, ValueError, AttributeError):
        raise PatchFormatError("authenticated patch header is malformed (written by a broken or newer writer)") from None


# ----------------------------------------------------------------------------- a sealed file in memory
class SealedPatch:
    """A sealed patch file's bytes in anonymous memory, with its header parsed (not yet authenticated:
    that needs the key, in patch_cipher.open_patch)."""

    def __init__(self, image, header, signed_len):
        self.image, self.header, self.signed_len = image, header, signed_len
        self.consumed = False  # set by an in-place open (open_patch(consume=True)): the image is plaintext now

    def check_intact(self):
        """Refuse to read a consumed image as a sealed file: it would not decrypt, and exported it would
        put plaintext on disk."""
        if self.consumed:
            raise PatchFormatError("this sealed patch was consumed by an in-place open (its image now holds the "
                                   "plaintext): read the patch file again")

    @classmethod
    def from_file(cls, path, max_bytes=DEFAULT_MAX_FILE_BYTES):
        """Read a patch file. Its size is checked against `max_bytes`, its prefix and the header's
        blob_bytes before the buffer for the whole file is allocated."""
        path = os.fspath(path)
        try:
            with open(path, "rb") as f:
                size = os.fstat(f.fileno()).st_size
                if not os.path.isfile(path):
                    raise PatchFormatError(f"{path} is not a regular file")
                if size > max_bytes:
                    raise PatchFormatError(f"{path}: {size:,} bytes is over the patch size limit of {max_bytes:,}")
                head = f.read(PREFIX.size)
                head += f.read(max(0, read_prefix(head, size)) + MAC_BYTES)
                header, signed_len = parse_header(head, size)
                image = SecureBuffer(size, lock=False, wipe=False)  # ciphertext: not secret, not locked
                view = image.view()
                view[:len(head)] = head
                got = len(head) + (f.readinto(view[len(head):]) if size > len(head) else 0)
                del view
        except FileNotFoundError:
            raise PatchFormatError(f"patch file {path} does not exist") from None
        except IsADirectoryError:
            raise PatchFormatError(f"{path} is a directory, not a patch file") from None
        except (PatchFormatError, TamperedError, TruncatedError) as e:
            raise type(e)(f"{path}: {e}") from None
        if got != size:
            image.close()
            raise TruncatedError(f"patch file {path} changed while it was read")
        return cls(image, header, signed_len)

    @classmethod
    def from_bytes(cls, data):
        data = memoryview(data).cast("B")
        header, signed_len = parse_header(data[:PREFIX.size + MAX_HEADER_BYTES + MAC_BYTES], len(data))
        image = SecureBuffer(len(data), lock=False, wipe=False)
        image.view()[:] = data
        return cls(image, header, signed_len)

    @classmethod
    def coerce(cls, patch, max_bytes=DEFAULT_MAX_FILE_BYTES):
        """(SealedPatch, owned): accept a SealedPatch, a path, or the file's bytes."""
        if isinstance(patch, SealedPatch):
            return patch, False
        if isinstance(patch, (bytes, bytearray, memoryview)):
            return cls.from_bytes(patch), True
        return cls.from_file(patch, max_bytes), True

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
        return [(e["name"], self.blob_start + e["offset"], e["plain_bytes"] + e["chunks"] * RECORD_OVERHEAD)
                for e in self.header["tensors"]]

    def tobytes(self):
        self.check_intact()
        return bytes(self.image.view())

    def export(self, path):
        """Write the sealed file atomically (temp file beside it, fsync, rename): header + ciphertext only.
        Temp files a killed earlier export of the same path left behind are removed first (atomic_path)."""
        self.check_intact()
        check_export_path(path)
        with atomic_path(path) as tmp, open(tmp, "wb") as f:
            f.write(self.image.view())
        return os.fspath(path)

    def close(self):
        self.image.close()


def check_export_path(path):
    """Refuse, before any work, an export target that is a directory or cannot be written."""
    raw = os.fspath(path)
    path = os.path.abspath(raw)
    if os.path.isdir(path) or raw.endswith(os.sep):
        raise PatchFormatError(f"--export {path} is a directory: give a file path")
    folder = os.path.dirname(path)
    existing = folder
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        raise PatchFormatError(f"--export {path}: {existing} is not a directory")
    if not os.access(existing, os.W_OK | os.X_OK) or (os.path.exists(path) and not os.access(path, os.W_OK)):
        raise PatchFormatError(f"--export {path} is not writable")
    return path
