"""utils/delta_tracker.py under DP: which tensors and embedding rows enter the patch must not depend on
which records were sampled (issue 11.6). Two DP runs on different people, with different sampled
batches, must select the same tensors and rows, and the selection must not show which tokens they had;
a non-private run, by contrast, selects exactly the rows its data touched (so the check can tell)."""
import copy

import pytest
import torch

from tests.conftest import make_record_dataset, tiny_model
from utils import finetune as ft_loop
from utils.delta_tracker import DeltaTracker

LOWER = [f"record {c * 5} of {c}{c}{c} abc" for c in "abcdefgh"]  # two groups of people whose texts use
UPPER = [f"RECORD {c * 5} OF {c}{c}{c} XYZ" for c in "MNOPQRST"]  # different letters (different wte rows)
FT = dict(save=False, batch_size=4, microbatch_size=4, eval_interval=0, log_interval=1000, max_steps=2,
          learning_rate=1e-3, noise_multiplier=1.0, target_epsilon=None, grad_sample_mode="hooks")


def selection(tmp_path, texts, dp, seed):
    data = make_record_dataset(tmp_path / f"{texts[0][:6]}{dp}{seed}", texts, texts[:2])
    base = tiny_model().eval()
    tracker = DeltaTracker(base, dp=dp)
    cfg = {**FT, "data_dir": data, "dp": dp, "seed": seed}
    if not dp:
        cfg = {k: v for k, v in cfg.items() if k not in ("noise_multiplier", "target_epsilon")}
    res = ft_loop.finetune(cfg, model=copy.deepcopy(base).train(), on_model_ready=tracker, log=lambda *a: None)
    plain, rep = tracker.build(res["model"])
    try:
        out = {t.name: (t.kind, t.rows, t.shape) for t in plain}
        rows = {}
        for t in plain:
            if t.kind == "rows":
                rows[t.name] = t.buffer.tensor(torch.int64, 0, t.rows).tolist()
        return out, rows, tracker
    finally:
        for t in plain:
            t.close()


@pytest.mark.parametrize("dp", [True, False])
def test_dp_selection_does_not_depend_on_the_sampled_records(tmp_path, dp):
    a, rows_a, tracker_a = selection(tmp_path, LOWER, dp, seed=1)
    b, rows_b, tracker_b = selection(tmp_path, UPPER, dp, seed=2)
    if not dp:  # the control: without DP the rows show the data, so the comparison below can fail
        assert a != b and rows_a["transformer.wte.weight"] != rows_b["transformer.wte.weight"]
        return
    assert a == b  # same tensors, kinds, row counts, shapes
    assert a["transformer.wte.weight"] == ("delta", 0, (257, 32))  # every row of the embedding, stored dense
    assert sorted(a) == sorted(tracker_a.trainable)  # every trainable tensor: data-independent structure
    for t in (tracker_a, tracker_b):  # nothing record-dependent was even recorded
        assert t.touched == set() and not any(bool(m.any()) for m in t.row_masks.values())
