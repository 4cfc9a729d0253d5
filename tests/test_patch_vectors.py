"""The test vectors in tests/vectors/ (PATCH_FORMAT.md section 10): the library authenticates small.patch
with key.hex, reproduces every payload in expected.json, the base fingerprint of the base state_dict
given there, and every patched tensor, bit for bit. decrypt_unit_test.py's independent reader checks
the same files."""
import json
import os

import pytest
import torch

from tests.conftest import REPO
from utils.patch_apply import apply_sealed_patch, base_fingerprint, tensor_bytes
from utils.patch_cipher import open_patch
from utils.patch_errors import PatchError, WrongTenantError
from utils.patch_format import SealedPatch
from utils.patch_keys import read_key_file

VECTORS = os.path.join(REPO, "tests", "vectors")
DTYPES = {"float32": torch.float32}


@pytest.fixture(scope="module")
def vectors():
    with open(os.path.join(VECTORS, "expected.json")) as f:
        expected = json.load(f)
    key, tenant = read_key_file(os.path.join(VECTORS, "key.hex"), warn=lambda m: None)  # git keeps no modes
    return expected, key, tenant


def base_model(expected):
    import importlib.util
    spec = importlib.util.spec_from_file_location("make_vectors", os.path.join(VECTORS, "make_vectors.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    model = mod.base_model()
    given = {e["name"]: e for e in expected["base_state_dict"]}
    for name, t in model.state_dict().items():  # the JSON is the reference, not our seeded constructor
        e = given[name]
        if "alias_of" not in e:
            assert tensor_bytes(t).tobytes().hex() == e["hex"], name
    return model


def test_the_library_passes_the_vectors(vectors):
    expected, key, tenant = vectors
    assert tenant == expected["tenant"]
    base = base_model(expected)
    assert base_fingerprint(base) == expected["base_fingerprint"]
    sealed = SealedPatch.from_file(os.path.join(VECTORS, "small.patch"))
    opened = open_patch(sealed, key, tenant, expected["base_fingerprint"])
    assert opened.header["generation"] == expected["generation"]
    for i, e in enumerate(opened.header["tensors"]):
        want = expected["tensors"][e["name"]]
        assert bytes(opened.plain.view(opened.offsets[i], e["plain_bytes"])).hex() == want["payload_hex"]
        rows, values, _ = opened.segments(i)
        assert rows.tolist() == want["rows"] and values.float().tolist() == want["values"]
    opened.plain.close()
    applied = apply_sealed_patch(base, sealed, key, tenant)
    params = dict(base.named_parameters())
    for name, want in expected["tensors"].items():
        assert tensor_bytes(params[name]).tobytes().hex() == want["patched_hex"], name
    applied.revert()
    with pytest.raises(WrongTenantError):
        apply_sealed_patch(base, sealed, key, "someone-else")


def test_every_byte_of_the_vector_file_is_checked(vectors):
    """A reader that passes the vectors must also refuse each of their bytes flipped (exit 2 or 3)."""
    expected, key, tenant = vectors
    raw = open(os.path.join(VECTORS, "small.patch"), "rb").read()
    for pos in range(8, len(raw)):  # past the magic, every byte
        b = bytearray(raw)
        b[pos] ^= 0x40
        with pytest.raises(PatchError) as info:
            open_patch(SealedPatch.from_bytes(bytes(b)), key, tenant).plain.close()
        assert info.value.exit_code in (2, 3), pos
