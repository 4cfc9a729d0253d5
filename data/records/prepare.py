"""
Your own records of people, from a CSV or JSONL file, as Q/A records with canaries: the same contract
as data/employees (utils/records.py), with a schema built from your columns.

    python data/records/prepare.py --input data/records/example_patients.csv --person_column name
        --fields diagnosis,medication --sensitive diagnosis,medication --tokenizer byte --out_dir data/patients
    python data/records/prepare.py --input visits.jsonl --person_column patient_id --fields ward,drug
        --text_column note --out_dir data/visits          (each command on one line)

One person = one record = the privacy unit. Every row of a person (the same --person_column value) goes
into that person's one record: a field on which the rows agree keeps its value, one on which they
differ keeps all the distinct values ("a; b", in row order), never two records. The train/val split is
by person. Each chosen field is asked as "Context: <person>. Question: ... Answer: <value>" with
paraphrased questions derived from the field's name (utils/records.derived_questions); --text_column
adds the person's free text (one line per row) after the Q/A lines, with no answer span. --sensitive
names the fields the leakage test tries to extract (default: all of them). Canaries are made-up people
with a random-digit phone secret, planted canary_reps times as data/employees does; a canary inserted k
times is k records, a group of k for DP. Person values are used as written (names are not replaced).

Every row and column is checked before anything is written; --max_people keeps a deterministic sample
of people (printed). Writes what utils/data.py describes, {split}_people.jsonl, canaries.json and
meta.json with the schema. Same arguments -> byte-identical files.
The seed is a reproducible mode: whoever knows it recomputes the split and the canary secrets, so
canaries measure memorization and are no secret from such an adversary; the DP guarantee rests on the
fine-tune's noise and sampling only, which must not run with a fixed seed to count.
"""
import csv
import io
import json
import os
import random

from configurator import configure
from utils.cli import UserError, run_cli
from utils.employees import unique_names
from utils.prepare import (check_canary_config, check_field_order, make_canaries, read_source, sha256_hex,
                           write_people)
from utils.progress import Progress
from utils.records import CANARY_FIELD, CANARY_QUESTIONS, N_TEMPLATES, Schema, derived_questions
from utils.tokenizer import get_tokenizer

DEFAULTS = dict(
    input="",                       # a .csv (with a header) or .jsonl (one JSON object per line) file
    person_column="",               # the column naming the person: all rows with one value = one record
    fields=(),                      # columns each record asks about (fewer = shorter records)
    sensitive=(),                   # fields the leakage test extracts (default: every field)
    text_column="",                 # optional column of free text added to the person's record
    out_dir=os.path.dirname(os.path.abspath(__file__)),  # where the prepared dataset is written
    tokenizer="gpt2",               # 'gpt2' or 'byte'
    val_frac=0.1,                   # fraction of people in val
    max_people=0,                   # keep a deterministic sample of this many people (0 = all)
    seed=1337,                      # split, sample, canaries and field order (same seed -> same files)
    templates=tuple(range(N_TEMPLATES)),  # question templates drawn for training (hold some out for robustness tests)
    field_order="random",           # 'random': fields shuffled per record (probes ask at any position); 'schema': schema order
    canary_reps=(1, 2, 4, 8, 16),   # each inserted canary appears this many times in train
    canaries_per_rep=2,             # canaries per entry of canary_reps
    n_control_canaries=10,          # drawn like canaries, never inserted
    secret_format="###-####",       # '#' = a random digit
)


def check_config(cfg):
    """Refuse bad arguments before the input is read."""
    for key in ("fields", "sensitive"):
        cfg[key] = tuple(dict.fromkeys(f.strip() for f in cfg[key] if f.strip()))
    if not cfg["input"]:
        raise UserError("--input FILE (.csv or .jsonl) is required")
    if not cfg["input"].lower().endswith((".csv", ".jsonl")):
        raise UserError(f"--input must be a .csv or .jsonl file, got {cfg['input']!r}")
    if not os.path.isfile(cfg["input"]):
        raise UserError(f"--input {cfg['input']} does not exist")
    if not cfg["person_column"]:
        raise UserError("--person_column COL is required (the column naming the person)")
    if not cfg["fields"]:
        raise UserError("--fields a,b,c is required (the columns each record asks about)")
    named = [cfg["person_column"]] + ([cfg["text_column"]] if cfg["text_column"] else [])
    clash = [f for f in cfg["fields"] if f in named]
    if clash:
        raise UserError(f"--fields {clash}: the person column and the text column cannot be fields")
    stray = [f for f in cfg["sensitive"] if f not in cfg["fields"]]
    if stray:
        raise UserError(f"--sensitive {stray} are not among --fields {list(cfg['fields'])}")
    if cfg["tokenizer"] not in ("gpt2", "byte"):
        raise UserError(f"--tokenizer must be 'gpt2' or 'byte', got {cfg['tokenizer']!r}")
    if cfg["max_people"] < 0:
        raise UserError(f"--max_people must be >= 0, got {cfg['max_people']}")
    check_field_order(cfg["field_order"])
    if not cfg["templates"] or any(not isinstance(t, int) or not 0 <= t < N_TEMPLATES for t in cfg["templates"]):
        raise UserError(f"--templates must be indices in 0..{N_TEMPLATES - 1}, got {cfg['templates']}")
    check_canary_config(cfg)


def read_rows(path):
    """(rows as {column: value or None}, columns, the file's bytes). Unreadable or malformed input is a
    UserError naming the line."""
    data, text = read_source(path, "--input")
    if path.lower().endswith(".csv"):
        reader = csv.reader(io.StringIO(text, newline=""))
        try:
            table = [row for row in reader if any(cell.strip() for cell in row)]
        except csv.Error as e:
            raise UserError(f"{path} is malformed near line {reader.line_num}: {e}") from None
        if len(table) < 2:
            raise UserError(f"{path} needs a header and at least one row")
        columns = [c.strip() for c in table[0]]
        rows = []
        for i, row in enumerate(table[1:], start=2):
            if len(row) != len(columns):
                raise UserError(f"{path} row {i} has {len(row)} fields, the header has {len(columns)}")
            rows.append({c: (v.strip() or None) for c, v in zip(columns, row)})
        return rows, columns, data
    rows, columns = [], {}
    for i, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise UserError(f"{path} line {i} is not JSON: {e.msg}") from None
        if not isinstance(obj, dict):
            raise UserError(f"{path} line {i} is not a JSON object")
        row = {}
        for k, v in obj.items():
            if isinstance(v, (dict, list)):
                v = json.dumps(v, ensure_ascii=False)
            elif isinstance(v, str):
                v = v.strip() or None
            row[str(k)] = v
        rows.append(row)
        columns.update(dict.fromkeys(row))
    if not rows:
        raise UserError(f"{path} has no JSON lines")
    return rows, list(columns), data


def group_people(rows, cfg):
    """One person per distinct person_column value (first-appearance order); a field keeps its value
    where the rows agree and the list of distinct values where they differ; the text column keeps
    every row's text."""
    person_col, text_col = cfg["person_column"], cfg["text_column"]
    by_person = {}
    progress = Progress("read rows", len(rows), hint="--max_people (after reading) or a smaller --input")
    for i, row in enumerate(progress.track(rows), start=1):
        who = row.get(person_col)
        if who is None or str(who).strip() == "":
            raise UserError(f"{cfg['input']} row {i}: empty {person_col}")
        by_person.setdefault(str(who).strip(), []).append(row)
    people = []
    for who, same in by_person.items():
        person = {person_col: who}
        for field in cfg["fields"] + ((text_col,) if text_col else ()):
            values = [r.get(field) for r in same if r.get(field) is not None]
            if field != text_col:
                values = list(dict.fromkeys(values))
            person[field] = None if not values else values[0] if len(values) == 1 else values
        people.append(person)
    return people


def is_number(value):
    if isinstance(value, bool):
        return False
    if isinstance(value, (int, float)):
        return True
    try:
        float(str(value).replace(",", ""))
        return True
    except ValueError:
        return False


def build_schema(cfg, people):
    """The schema: questions derived from each field's name; a field is numeric when every value is a
    number, else categorical; the canary field is Phone (or 'canary phone' if Phone is one of yours)."""
    fields = list(cfg["fields"])
    values = {f: [v for p in people for v in (p[f] if isinstance(p[f], list) else [p[f]]) if v is not None]
              for f in fields}
    numeric = [f for f in fields if values[f] and all(is_number(v) for v in values[f])]
    taken = set(fields) | {cfg["person_column"], cfg["text_column"]}
    canary_field = CANARY_FIELD if CANARY_FIELD not in taken else "canary phone"
    questions = {f: derived_questions(f) for f in fields}
    questions[canary_field] = CANARY_QUESTIONS
    return Schema(cfg["person_column"], fields, questions, sensitive=list(cfg["sensitive"] or fields),
                  categorical=[f for f in fields if f not in numeric], numeric=numeric, canary_field=canary_field,
                  canary_template=0, text_field=cfg["text_column"] or None)


def main(argv=None):
    cfg = configure(DEFAULTS, argv or [])
    check_config(cfg)
    rows, columns, data = read_rows(cfg["input"])
    wanted = [cfg["person_column"], *cfg["fields"]] + ([cfg["text_column"]] if cfg["text_column"] else [])
    missing = [c for c in wanted if c not in columns]
    if missing:
        raise UserError(f"{cfg['input']} has no column(s) {missing}; its columns are {', '.join(columns)}")
    tokenizer = get_tokenizer(cfg["tokenizer"])
    people = group_people(rows, cfg)
    absent = [f for f in cfg["fields"] if all(p[f] is None for p in people)]
    if absent:
        raise UserError(f"field(s) {absent} are empty in every row of {cfg['input']}")
    print(f"{cfg['input']}: {len(rows)} rows, {len(people)} people "
          f"({sum(any(isinstance(p[f], list) for f in cfg['fields']) for p in people)} with differing values "
          f"across their rows, all kept in their one record)")
    seed = cfg["seed"]
    if 0 < cfg["max_people"] < len(people):
        keep = sorted(random.Random(f"people:{seed}").sample(range(len(people)), cfg["max_people"]))
        people = [people[i] for i in keep]
        print(f"--max_people={cfg['max_people']}: keeping a deterministic sample of {len(people)} people")
    schema = build_schema(cfg, people)
    canary_rng = random.Random(f"canaries:{seed}")
    taken = {schema.name(p) for p in people}
    canaries = make_canaries(cfg, canary_rng, lambda n: [{schema.person_field: name}
                                                          for name in unique_names(canary_rng, n, taken)],
                             schema.canary_field)
    extra_meta = {"seed": seed, "source": os.path.basename(cfg["input"]), "source_sha256": sha256_hex(data),
                  "rows": len(rows)}
    return write_people(cfg["out_dir"], schema, people, canaries, tokenizer, cfg, extra_meta)


if __name__ == "__main__":
    run_cli(main)
