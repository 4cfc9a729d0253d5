"""
Employee-salary Q/A records (City of Chicago schema), synthetic by default or from a real CSV, with
planted canary secrets for leakage tests.

    python data/employees/prepare.py --tokenizer byte
    python data/employees/prepare.py --csv Current_Employee_Names_Salaries.csv       # every row
    python data/employees/prepare.py --tokenizer byte --fields "Job Titles,Annual Salary" --canary_reps 1,4,16

One person = one record = the privacy unit; the train/val split is by person (nobody is in both). A real
CSV has people with several rows (the same name; some with conflicting salaries): their rows become one
person, whose differing values are all in the one record (utils/records.py), never two records.

Records that fit: the default asks two fields (Department, Annual Salary): a byte-level record is at
most ~245 tokens and fits the README's 256-token block; one field fits a 128 block (demo, reproduce).
All seven fields make byte records of up to ~800 tokens: use them with BPE (--tokenizer gpt2) and a
1024 block, or finetune refuses them.
Every record is the person's Q/A examples (utils/employees.py), and the answer mask marks the answers
(" " + answer + "\\n") so fine-tuning with loss_on='answer' learns only those.

Canaries: extra people with a random-digit Phone secret; a canary's record is its Phone line alone (so
it fits wherever the people's records fit). A canary with repetitions k is inserted as k
identical train records, so for DP it is a group of k records: (eps, delta)-DP per record gives it only
(k*eps, k*e^((k-1)*eps)*delta). Controls (repetitions 0) are drawn the same way and never inserted.
canaries.json lists them all with the exact text the model sees before each secret.

Writes {train,val}.bin, _offsets.bin, _answer_mask.bin, {train,val}_people.jsonl (one JSON object per
record, in record order), canaries.json and meta.json. Same arguments -> byte-identical files.
The seed is a reproducible mode: whoever knows it recomputes the split and the canary secrets, so
canaries measure memorization and are no secret from such an adversary; the DP guarantee rests on the
fine-tune's noise and sampling only, which must not run with a fixed seed to count.
With --csv, names are replaced by deterministic pseudonyms unless --keep_names; an empty Annual Salary
is hourly rate x typical hours x 52; every person is kept unless --csv_people N asks for a deterministic
sample of N people (printed).
meta.json's source_sha256 is the sha256 of the CSV's bytes, or of the synthetic people as JSON lines.
"""
import csv
import io
import json
import os
import random

from configurator import configure
from utils.cli import UserError, run_cli
from utils.employees import (CANARY_FIELD, FIELDS, MONEY_FIELDS, N_TEMPLATES, SCHEMA, SECRET_FORMAT, complete,
                             generate_people, name_capacity, unique_names)
from utils.prepare import (check_canary_config, check_field_order, make_canaries, read_source, sha256_hex,
                           write_people)
from utils.tokenizer import get_tokenizer

DEFAULTS = dict(
    out_dir=os.path.dirname(os.path.abspath(__file__)),  # where train.bin, val.bin and meta.json go (this folder)
    n_people=1000,                  # synthetic people (not used with --csv)
    val_frac=0.1,                   # fraction of people in val
    seed=1337,                      # seeds the people, the split and the canaries: rerun = same dataset
    tokenizer="gpt2",               # 'gpt2' or 'byte'
    fields=("Department", "Annual Salary"),  # schema fields each record asks about (all 7 need BPE and a 1024 block)
    templates=tuple(range(N_TEMPLATES)),  # question templates drawn for training (hold some out for robustness tests)
    field_order="random",           # 'random': fields shuffled per record (probes ask at any position); 'schema': schema order
    canary_reps=(1, 2, 4, 8, 16),   # each inserted canary appears this many times in train
    canaries_per_rep=2,             # distinct canaries at each repetition count
    n_control_canaries=10,          # drawn like canaries, never inserted
    secret_format=SECRET_FORMAT,    # '#' = a random digit
    csv="",                         # a City of Chicago employee-salary CSV instead of synthetic people
    keep_names=False,               # --csv: keep real names (else deterministic pseudonyms)
    csv_people=0,                   # --csv: keep a deterministic sample of this many people (0 = every row)
)


def parse_number(text, column, where):
    text = text.strip().replace("$", "").replace(",", "")
    if not text:
        return None
    try:
        value = float(text)
    except ValueError:
        raise UserError(f"{where}: {column} is not a number: {text!r}") from None
    return int(value) if column == "Typical Hours" and value.is_integer() else value


def display_name(raw):
    """'LOPEZ,  MARIA J' (the CSV's form) -> 'Maria J Lopez'."""
    name = " ".join(raw.split())
    if "," in name:
        last, first = (part.strip() for part in name.split(",", 1))
        name = f"{first} {last}".strip()
    return name.title() if name.isupper() else name


def read_chicago_csv(path):
    """(people with the CSV's names, the file's bytes). Any unreadable or malformed input is a UserError."""
    data, text = read_source(path, "CSV")
    reader = csv.reader(io.StringIO(text, newline=""))
    try:
        rows = list(reader)
    except csv.Error as e:
        raise UserError(f"CSV {path} is malformed near line {reader.line_num}: {e}") from None
    if not rows:
        raise UserError(f"CSV {path} is empty")
    header = [h.strip().lower() for h in rows[0]]
    columns = ["Name"] + FIELDS
    missing = [c for c in columns if c.lower() not in header]
    if missing:
        raise UserError(f"CSV {path} lacks column(s) {', '.join(missing)}; the Chicago employee-salary columns are "
                        f"{', '.join(columns)}")
    index = {c: header.index(c.lower()) for c in columns}
    people = []
    for line, row in enumerate(rows[1:], start=2):
        where = f"{path} line {line}"
        if not any(cell.strip() for cell in row):
            continue
        if len(row) != len(header):
            raise UserError(f"{where} has {len(row)} fields, the header has {len(header)}")
        cell = {c: row[i].strip() for c, i in index.items()}
        if not cell["Name"]:
            raise UserError(f"{where}: empty Name")
        person = {"Name": display_name(cell["Name"])}
        for column in FIELDS:
            if column in MONEY_FIELDS or column == "Typical Hours":
                person[column] = parse_number(cell[column], column, where)
            else:
                person[column] = cell[column] or None
        pay, full_part = person["Salary or Hourly"], person["Full or Part-Time"]
        if pay is not None and pay.title() not in ("Salary", "Hourly"):
            raise UserError(f"{where}: Salary or Hourly must be 'Salary' or 'Hourly', got {pay!r}")
        if full_part is not None and full_part.upper() not in ("F", "P"):
            raise UserError(f"{where}: Full or Part-Time must be 'F' or 'P', got {full_part!r}")
        person["Salary or Hourly"] = pay and pay.title()
        person["Full or Part-Time"] = full_part and full_part.upper()
        people.append(complete(person))
    if not people:
        raise UserError(f"CSV {path} has a header but no rows")
    return people, data


def group_rows(rows):
    """One person per distinct name, in order of first appearance: a field the rows agree on keeps its
    value, one where they differ keeps all its distinct values as a list (in row order)."""
    by_name = {}
    for row in rows:
        by_name.setdefault(row["Name"], []).append(row)
    people = []
    for name, same in by_name.items():
        person = {"Name": name}
        for field in FIELDS:
            values = list(dict.fromkeys(r[field] for r in same if r[field] is not None))
            person[field] = None if not values else values[0] if len(values) == 1 else values
        people.append(person)
    return people


def csv_people(cfg, rng):
    rows, data = read_chicago_csv(cfg["csv"])
    people = group_rows(rows)
    print(f"{cfg['csv']}: {len(rows)} rows, {len(people)} people ({len(rows) - len(people)} extra rows of people "
          f"with several rows, each kept in its person's one record)")
    if 0 < cfg["csv_people"] < len(people):
        keep = sorted(rng.sample(range(len(people)), cfg["csv_people"]))
        people = [people[i] for i in keep]
        print(f"--csv_people={cfg['csv_people']}: keeping a deterministic sample of {len(people)} people")
    if not cfg["keep_names"]:  # one pseudonym per distinct real name, in order of appearance
        real = [p["Name"] for p in people]
        if len(real) > name_capacity() // 2:
            raise UserError(f"{len(real)} distinct names are too many to pseudonymize; "
                            f"use --keep_names or --csv_people")
        alias = dict(zip(real, unique_names(rng, len(real), taken=real)))  # no alias is a real name here
        people = [{**p, "Name": alias[p["Name"]]} for p in people]
    return people, sha256_hex(data)


def check_config(cfg):
    """Refuse bad arguments before anything is read or written; normalize fields."""
    cfg["fields"] = tuple(f.strip() for f in cfg["fields"])
    if cfg["tokenizer"] not in ("gpt2", "byte"):
        raise UserError(f"--tokenizer must be 'gpt2' or 'byte', got {cfg['tokenizer']!r}")
    unknown = [f for f in cfg["fields"] if f not in FIELDS]
    if unknown or not cfg["fields"]:
        raise UserError(f"--fields: unknown or no field(s) {unknown}; valid fields: {', '.join(FIELDS)}")
    cfg["fields"] = tuple(f for f in FIELDS if f in cfg["fields"])  # records ask in schema order
    check_field_order(cfg["field_order"])
    if not cfg["templates"] or any(not isinstance(t, int) or not 0 <= t < N_TEMPLATES for t in cfg["templates"]):
        raise UserError(f"--templates must be indices in 0..{N_TEMPLATES - 1}, got {cfg['templates']}")
    check_canary_config(cfg)
    if not cfg["csv"] and cfg["n_people"] < 2:
        raise UserError(f"--n_people must be at least 2, got {cfg['n_people']}")
    if cfg["csv_people"] < 0 or (cfg["csv_people"] and not cfg["csv"]):
        raise UserError(f"--csv_people must be >= 0 and needs --csv, got {cfg['csv_people']}")


def load_people(cfg):
    """(people, source_sha256): the CSV's rows, or synthetic people, both deterministic for the seed."""
    rng = random.Random(f"people:{cfg['seed']}")
    if cfg["csv"]:
        return csv_people(cfg, rng)
    people = generate_people(rng, cfg["n_people"])
    return people, sha256_hex("".join(json.dumps(p) + "\n" for p in people))


def main(argv=None):
    cfg = configure(DEFAULTS, argv or [])
    check_config(cfg)
    tokenizer = get_tokenizer(cfg["tokenizer"])
    seed = cfg["seed"]
    people, source_sha256 = load_people(cfg)
    canary_rng = random.Random(f"canaries:{seed}")
    taken = {p["Name"] for p in people}
    # made-up people (drawn like the others, so the seeds' secrets stay the same) who hold only a phone secret
    canaries = make_canaries(cfg, canary_rng, lambda n: [{"Name": p["Name"]}
                                                          for p in generate_people(canary_rng, n, taken)], CANARY_FIELD)
    extra_meta = {"seed": seed, "source": os.path.basename(cfg["csv"]) if cfg["csv"] else "synthetic",
                  "source_sha256": source_sha256}
    return write_people(cfg["out_dir"], SCHEMA.select(cfg["fields"]), people, canaries, tokenizer, cfg, extra_meta)


if __name__ == "__main__":
    run_cli(main)
