"""
Key input for sealed patches (PATCH_FORMAT.md section 3): master keys, passphrases, tenant-bound key
files, and the HKDF subkeys derived from them.

- A key file is either exactly 32 raw bytes, or text: one line of 64 hex digits (either case), then
  optionally one line `tenant=<tenant id>` that binds the key to a tenant (keygen --tenant); lines end in
  LF or CRLF, spaces and tabs around a line are ignored, nothing else is allowed. Environment variables
  and stdin give the hex line only.
- A passphrase is the bytes of its file, or the UTF-8 bytes of its environment variable, with ONE
  trailing LF or CRLF removed and nothing else trimmed: both sources give the same key for one
  passphrase. It is stretched by scrypt with the parameters and salt stored in the header.
- Key and passphrase files should be readable by their owner only: group/other access is warned about
  (one check for both kinds of file).
"""
import os
import secrets
import stat
import sys

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives import hmac as crypto_hmac
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from cryptography.hazmat.primitives.kdf.scrypt import Scrypt

from utils.atomic import atomic_path
from utils.patch_errors import KeyInputError

KEY_BYTES = 32
LABEL = "private-nanogpt sealed-patch v1"
SCRYPT_DEFAULT = {"n": 1 << 15, "r": 8, "p": 1}  # ~32 MiB, ~0.1 s
SCRYPT_MAX = {"n": 1 << 20, "r": 32, "p": 16}  # a header must not be a memory bomb (n * r * 128 B <= 4 GiB)
SCRYPT_SALT_BYTES = 16
MAX_KEY_FILE_BYTES = 4096


def _warn(msg):
    print(f"warning: {msg}", file=sys.stderr)


class Passphrase:
    """A passphrase (bytes). Sealing stretches it with scrypt; the parameters and salt go in the header."""
    __slots__ = ("secret",)

    def __init__(self, secret):
        self.secret = secret.encode() if isinstance(secret, str) else bytes(secret)
        if not self.secret:
            raise KeyInputError("the passphrase is empty")

    @classmethod
    def from_line(cls, data):
        """PATCH_FORMAT.md: one trailing LF or CRLF is not part of the passphrase; nothing else is trimmed."""
        data = data.encode() if isinstance(data, str) else bytes(data)
        for end in (b"\r\n", b"\n"):
            if data.endswith(end):
                return cls(data[:-len(end)])
        return cls(data)

    def __repr__(self):
        return "Passphrase(<hidden>)"


def parse_hex_key(text, source):
    if isinstance(text, (bytes, bytearray)):
        try:
            text = bytes(text).decode("ascii")
        except UnicodeDecodeError:
            raise KeyInputError(f"{source} does not hold a key: expected 64 hex characters") from None
    text = text.strip(" \t\r\n")
    if len(text) == 2 * KEY_BYTES and all(c in "0123456789abcdefABCDEF" for c in text):
        return bytes.fromhex(text)
    raise KeyInputError(f"{source} does not hold a key: expected 32 bytes written as 64 hex characters")


def read_key_file(path, warn=None):
    """(32 key bytes, bound tenant or None) from a key file (format in the module docstring)."""
    data = read_private_file(path, "key file", warn)
    if len(data) == KEY_BYTES:
        return bytes(data), None
    lines = data.replace(b"\r\n", b"\n").split(b"\n")
    if lines and lines[-1] == b"":
        lines.pop()
    lines = [ln.strip(b" \t") for ln in lines]
    if not 1 <= len(lines) <= 2:
        raise KeyInputError(f"key file {path} does not hold a key: expected one hex line and an optional tenant= line")
    key = parse_hex_key(lines[0], f"key file {path}")
    tenant = None
    if len(lines) == 2:
        if not lines[1].startswith(b"tenant="):
            raise KeyInputError(f"key file {path}: its second line must be tenant=<tenant id>")
        from utils.patch_format import check_tenant
        tenant = check_tenant(lines[1][len(b"tenant="):].decode("ascii", "replace"))
    return key, tenant


def read_private_file(path, what, warn=None):
    """A key or passphrase file's bytes; refused when it is missing, not a file or too big; `warn` is
    told when group or others may read it."""
    path = os.fspath(path)
    try:
        st = os.stat(path)
    except OSError:
        raise KeyInputError(f"{what} {path} does not exist") from None
    if not stat.S_ISREG(st.st_mode):
        raise KeyInputError(f"{what} {path} is not a regular file")
    if st.st_mode & 0o077:
        (warn or _warn)(f"{what} {path} is accessible to other users (mode {st.st_mode & 0o777:o}): chmod 600 it")
    if st.st_size > MAX_KEY_FILE_BYTES:
        raise KeyInputError(f"{what} {path} is larger than {MAX_KEY_FILE_BYTES} bytes")
    with open(path, "rb") as f:
        return f.read(MAX_KEY_FILE_BYTES)


def load_key(key_file=None, env_var=None, passphrase=None, *, stdin=False, key_hex=None, passphrase_file=None,
             passphrase_env=None, warn=None):
    """The master key from exactly one source: key_file, env_var (the NAME of an environment variable
    holding hex), stdin (one hex line), key_hex (a command-line value: works, but `warn` is told it shows
    in the process list), or a passphrase (passphrase / passphrase_file / passphrase_env). Returns 32
    bytes, or a Passphrase that seal/open stretch with scrypt. A key file's tenant: key_file_tenant()."""
    warn = warn or _warn
    given = {k: v for k, v in dict(key_file=key_file, env_var=env_var, passphrase=passphrase, stdin=stdin,
                                   key_hex=key_hex, passphrase_file=passphrase_file,
                                   passphrase_env=passphrase_env).items() if v}
    if len(given) != 1:
        names = "--key_file, --key_env, --key_stdin, --passphrase_file, --passphrase_env (or --key)"
        raise KeyInputError(f"give exactly one key source: {names}" + (f"; got {', '.join(sorted(given))}" if given else ""))
    if key_file:
        return read_key_file(key_file, warn)[0]
    if env_var:
        if env_var not in os.environ:
            raise KeyInputError(f"environment variable {env_var} is not set")
        return parse_hex_key(os.environ[env_var], f"environment variable {env_var}")
    if stdin:
        return parse_hex_key(sys.stdin.readline(), "stdin")
    if key_hex:
        warn("a key given with --key is visible to every user in the process list (ps, /proc/PID/cmdline); "
             "use --key_file, --key_env or --key_stdin")
        return parse_hex_key(key_hex, "--key")
    if passphrase_file:
        return Passphrase.from_line(read_private_file(passphrase_file, "passphrase file", warn))
    if passphrase_env:
        if passphrase_env not in os.environ:
            raise KeyInputError(f"environment variable {passphrase_env} is not set")
        return Passphrase.from_line(os.environ[passphrase_env])
    return Passphrase(passphrase)


def key_file_tenant(path):
    """The tenant a key file is bound to, or None."""
    return read_key_file(path, warn=lambda msg: None)[1] if path else None


def expected_tenant(tenant=None, key_file=None):
    """The tenant a patch must belong to: `tenant`, or the tenant `key_file` is bound to; they must agree
    when both are given. Neither is WrongTenantError (exit 4, PATCH_FORMAT.md 8.9), raised before any patch
    is read: a patch is never accepted for whichever tenant it names."""
    from utils.patch_errors import WrongTenantError
    from utils.patch_format import check_tenant
    bound = key_file_tenant(key_file)
    if tenant and bound and tenant != bound:
        raise WrongTenantError(f"tenant {tenant} was asked for, but key file {key_file} is bound to tenant {bound}")
    if not (tenant or bound):
        raise WrongTenantError("no expected tenant: give --tenant NAME (or a key file bound to a tenant: keygen "
                               "--tenant NAME); a patch is never accepted for whichever tenant it names")
    return check_tenant(tenant or bound)


def generate_key_file(path, tenant=None):
    """Write a fresh random key (64 hex chars; `tenant=` line when bound) owner-only, atomically."""
    lines = [secrets.token_hex(KEY_BYTES)]
    if tenant is not None:
        from utils.patch_format import check_tenant
        lines.append(f"tenant={check_tenant(tenant)}")
    with atomic_path(path) as tmp:  # mkstemp creates the file with mode 0600
        with open(tmp, "w") as f:
            f.write("\n".join(lines) + "\n")
        os.chmod(tmp, 0o600)
    return path


def new_key_spec(key, scrypt_params=None):
    """The header's `key` object for this key: raw, or scrypt with fresh salt and checked parameters."""
    if not isinstance(key, Passphrase):
        return {"source": "raw"}
    p = {**SCRYPT_DEFAULT, **(scrypt_params or {})}
    if not all(isinstance(p[k], int) and 1 <= p[k] <= hi for k, hi in SCRYPT_MAX.items()) or p["n"] & (p["n"] - 1):
        raise KeyInputError(f"scrypt parameters must be n a power of 2 <= {SCRYPT_MAX['n']}, "
                            f"r <= {SCRYPT_MAX['r']}, p <= {SCRYPT_MAX['p']}")
    return {"source": "scrypt", "salt": secrets.token_hex(SCRYPT_SALT_BYTES), "n": p["n"], "r": p["r"], "p": p["p"]}


def master_key(key, key_spec):
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


def subkey(master, salt, purpose):
    """K(purpose) of PATCH_FORMAT.md section 3."""
    return HKDF(algorithm=hashes.SHA256(), length=KEY_BYTES, salt=salt,
                info=f"{LABEL} {purpose}".encode()).derive(master)


def tensor_key(master, salt, name):
    return subkey(master, salt, f"tensor {name}")


def header_mac(mac_key, signed):
    h = crypto_hmac.HMAC(mac_key, hashes.SHA256())
    h.update(signed)
    return h.finalize()
