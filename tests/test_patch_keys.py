"""utils/patch_keys.py: key files (hex either case, raw, tenant-bound), passphrases from a file and from the
environment giving one key, the permission check on both kinds of file, and no key in any message."""
import os

import pytest

from utils import patch_keys as pk
from utils.patch_errors import KeyInputError

SPEC = {"source": "scrypt", "salt": "00" * 16, "n": 1 << 10, "r": 8, "p": 1}


def private(path, data):
    path.write_bytes(data)
    os.chmod(path, 0o600)
    return str(path)


def test_key_sources(tmp_path, monkeypatch, capsys):
    key = os.urandom(32)
    hex_file = private(tmp_path / "k.hex", key.hex().encode() + b"\n")
    upper = private(tmp_path / "k.HEX", b"  " + key.hex().upper().encode() + b" \r\n")
    raw_file = private(tmp_path / "k.bin", key)
    bad = private(tmp_path / "bad", b"00" * 31)
    assert pk.load_key(key_file=hex_file) == key == pk.load_key(key_file=upper) == pk.load_key(key_file=raw_file)
    monkeypatch.setenv("PATCH_KEY", key.hex())
    assert pk.load_key(env_var="PATCH_KEY") == key
    assert pk.load_key(key_hex=key.hex()) == key
    assert "process list" in capsys.readouterr().err
    with pytest.raises(KeyInputError) as info:
        pk.load_key(key_file=bad)
    assert "00" * 8 not in str(info.value)
    with pytest.raises(KeyInputError):
        pk.load_key(key_file=hex_file, env_var="PATCH_KEY")
    assert isinstance(pk.load_key(passphrase="pw"), pk.Passphrase) and "pw" not in repr(pk.load_key(passphrase="pw"))


def test_a_passphrase_gives_one_key_from_a_file_or_the_environment(tmp_path, monkeypatch):
    """PATCH_FORMAT.md 3: one trailing LF or CRLF is dropped from either source, nothing else."""
    def master(p):
        return pk.master_key(p, SPEC)
    f_lf = private(tmp_path / "lf", b"correct horse\n")
    f_crlf = private(tmp_path / "crlf", b"correct horse\r\n")
    f_two = private(tmp_path / "two", b"correct horse\n\n")
    monkeypatch.setenv("PW_LF", "correct horse\n")
    monkeypatch.setenv("PW", "correct horse")
    one = master(pk.load_key(passphrase_file=f_lf))
    assert one == master(pk.load_key(passphrase_file=f_crlf)) == master(pk.load_key(passphrase_env="PW_LF"))
    assert one == master(pk.load_key(passphrase_env="PW"))
    assert one != master(pk.load_key(passphrase_file=f_two))  # only ONE line end is not part of it
    assert master(pk.Passphrase("correct horse ")) != one  # spaces are part of a passphrase


def test_passphrase_files_get_the_key_files_permission_check(tmp_path):
    warned = []
    for name in ("key.hex", "pass.txt"):
        (tmp_path / name).write_bytes(os.urandom(32).hex().encode() + b"\n")
        os.chmod(tmp_path / name, 0o644)
    pk.load_key(key_file=str(tmp_path / "key.hex"), warn=warned.append)
    pk.load_key(passphrase_file=str(tmp_path / "pass.txt"), warn=warned.append)
    assert len(warned) == 2 and all("other users" in w and "chmod 600" in w for w in warned)
    assert "passphrase file" in warned[1]


def test_key_files_can_bind_a_tenant(tmp_path):
    bound = pk.generate_key_file(tmp_path / "acme.hex", tenant="acme")
    plain = pk.generate_key_file(tmp_path / "any.hex")
    assert oct(os.stat(bound).st_mode & 0o777) == "0o600"
    assert pk.key_file_tenant(bound) == "acme" and pk.key_file_tenant(plain) is None
    assert len(pk.load_key(key_file=bound)) == 32
    for text in (b"%s\ntenant=acme\n\n" % (b"ab" * 32), b"%s\nowner=acme\n" % (b"ab" * 32), b"%s\ntenant=ac me\n" % (b"ab" * 32)):
        with pytest.raises(Exception):  # extra lines, another field, an invalid tenant: all refused
            pk.read_key_file(private(tmp_path / "x", text))
    with pytest.raises(Exception):
        pk.generate_key_file(tmp_path / "nl.hex", tenant="acme\n")


def test_scrypt_parameters_are_bounded_when_sealing():
    for params in ({"n": 3}, {"n": 1 << 21}, {"r": 33}, {"p": 0}):
        with pytest.raises(KeyInputError):
            pk.new_key_spec(pk.Passphrase("pw"), params)
    spec = pk.new_key_spec(pk.Passphrase("pw"), {"n": 1 << 10})
    assert len(bytes.fromhex(spec["salt"])) == pk.SCRYPT_SALT_BYTES and spec["n"] == 1 << 10
