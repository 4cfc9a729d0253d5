"""make demo: the story check on leakage reports, and the whole demo end to end at a tiny scale."""
import json
import os
import stat

import pytest

import demo
from utils.cli import UserError

CFG = dict(demo.DEFAULTS, canary_reps=(1, 4, 16), dp_epsilon=8.0)


def canaries(exposure_by_reps):
    return [{"repetitions": r, "exposure": e} for r, es in exposure_by_reps.items() for e in es]


def report(nonprivate, dp, patched=None, wrong="refused (auth failure)"):
    models = [{"label": "base", "status": "ok", "canaries": canaries({0: [1.0], 1: [1.0], 4: [1.0], 16: [1.0]})},
              {"label": "fine-tuned (finetune)", "status": "ok", "canaries": canaries(nonprivate)},
              {"label": "fine-tuned (finetune_dp)", "status": "ok", "canaries": canaries(dp)},
              {"label": "patched + key", "status": "ok", "canaries": canaries(patched or nonprivate)},
              {"label": "patched + wrong key", "status": wrong}]
    return {"models": models}


MEMORIZED = {0: [1.4, 1.2], 1: [5.0], 4: [8.0], 16: [11.0, 10.0]}
PRIVATE = {0: [1.5], 1: [2.0], 4: [2.2], 16: [4.4]}


def test_story_holds_for_the_expected_outcome():
    lines, ok = demo.check_story(report(MEMORIZED, PRIVATE), CFG)
    assert ok, lines
    assert sum(line.startswith("PASS") for line in lines) == 4


@pytest.mark.parametrize("case, broken", [
    ("nothing memorized", dict(nonprivate={0: [1.0], 1: [1.0], 4: [1.0], 16: [2.0]})),
    ("DP leaks the 1x and 4x canaries", dict(dp={0: [1.0], 1: [9.0], 4: [9.0], 16: [11.0]})),
    ("the patch is not the fine-tuned model", dict(patched={0: [1.0], 1: [1.0], 4: [1.0], 16: [1.0]})),
    ("a wrong key gives numbers", dict(wrong="ok")),
])
def test_story_fails_when_any_part_breaks(case, broken):
    args = dict(nonprivate=MEMORIZED, dp=PRIVATE) | broken
    lines, ok = demo.check_story(report(**args), CFG)
    assert not ok, case
    assert sum(line.startswith("FAIL") for line in lines) == 1, lines


def test_demo_runs_every_step_end_to_end(tmp_path, capsys):
    """A tiny demo: every step's command runs; at this scale nothing is memorized, so the story check fails
    with exit code 1, after the patch is sealed and the wrong key refused."""
    out = tmp_path / "demo"
    argv = [f"--out_dir={out}", "--pretrain_iters=4", "--n_layer=1", "--n_embd=32", "--block_size=128",
            "--batch_size=4", "--n_people=12", "--epochs=1.0", "--dp_steps=2", "--dp_batch_size=8",
            "--ft_batch_size=4", "--n_candidates=50"]
    with pytest.raises(UserError, match="story did not hold") as err:
        demo.main(argv)
    assert err.value.exit_code == 1
    printed = capsys.readouterr().out
    assert "=== 10. leakage" in printed and "=== the story" in printed
    for name in ("key.hex", "wrong.hex"):
        assert stat.S_IMODE(os.stat(out / name).st_mode) == 0o600
    with open(out / "demo.patch", "rb") as f:
        sealed = f.read()
    with open(out / "key.hex") as f:
        key = f.read().strip()
    assert key.encode() not in sealed and bytes.fromhex(key) not in sealed
    with open(out / "leakage.json") as f:
        rows = {m["label"]: m for m in json.load(f)["models"]}
    assert rows["patched + wrong key"]["status"] == "refused (auth failure)"  # a wrong key, not a missing tenant
    assert rows["patched + key"]["status"] == "ok" and rows["base"]["status"] == "ok"
