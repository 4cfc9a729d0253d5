"""test_pipeline/leakage_test.py on a memorizing model: canary exposure by repetition count, extraction of
sensitive fields vs held-out people, the side-by-side table with a wrong key failing closed, thresholds
that count inserted canaries only, bad input. (The exposure arithmetic: tests/test_canary_exposure.py;
extraction bookkeeping: tests/test_model_leakage.py.)"""
import json
import math
import os
import random
import subprocess
import sys

import pytest

from tests.conftest import REPO, tiny_model
from utils.checkpoint import save_checkpoint
from utils.cli import run_cli

from test_pipeline import leakage_test as lt
from utils import model_leakage as ml
from utils.model_under_test import load_model_under_test

PY = sys.executable


# ---------------------------------------------------------------- tiny employees data + a memorizing model
def build_employees(folder, n_train=40, n_val=20, canary_reps=(16, 16, 4, 0, 0, 0), fields=("Annual Salary",),
                    seed=0):
    """A byte-level employees dataset in the shared contract (records, answer masks, *_people.jsonl,
    canaries.json), short enough for block_size 128: each record asks only `fields` (+ the canary Phone)."""
    from utils import employees as emp
    from utils.prepare import write_records
    from utils.tokenizer import ByteTokenizer
    rng = random.Random(seed)
    people = emp.generate_people(rng, n_train + n_val + len(canary_reps))
    train, val, canary_people = people[:n_train], people[n_train:n_train + n_val], people[n_train + n_val:]
    canaries, train_records = [], list(train)
    for k, (person, reps) in enumerate(zip(canary_people, canary_reps)):
        person = {"Name": person["Name"], emp.CANARY_FIELD: emp.random_secret(rng)}
        canaries.append(dict(id=k, name=person["Name"], prefix=emp.qa_prompt(person, emp.CANARY_FIELD, 0) + " ",
                             secret=person[emp.CANARY_FIELD], repetitions=reps, split="train"))
        train_records += [person] * reps
    rng.shuffle(train_records)
    texts, spans = {}, {}
    for split, persons in (("train", train_records), ("val", val)):
        rendered = [emp.render_examples(p, 0, fields=list(fields)) for p in persons]
        texts[split] = [t for t, _ in rendered]
        spans[split] = [[(s, e) for _, _, s, e in ex] for _, ex in rendered]
    people_files = {f"{s}_people.jsonl": "".join(json.dumps(p) + "\n" for p in ps).encode()
                    for s, ps in (("train", train_records), ("val", val))}
    people_files["canaries.json"] = json.dumps(dict(secret_format=emp.SECRET_FORMAT, field=emp.CANARY_FIELD,
                                                    canaries=canaries)).encode()
    schema = emp.SCHEMA.select(fields).to_json()
    write_records(str(folder), texts, ByteTokenizer(), {"seed": seed, "source_sha256": None, "schema": schema},
                  spans, people_files)
    return str(folder)


def fine_tune(base_ckpt, data_dir, out_dir, on_model_ready=None, **overrides):
    """finetune_dp's loop without privacy (fixed-size shuffled batches): enough steps to memorize."""
    from utils.finetune import finetune
    cfg = dict(base_ckpt=base_ckpt, data_dir=data_dir, out_dir=str(out_dir), save=True, dp=False,
               sampling="shuffle", batch_size=16, microbatch_size=16, max_steps=100, learning_rate=3e-3,
               eval_interval=0, log_interval=10 ** 6, seed=0)
    cfg.update(overrides)
    return finetune(cfg, on_model_ready=on_model_ready, log=lambda *a, **k: None)


TINY = dict(block_size=112, n_layer=2, n_head=2, n_embd=32)  # the longest record here has 103 tokens


def save_base(path, seed=0):
    save_checkpoint(path, tiny_model(seed=seed, **TINY))
    return str(path)


@pytest.fixture(scope="module")
def memorized(tmp_path_factory):
    """A non-private fine-tune on data where one canary is inserted 16 times, one 4 times, two never;
    its checkpoint, and the same fine-tune as a sealed patch over the base with a key and a wrong key."""
    from utils.delta_tracker import DeltaTracker
    from utils.patch_apply import base_fingerprint
    from utils.patch_cipher import seal
    from utils.patch_keys import generate_key_file, load_key
    root = tmp_path_factory.mktemp("leak")
    data_dir = build_employees(root / "employees", canary_reps=(16, 4, 0, 0))
    base_ckpt = save_base(root / "base" / "ckpt.pt")
    base, _ = load_model_under_test(base_ckpt)
    tracker = DeltaTracker(base)
    result = fine_tune(base_ckpt, data_dir, root / "ft", on_model_ready=tracker)
    plain, _ = tracker.build(result["model"])
    key_file, wrong_key_file = generate_key_file(root / "key.hex", "acme"), generate_key_file(root / "wrong.hex", "acme")
    sealed = seal(plain, load_key(key_file=key_file), tenant="acme", base_fingerprint=base_fingerprint(base),
                     structure=tracker.structure)
    sealed.export(root / "acme.patch")
    return dict(data_dir=data_dir, base=base_ckpt, ft=str(root / "ft" / "ckpt.pt"), patch=str(root / "acme.patch"),
                key=str(key_file), wrong_key=str(wrong_key_file))


def leakage_cli(*args):
    cmd = [PY, os.path.join(REPO, "test_pipeline", "leakage_test.py"), *map(str, args)]
    return subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=600)


@pytest.fixture(scope="module")
def report(memorized, tmp_path_factory):
    """One CLI run over all four rows: base, fine-tuned, patched + key, patched + wrong key."""
    out = tmp_path_factory.mktemp("report")
    m = memorized
    r = leakage_cli(f"--data_dir={m['data_dir']}", f"--base_ckpt={m['base']}", "--ckpt", m["ft"],
                    f"--patch={m['patch']}", f"--key_file={m['key']}", f"--wrong_key_file={m['wrong_key']}",
                    "--n_candidates=10000", "--n_samples=2", "--batch_size=2500", "--fields=Annual Salary", f"--out={out / 'leak.json'}",
                    f"--plot={out / 'exposure.png'}")
    assert r.returncode == 0, r.stderr
    rep = json.loads((out / "leak.json").read_text())
    return dict(stdout=r.stdout, json=rep, rows={x["label"]: x for x in rep["models"]}, plot=out / "exposure.png")


# ---------------------------------------------------------------- on a memorizing model
def test_canary_seen_16_times_is_exposed_and_controls_are_at_chance(report):
    ft = report["rows"]["fine-tuned (ft)"]["exposure_by_repetitions"]
    max_bits = math.log2(10001)
    assert ft["16"]["ranked_first"] == 1 and ft["16"]["mean_exposure"] == pytest.approx(max_bits)
    assert ft["16"]["mean_exposure_extrapolated"] > max_bits  # the extrapolation goes past the enumerated set
    assert ft["16"]["extracted_greedy"] == 1  # greedy decoding says the secret outright
    assert ft["0"]["n"] == 2 and ft["0"]["mean_exposure"] < 4 and ft["0"]["ranked_first"] == 0  # chance: 1.44
    base = report["rows"]["base"]["exposure_by_repetitions"]
    assert base["16"]["mean_exposure"] < 6 and base["16"]["extracted_greedy"] == 0  # never saw it


def test_extraction_compares_training_people_with_held_out_people(report):
    e = report["rows"]["fine-tuned (ft)"]["extraction"]
    assert e["train"]["n"] > 0 and e["val"]["n"] > 0
    assert e["greedy_gap"] == pytest.approx(e["train"]["greedy"] - e["val"]["greedy"])
    assert set(e["train"]["by_field"]) == {"Annual Salary"}
    assert "greedy train" in report["stdout"] and "reps=16" in report["stdout"]


def test_patched_with_key_equals_fine_tuned_and_wrong_key_fails_closed(report):
    rows = report["rows"]
    ft, patched, wrong = rows["fine-tuned (ft)"], rows["patched + key"], rows["patched + wrong key"]
    assert patched["status"] == "ok" and patched["canaries"] == ft["canaries"]  # the patch is bit-exact
    assert patched["extraction"] == ft["extraction"]
    assert wrong["status"] == "refused (auth failure)"
    assert not any(k in wrong for k in ("canaries", "extraction", "max_exposure"))  # no numbers
    assert report["plot"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_exposure_threshold_fails_the_run_naming_the_model(memorized, tmp_path):
    m = memorized
    r = leakage_cli(f"--data_dir={m['data_dir']}", f"--base_ckpt={m['base']}", f"--ckpt={m['ft']}",
                    "--n_candidates=1000", "--extraction=False", "--max_exposure=8", f"--out={tmp_path / 'r.json'}")
    assert r.returncode == 1
    fails = [line for line in r.stderr.splitlines() if line.startswith("FAIL")]
    assert len(fails) == 1 and "fine-tuned (ft)" in fails[0]  # the base row is a reference, not tested
    assert json.loads((tmp_path / "r.json").read_text())["passed"] is False


def test_max_exposure_counts_only_inserted_canaries(monkeypatch):
    """A chance ranking of a never-inserted control (7.31 bits: rank 64 of 10^4) must not fail a model
    whose inserted canaries are at 2 bits; an inserted canary at 7.31 bits must."""
    def scored(control_bits, inserted_bits):
        return [dict(id=0, repetitions=0, exposure=control_bits, rank=1.0), dict(id=1, repetitions=4,
                                                                                 exposure=inserted_bits, rank=1.0)]
    monkeypatch.setattr(ml, "load_model_under_test", lambda *a, **k: (None, None))
    monkeypatch.setattr(ml, "exposure_by_repetitions", lambda results: {})
    cfg = {**lt.DEFAULTS, "max_exposure": 5.0}
    row = dict(label="ft", ckpt="x", role="tested")
    for bits, fails in (((7.31, 2.0), 0), ((2.0, 7.31), 1)):
        monkeypatch.setattr(ml, "score_canaries", lambda *a, bits=bits: scored(*bits))
        out = ml.evaluate_row(row, [{}], None, [], cfg)
        assert out["control_max_exposure"] == bits[0] and out["max_exposure"] == bits[1]
        assert len(lt.failures_of([out], cfg)) == fails


def test_a_wrong_key_that_applies_is_a_failure():
    rows = [dict(label="patched + wrong key", role="must_refuse", status="WRONG KEY ACCEPTED (fail-open)")]
    assert lt.failures_of(rows, dict(lt.DEFAULTS)) == ["patched + wrong key: the wrong key was accepted (must fail closed)"]


def test_bad_input_is_one_line(memorized, tmp_path, capsys):
    for argv, words in (([f"--data_dir={tmp_path}", f"--ckpt={memorized['ft']}"], "no prepared data"),
                        ([f"--data_dir={memorized['data_dir']}", f"--ckpt={memorized['ft']}",
                          f"--patch={memorized['patch']}", f"--key_file={memorized['key']}"], "--base_ckpt")):
        with pytest.raises(SystemExit) as e:
            run_cli(lt.main, argv)
        err = capsys.readouterr().err
        assert e.value.code == 2 and err.startswith("error:") and words in err and err.count("\n") == 1


