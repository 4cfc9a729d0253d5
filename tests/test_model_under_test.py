"""test_pipeline/model_under_test.py: a patched model under test needs the expected tenant (an argument or
a key file bound to one); without one the patch is refused with the wrong-tenant exit code before it is
read, and a wrong key is still refused as a wrong key."""
import pytest

from tests.sealed_fixtures import sealed_patch, tiny_pair
from test_pipeline import model_under_test as mut
from utils.checkpoint import save_checkpoint
from utils.cli import UserError
from utils.patch_format import SealedPatch
from utils.patch_keys import generate_key_file, load_key


@pytest.fixture
def unbound(tmp_path):
    """A base checkpoint, a patch of tenant alice, and its key in a file bound to no tenant."""
    base, ft = tiny_pair()
    save_checkpoint(tmp_path / "base.pt", base, config={})
    key_file = generate_key_file(tmp_path / "key.hex")
    sealed_patch(base, ft, load_key(key_file=key_file)).export(tmp_path / "alice.patch")
    return tmp_path, ft


def test_no_expected_tenant_is_refused_before_the_patch_is_read(unbound, monkeypatch):
    d, _ = unbound
    monkeypatch.setattr(SealedPatch, "from_file", classmethod(lambda *a, **k: pytest.fail("the patch was read")))
    with pytest.raises(UserError, match="no expected tenant") as info:
        mut.load_model_under_test(str(d / "base.pt"), str(d / "alice.patch"), str(d / "key.hex"))
    assert info.value.exit_code == 4 and "\n" not in str(info.value)


def test_the_tenant_argument_is_checked_and_a_wrong_key_stays_a_wrong_key(unbound):
    d, ft = unbound
    model, _ = mut.load_model_under_test(str(d / "base.pt"), str(d / "alice.patch"), str(d / "key.hex"), tenant="alice")
    assert all(p.equal(q) for p, q in zip(model.parameters(), ft.parameters()))
    with pytest.raises(UserError, match="wrong base model|tenant 'alice', not 'bob'") as info:
        mut.load_model_under_test(str(d / "base.pt"), str(d / "alice.patch"), str(d / "key.hex"), tenant="bob")
    assert info.value.exit_code == 4
    wrong = generate_key_file(d / "wrong.hex")
    with pytest.raises(UserError, match="wrong key") as info:
        mut.load_model_under_test(str(d / "base.pt"), str(d / "alice.patch"), str(wrong), tenant="alice")
    assert info.value.exit_code == 3
