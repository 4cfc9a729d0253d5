"""utils.run_privacy: the base's DP history split by data fingerprint, resume refusals, the canaries'
repetition counts and how the randomness is stated."""
import json

import pytest

from utils import privacy_ledger as ledger
from utils import run_privacy
from utils.cli import UserError
from utils.finetune import DEFAULTS


def test_lineage_splits_history_by_this_datas_fingerprint(records_dir):
    mine = ledger.dataset_fingerprint(records_dir)
    history = [ledger.segment(1.0, 0.1, 5, 1.0, "add_remove", mine),
               ledger.segment(2.0, 0.2, 3, 1.0, "add_remove", "hmac-sha256:other")]
    cfg = {**DEFAULTS, "data_dir": records_dir}
    got = run_privacy.lineage(cfg, {"privacy_history": history})
    assert got["prior"] == history[:1] and got["elsewhere"] == history[1:] and got["fingerprint"] == mine
    assert got["resume"] is None
    resume = {**cfg, "init_from": "resume"}
    done = {"privacy_history": history[:1], "run_state": {"total_planned_steps": 5, "steps_done": 5,
                                                          "noise_multiplier": 1.0}}
    with pytest.raises(UserError, match="already finished"):
        run_privacy.lineage(resume, done)
    half = {**done, "run_state": {**done["run_state"], "steps_done": 2}, "optimizer": {}}
    assert run_privacy.lineage(resume, half)["resume"] == (1.0, 3)
    with pytest.raises(UserError, match="other data"):
        run_privacy.lineage(resume, {**half, "privacy_history": history})


def test_planted_repetitions_and_the_randomness_statement(records_dir):
    assert run_privacy.planted_repetitions(records_dir) == []
    with open(f"{records_dir}/canaries.json", "w") as f:
        json.dump({"canaries": [{"repetitions": k} for k in (0, 1, 4, 2, 4)]}, f)
    assert run_privacy.planted_repetitions(records_dir) == [2, 4]
    assert "never stored" in run_privacy.randomness_note(DEFAULTS)
    assert "does NOT hold" in run_privacy.randomness_note({**DEFAULTS, "reproducible_noise_seed": 3})
