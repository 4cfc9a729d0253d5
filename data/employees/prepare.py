"""
Employee-salary Q/A records (City of Chicago schema), synthetic by default or from a real CSV, with
planted canary secrets for leakage tests.

    python data/employees/prepare.py --tokenizer byte
    python data/employees/prepare.py --csv Current_Employee_Names_Salaries.csv --n_people 0
    python data/employees/prepare.py --tokenizer byte --fields "Job Titles,Annual Salary" --canary_reps 1,4,16

One person = one record = the privacy unit; the train/val split is by person (nobody is in both).
Every record is the person's Q/A examples (utils/employees.py), and the answer mask marks the answers
(" " + answer + "\\n") so fine-tuning with loss_on='answer' learns only those.

Canaries: extra people with a random-digit Phone secret. A canary with repetitions k is inserted as k
identical train records, so for DP it is a group of k records: (eps, delta)-DP per record gives it only
(k*eps, k*e^((k-1)*eps)*delta). Controls (repetitions 0) are drawn the same way and never inserted.
canaries.json lists them all with the exact text the model sees before each secret.

Writes {train,val}.bin, _offsets.bin, _answer_mask.bin, {train,val}_people.jsonl (one JSON object per
record, in record order), canaries.json and meta.json. Same arguments -> byte-identical files.
With --csv, names are replaced by deterministic pseudonyms unless --keep_names; an empty Annual Salary
is hourly rate x typical hours x 52; n_people keeps a deterministic sample of rows (0 = every row).
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
                             generate_people, name_capacity, random_secret, render_examples, unique_names)
from utils.prepare import describe, sha256_hex, split_train_val, write_records
from utils.tokenizer import get_tokenizer

DEFAULTS = dict(
    out_dir=os.path.dirname(os.path.abspath(__file__)),
    n_people=1000,                  # synthetic people; with --csv the rows kept (0 = all)
    val_frac=0.1,                   # fraction of people in val
    seed=1337,
    tokenizer="gpt2",               # 'gpt2' or 'byte'
    fields=tuple(FIELDS),           # schema fields each record asks about (fewer = shorter records)
    templates=tuple(range(N_TEMPLATES)),  # question templates drawn for training (hold some out for robustness tests)
    canary_reps=(1, 2, 4, 8, 16),   # each inserted canary appears this many times in train
    canaries_per_rep=2,
    n_control_canaries=10,          # drawn like canaries, never inserted
    secret_format=SECRET_FORMAT,    # '#' = a random digit
    csv="",                         # a City of Chicago employee-salary CSV instead of synthetic people
    keep_names=False,               # --csv: keep real names (else deterministic pseudonyms)
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
    try:
        with open(path, "rb") as f:
            data = f.read()
        text = data.decode("utf-8-sig")
    except OSError as e:
        raise UserError(f"cannot read CSV {path}: {e.strerror or e}") from None
    except UnicodeDecodeError:
        raise UserError(f"CSV {path} is not UTF-8 text") from None
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


def csv_people(cfg, rng):
    people, data = read_chicago_csv(cfg["csv"])
    if 0 < cfg["n_people"] < len(people):
        keep = sorted(rng.sample(range(len(people)), cfg["n_people"]))
        people = [people[i] for i in keep]
    if not cfg["keep_names"]:  # one pseudonym per distinct real name, in order of appearance
        real = list(dict.fromkeys(p["Name"] for p in people))
        if len(real) > name_capacity() // 2:
            raise UserError(f"{len(real)} distinct names are too many to pseudonymize; use --keep_names or --n_people")
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
    if not cfg["templates"] or any(not isinstance(t, int) or not 0 <= t < N_TEMPLATES for t in cfg["templates"]):
        raise UserError(f"--templates must be indices in 0..{N_TEMPLATES - 1}, got {cfg['templates']}")
    if any(not isinstance(k, int) or k < 0 for k in cfg["canary_reps"]):
        raise UserError(f"--canary_reps must be non-negative integers, got {cfg['canary_reps']}")
    if cfg["canaries_per_rep"] < 0 or cfg["n_control_canaries"] < 0:
        raise UserError("--canaries_per_rep and --n_control_canaries must be >= 0")
    if "#" not in cfg["secret_format"]:
        raise UserError(f"--secret_format needs at least one '#' (a random digit), got {cfg['secret_format']!r}")
    if cfg["n_people"] < (0 if cfg["csv"] else 2):
        raise UserError(f"--n_people must be at least 2, got {cfg['n_people']}")


def make_canaries(cfg, rng, taken):
    """[(repetitions, person with a Phone secret)]: canaries_per_rep per entry of canary_reps, then controls."""
    reps = [k for k in cfg["canary_reps"] for _ in range(cfg["canaries_per_rep"])] + [0] * cfg["n_control_canaries"]
    n_secrets = 10 ** cfg["secret_format"].count("#")
    if len(reps) > n_secrets // 2:
        raise UserError(f"--secret_format {cfg['secret_format']!r} has too few values for {len(reps)} distinct secrets")
    people = generate_people(rng, len(reps), taken)
    secrets = set()
    for person in people:
        secret = random_secret(rng, cfg["secret_format"])
        while secret in secrets:
            secret = random_secret(rng, cfg["secret_format"])
        secrets.add(secret)
        person[CANARY_FIELD] = secret
    return list(zip(reps, people))


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
    canaries = make_canaries(cfg, random.Random(f"canaries:{seed}"), {p["Name"] for p in people})
    train_names, val_names = split_train_val(dict.fromkeys(p["Name"] for p in people), cfg["val_frac"], seed)
    by_name = {}
    for p in people:  # rows sharing a name (a real CSV has some) stay in one split
        by_name.setdefault(p["Name"], []).append(p)

    template_rng = random.Random(f"templates:{seed}")

    def record(person):  # (person, text, answer spans)
        text, examples = render_examples(person, template_rng, cfg["fields"], cfg["templates"])
        return person, text, [(a, b) for _, _, a, b in examples]

    records = {split: [record(p) for name in names for p in by_name[name]]
               for split, names in (("train", train_names), ("val", val_names))}
    canary_list = []
    for i, (reps, p) in enumerate(canaries):
        _, text, spans = rec = record(p)
        records["train"] += [rec] * reps
        canary_list.append({"id": f"canary-{i:03d}", "name": p["Name"],
                            "prefix": text[:spans[0][0] + 1],  # Phone comes first; its span starts at the space
                            "secret": p[CANARY_FIELD], "repetitions": reps, "split": "train"})
    random.Random(f"order:{seed}").shuffle(records["train"])  # scatter the canary copies

    canaries_json = {
        "secret_format": cfg["secret_format"], "field": CANARY_FIELD,
        "note": "prefix is the exact record text before the secret (it starts the record); a canary with "
                "repetitions k is k identical train records, a group of k for DP; repetitions 0 = control, "
                "never inserted",
        "canaries": canary_list,
    }
    extra_files = {f"{split}_people.jsonl": "".join(json.dumps(p) + "\n" for p, _, _ in recs).encode()
                   for split, recs in records.items()}
    extra_files["canaries.json"] = (json.dumps(canaries_json, indent=2) + "\n").encode()
    extra_meta = {
        "seed": seed, "source": os.path.basename(cfg["csv"]) if cfg["csv"] else "synthetic",
        "source_sha256": source_sha256, "fields": list(cfg["fields"]), "n_templates": N_TEMPLATES,
        "templates": list(cfg["templates"]), "schema": SCHEMA.select(cfg["fields"]).to_json(),
        "people": {"train": len(train_names), "val": len(val_names)},
        "canaries": {"field": CANARY_FIELD, "secret_format": cfg["secret_format"],
                     "canary_reps": list(cfg["canary_reps"]), "canaries_per_rep": cfg["canaries_per_rep"],
                     "n_control_canaries": cfg["n_control_canaries"],
                     "inserted_records": sum(reps for reps, _ in canaries)},
    }
    meta = write_records(cfg["out_dir"], {s: [t for _, t, _ in r] for s, r in records.items()}, tokenizer,
                         extra_meta, answer_spans={s: [a for _, _, a in r] for s, r in records.items()},
                         extra_files=extra_files)
    print(describe(cfg["out_dir"], meta))
    print(f"people: {len(train_names)} train / {len(val_names)} val; canaries: "
          f"{sum(1 for r, _ in canaries if r)} inserted ({extra_meta['canaries']['inserted_records']} records), "
          f"{sum(1 for r, _ in canaries if not r)} controls; longest record "
          f"{max(v['max_record_tokens'] for v in meta['splits'].values())} tokens")
    return meta


if __name__ == "__main__":
    run_cli(main)
