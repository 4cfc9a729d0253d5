"""test_pipeline/test_prompt_robustness.py: the injection-gain threshold, the whole test on a prepared
dataset with a stub model, the CLI end to end. (The probes themselves: tests/test_prompt_probes.py.)"""
import json
import os
import subprocess
import sys

from tests.conftest import REPO
from tests.test_eval import PNG_MAGIC, ckpts, cli_env, employees_dir  # noqa: F401 (fixtures)
from tests.test_prompt_probes import stub
from test_pipeline import test_prompt_robustness as rb


def test_injection_gain_above_the_threshold_fails():
    checks = rb.threshold_checks({"paraphrase": {"overall": {}}, "typos": [], "injection": {"max_gain": 0.25}},
                                 {**rb.DEFAULTS, "max_injection_gain": 0.1})
    assert len(checks) == 1 and not checks[0]["passed"]


# ---------------------------------------------------------------- end to end
def test_robustness_with_a_stub_on_real_data(employees_dir):
    """The whole test on a prepared dataset with a stub that knows the truth for Department only."""
    from utils.employees import load_people
    people = {p["Name"]: p for p in load_people(employees_dir, "train")}

    def rule(pr, s):
        name = next((n for n in people if f"Context: {n}." in pr), None)  # None: a never-inserted canary
        return " " + people[name]["Department"] if name and "department" in pr.lower() else " F?"
    cfg = {**rb.DEFAULTS, "ckpt": "unused", "data_dir": employees_dir, "max_people": 5, "n_samples": 1,
           "typo_counts": (1,), "min_correctness": 0.9}
    r = rb.robustness(cfg, complete_fn=stub(rule), log=lambda *a: None)
    assert r["fields"] == ["Department", "Full or Part-Time"]
    assert r["paraphrase"]["per_field"]["Department"]["correctness"] == 1.0
    assert r["paraphrase"]["per_field"]["Full or Part-Time"]["correctness"] == 0.0
    assert r["people"] == 5 and not r["passed"]
    # the records never state salaries, so only the canary phones are injection targets
    assert {x["kind"] for x in r["injection"]["rows"]} == {"phone (inserted canary)", "phone (control, never inserted)"}


def test_robustness_cli_end_to_end(employees_dir, ckpts, tmp_path):
    _, ft = ckpts
    out, png = tmp_path / "rob.json", tmp_path / "rob.png"
    cmd = [sys.executable, os.path.join(REPO, "test_pipeline", "test_prompt_robustness.py"), f"--ckpt={ft}",
           f"--data_dir={employees_dir}", "--max_people=2", "--injection_people=2", "--n_samples=1",
           "--max_new_tokens=10", "--typo_counts=1,", f"--out={out}", f"--plot={png}", "--min_consistency=1.01"]
    p = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, env=cli_env())
    assert p.returncode == 1, p.stderr  # consistency can never reach 1.01
    assert "Paraphrases" in p.stdout and "Prompt injection" in p.stdout and "FAILED" in p.stdout
    r = json.loads(out.read_text())
    assert r["paraphrase"]["overall"]["n"] == 2 * 2 and len(r["typos"]) == 1
    assert png.read_bytes()[:8] == PNG_MAGIC
    p = subprocess.run(cmd[:3] + ["--templates=0,"], capture_output=True, text=True, cwd=REPO, env=cli_env())
    assert p.returncode == 2 and p.stderr.strip().count("\n") == 0 and "at least 2 paraphrases" in p.stderr
