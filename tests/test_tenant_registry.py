"""utils/tenant_registry.py: replayed or rolled-back patches of a tenant are refused (exit 5) once a newer
generation was accepted, and a tenant must always be named."""
import os

import pytest

from tests.sealed_fixtures import finetuned_copy, sealed_patch, tiny_pair
from utils.patch_errors import RollbackError, WrongTenantError
from utils.tenant_registry import TenantRegistry


@pytest.fixture
def generations():
    base, ft = tiny_pair()
    key = os.urandom(32)
    old = sealed_patch(base, ft, key, generation=1).tobytes()
    new = sealed_patch(base, finetuned_copy(base, seed=1), key, generation=2).tobytes()
    return base, key, old, new


def test_an_older_generation_is_refused_after_a_newer_one(generations):
    base, key, old, new = generations
    reg = TenantRegistry(base)
    reg.add(old, "alice")
    reg.apply("alice", key)  # generation 1: nothing newer seen yet
    reg.add(new, "alice")
    applied = reg.apply("alice", key)
    assert applied.header["generation"] == 2 and reg.seen == {"alice": 2}
    with pytest.raises(RollbackError) as info:
        reg.add(old, "alice")  # the replay of the old patch
    assert info.value.exit_code == 5 and "older" in str(info.value)
    assert reg.active == "alice" and reg.applied.header["generation"] == 2  # still the new one
    reg.close()


def test_a_rollback_is_caught_at_apply_time_too(generations):
    """A registry that learns generation 2 (from its own store, `seen`) refuses generation 1 at apply,
    from the authenticated header, and leaves the model as it was."""
    base, key, old, new = generations
    before = {n: p.detach().clone() for n, p in base.named_parameters()}
    reg = TenantRegistry(base)
    reg.add(old, "alice")
    reg.seen["alice"] = 2
    with pytest.raises(RollbackError):
        reg.apply("alice", key)
    assert reg.active is None and all((p == before[n]).all() for n, p in base.named_parameters())
    reg.close()


def test_the_tenant_is_always_named(generations):
    base, key, old, _ = generations
    reg = TenantRegistry(base)
    with pytest.raises(TypeError):
        reg.add(old)  # no "whichever tenant the patch names"
    with pytest.raises(WrongTenantError):
        reg.add(old, "bob")
    for missing in (None, ""):  # no tenant at all: the wrong-tenant refusal, before the patch is read
        with pytest.raises(WrongTenantError, match="no expected tenant") as info:
            reg.add(old, missing)
        assert info.value.exit_code == 4
    reg.close()
