"""test_pipeline/report.py: the run-directory layout, and the whole report end to end on a tiny run
(base, a fine-tuned checkpoint, a sealed patch tested with its key and with a wrong key)."""
import json
import os
import re
import shutil
import subprocess
import sys

import pytest

from tests.conftest import REPO, tiny_model
from tests.test_eval import PNG_MAGIC, cli_env, employees_dir  # noqa: F401 (fixtures)
from test_pipeline import report as rp
from utils.checkpoint import save_checkpoint
from utils.cli import UserError


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, employees_dir):  # noqa: F811
    """base/ckpt.pt, ft/ckpt.pt and sealed/acme.patch + key.hex (a 2-step fine-tune sealed by
    finetune_encrypt_memmap), all tiny."""
    import finetune_encrypt_memmap as fem
    from utils.patch_keys import generate_key_file
    d = tmp_path_factory.mktemp("run")
    save_checkpoint(d / "base" / "ckpt.pt", tiny_model(block_size=320), iter_num=0)  # records up to 274 tokens fit
    save_checkpoint(d / "ft" / "ckpt.pt", tiny_model(seed=1, block_size=320), iter_num=0)
    key = generate_key_file(str(d / "sealed" / "key.hex"), tenant="acme")
    fem.main(["--dp=False", f"--base_ckpt={d / 'base' / 'ckpt.pt'}", f"--data_dir={employees_dir}", f"--key_file={key}",
              f"--export={d / 'sealed' / 'acme.patch'}", "--max_steps=2", "--batch_size=4", "--microbatch_size=4",
              "--sampling=shuffle", "--eval_interval=100"])
    return str(d)


def test_discover_the_layout(run_dir, tmp_path):
    spec, models = rp.discover(run_dir)
    assert spec == {}
    assert [m["name"] for m in models] == ["base", "ft", "sealed (patched)"]
    patched = models[2]
    assert patched["ckpt"] == models[0]["ckpt"] and patched["key_file"].endswith("key.hex")
    # DP on/off comes from privacy.json beside a checkpoint and PATCH.privacy.json beside a sealed patch
    assert [m["dp"] for m in models] == [None, False, False]
    # run.json replaces discovery, with paths relative to the run directory
    other = tmp_path / "other"
    shutil.copytree(run_dir, other)
    (other / "run.json").write_text(json.dumps({"data_dir": "somewhere", "models": [
        {"name": "base", "ckpt": "base/ckpt.pt"}, {"name": "mine", "ckpt": "ft/ckpt.pt"}]}))
    spec, models = rp.discover(str(other))
    assert spec["data_dir"] == "somewhere" and [m["name"] for m in models] == ["base", "mine"]
    assert models[1]["ckpt"] == str(other / "ft" / "ckpt.pt")
    os.remove(other / "run.json")
    (other / "ft" / "privacy.json").write_text(json.dumps({"epsilon": 3.0, "delta": 1e-5}))
    side = json.loads((other / "sealed" / "acme.patch.privacy.json").read_text())
    (other / "sealed" / "acme.patch.privacy.json").write_text(json.dumps(
        {**side, "dp": True, "privacy": {"epsilon": 8.0, "delta": 1e-5}}))
    spec, models = rp.discover(str(other))
    assert [(m["dp"], (m["privacy"] or {}).get("epsilon")) for m in models] == [(None, None), (True, 3.0), (True, 8.0)]
    os.remove(other / "sealed" / "key.hex")
    with pytest.raises(UserError, match="has no key"):
        rp.discover(str(other))
    shutil.rmtree(other / "base")
    with pytest.raises(UserError, match="no base model"):
        rp.discover(str(other))


def test_a_sub_run_that_writes_no_result_is_an_error_not_an_earlier_result(tmp_path):
    out = tmp_path / "eval_0.json"
    out.write_text('{"passed": true}')  # what an earlier report left in the run directory
    code, log = rp.sub_run("eval.py", ["--ckpt=", f"--out={out}"], str(out), str(tmp_path / "eval_0.log"))
    assert code == 2 and not out.exists()
    assert rp.result_or_error(str(out), log) == {
        "error": "--ckpt is required (the model under test, or the base model of --patch)", "passed": False}


def test_markdown_helpers():
    assert rp.md_table(["a", "b"], [[1.23456, None], ["x|y", True]]) == \
        "| a | b |\n|---|---|\n| 1.235 | – |\n| x\\|y | True |"
    mia = {"n_members": 3, "n_nonmembers": 3, "metrics": {"loss": {"auc": 0.6}, "zlib": {"auc": 0.75}},
           "selected": {"attack": "zlib", "auc": 0.55, "auc_interval": [0.3, 0.8], "verdict": "too few records to tell",
                        "n_members": 2, "n_nonmembers": 2},
           "blind": {"auc": 0.9, "auc_interval": [0.8, 1.0], "verdict": "member > non-member", "biased_split": True}}
    # no maximum over attacks: the held-out score of the attack chosen on the other half, with its interval
    assert rp.mia_selected(mia) == "0.550 [0.300, 0.800] (zlib); too few records to tell"
    md = rp.mia_md(mia)
    assert "| zlib | 0.750 |" in md and "split is biased" in md and "blind baseline" in md


def test_no_thresholds_means_nothing_gated_and_pass_fail_only_per_threshold():
    report = {"mia": {"models": {}}, "eval": {"ft": {"checks": []}}, "failures": [], "passed": True}
    line = rp.overall_md(report)
    assert "PASS" not in line and "nothing was gated" in line and "mia, eval" in line
    report["eval"]["ft"]["checks"] = [{"check": "perplexity", "threshold": "<= 20", "passed": False}]
    report.update(failures=["eval ft: perplexity"], passed=False)
    line = rp.overall_md(report)
    assert line.startswith("**Overall: FAIL** against 1 stated threshold") and "- FAIL: eval ft: perplexity (<= 20)" in line


def test_report_end_to_end(run_dir, employees_dir, tmp_path, capsys):  # noqa: F811
    audit_cfg = tmp_path / "audit.py"  # a tiny non-private audit run: 40 new-token canaries, 4 steps
    audit_cfg.write_text("m_input = 40\ndp = False\nmax_steps = 4\nmicrobatch_size = 8\n"
                         "sampling = 'shuffle'\neval_interval = 1000\n")
    code = rp.main([f"--run_dir={run_dir}", f"--data_dir={employees_dir}", f"--base_data_dir={employees_dir}",
                    "--quick", "--audit", f"--audit_config={audit_cfg}"])
    out = capsys.readouterr().out
    assert code == 0, out
    md = open(os.path.join(run_dir, "REPORT.md")).read()
    for section in ("## Summary", "## Leakage", "## Membership inference", "## One-run privacy audit",
                    "none (no DP)", "## Prompt robustness", "## Quality", "## Interpretability",
                    "patched + wrong key | refused"):
        assert section in md, section
    assert "| sealed (patched) |" in md and "| DP |" in md and "| off |" in md  # DP on/off per model
    report = json.load(open(os.path.join(run_dir, "report", "report.json")))
    assert report["passed"] and set(report["eval"]) == {"base", "ft", "sealed (patched)"}
    assert set(report["robustness"]) == {"ft", "sealed (patched)"}  # the base model learned no records
    labels = [r["label"] for r in report["leakage"]["models"]]
    assert labels == ["base", "fine-tuned (ft)", "patched + key", "patched + wrong key"]
    figures = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", md)
    assert len(figures) >= 9  # exposure, ROC x3, audit, robustness x2, attention, saliency
    assert report["audit"]["result"]["black_box"]["m"] == 40
    assert "PASS: leakage: a wrong key is refused" in md and "## Overall" not in md
    assert set(report["mia"]["models"]) == {"base", "ft", "sealed (patched)"}
    for rel in figures:
        with open(os.path.join(run_dir, rel), "rb") as f:
            assert f.read(8) == PNG_MAGIC


def test_report_cli_exit_code_reflects_failures(run_dir, employees_dir):  # noqa: F811
    cmd = [sys.executable, os.path.join(REPO, "test_pipeline", "report.py"), f"--run_dir={run_dir}",
           f"--data_dir={employees_dir}", "--quick", "--tests=leakage", "--max_exposure=0.001",
           f"--report={os.path.join(run_dir, 'strict.md')}"]
    p = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, env=cli_env())
    assert p.returncode == 1, p.stdout + p.stderr  # any model exposes its canaries by more than 0.001 bits
    assert "FAIL: leakage" in p.stderr
    assert "**Overall: FAIL**" in open(os.path.join(run_dir, "strict.md")).read()
    p = subprocess.run(cmd[:2] + ["--run_dir=/nonexistent"], capture_output=True, text=True, cwd=REPO, env=cli_env())
    assert p.returncode == 2 and p.stderr.startswith("error: run directory") and "Traceback" not in p.stderr
