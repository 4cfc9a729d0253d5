"""New-token canaries: only ids the dataset never uses, end-of-text last, the included ones appended to
the training split as records, scored by mean token log-prob."""
import numpy as np

from tests.conftest import tiny_model
from tests.test_leakage import build_employees
from utils import input_canaries as ic
from utils.data import load_meta, offsets, tokens


def test_new_token_canaries_use_only_ids_the_dataset_never_uses(tmp_path):
    data_dir = build_employees(tmp_path / "emp", n_train=6, n_val=3, canary_reps=())
    alphabet = ic.unused_tokens(data_dir)
    meta = load_meta(data_dir)
    used = set(np.unique(np.asarray(tokens(data_dir, "train", meta))).tolist())
    assert len(alphabet) > 100 and not used & set(alphabet.tolist()) and 256 not in alphabet
    recs, inc = ic.draw_new_token_canaries(alphabet, 50, 8, 256, np.random.default_rng(0))
    assert all(set(ids[:-1]) <= set(alphabet.tolist()) and ids[-1] == 256 and len(msk) == 9 for ids, msk in recs)
    ic.write_audit_dataset(data_dir, tmp_path / "audit", recs, inc)
    assert len(offsets(tmp_path / "audit", "train")) - 1 == 6 + int(inc.sum())
    assert load_meta(tmp_path / "audit")["audit"]["canaries_included"] == int(inc.sum())
    lp = ic.canary_logprob(tiny_model(), recs[:4], 2)
    assert lp.shape == (4,) and np.all(lp < 0)
