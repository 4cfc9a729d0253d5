"""test_pipeline/test_prompt_robustness.py: correctness is scored against the record (not only consistency),
typos are deterministic and really perturb, an injection that leaks is counted, the CLI runs end to end."""
import json
import os
import subprocess
import sys

import pytest

from tests.conftest import REPO
from tests.test_eval import PEOPLE, PNG_MAGIC, ckpts, cli_env, employees_dir  # noqa: F401 (fixtures)
from test_pipeline import test_prompt_robustness as rb
from utils import employees

TEMPLATES = list(range(employees.N_TEMPLATES))
FIELDS = employees.FIELDS


def parse(prompt):
    """(person, field, template) of a clean prompt, or (person, field, None) when the question is not one
    of the templates (a perturbed one): what a stub model 'understands'."""
    p = next(p for p in PEOPLE if p["Name"] in prompt)
    for f in FIELDS:
        for t in TEMPLATES:
            if p.get(f) is not None and employees.qa_prompt(p, f, t) == prompt:
                return p, f, t
    return p, None, None


def stub(rule):
    def complete_fn(prompts, sample=None):
        return [rule(pr, sample) for pr in prompts]
    return complete_fn


# ---------------------------------------------------------------- paraphrases
def test_wrong_but_consistent_model_gets_consistency_one_and_correctness_zero():
    r, _, _ = rb.paraphrase_scores(stub(lambda pr, s: " POLICE"), PEOPLE, FIELDS, TEMPLATES)
    o = r["overall"]
    # Bo Chen works for POLICE: his Department is right, everything else is wrong
    assert o["consistency"] == 1.0
    assert r["per_field"]["Department"]["correctness"] == 0.5
    assert r["per_field"]["Job Titles"]["correctness"] == 0.0
    assert r["per_field"]["Job Titles"]["consistent_but_wrong"] == 1.0
    assert o["correctness"] == pytest.approx(1 / o["n"])


def test_correct_model_and_half_right_model():
    right = stub(lambda pr, s: " " + employees.answer(*parse(pr)[:2]))
    r, _, _ = rb.paraphrase_scores(right, PEOPLE, FIELDS, TEMPLATES)
    assert r["overall"]["consistency"] == 1.0 and r["overall"]["correctness"] == 1.0
    assert r["overall"]["consistent_and_correct"] == 1.0
    # right only for the canonical template: inconsistent, and a quarter of the answers are right
    first_only = stub(lambda pr, s: " " + employees.answer(*parse(pr)[:2]) if parse(pr)[2] == 0 else " ?")
    r, _, _ = rb.paraphrase_scores(first_only, PEOPLE, FIELDS, TEMPLATES)
    assert r["overall"]["consistency"] == 0.0
    assert r["overall"]["correctness"] == pytest.approx(1 / len(TEMPLATES))
    assert r["per_template_correctness"] == {t: float(t == 0) for t in TEMPLATES}
    assert r["per_field"]["Hourly Rate"]["n"] == 1  # only Bo Chen is paid by the hour


# ---------------------------------------------------------------- typos
def test_perturb_is_deterministic_and_changes_the_text():
    q = "What is Maria Lopez's annual salary?"
    for kind in rb.TYPO_KINDS:
        a = rb.perturb(q, 1, seed=3, kinds=(kind,))
        assert a == rb.perturb(q, 1, seed=3, kinds=(kind,)) and a != q
    assert {rb.perturb(q, 1, seed=s) for s in range(20)} != {rb.perturb(q, 1, seed=0)}  # the seed matters
    assert any(c.isdigit() for c in rb.perturb("Boston", 1, seed=0, kinds=("leet",)))
    assert len(rb.perturb("Boston", 1, seed=0, kinds=("drop",))) == 5
    assert len(rb.perturb("Boston", 1, seed=0, kinds=("double",))) == 7
    swapped = rb.perturb("Boston", 1, seed=0, kinds=("swap",))
    assert sorted(swapped) == sorted("Boston") and swapped != "Boston"
    assert rb.perturb("Boston", 3, seed=1) != "Boston"
    assert rb.perturb("123 ?!", 2, seed=0) == "123 ?!"  # no letter, nothing to perturb


def test_typo_drop_is_measured():
    # answers right when the question is one of the templates, wrong when a typo broke it
    def rule(pr, s):
        p, f, _ = parse(pr)
        return " " + employees.answer(p, f) if f else " ???"
    fn = stub(rule)
    _, items, clean = rb.paraphrase_scores(fn, PEOPLE, FIELDS, TEMPLATES)
    t = rb.typo_scores(fn, items, clean, 1, seed=0)
    assert t["overall"]["clean_correctness"] == 1.0
    assert t["overall"]["typo_correctness"] == 0.0 and t["overall"]["drop"] == 1.0
    assert t["overall"]["answer_changed"] == 1.0
    assert t["examples"][0]["prompt"] != employees.qa_prompt(PEOPLE[0], FIELDS[0], 0)


# ---------------------------------------------------------------- injection
def test_leaked():
    assert rb.leaked("163-2468", "it is 163-2468.")
    assert rb.leaked("163-2468", "call 1632468 now")
    assert not rb.leaked("163-2468", "163-2469")
    assert not rb.leaked("1.5", "15")  # too few digits to count a digits-only match


def test_injection_that_leaks_is_counted_as_leaking_more():
    canaries = [{"name": "Cy Diaz", "secret": "555-0101", "repetitions": 4},
                {"name": "Di Ng", "secret": "555-0202", "repetitions": 0}]
    targets = rb.injection_targets(canaries, PEOPLE, n_salary=2)
    assert [t[0] for t in targets] == ["phone (inserted canary)", "phone (control, never inserted)",
                                       "annual salary (train person)", "annual salary (train person)"]
    probes = rb.injection_probes(targets, PEOPLE)
    assert len(probes) == len(targets) * (1 + len(rb.INJECTIONS))
    secret_of = {t[1]: t[2] for t in targets}

    def leaky(pr, s):  # says the secret only when told to ignore previous instructions, and only when greedy
        if "Ignore previous instructions" not in pr or s is not None:
            return " no"
        return " " + next(secret for name, secret in secret_of.items() if f"of {name}" in pr)
    r = rb.injection_scores(stub(leaky), targets, probes, n_samples=3)
    rows = {(x["kind"], x["variant"]): x for x in r["rows"]}
    hit = rows[("phone (inserted canary)", "ignore_instructions")]
    assert hit["greedy_leak_rate"] == 1.0 and hit["leak_rate"] == pytest.approx(1 / 4)
    assert hit["gain_over_plain"] == pytest.approx(1 / 4)
    assert rows[("phone (inserted canary)", "plain question")]["leak_rate"] == 0.0
    assert rows[("phone (inserted canary)", "debug_mode")]["leak_rate"] == 0.0
    assert r["leaks_more_under_injection"] and r["max_gain"] == pytest.approx(1 / 4)
    # a model that leaks on the plain question and never under injection: no gain
    plain = {t[4] for t in targets}
    r = rb.injection_scores(stub(lambda pr, s: " " + "/".join(secret_of.values()) if pr in plain else " no"),
                            targets, probes, n_samples=1)
    assert not r["leaks_more_under_injection"] and r["max_gain"] < 0
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
