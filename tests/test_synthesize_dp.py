"""synthesize_dp.py: the plan before spending, structured records (template free, values private, every
kept record parses), fidelity to the private marginal against the public drafter, the CLI."""
import json
import math
import os
import random
import re
import subprocess
import sys

import pytest
import torch

import synthesize_dp as S
import utils.private_prediction as P
import utils.record_synthesis as RS
from tests.conftest import REPO, make_record_dataset, tiny_model
from utils import employees
from utils.checkpoint import save_checkpoint
from utils.cli import UserError
from utils.records import Schema

DEPARTMENTS = ["POLICE", "FIRE", "LAW", "HEALTH", "AVIATION", "OEMC"]
FIELDS = ["Department", "Full or Part-Time", "Annual Salary"]
SCHEMA = Schema("Name", FIELDS, {f: [f"What is {{name}}'s {f}?"] for f in FIELDS + ["Phone"]},
                categorical=FIELDS[:2], numeric=["Annual Salary"], decimals={"Annual Salary": 2}, canary_field="Phone")
DOMAINS = {"Department": DEPARTMENTS, "Full or Part-Time": ["F", "P"]}
DIGITS = {"Annual Salary": (4, 5)}


def people(n=60, seed=0):
    """Private people: 70% POLICE, 20% FIRE, 10% LAW (the public drafter knows nothing of it); names that
    the public name generator never draws; one canary person."""
    rng = random.Random(seed)
    out = [{"Name": f"Zed{i} Private", "Department": rng.choices(DEPARTMENTS[:3], [7, 2, 1])[0],
            "Full or Part-Time": rng.choice("FFFP"), "Annual Salary": float(rng.randint(30, 99) * 1000)}
           for i in range(n)]
    out[0]["Phone"] = "555-0199"
    return out


class CopyingLM(torch.nn.Module):
    """A stand-in for a model that continues the record in its prompt (what the drafter's warm-up teaches):
    at a value position it puts +8 on the next character of the same field's value in the row's own
    record, if the row has one and the value so far agrees; otherwise flat logits. blind=True ignores the
    record: every row then predicts what the public row predicts (private logits = public logits)."""

    def __init__(self, header, blind=False, vocab=257, block_size=256):
        super().__init__()
        self.lm_head = torch.nn.Linear(1, vocab)
        self.config = type("C", (), {"block_size": block_size, "vocab_size": vocab})()
        self.header, self.blind, self.vocab = header, blind, vocab

    def forward(self, idx, attention_mask=None, cache=None, last_only=True, **_):
        assert cache is None  # used with use_kv_cache=False: every call sees the whole row
        logits = torch.zeros(idx.size(0), 1, self.vocab)
        for i, row in enumerate(idx.tolist()):
            keep = attention_mask[i].tolist() if attention_mask is not None else [1] * len(row)
            text = bytes(t for t, k in zip(row, keep) if k and t < 256).decode()
            parts = text.split(self.header)
            own, current = (parts[-2] if len(parts) > 2 else ""), parts[-1]
            line = current.split("\n")[-1]
            if ": " not in line or self.blind:
                continue
            field, sofar = line.split(": ", 1)
            m = re.search(f"^{re.escape(field)}: (.*)$", own, re.M)
            if m and (m.group(1) + "\n").startswith(sofar):
                logits[i, 0, ord((m.group(1) + "\n")[len(sofar)])] += 8.0
        return logits, None


def template():
    from utils.tokenizer import ByteTokenizer
    return RS.RecordTemplate(SCHEMA, FIELDS, DOMAINS, DIGITS, ByteTokenizer(), header="Record:\n")


def run_records(model, crowd, r, max_records, public_only=False, seed=0, svt=False):
    tpl = template()
    prompts = [tpl.prompt_ids(p, 200) for p in crowd] + [tpl.public_ids()]
    decoder = P.BatchDecoder(model, prompts, tpl.max_new_tokens(), use_kv_cache=False)
    mech = P.Mechanism(s=len(crowd), c=3.0, tau=1.0, svt=svt, sigma=0.5, theta=0.5, tau_pub=1.0)
    return RS.synthesize_records(decoder, len(crowd), mech, tpl, r, torch.Generator().manual_seed(seed), max_records,
                                 public_only=public_only)


# ----------------------------------------------------------------------------- structured records
def test_value_grammar_masks_and_forced_tokens():
    tpl = template()
    assert [chr(t) for t in tpl.allowed("Department", "")] == sorted("PFLHAO")
    assert [chr(t) for t in tpl.allowed("Department", "POLIC")] == ["E"]  # forced: free
    assert [chr(t) for t in tpl.allowed("Department", "POLICE")] == ["\n"]
    assert [chr(t) for t in tpl.allowed("Annual Salary", "")] == list("123456789")  # no leading zero
    assert "." not in [chr(t) for t in tpl.allowed("Annual Salary", "123")]  # at least 4 digits
    assert [chr(t) for t in tpl.allowed("Annual Salary", "12345")] == ["."]  # at most 5
    assert [chr(t) for t in tpl.allowed("Annual Salary", "1234.56")] == ["\n"]
    rec = {"Department": "FIRE", "Full or Part-Time": "P", "Annual Salary": "1234.50"}
    assert tpl.parse(tpl.render(rec)) == rec
    for bad in ({**rec, "Department": "FIRES"}, {**rec, "Annual Salary": "0123.00"}, {**rec, "Annual Salary": "1234.5"}):
        assert tpl.parse(tpl.render(bad)) is None


def test_structured_records_parse_spend_only_on_values_and_count_discards():
    crowd = people(30)
    kept, discards, spent = run_records(CopyingLM("Record:\n"), crowd, r=60, max_records=20)
    tpl = template()
    assert kept and sum(c["private"] for _, c in kept) <= spent <= 60  # a discarded record's tokens count too
    for values, counts in kept:
        assert tpl.parse(tpl.render(values)) == values  # parses back into its fields
        assert values["Department"] in DEPARTMENTS and values["Full or Part-Time"] in "FP"
        assert counts["forced"] > 0  # e.g. the rest of POLICE after P O
        # labels are never paid for: private + public + forced tokens are the value tokens alone
        assert counts["private"] + counts["public"] + counts["forced"] == sum(len(v) + 1 for v in values.values())
    assert set(discards) <= {"budget ran out mid-record"} and sum(discards.values()) <= 1  # the last one, at most
    people_out, texts = RS.qa_records(tpl, [v for v, _ in kept], random.Random(0))
    private_names = {p["Name"] for p in crowd}
    for person, text in zip(people_out, texts):
        first, middle, second, last = person["Name"].split(" ")
        assert first in employees.FIRST_NAMES and last in employees.LAST_NAMES
        assert middle[:-1] in employees.MIDDLE_INITIALS and second[:-1] in employees.MIDDLE_INITIALS
        assert person["Name"] not in private_names and "555-0199" not in text and "Phone" not in text
        for f in FIELDS:
            assert f" {SCHEMA.answer(person, f)}\n" in text


def test_budget_running_out_mid_record_discards_it_never_writes_a_partial():
    kept, discards, spent = run_records(CopyingLM("Record:\n"), people(20), r=7, max_records=20)
    assert spent <= 7 and discards["budget ran out mid-record"] == 1
    assert all(template().parse(template().render(v)) == v for v, _ in kept)


def test_private_output_is_closer_to_the_private_marginal_than_the_public_drafter_and_the_test_can_fail():
    from utils.synthetic_utility import tv
    crowd = people(60)
    real = [p["Department"] for p in crowd]
    private, _, _ = run_records(CopyingLM("Record:\n"), crowd, r=400, max_records=40)
    drafter, _, _ = run_records(CopyingLM("Record:\n"), crowd, r=0, max_records=40, public_only=True)
    blind, _, _ = run_records(CopyingLM("Record:\n", blind=True), crowd, r=400, max_records=40)
    tv_private, tv_drafter = tv([v["Department"] for v, _ in private], real), tv([v["Department"] for v, _ in drafter], real)
    tv_blind = tv([v["Department"] for v, _ in blind], real)
    assert len(private) >= 30
    assert tv_private < 0.5 * tv_drafter, (tv_private, tv_drafter)
    # private logits replaced by public ones: the same run no longer beats the drafter
    assert not tv_blind < 0.5 * tv_drafter, (tv_blind, tv_drafter)


def test_the_released_joint_follows_the_private_joint_closer_than_record_by_record_votes_and_can_fail():
    """release_share > 0: the batch's (Department, Full or Part-Time) table released once (Gaussian, here
    sigma = 1 count) and every record drawn from it. Against the private people's joint it beats the
    record-by-record vote (whose p ~ exp(2c f / tau) over-draws the rare values) and the public drafter;
    with the private logits replaced by public ones (blind) the same release no longer beats the drafter."""
    from utils.secure_rng import RunSecret
    from utils.synthetic_utility import tv
    crowd = people(60)
    real = [(p["Department"], p["Full or Part-Time"]) for p in crowd]

    def draws(model, release):
        tpl = template()
        prompts = [tpl.prompt_ids(p, 200) for p in crowd] + [tpl.public_ids()]
        decoder = P.BatchDecoder(model, prompts, tpl.max_new_tokens(), use_kv_cache=False)
        joint = RS.release_joint(decoder, 60, tpl, 1.0, RunSecret.reproducible(0).stream("t")) if release else None
        mech = P.Mechanism(s=60, c=3.0, tau=1.0, svt=False, sigma=0.5, theta=0.5, tau_pub=1.0)
        kept, _, _ = RS.synthesize_records(decoder, 60, mech, tpl, 400, torch.Generator().manual_seed(1), 40,
                                           whole_values=True, joint=joint)
        assert len(kept) == 40 and all(c["released"] == (2 if release else 0) for _, c in kept)
        return tv([(v["Department"], v["Full or Part-Time"]) for v, _ in kept], real)

    released, voted = draws(CopyingLM("Record:\n"), True), draws(CopyingLM("Record:\n"), False)
    drafter, _, _ = run_records(CopyingLM("Record:\n"), crowd, r=0, max_records=40, public_only=True)
    tv_drafter = tv([(v["Department"], v["Full or Part-Time"]) for v, _ in drafter], real)
    assert released < voted and released < 0.5 * tv_drafter, (released, voted, tv_drafter)
    blind = draws(CopyingLM("Record:\n", blind=True), True)
    assert not blind < 0.5 * tv_drafter, (blind, tv_drafter)


# ----------------------------------------------------------------------------- the plan and the CLI
@pytest.fixture
def records_setup(tmp_path):
    """An employees-like prepared folder (schema in meta.json, people files) and a tiny base."""
    from utils.records import read_people  # noqa: F401  (the reader the script uses)
    crowd = people(24)
    data = make_record_dataset(tmp_path / "emp", [SCHEMA.render_record(p, 0) for p in crowd])
    meta = json.load(open(os.path.join(data, "meta.json")))
    meta["schema"] = SCHEMA.to_json()
    json.dump(meta, open(os.path.join(data, "meta.json"), "w"))
    for split, group in (("train", crowd), ("val", crowd[:6])):
        with open(os.path.join(data, f"{split}_people.jsonl"), "w") as f:
            f.writelines(json.dumps(p) + "\n" for p in group)
    ckpt = tmp_path / "base" / "ckpt.pt"
    save_checkpoint(ckpt, tiny_model(block_size=256), config={"dataset": "pydocs"})
    return data, str(ckpt), tmp_path


def structured_args(data, ckpt, tmp, *extra):
    return [f"--ckpt={ckpt}", f"--data_dir={data}", f"--out={tmp}/out/syn.jsonl", f"--fields={FIELDS}",
            f"--domains={DOMAINS}", f"--digits={DIGITS}", "--record_header=Record:\n", "--s=12", "--n_batches=2",
            "--c=3.0", "--tau=1.0", "--svt=False", "--max_examples_per_batch=3", "--drafter_steps=0",
            "--batch_salt=t", "--seed=0", *extra]


def test_plan_comes_before_any_record_is_read_and_refuses_below_one_record_per_batch(records_setup, monkeypatch):
    data, ckpt, tmp = records_setup
    said = []
    def no_people(*a, **k):
        raise AssertionError("records read before the plan")
    monkeypatch.setattr(S, "load_people", no_people)
    with pytest.raises(AssertionError, match="before the plan"):
        S.synthesize(S.configure(S.DEFAULTS, structured_args(data, ckpt, tmp, "--r=400")), log=said.append)
    plan = [line for line in said if line.startswith("plan:")]
    assert plan and "records per batch" in plan[0] and "r=400" in plan[0]
    with pytest.raises(UserError, match=r"records per batch.*--epsilon.*--s"):
        S.main(structured_args(data, ckpt, tmp, "--r=3"))  # a record costs more than 3 private tokens
    assert not os.path.exists(tmp / "out")


def test_tau_from_the_plan_depends_on_the_config_alone_and_spends_the_budget_on_records(records_setup, tmp_path):
    """tau=0: the plan picks the sharpest tau (2c/tau <= sharpness) that pays for max_examples_per_batch
    records at the epsilon, from the config and the public dry run; two different private crowds get the
    same tau and r, and the epsilon stays at the target (checked by the conversion the tests anchor)."""
    data, ckpt, tmp = records_setup
    other = make_record_dataset(tmp_path / "other", [SCHEMA.render_record(p, 0) for p in people(24, seed=5)])
    meta = json.load(open(os.path.join(other, "meta.json")))
    json.dump({**meta, "schema": SCHEMA.to_json()}, open(os.path.join(other, "meta.json"), "w"))
    for split, group in (("train", people(24, seed=5)), ("val", people(6, seed=6))):
        with open(os.path.join(other, f"{split}_people.jsonl"), "w") as f:
            f.writelines(json.dumps(p) + "\n" for p in group)
    def run(eps, folder):
        cfg = S.configure(S.DEFAULTS, structured_args(folder, ckpt, tmp, f"--epsilon={eps}", "--tau=0",
                                                      "--sharpness=6", "--utility_check=False"))
        return S.synthesize(cfg, log=lambda *a: None)
    rich, poor = run(1e4, data), run(2.0, data)
    assert rich["plan"]["tau"] == pytest.approx(1.0)  # 2c/6: an abundant budget buys no more sharpness
    assert poor["plan"]["tau"] > 1.0  # a scarce one flattens the vote to pay for the planned records
    wanted = 1.1 * 3 * poor["plan"]["private_tokens_per_record"]
    assert wanted - 1 <= poor["privacy"]["r"] <= wanted + 1 and poor["plan"]["records_per_batch"] >= 2
    for result in (rich, poor):
        privacy = result["privacy"]
        assert privacy["tau"] == result["plan"]["tau"] and privacy["epsilon"] <= privacy["epsilon_target"]
        assert privacy["epsilon"] == P.zcdp_to_epsilon(privacy["r"] * P.rho_per_private_token(
            12, 3.0, privacy["tau"], svt=False), privacy["delta"])
    elsewhere = run(2.0, other)  # other people, the same plan (seed 0: the same public dry run)
    assert elsewhere["plan"] == poor["plan"] and elsewhere["privacy"]["r"] == poor["privacy"]["r"]
    with pytest.raises(UserError, match="tau=0"):
        S.main(structured_args(data, ckpt, tmp, "--r=300", "--tau=0"))  # an explicit r needs an explicit tau


def run_script(args, tmp):
    """(command, output rows) of synthesize_dp.py run as a user runs it, which must succeed."""
    cmd = [sys.executable, os.path.join(REPO, "synthesize_dp.py"), *args]
    done = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp)
    assert done.returncode == 0, done.stderr
    return cmd, [json.loads(line) for line in open(tmp / "out" / "syn.jsonl")]


def test_cli_writes_parseable_records_and_the_utility_table(records_setup):
    data, ckpt, tmp = records_setup
    cmd, rows = run_script(structured_args(data, ckpt, tmp, "--r=300"), tmp)
    tpl = template()
    assert rows and all(tpl.parse(row["record"]) is not None and row["text"].strip() for row in rows)
    report = json.load(open(tmp / "out" / "syn.privacy.json"))
    assert report["plan"]["expected_records"] >= 1 and report["diagnostics"]["records"] == len(rows)
    assert report["epsilon"] == P.zcdp_to_epsilon(report["rho"], report["delta"])
    table = open(tmp / "out" / "syn.utility.md").read()
    for what in ("Department", "Department x Full or Part-Time", "Annual Salary", "public drafter", "DP histogram",
                 "canaries reproduced: 0"):
        assert what in table
    missing = subprocess.run(cmd + [f"--data_dir={tmp}/nowhere", f"--out={tmp}/bad.jsonl"], capture_output=True,
                             text=True, cwd=tmp)
    assert missing.returncode == 2 and missing.stderr.startswith("error:") and "prepare" in missing.stderr
    assert not os.path.exists(tmp / "bad.jsonl")


def test_cli_with_a_released_joint_reports_it_and_spends_tokens_on_the_rest_only(records_setup):
    """release_share=0.5 from the command line: the report carries the release (its rho, sigma), the
    epsilon of tokens + release stays at the target, the plan counts private tokens for Annual Salary
    alone, and every record parses. A release without --epsilon, or of free text, is refused first."""
    data, ckpt, tmp = records_setup
    _, rows = run_script(structured_args(data, ckpt, tmp, "--epsilon=8", "--release_share=0.5",
                                         "--utility_check=False"), tmp)
    tpl = template()
    assert rows and all(tpl.parse(row["record"]) is not None for row in rows)
    report = json.load(open(tmp / "out" / "syn.privacy.json"))
    release = report["release"]
    assert release["rho"] == pytest.approx(0.5 * P.max_rho_for_epsilon(8.0, report["delta"]))
    assert report["rho"] == pytest.approx(report["r"] * report["rho_per_private_token"] + release["rho"])
    assert report["epsilon"] <= 8.0 and report["plan"]["released_fields"] == ["Department", "Full or Part-Time"]
    assert all(row["private_tokens"] <= len(tpl.parse(row["record"])["Annual Salary"]) + 1 for row in rows)  # salary only
    with pytest.raises(UserError, match="release_share"):
        S.main(structured_args(data, ckpt, tmp, "--r=300", "--release_share=0.5"))
    with pytest.raises(UserError, match="release_share must be in"):
        S.main(structured_args(data, ckpt, tmp, "--epsilon=8", "--release_share=1.5"))
    with pytest.raises(UserError, match="leaves no private token"):  # the salary would still need tokens
        S.main(structured_args(data, ckpt, tmp, "--epsilon=8", "--release_share=1.0"))
    with pytest.raises(UserError, match="release_share"):
        S.main(["--structured=False", "--epsilon=8", "--release_share=0.5", f"--out={tmp}/x.jsonl"])


def test_cli_with_released_bands_spends_no_token_and_reports_both_tables(records_setup):
    """release_share=1 with the salary's bands released too, the joint from the records: two tables share
    the budget (the report says so, at the target epsilon), no record spends a private token, every
    record parses, its (Department, Full or Part-Time) is a private person's and its salary lies in a
    band that holds a private person of its Full or Part-Time (the noise at epsilon 1000 is under a
    count). Bands of a field without public bins, or given an unreleased field, are refused."""
    data, ckpt, tmp = records_setup
    bands = "--release_bands={'Annual Salary': ['Full or Part-Time']}"
    _, rows = run_script(structured_args(data, ckpt, tmp, "--epsilon=1000", "--release_share=1.0", bands,
                                         "--histogram_bins={'Annual Salary': (0.0, 100000.0, 10)}",
                                         "--release_from=records", "--utility_check=False"), tmp)
    tpl = template()
    report = json.load(open(tmp / "out" / "syn.privacy.json"))
    assert report["release"]["tables"] == 2 and report["r"] == 0 and report["epsilon"] <= 1000
    assert report["plan"]["released_bands"] == {"Annual Salary": {"given": ["Full or Part-Time"], "cells": 20}}
    assert len(rows) == report["plan"]["expected_records"] and all(row["private_tokens"] == 0 for row in rows)
    held = {(p["Full or Part-Time"], int(p["Annual Salary"] // 10000)) for p in people(24)}
    joints = {(p["Department"], p["Full or Part-Time"]) for p in people(24)}
    assert "one-hot vectors of their own values" in report["release"]["mechanism"]
    for row in rows:  # the tiny model reads nothing: the cells come from the records, each one a real one
        values = tpl.parse(row["record"])
        assert (values["Full or Part-Time"], int(float(values["Annual Salary"]) // 10000)) in held
        assert (values["Department"], values["Full or Part-Time"]) in joints
    with pytest.raises(UserError, match="release_from"):
        S.main(structured_args(data, ckpt, tmp, "--epsilon=8", "--release_share=1.0", bands, "--release_from=rows"))
    with pytest.raises(UserError, match="release_bands"):
        S.main(structured_args(data, ckpt, tmp, "--epsilon=8", "--release_share=1.0", bands, "--histogram_bins={}"))
    with pytest.raises(UserError, match="release_bands"):
        S.main(structured_args(data, ckpt, tmp, "--epsilon=8", "--release_share=1.0",
                               "--release_bands={'Annual Salary': ['Annual Salary']}"))


def test_fields_the_data_lacks_are_refused_with_the_prepare_command(records_setup):
    data, ckpt, tmp = records_setup
    with pytest.raises(UserError, match="prepare.py"):
        S.main(structured_args(data, ckpt, tmp, "--r=300", "--fields=('Department', 'Job Titles')",
                               "--domains={'Department': ['POLICE'], 'Job Titles': ['CLERK']}"))


def test_accounting_needs_no_data_and_refuses_bad_budgets(tmp_path):
    missing = str(tmp_path / "nowhere")
    argv = ["--structured=False", f"--data_dir={missing}", f"--ckpt={missing}/ckpt.pt", f"--out={tmp_path}/o.jsonl"]
    with pytest.raises(UserError, match="does not pay for one private token"):
        S.main(argv + ["--epsilon=1e-4", "--s=10"])
    with pytest.raises(UserError, match="exactly one of"):
        S.main(argv + ["--epsilon=1", "--r=5"])
    with pytest.raises(UserError, match="exactly one of"):
        S.main(argv)
    with pytest.raises(UserError, match="delta"):
        S.main(argv + ["--r=5", "--delta=1.5"])
    assert not os.listdir(tmp_path)  # nothing written



# ----------------------------------------------------------------------------- end to end
@pytest.fixture
def synth_setup(tmp_path):
    rng = random.Random(0)
    texts = [f"name: P{i}; dept: {rng.choice(['POLICE', 'FIRE'])}; pay: {rng.randint(10, 99)}" for i in range(24)]
    data = make_record_dataset(tmp_path / "rec", texts)
    ckpt = tmp_path / "base" / "ckpt.pt"
    save_checkpoint(ckpt, tiny_model(block_size=128), config={"dataset": "pydocs"})
    return data, str(ckpt), tmp_path


def synth_args(data, ckpt, tmp_path, *extra):
    return [f"--ckpt={ckpt}", f"--data_dir={data}", f"--out={tmp_path}/out/syn.jsonl", "--r=6", "--s=6",
            "--n_batches=6", "--max_new_tokens=16", "--max_examples_per_batch=2", "--keep_unfinished=True",
            "--batch_salt=test", "--seed=0", "--structured=False", *extra]


def test_cached_and_uncached_synthesis_give_the_same_text(synth_setup):
    data, ckpt, tmp = synth_setup
    a = S.main(synth_args(data, ckpt, tmp, "--n_batches=3", "--use_kv_cache=True"))["examples"]
    b = S.main(synth_args(data, ckpt, tmp, "--n_batches=3", "--use_kv_cache=False"))["examples"]
    assert [e["text"] for e in a] == [e["text"] for e in b] and len(a) > 0


def test_cli_end_to_end(synth_setup):
    data, ckpt, tmp = synth_setup
    cmd, rows = run_script(synth_args(data, ckpt, tmp, "--n_batches=10"), tmp)
    report = json.load(open(tmp / "out" / "syn.privacy.json"))
    assert report["r"] == 6 and report["s"] == 6 and report["batching"]["n_batches"] == 10
    assert math.isclose(report["rho"], 6 * P.rho_per_private_token(6, 10.0, 2.0, S.DEFAULTS["sigma"], svt=True))
    assert report["epsilon"] == P.zcdp_to_epsilon(report["rho"], report["delta"])
    assert {row["batch"] for row in rows} <= set(range(10)) and all(row["text"].strip() for row in rows)
    for b in range(10):
        assert sum(row["private_tokens"] for row in rows if row["batch"] == b) <= 6
    assert report["diagnostics"]["private_tokens"] == sum(row["private_tokens"] for row in rows)
    assert "batch_sizes" not in json.dumps(report)  # nothing data-dependent without noise is reported

    bad = subprocess.run(cmd + ["--ckpt=" + str(tmp / "missing.pt"), f"--out={tmp}/bad.jsonl"],
                         capture_output=True, text=True, cwd=tmp)
    assert bad.returncode == 2 and bad.stderr.startswith("error:") and "Traceback" not in bad.stderr
    assert not os.path.exists(tmp / "bad.jsonl")


def test_vocabulary_mismatch_is_refused(synth_setup):
    data, _, tmp = synth_setup
    small = tmp / "small" / "ckpt.pt"
    save_checkpoint(small, tiny_model(vocab_size=100, block_size=128))
    with pytest.raises(UserError, match="vocabulary"):
        S.main(synth_args(data, str(small), tmp))
