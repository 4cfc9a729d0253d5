"""Bring your own records, end to end: a made-up patients JSONL (not employees: other fields, a person
with two visits) through data/records/prepare.py, a DP fine-tune, a sealed patch, and the report's
leakage (canary exposure and extraction of the sensitive fields, with the patch applied by its key),
MIA, robustness and eval, all reading the schema from meta.json. Tiny model, a few steps."""
import importlib.util
import json
import os
import random

import pytest

from tests.conftest import REPO, tiny_model
from utils.checkpoint import save_checkpoint
from utils.cli import UserError

DIAGNOSES = ["asthma", "diabetes", "migraine", "influenza", "eczema", "anemia"]
MEDICATIONS = ["insulin", "ibuprofen", "salbutamol", "iron", "none"]
DOCTORS = ["Dr Kim", "Dr Osei", "Dr Rao"]
BLOCK = 320  # the longest patient record here is ~230 byte tokens


def prepare_script():
    spec = importlib.util.spec_from_file_location("records_prepare", os.path.join(REPO, "data", "records", "prepare.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def write_patients(path, n=36):
    rng = random.Random(0)
    rows = [{"name": f"Patient {i:02d}", "diagnosis": rng.choice(DIAGNOSES), "medication": rng.choice(MEDICATIONS),
             "doctor": rng.choice(DOCTORS)} for i in range(n)]
    rows.append({**rows[0], "medication": "antibiotics"})  # a second visit: same person, another medication
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def patients(tmp_path_factory):
    root = tmp_path_factory.mktemp("own")
    data = root / "data"
    prepare_script().main([f"--input={write_patients(root / 'patients.jsonl')}", "--person_column=name",
                           "--fields=diagnosis,medication,doctor", "--sensitive=diagnosis,medication",
                           "--tokenizer=byte", f"--out_dir={data}", "--val_frac=0.25", "--canary_reps=4,16",
                           "--canaries_per_rep=1", "--n_control_canaries=1"])
    return root, str(data)


def test_prepare_makes_one_record_per_patient_with_the_schema(patients):
    _, data = patients
    from utils.records import load_people, load_schema
    schema = load_schema(data)
    assert schema.person_field == "name" and schema.fields == ["diagnosis", "medication", "doctor"]
    assert schema.sensitive == ["diagnosis", "medication"] and schema.canary_field == "Phone"
    people = load_people(data, "train", schema) + load_people(data, "val", schema)
    first = [p for p in people if p["name"] == "Patient 00"]
    assert len(first) == 1 and "antibiotics" in first[0]["medication"]  # both visits in the one record
    assert "Patient 00's medication?" in schema.qa_prompt(first[0], "medication")


def test_records_longer_than_the_block_are_refused_before_training(patients, tmp_path):
    _, data = patients
    from utils.finetune import finetune
    base = tmp_path / "base.pt"
    save_checkpoint(base, tiny_model(block_size=64), iter_num=0)
    cfg = dict(base_ckpt=str(base), data_dir=data, out_dir=str(tmp_path / "ft"), max_steps=1, batch_size=8,
               microbatch_size=8, eval_interval=0)
    with pytest.raises(UserError, match=r"train records .* longer than block_size 64 .*fewer fields"):
        finetune(cfg, log=lambda *a, **k: None)
    assert not (tmp_path / "ft").exists()  # refused before anything was written
    finetune({**cfg, "truncate_records": True}, log=lambda *a, **k: None)
    privacy = json.loads((tmp_path / "ft" / "privacy.json").read_text())
    assert privacy["truncated_records"] == privacy["dataset_size"] > 0  # every record is cut at 65 tokens


def test_own_records_through_dp_finetune_seal_leakage_mia_robustness_and_report(patients):
    root, data = patients
    import finetune_encrypt_memmap as fem
    from test_pipeline import report as rp
    from utils.finetune import finetune
    from utils.patch_keys import generate_key_file
    run = root / "run"
    save_checkpoint(run / "base" / "ckpt.pt", tiny_model(block_size=BLOCK), iter_num=0)
    base = str(run / "base" / "ckpt.pt")
    finetune(dict(base_ckpt=base, data_dir=data, out_dir=str(run / "dp"), loss_on="answer", max_steps=3,
                  batch_size=8, microbatch_size=8, target_epsilon=8.0, eval_interval=0), log=lambda *a, **k: None)
    privacy = json.loads((run / "dp" / "privacy.json").read_text())
    assert privacy["truncated_records"] == 0 and 0 < privacy["epsilon"] <= 8.0
    key = generate_key_file(str(run / "sealed" / "key.hex"), tenant="clinic")
    fem.main([f"--base_ckpt={base}", f"--data_dir={data}", f"--key_file={key}",
              f"--export={run / 'sealed' / 'clinic.patch'}", "--max_steps=2", "--batch_size=8", "--microbatch_size=8",
              "--eval_interval=100", "--loss_on=answer"])

    code = rp.main([f"--run_dir={run}", f"--data_dir={data}", f"--base_data_dir={data}", "--quick"])
    report = json.loads((run / "report" / "report.json").read_text())
    assert code == 0, report.get("failures")
    rows = {r["label"]: r for r in report["leakage"]["models"]}
    assert rows["patched + wrong key"]["status"].startswith("refused")
    for label in ("base", "fine-tuned (dp)", "patched + key"):
        r = rows[label]
        assert r["status"] == "ok" and sorted(c["repetitions"] for c in r["canaries"]) == [0, 4, 16]
        assert set(r["extraction"]["train"]["by_field"]) == {"diagnosis", "medication"}  # the sensitive fields
        assert set(r["extraction"]["val"]["by_field"]) == {"diagnosis", "medication"}
    assert set(report["mia"]["models"]) == {"base", "dp", "sealed (patched)"}
    assert all(m["code"] == 0 for m in report["mia"]["models"].values())
    for name in ("dp", "sealed (patched)"):
        rob = report["robustness"][name]
        assert rob["fields"] == ["diagnosis", "medication", "doctor"]
        kinds = {r["kind"] for r in rob["injection"]["rows"]}
        assert "diagnosis (train person)" in kinds and "phone (inserted canary)" in kinds
    assert set(report["eval"]["dp"]["qa"]["per_field"]) <= {"diagnosis", "medication", "doctor"}
    assert report["eval"]["dp"]["qa"]["n"] > 0
    assert "Patient" in report["figures"]["prompt"]
