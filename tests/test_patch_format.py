"""utils/patch_format.py: sizes checked before anything is allocated, exit codes of damaged prefixes,
duplicate JSON keys, tenant/name validation by fullmatch, export targets checked up front, and temp files
of a killed export swept by the next one."""
import json
import os
import resource
import struct

import pytest

from tests.sealed_fixtures import sealed_patch, tiny_pair
from utils import patch_format as pf
from utils.patch_errors import PatchFormatError, TamperedError, TruncatedError


@pytest.fixture(scope="module")
def raw():
    base, ft = tiny_pair()
    return sealed_patch(base, ft, os.urandom(32)).tobytes()


def test_a_huge_sparse_file_is_refused_before_it_is_read(raw, tmp_path):
    """A valid header then 512 MiB of holes: refused from the declared blob size, with no 512 MiB buffer."""
    path = tmp_path / "sparse.patch"
    with open(path, "wb") as f:
        f.write(raw)
        f.truncate(512 << 20)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    with pytest.raises(TamperedError, match="trailing bytes"):
        pf.SealedPatch.from_file(path)
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before < 64 << 10  # KiB: far below 512 MiB


def test_the_size_limit_is_checked_first(raw, tmp_path):
    path = tmp_path / "p.patch"
    path.write_bytes(raw)
    with pytest.raises(PatchFormatError, match="size limit"):
        pf.SealedPatch.from_file(path, max_bytes=len(raw) - 1)
    assert pf.SealedPatch.from_file(path, max_bytes=len(raw)).nbytes == len(raw)


def test_short_and_damaged_prefixes(raw, tmp_path):
    cases = {"empty": (b"", PatchFormatError), "10 bytes of a patch": (raw[:10], PatchFormatError),
             "13 bytes": (raw[:13], PatchFormatError), "header cut": (raw[:40], TruncatedError),
             "header length huge": (raw[:10] + struct.pack("<I", pf.MAX_HEADER_BYTES + 1) + raw[14:], TamperedError)}
    for label, (data, error) in cases.items():
        path = tmp_path / "p"
        path.write_bytes(data)
        with pytest.raises(error) as info:
            pf.SealedPatch.from_file(path)
        assert type(info.value) is error, label
        assert info.value.exit_code == {PatchFormatError: 2, TruncatedError: 3, TamperedError: 3}[error], label


def test_duplicate_json_keys_are_refused(raw):
    n = struct.unpack_from("<I", raw, 10)[0]
    text = raw[14:14 + n]
    dup = text[:-1] + b',"tenant":"mallory"}'  # a second "tenant": json.loads alone keeps the last one
    assert json.loads(dup)["tenant"] == "mallory"
    forged = raw[:10] + struct.pack("<I", len(dup)) + dup + raw[14 + n:]
    with pytest.raises(TamperedError, match="corrupt"):
        pf.SealedPatch.from_bytes(forged)


def test_tenant_and_name_patterns_match_whole_strings():
    for bad in ("alice\n", "\nalice", "al ice", "", "-alice", "a" * 65):
        with pytest.raises(PatchFormatError):
            pf.check_tenant(bad)
    assert pf.check_tenant("alice@corp.example") == "alice@corp.example"
    assert pf.valid_name("lm_head.weight") and not pf.valid_name("lm_head.weight\n")


def test_export_targets_are_checked_before_any_work(tmp_path):
    (tmp_path / "ro").mkdir()
    os.chmod(tmp_path / "ro", 0o500)
    (tmp_path / "file").write_text("x")
    try:
        for target, words in [(tmp_path, "is a directory"), (str(tmp_path / "new") + os.sep, "is a directory"),
                              (tmp_path / "file" / "p.patch", "is not a directory")]:
            with pytest.raises(PatchFormatError, match=words):
                pf.check_export_path(target)
        if os.geteuid() != 0:  # root writes anywhere
            with pytest.raises(PatchFormatError, match="not writable"):
                pf.check_export_path(tmp_path / "ro" / "p.patch")
        assert pf.check_export_path(tmp_path / "sub" / "p.patch")  # folders are created on export
    finally:
        os.chmod(tmp_path / "ro", 0o700)


def test_a_killed_exports_temp_files_are_swept_by_the_next_export(raw, tmp_path):
    target = tmp_path / "acme.patch"
    stale = [tmp_path / ".acme.patch.k1l2x9.tmp", tmp_path / ".acme.patch.zz0001.tmp"]
    for f in stale:  # what utils.atomic leaves when SIGKILL hits between mkstemp and the rename
        f.write_bytes(b"partial ciphertext")
    other = tmp_path / ".other.patch.aaaa.tmp"
    other.write_bytes(b"another target's")
    pf.SealedPatch.from_bytes(raw).export(target)
    assert sorted(os.listdir(tmp_path)) == [".other.patch.aaaa.tmp", "acme.patch"]
    assert target.read_bytes() == raw
