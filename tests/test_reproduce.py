"""reproduce.py end to end on a tiny matrix: two methods (non-private and DP), a few steps, a tiny model."""
import json
import math
import os

import pytest

import reproduce
from utils.cli import UserError

TINY = dict(n_people=40, val_frac=0.3, canary_reps=(1, 8), canaries_per_rep=1, n_control_canaries=1,
            pydocs_max_tokens=30000, n_layer=2, n_head=2, n_embd=32, block_size=128, pretrain_iters=10,
            pretrain_batch_size=4, steps=3, batch_size=8, microbatch_size=8, dp_batch_size=8, audit_m=20, audit_k=4, audit_white_m=200,
            n_candidates=200, check_candidates=100, extraction_people=4, mia_records=8, eval_people=4,
            base_eval_tokens=2000, latency_prompts=2, latency_tokens=4, robustness_people=3, robustness_tenant=3,
            min_consistency=0.0, min_correctness=0.0, max_base_exposure=8.0)


def argv(tmp_path, **over):
    cfg = {**TINY, "out_dir": str(tmp_path / "run"), "results_dir": str(tmp_path / "results"),
           "methods": ("full", "dp8"), "checks": ("leakage", "robustness"), **over}
    return [f"--{k}={','.join(map(str, v)) if isinstance(v, tuple) else v}" for k, v in cfg.items()]


def finite_number(x):
    return isinstance(x, (int, float)) and math.isfinite(x)


def test_tiny_matrix_end_to_end_and_resume(tmp_path, capsys):
    assert reproduce.main(argv(tmp_path)) == 0
    results_dir = tmp_path / "results"
    results = json.loads((results_dir / "results.json").read_text())
    rows = {r["method"]: r for r in results["methods"]}
    assert list(rows) == ["base", "full", "dp8"]
    for name in ("full", "dp8"):
        r = rows[name]
        patch = tmp_path / "run" / name / f"{name}.patch"
        assert r["patch_bytes"] == os.path.getsize(patch) > 0
        assert 0 < r["trainable_params"]
        for key in ("val_loss", "val_ppl", "base_corpus_ppl", "forgetting_ratio", "finetune_time_s", "apply_ms",
                    "exposure_top", "audit_lower_bound", "heldout_exact_match"):
            assert finite_number(r[key]), (name, key, r[key])
        assert math.isclose(math.exp(r["val_loss"]), r["val_ppl"], rel_tol=1e-6)
        assert set(r["memory_mb"]) == {"base_only", "1", "10", "100"}
        # holding 100 tenants' sealed patches costs at least 99 more copies of the patch
        assert (r["memory_mb"]["100"] - r["memory_mb"]["1"]) * 1e6 >= 0.9 * 99 * r["patch_bytes"]
        assert all(finite_number(v) and v > 0 for v in r["latency_ms_per_token"].values())
        assert all(0.0 <= auc <= 1.0 for auc in r["mia_auc"].values()) and "loss" in r["mia_auc"]
        assert r["wrong_key"] == "refused (auth failure)"  # a wrong key, not a missing tenant
    assert rows["full"]["claimed_epsilon"] is None
    assert 0 < rows["dp8"]["claimed_epsilon"] <= 8.0
    assert rows["dp8"]["audit_lower_bound"] <= rows["dp8"]["claimed_epsilon"]
    assert rows["dp8"]["white_box_lower_bound"] <= rows["dp8"]["claimed_epsilon"] and rows["dp8"]["white_box_max_certifiable"] > 5
    assert rows["full"]["white_box_lower_bound"] is None and rows["full"]["audit_max_certifiable"] > 0
    assert rows["base"]["patch_bytes"] == 0 and finite_number(rows["base"]["val_ppl"])
    assert set(results["checks"]) == {"leakage", "robustness"}
    assert all(c["passed"] for c in results["checks"].values()), results["checks"]
    assert "python test_pipeline/leakage_test.py" in results["checks"]["leakage"]["command"]
    md = (results_dir / "RESULTS.md").read_text()
    for name in ("full", "dp8", "leakage", "robustness"):
        assert f"| {name} |" in md
    for png in ("loss_curves.png", "size_vs_utility.png", "exposure_vs_epsilon.png"):
        assert (results_dir / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    key = tmp_path / "run" / "full" / "key.hex"
    assert os.stat(key).st_mode & 0o777 == 0o600

    # a second run finds every output and redoes nothing, but still reports every stage's time
    capsys.readouterr()
    assert reproduce.main(argv(tmp_path)) == 0
    out = capsys.readouterr().out
    assert out.count("outputs exist, skipped") == 2 + 2 + 3 + 1  # data, pretrain, 2 fine-tunes, 3 test sets, checks
    again = json.loads((results_dir / "results.json").read_text())
    assert [r["patch_bytes"] for r in again["methods"]] == [r["patch_bytes"] for r in results["methods"]]
    assert {t[0] for t in again["timings"]} >= {"pretrain", "finetune full", "tests dp8"}


def test_bad_method_and_stage_are_refused(tmp_path):
    with pytest.raises(UserError, match="unknown methods"):
        reproduce.main(argv(tmp_path, methods=("full", "lora3")))
    with pytest.raises(UserError, match="unknown stages"):
        reproduce.main(argv(tmp_path, stages=("data", "train")))
    assert not (tmp_path / "run").exists()
