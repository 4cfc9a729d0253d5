"""utils/patch_cipher.py: the order of checks of PATCH_FORMAT.md section 8 (integrity before identity) and
the authenticated generation."""
import os

import pytest

from tests.sealed_fixtures import sealed_patch, tiny_pair
from utils.patch_apply import base_fingerprint
from utils.patch_cipher import open_patch
from utils.patch_errors import TamperedError, WrongBaseError, WrongTenantError
from utils.patch_format import SealedPatch


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
