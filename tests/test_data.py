"""The data/<name>/prepare.py scripts: run from the CLI into tmp_path, deterministic, split by privacy
unit, offsets and answer masks consistent with the tokens, canaries, CSV input and bad input."""
import hashlib
import importlib.util
import json
import os
import random
import subprocess
import sys

import numpy as np
import pytest

from utils.cli import UserError
from utils.data import RecordDataset, answer_mask, last_run, load_meta, offsets, tokens
from utils.employees import (CANARY_FIELD, FIELDS, N_TEMPLATES, QUESTIONS, answer, generate_people, qa_prompt,
                             random_secret, record_fields, render_examples, render_record)
from utils.prepare import encode_record, take_tokens
from utils.tokenizer import ByteTokenizer, get_tokenizer

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMALL_EMPLOYEES = ["--n_people=40", "--val_frac=0.25", "--canary_reps=1,3", "--canaries_per_rep=2",
                   "--n_control_canaries=3", "--fields=Job Titles,Annual Salary,Hourly Rate"]


def prepare(name, out_dir, *args, check=True, env=None):
    """Run data/<name>/prepare.py as a user would, from another working directory."""
    cmd = [sys.executable, os.path.join(REPO, "data", name, "prepare.py"), f"--out_dir={out_dir}", *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=os.path.dirname(out_dir),
                          env={**os.environ, **(env or {})}, timeout=300)
    if check:
        assert proc.returncode == 0, proc.stderr
    return proc


def prepare_in_process(name, out_dir, *args):
    """The same run in this process: compared with a CLI run it checks determinism across processes
    (another hash seed) without paying for a second interpreter start."""
    load_script(name).main([f"--out_dir={out_dir}", *args])


def folder_bytes(folder):
    return {f: open(os.path.join(folder, f), "rb").read() for f in sorted(os.listdir(folder))}


def decoded_records(data_dir, split):
    """[(record text, answer-mask text)] decoded from the written tokens; checks the stream's structure."""
    meta = load_meta(data_dir)
    tok = get_tokenizer(meta)
    ids, off, mask = tokens(data_dir, split, meta), offsets(data_dir, split), answer_mask(data_dir, split)
    assert off[-1] == len(ids) == meta["splits"][split]["tokens"]
    assert len(off) - 1 == meta["splits"][split]["records"]
    out = []
    for a, b in zip(off[:-1], off[1:]):
        rec = [int(t) for t in ids[a:b]]
        assert rec[-1] == tok.eot and tok.eot not in rec[:-1]  # exactly one end-of-text, at the end
        answer_ids = [t for t, m in zip(rec, mask[a:b]) if m] if mask is not None else []
        out.append((tok.decode(rec[:-1]), tok.decode(answer_ids)))
    return out


def load_script(name):
    """data/<name>/prepare.py as a module (they all share the file name 'prepare')."""
    spec = importlib.util.spec_from_file_location(f"{name}_prepare", os.path.join(REPO, "data", name, "prepare.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def people(data_dir, split):
    with open(os.path.join(data_dir, f"{split}_people.jsonl")) as f:
        return [json.loads(line) for line in f]


# ----------------------------------------------------------------------------------------- employees


def test_render_record_matches_contract():
    rng = random.Random(0)
    person = generate_people(rng, 1)[0]
    person[CANARY_FIELD] = random_secret(rng, "###-####")
    assert len(person[CANARY_FIELD]) == 8 and person[CANARY_FIELD][3] == "-"
    assert all(len(QUESTIONS[f]) == N_TEMPLATES >= 3 for f in FIELDS + [CANARY_FIELD])
    text, examples = render_examples(person, random.Random(1))
    assert text == render_record(person, random.Random(1))
    lines = text.splitlines(keepends=True)
    assert [e[0] for e in examples][0] == CANARY_FIELD  # the canary line starts the record
    for line, (field, t, start, end) in zip(lines, examples):
        assert line == f"{qa_prompt(person, field, t)} {answer(person, field)}\n"
        assert text[start:end] == f" {answer(person, field)}\n"
    # after the canary line, every field once, in an order that varies between records
    orders = set()
    for seed in range(20):
        _, ex = render_examples(person, random.Random(seed))
        assert ex[0][0] == CANARY_FIELD and sorted(e[0] for e in ex[1:]) == sorted(record_fields(person)[1:])
        orders.add(tuple(e[0] for e in ex))
    assert len(orders) > 1
    assert [e[0] for e in render_examples(person, 0)[1]] == record_fields(person)  # a fixed template: schema order
    # salaried people have no hourly rate and hourly people a computed annual salary
    for p in generate_people(random.Random(2), 200):
        if p["Salary or Hourly"] == "Salary":
            assert p["Hourly Rate"] is None and p["Annual Salary"] > 0
        else:
            assert p["Annual Salary"] == round(p["Hourly Rate"] * p["Typical Hours"] * 52, 2)


def fields_of_lines(person, text, fields):
    """The field each line of a record asks about, checking that the line is that field's Q/A example in
    one of its templates."""
    order = []
    for line in text.splitlines(keepends=True):
        field = [f for f in fields
                 if any(line == f"{qa_prompt(person, f, t)} {answer(person, f)}\n" for t in range(N_TEMPLATES))]
        assert len(field) == 1, line
        order.append(field[0])
    return order


@pytest.fixture(scope="module")
def employees_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("employees") / "byte"
    prepare("employees", out, "--tokenizer=byte", *SMALL_EMPLOYEES)
    return out


def test_employees_deterministic_split_by_person_and_masks(employees_dir, tmp_path):
    a, b = employees_dir, tmp_path / "b"
    prepare_in_process("employees", b, "--tokenizer=byte", *SMALL_EMPLOYEES)
    assert folder_bytes(a) == folder_bytes(b)
    meta = load_meta(a)
    assert meta["fields"] == ["Job Titles", "Annual Salary", "Hourly Rate"] and meta["n_templates"] >= 3
    train_names = {p["Name"] for p in people(a, "train")}
    val_names = {p["Name"] for p in people(a, "val")}
    assert val_names and not train_names & val_names
    assert meta["people"] == {"train": 30, "val": 10}
    for split in ("train", "val"):
        rows = people(a, split)
        recs = decoded_records(a, split)
        assert len(rows) == len(recs)
        for person, (text, answers) in zip(rows, recs):
            fields = [f for f in ([CANARY_FIELD] + meta["fields"]) if person.get(f) is not None]
            order = fields_of_lines(person, text, fields)
            assert sorted(order) == sorted(fields)
            assert (order[0] == CANARY_FIELD) == (CANARY_FIELD in person)  # a canary's Phone line comes first
            # the mask covers exactly the answers (with their leading space and newline)
            assert answers == "".join(f" {answer(person, f)}\n" for f in order)
    ds = RecordDataset(str(a), "train", block_size=256, loss_on="answer")
    x, y = ds[0]
    assert (y != -1).sum() > 0 and (y != -1).sum() < (x != 0).sum()


def test_last_answer_loss_keeps_exactly_each_records_last_answer(employees_dir):
    """loss_on='last_answer' (completion-only fine-tuning): the targets are the record's last answer, every
    earlier answer and all the scaffold ignored; 'answer' keeps them all."""
    meta = load_meta(employees_dir)
    tok = get_tokenizer(meta)
    block = RecordDataset(str(employees_dir), "train", block_size=8).longest  # no record cut
    last = RecordDataset(str(employees_dir), "train", block_size=block, loss_on="last_answer")
    every = RecordDataset(str(employees_dir), "train", block_size=block, loss_on="answer")
    fields = [CANARY_FIELD] + meta["fields"]
    several = 0
    for i, (person, (text, _)) in enumerate(zip(people(employees_dir, "train"), decoded_records(employees_dir, "train"))):
        order = fields_of_lines(person, text, [f for f in fields if person.get(f) is not None])
        kept = last[i][1]
        assert tok.decode([int(t) for t in kept[kept >= 0]]) == f" {answer(person, order[-1])}\n"
        several += len(order) > 1 and (every[i][1] >= 0).sum() > (kept >= 0).sum()
    assert several > 0  # records with earlier answers exist, and they lost them
    with pytest.raises(UserError, match="loss_on must be one of all, answer, last_answer"):
        RecordDataset(str(employees_dir), "train", block_size=256, loss_on="last")


def test_last_run_of_a_mask():
    keep = np.array([0, 1, 1, 0, 0, 1, 1, 1, 0], bool)
    assert last_run(keep).tolist() == [0, 0, 0, 0, 0, 1, 1, 1, 0]
    assert last_run(np.array([1, 1], bool)).tolist() == [1, 1] and not last_run(np.zeros(3, bool)).any()


def test_records_longer_than_the_block_are_refused_unless_truncation_is_asked(employees_dir):
    """Training on a cut record trains its person on their first lines only: refused by default."""
    ds = RecordDataset(str(employees_dir), "train", block_size=32)
    with pytest.raises(UserError, match=rf"{len(ds)} of {len(ds)} train records .* longer than block_size 32 \+ 1 "
                                        rf"\(longest: {ds.longest} tokens\); fixes: fewer fields .*larger block_size.*BPE"):
        ds.check_fit()
    assert ds.check_fit(truncate=True) == ds.n_truncated == len(ds)
    fits = RecordDataset(str(employees_dir), "train", block_size=ds.longest - 1)  # x and y: block_size + 1 tokens
    assert fits.check_fit() == 0
    assert RecordDataset(str(employees_dir), "train", block_size=ds.longest - 2).check_fit(truncate=True) >= 1


def test_readme_cpu_flow_records_fit_the_block(tmp_path):
    """The README's CPU flow: employees with byte tokens (default fields) on config/train_pydocs.py's block.
    All seven fields made every record longer than the block (962 of 962 truncated)."""
    import runpy
    block = runpy.run_path(os.path.join(REPO, "config", "train_pydocs.py"))["block_size"]
    out = tmp_path / "emp"
    prepare_in_process("employees", out, "--tokenizer=byte", "--n_people=300")
    assert max(s["max_record_tokens"] for s in load_meta(out)["splits"].values()) <= block + 1
    for split in ("train", "val"):
        assert RecordDataset(str(out), split, block).check_fit() == 0


def test_employees_canaries_inserted_exactly_repetitions_times(employees_dir):
    out = employees_dir
    with open(out / "canaries.json") as f:
        canaries = json.load(f)
    assert canaries["field"] == CANARY_FIELD and canaries["secret_format"] == "###-####"
    reps = sorted(c["repetitions"] for c in canaries["canaries"])
    assert reps == [0, 0, 0, 1, 1, 3, 3]
    train_texts = [t for t, _ in decoded_records(out, "train")]
    val_texts = [t for t, _ in decoded_records(out, "val")]
    for c in canaries["canaries"]:
        holding = [t for t in train_texts if c["secret"] in t]
        assert len(holding) == c["repetitions"]
        assert all(t.startswith(c["prefix"] + c["secret"] + "\n") for t in holding)
        assert c["prefix"].endswith("Answer: ") and c["name"] in c["prefix"]
        context = f"Context: {c['name']}."
        assert not any(c["secret"] in t or context in t for t in val_texts)
        if c["repetitions"] == 0:
            assert not any(context in t for t in train_texts)
    assert len({c["secret"] for c in canaries["canaries"]}) == len(canaries["canaries"])
    assert len(train_texts) == load_meta(out)["people"]["train"] + 2 * 1 + 2 * 3


def test_employees_gpt2_tokenizer_offline(tmp_path):
    out = tmp_path / "emp"
    prepare("employees", out, "--tokenizer=gpt2", "--n_people=12", "--canary_reps=2,", "--canaries_per_rep=1",
            "--n_control_canaries=1")
    meta = load_meta(out)
    assert meta["tokenizer"] == "gpt2" and meta["vocab_size"] == 50257 and meta["dtype"] == "uint16"
    for person, (text, answers) in zip(people(out, "train"), decoded_records(out, "train")):
        fields = [f for f in [CANARY_FIELD] + meta["fields"] if person.get(f) is not None]
        order = fields_of_lines(person, text, fields)
        assert sorted(order) == sorted(fields)
        assert answers == "".join(f" {answer(person, f)}\n" for f in order)


def write_csv(path, rows):
    header = "Name,Job Titles,Department,Full or Part-Time,Salary or Hourly,Typical Hours,Annual Salary,Hourly Rate\n"
    path.write_text(header + "".join(r + "\n" for r in rows))
    return path


CSV_ROWS = ['"AARON,  JEFFERY M",WATER CHEMIST II,WATER MGMNT,F,Salary,,"$95,028.00",',
            '"OKAFOR,  CHIDI",CROSSING GUARD,POLICE,P,Hourly,20,,$18.50',
            '"ZYGMUNT,  ILSE",POLICE OFFICER,POLICE,F,Salary,,90024.00,',
            '"QUAYLE,  BRAM",LIBRARIAN I,PUBLIC LIBRARY,F,Salary,,70000,',
            '"OKAFOR,  CHIDI",CUSTODIAN,AVIATION,F,Hourly,40,,20.00']


def test_employees_csv(tmp_path):
    csv_path = write_csv(tmp_path / "salaries.csv", CSV_ROWS)
    kept = tmp_path / "kept"
    prepare("employees", kept, "--tokenizer=byte", f"--csv={csv_path}", "--keep_names", "--val_frac=0.3",
            "--canaries_per_rep=0", "--n_control_canaries=0")
    rows = people(kept, "train") + people(kept, "val")
    by_name = {p["Name"]: p for p in rows}
    assert len(by_name) == len(rows) == 4  # one person = one record: Chidi Okafor's two rows are one record
    assert sorted(by_name) == ["Bram Quayle", "Chidi Okafor", "Ilse Zygmunt", "Jeffery M Aaron"]
    chidi = by_name["Chidi Okafor"]
    assert chidi["Job Titles"] == ["CROSSING GUARD", "CUSTODIAN"]  # conflicting values: all kept, in row order
    assert chidi["Annual Salary"][0] == pytest.approx(18.5 * 20 * 52)  # the CSV leaves it empty
    assert chidi["Annual Salary"] == [19240.0, 41600.0] and chidi["Department"] == ["POLICE", "AVIATION"]
    assert by_name["Jeffery M Aaron"]["Annual Salary"] == 95028.0
    assert not {p["Name"] for p in people(kept, "train")} & {p["Name"] for p in people(kept, "val")}
    records = [t for s in ("train", "val") for t, _ in decoded_records(kept, s)]
    chidi_records = [t for t in records if "Chidi Okafor" in t]
    assert len(chidi_records) == 1 and "Answer: 19240.00; 41600.00\n" in chidi_records[0]
    meta = load_meta(kept)
    assert meta["source_sha256"] == hashlib.sha256(csv_path.read_bytes()).hexdigest()
    assert meta["people"]["train"] + meta["people"]["val"] == 4  # dataset_size counts persons
    assert sum(v["records"] for v in meta["splits"].values()) == 4

    renamed = tmp_path / "renamed"
    prepare_in_process("employees", renamed, "--tokenizer=byte", f"--csv={csv_path}", "--val_frac=0.3")
    written = b"".join(folder_bytes(renamed).values()).decode("utf-8", errors="ignore")
    for real in ("Aaron", "Okafor", "Zygmunt", "Quayle", "AARON", "Chidi", "Jeffery"):
        assert real not in written
    renamed_rows = people(renamed, "train") + people(renamed, "val")
    assert len({p["Name"] for p in renamed_rows if p.get(CANARY_FIELD) is None}) == 4  # one alias per name


def test_employees_csv_keeps_every_row_by_default(tmp_path):
    """The old default (n_people=1000) silently dropped every row past a sample of 1000."""
    rows = [f'"P{i:04d},  ANN",CLERK,LAW,F,Salary,,{50000 + i},' for i in range(1010)]
    csv_path = write_csv(tmp_path / "big.csv", rows)
    out = tmp_path / "all"
    proc = prepare("employees", out, "--tokenizer=byte", f"--csv={csv_path}", "--keep_names",
                   "--canaries_per_rep=0", "--n_control_canaries=0")
    assert len(people(out, "train")) + len(people(out, "val")) == 1010
    assert "1010 rows, 1010 people" in proc.stdout
    sample = tmp_path / "sample"
    proc = prepare("employees", sample, "--tokenizer=byte", f"--csv={csv_path}", "--keep_names", "--csv_people=20",
                   "--canaries_per_rep=0", "--n_control_canaries=0")
    assert len(people(sample, "train")) + len(people(sample, "val")) == 20
    assert "--csv_people=20: keeping a deterministic sample of 20 people" in proc.stdout  # a limit is printed


def test_employees_bad_csv_one_line_error(tmp_path):
    bad = tmp_path / "bad.csv"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n\x00\xff\xfe binary")
    out = tmp_path / "out"
    proc = prepare("employees", out, "--tokenizer=byte", f"--csv={bad}", check=False)
    assert proc.returncode == 2
    assert proc.stderr.startswith("error: ") and proc.stderr.count("\n") == 1
    assert "Traceback" not in proc.stderr and "bad.csv" in proc.stderr
    assert not out.exists()


@pytest.mark.parametrize("rows, message", [
    (['"A,  B",CLERK,LAW,F,Salary,,ninety,'], "Annual Salary is not a number"),
    (['"A,  B",CLERK,LAW,F,Salary,,90000'], "fields, the header has"),
    (['"A,  B",CLERK,LAW,X,Salary,,90000,'], "Full or Part-Time"),
    ([], "no rows"),
])
def test_employees_malformed_csv(tmp_path, rows, message):
    path = write_csv(tmp_path / "x.csv", rows)
    with pytest.raises(UserError, match=message):
        load_script("employees").read_chicago_csv(str(path))


def test_employees_bad_arguments(tmp_path):
    employees = load_script("employees")
    with pytest.raises(UserError, match="cannot read CSV"):
        employees.read_chicago_csv(str(tmp_path / "missing.csv"))
    for args, message in ((["--fields=Salary"], "unknown or no field"), (["--tokenizer=word"], "gpt2' or 'byte"),
                          (["--val_frac=1.0"], "val_frac"), (["--secret_format=XXX"], "'#'"),
                          (["--field_order=sorted"], "'random' or 'schema'")):
        with pytest.raises(UserError, match=message):
            employees.main([f"--out_dir={tmp_path / 'o'}", "--tokenizer=byte", "--n_people=10", *args])
    assert not (tmp_path / "o").exists()


def test_employees_field_order_schema_keeps_every_record_in_schema_order(tmp_path):
    """--field_order=schema: the title line before the department line in every record (the templates are
    still drawn); the default shuffles, so both orders occur."""
    employees = load_script("employees")
    firsts = {}
    for order in ("random", "schema"):
        out = tmp_path / order
        meta = employees.main([f"--out_dir={out}", "--tokenizer=byte", "--n_people=60", "--canaries_per_rep=0",
                               "--n_control_canaries=0", "--fields=('Department', 'Job Titles')",
                               f"--field_order={order}"])
        assert meta["field_order"] == order
        texts = [t for split in ("train", "val") for t, _ in decoded_records(str(out), split)]
        firsts[order] = {"department" not in t.splitlines()[0].split("Answer:")[0] for t in texts}  # title first?
    assert firsts["schema"] == {True} and firsts["random"] == {True, False}


# ----------------------------------------------------------------------------------------- others


def test_pydocs_deterministic_split_by_document(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    args = ("--tokenizer=byte", "--max_tokens=40000", "--max_doc_chars=1500")
    prepare("pydocs", a, *args)
    prepare_in_process("pydocs", b, *args)
    assert folder_bytes(a) == folder_bytes(b)
    meta = load_meta(a)
    assert sum(s["tokens"] for s in meta["splits"].values()) <= 40000
    train = [t for t, _ in decoded_records(a, "train")]
    val = [t for t, _ in decoded_records(a, "val")]
    assert val and not set(train) & set(val)
    from pydoc_data.topics import topics
    corpus = "\n\n".join(topics.values())
    assert all(t[:200] in corpus for t in train + val)  # documents are pieces of the docs, in order


def test_tiny_word_vocabulary(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    prepare("tiny", a)
    prepare_in_process("tiny", b)
    assert folder_bytes(a) == folder_bytes(b)
    meta = load_meta(a)
    assert meta["tokenizer"] == "word" and meta["vocab_size"] == len(meta["words"]) + 1
    train = [t for t, _ in decoded_records(a, "train")]
    val = [t for t, _ in decoded_records(a, "val")]
    assert len(train) == 4 and len(val) == 1
    assert sorted(train + val) == sorted(s.lower() for s in [
        "I love Paris in the spring", "New York is a vibrant city", "Tokyo has amazing food",
        "London is very rainy", "Traveling expands your mind"])


def write_jsonl(path, n=60):
    rng = random.Random(0)
    filler = "the cat sat on a mat while people talked about the weather and music".split()
    docs = []
    for i in range(n):
        words = [rng.choice(filler) for _ in range(40)]
        if i % 3 == 0:
            words.insert(7, ["economy", "Inflation", "GDP", "stock"][i % 4])
        if i % 3 == 1:
            words.insert(7, "supermarkets")  # contains 'market' but is not the word
        docs.append(" ".join(words))
    path.write_text("".join(json.dumps({"id": i, "text": d}) + "\n" for i, d in enumerate(docs)))
    return docs


def test_openwebtext_local_jsonl_keyword_filter(tmp_path):
    docs = write_jsonl(tmp_path / "docs.jsonl")
    env = {"HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "1"}
    a, b = tmp_path / "a", tmp_path / "b"
    prepare("openwebtext", a, "--data_files=docs.jsonl", "--tokenizer=byte", "--val_frac=0.2", env=env)
    prepare_in_process("openwebtext", b, f"--data_files={tmp_path / 'docs.jsonl'}", "--tokenizer=byte",
                       "--val_frac=0.2")
    assert folder_bytes(a) == folder_bytes(b)
    texts = [t for s in ("train", "val") for t, _ in decoded_records(a, s)]
    expected = [d for i, d in enumerate(docs) if i % 3 == 0]
    assert sorted(texts) == sorted(expected)
    meta = load_meta(a)
    assert meta["documents_scanned"] == 60 and meta["documents_kept"] == 20


def test_openwebtext_token_budget_and_offline_hub(tmp_path):
    write_jsonl(tmp_path / "docs.jsonl")
    env = {"HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "1"}
    out = tmp_path / "budget"
    prepare_in_process("openwebtext", out, f"--data_files={tmp_path / 'docs.jsonl'}", "--tokenizer=byte",
                       "--max_tokens=1000", "--keywords=")
    assert 999 <= sum(s["tokens"] for s in load_meta(out)["splits"].values()) <= 1000  # the last doc is cut
    proc = prepare("openwebtext", tmp_path / "hub", "--dataset=nobody/not-a-dataset", check=False, env=env)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr
    assert "Hugging Face hub" in proc.stderr and "--data_files" in proc.stderr
    assert not (tmp_path / "hub").exists()


def test_encode_record_spans_and_budget():
    tok = ByteTokenizer()
    ids, mask = encode_record("Q: x? Answer: 12\n", tok, [(13, 17)])
    assert ids[-1] == tok.eot and len(ids) == len(mask) == 18
    assert bytes(i for i, m in zip(ids, mask) if m) == b" 12\n"
    recs = [encode_record("abcd", tok), encode_record("efghij", tok)]
    cut = take_tokens(iter(recs), 8, tok.eot)
    assert sum(len(r) for r, _ in cut) == 8 and cut[1][0] == list(b"ef") + [tok.eot]
    assert take_tokens(iter(recs), 0, tok.eot) == recs


# ----------------------------------------------------------------------------------------- records (your own)
VISITS_CSV = ("patient_id,ward,drug,note\n"
              "p1,cardio,aspirin,chest pain\n"
              "p2,neuro,none,headache\n"
              "p1,cardio,statin,follow-up\n"  # p1 again: another drug, same ward
              "p3,ortho,ibuprofen,\n"
              "p4,neuro,none,dizzy\n"
              "p5,cardio,aspirin,\n")


def test_records_csv_one_record_per_person_deterministic(tmp_path):
    src = tmp_path / "visits.csv"
    src.write_text(VISITS_CSV)
    args = (f"--input={src}", "--person_column=patient_id", "--fields=ward,drug", "--text_column=note",
            "--tokenizer=byte", "--val_frac=0.2", "--canary_reps=2,", "--canaries_per_rep=1", "--n_control_canaries=1")
    a, b = tmp_path / "a", tmp_path / "b"
    proc = prepare("records", a, *args)
    prepare_in_process("records", b, *args)
    assert folder_bytes(a) == folder_bytes(b)
    assert "6 rows, 5 people" in proc.stdout
    meta = load_meta(a)
    assert meta["schema"]["person_field"] == "patient_id" and meta["schema"]["sensitive"] == ["ward", "drug"]
    assert meta["people"] == {"train": 4, "val": 1} and meta["rows"] == 6
    rows = people(a, "train") + people(a, "val")
    real = [p for p in rows if "Phone" not in p]
    assert sorted(p["patient_id"] for p in real) == ["p1", "p2", "p3", "p4", "p5"]  # p1's two rows: one record
    p1 = next(p for p in real if p["patient_id"] == "p1")
    assert p1["ward"] == "cardio" and p1["drug"] == ["aspirin", "statin"] and p1["note"] == ["chest pain", "follow-up"]
    texts = [t for s in ("train", "val") for t, _ in decoded_records(a, s)]
    (p1_text,) = [t for t in texts if "Context: p1." in t]
    assert "Answer: aspirin; statin\n" in p1_text and p1_text.endswith("chest pain\nfollow-up\n")
    assert meta["source_sha256"] == hashlib.sha256(src.read_bytes()).hexdigest()
    canaries = json.loads((a / "canaries.json").read_text())["canaries"]
    assert sum(c["secret"] in t for c in canaries for t in texts) == 2  # the canary inserted twice, the control never


@pytest.mark.parametrize("extra, message", [
    (["--person_column=who"], "no column(s) ['who']; its columns are patient_id, ward, drug, note"),
    (["--sensitive=dose"], "--sensitive ['dose'] are not among --fields"),
    (["--fields=patient_id"], "cannot be fields"),
    (["--input=visits.txt"], ".csv or .jsonl"),
    (["--person_column="], "--person_column COL is required"),
    (["--field_order=sorted"], "--field_order must be 'random' or 'schema'"),
])
def test_records_bad_input_one_line_error_before_writing(tmp_path, extra, message):
    (tmp_path / "visits.csv").write_text(VISITS_CSV)
    out = tmp_path / "out"
    base = ["--input=visits.csv", "--person_column=patient_id", "--fields=ward,drug", "--tokenizer=byte"]
    proc = prepare("records", out, *base, *extra, check=False)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr
    assert message in proc.stderr
    assert not out.exists()


def test_records_jsonl_malformed_line_named(tmp_path):
    src = tmp_path / "p.jsonl"
    src.write_text('{"name": "a", "x": 1}\nnot json\n')
    with pytest.raises(UserError, match="line 2 is not JSON"):
        load_script("records").main([f"--input={src}", "--person_column=name", "--fields=x", f"--out_dir={tmp_path / 'o'}"])
    assert not (tmp_path / "o").exists()


def test_readme_own_records_flow_fits_the_block(tmp_path):
    """The README's "Use your own records" commands on the shipped example: two fields fit the 256 block of
    config/train_pydocs.py; the third is refused (the README says so)."""
    import runpy
    block = runpy.run_path(os.path.join(REPO, "config", "train_pydocs.py"))["block_size"]
    example = os.path.join(REPO, "data", "records", "example_patients.csv")
    args = [f"--input={example}", "--person_column=name", "--sensitive=diagnosis,medication", "--tokenizer=byte"]
    prepare_in_process("records", tmp_path / "two", *args, "--fields=diagnosis,medication")
    for split in ("train", "val"):
        assert RecordDataset(str(tmp_path / "two"), split, block).check_fit() == 0
    prepare_in_process("records", tmp_path / "three", *args, "--fields=diagnosis,medication,doctor")
    with pytest.raises(UserError, match="longer than block_size"):
        RecordDataset(str(tmp_path / "three"), "train", block).check_fit()
