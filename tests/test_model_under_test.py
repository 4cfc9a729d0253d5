"""utils/model_under_test.py: a patched model under test needs the expected tenant (an argument or
a key file bound to one); without one the patch is refused with the wrong-tenant exit code before it is
read, and a wrong key is still refused as a wrong key; batched scoring (one padded forward per batch, and
one shared prefix in a KV cache) equals one forward per sequence."""
import numpy as np
import pytest
import torch

from tests.conftest import tiny_model
from tests.sealed_fixtures import sealed_patch, tiny_pair
from utils import model_under_test as mut
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


def test_batched_scoring_equals_one_forward_per_sequence():
    m = tiny_model().eval()
    g = torch.Generator().manual_seed(1)
    prefix = torch.randint(0, 257, (12,), generator=g).tolist()
    conts = [torch.randint(0, 257, (n,), generator=g).tolist() for n in (1, 3, 8, 5, 8, 2, 7)]
    naive = []
    for c in conts:
        s = torch.tensor([prefix + c])
        logits, _ = m(s[:, :-1])
        lp = torch.log_softmax(logits, -1)[0, len(prefix) - 1:].gather(1, torch.tensor(c)[:, None])
        naive.append(lp.sum().item())
    cached = mut.continuation_logprobs(m, prefix, conts, batch_size=3)
    batched = [s.sum() for s in mut.sequence_logprobs(m, [prefix] * len(conts), conts, batch_size=4)]
    assert np.allclose(cached, naive, atol=1e-4) and np.allclose(batched, naive, atol=1e-4)
