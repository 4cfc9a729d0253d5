"""What every data/<name>/prepare.py shares: split documents (privacy units) into train/val, tokenize
them into records, keep a token budget, and write the splits + meta.json in the shared data contract
(utils/data.py), with meta.json written last so a half-finished run never looks prepared. For datasets
of people (employees, records): plant canaries and write one record per person with write_people."""
import hashlib
import json
import os
import random

from utils.atomic import write_bytes
from utils.cli import UserError
from utils.data import token_dtype, write_meta, write_split
from utils.progress import Progress


def sha256_hex(data):
    return hashlib.sha256(data.encode() if isinstance(data, str) else data).hexdigest()


def read_source(path, what="file"):
    """(the file's bytes, its UTF-8 text): what every prepare script reads its input with. Unreadable or
    non-UTF-8 input is a one-line UserError naming `what` and the path."""
    try:
        with open(path, "rb") as f:
            data = f.read()
        return data, data.decode("utf-8-sig")
    except OSError as e:
        raise UserError(f"cannot read {what} {path}: {e.strerror or e}") from None
    except UnicodeDecodeError:
        raise UserError(f"{what} {path} is not UTF-8 text") from None


def split_train_val(units, val_frac, seed):
    """Shuffle units (people, documents) with `seed` and cut off the first val_frac of them as val.
    Each unit lands in exactly one split. Both splits must be non-empty."""
    if not 0.0 < val_frac < 1.0:
        raise UserError(f"val_frac must be between 0 and 1 (exclusive), got {val_frac}")
    units = list(units)
    random.Random(f"split:{seed}").shuffle(units)
    n_val = max(1, round(len(units) * val_frac))
    if n_val >= len(units):
        raise UserError(f"{len(units)} documents/people are too few to split with val_frac={val_frac}")
    return units[n_val:], units[:n_val]


def encode_record(text, tokenizer, answer_spans=None):
    """(token ids ending in end-of-text, answer mask or None). With answer_spans [(start, end), ...]
    (character offsets), the text is cut at every span edge and each piece is encoded on its own, so no
    token straddles a prompt/answer boundary: the answer tokens are exactly those a model produces when
    it completes the prompt text alone."""
    if answer_spans is None:
        return tokenizer.encode(text) + [tokenizer.eot], None
    ids, mask, pos = [], [], 0
    for start, end in answer_spans:
        for piece, flag in ((text[pos:start], 0), (text[start:end], 1)):
            piece_ids = tokenizer.encode(piece)
            ids += piece_ids
            mask += [flag] * len(piece_ids)
        pos = end
    tail = tokenizer.encode(text[pos:])
    return ids + tail + [tokenizer.eot], mask + [0] * (len(tail) + 1)


def take_tokens(encoded_records, max_tokens, eot):
    """Records from an iterable of (ids, mask) until max_tokens (0 = no limit); the last record is cut
    (keeping its end-of-text token) so the total is at most max_tokens. Consumes the iterable lazily."""
    out, total = [], 0
    for ids, mask in encoded_records:
        if max_tokens and total + len(ids) > max_tokens:
            room = max_tokens - total
            if room >= 2:
                out.append((ids[:room - 1] + [eot], None if mask is None else mask[:room - 1] + [0]))
                total += room
            break
        out.append((ids, mask))
        total += len(ids)
        if max_tokens and total == max_tokens:
            break
    return out


def write_encoded(out_dir, splits, tokenizer, extra_meta, extra_files=None):
    """Write {split}.bin / _offsets.bin (/ _answer_mask.bin when records carry masks) for each split of
    encoded records [(ids, mask or None), ...], then extra_files {filename: bytes}, then meta.json.
    Returns the meta dict."""
    for split, records in splits.items():
        if not records:
            raise UserError(f"the {split} split would be empty: use more data or another val_frac")
    meta = {"tokenizer": tokenizer.name, "vocab_size": tokenizer.vocab_size,
            "dtype": token_dtype(tokenizer.vocab_size)}
    if tokenizer.name == "word":
        meta["words"] = tokenizer.itos[1:]
    meta.update(extra_meta)
    meta["splits"] = {}
    os.makedirs(out_dir, exist_ok=True)
    for split, records in splits.items():
        masks = [m for _, m in records]
        has_mask = all(m is not None for m in masks)
        n_tokens, n_records = write_split(out_dir, split, [ids for ids, _ in records], tokenizer.vocab_size,
                                          masks if has_mask else None)
        meta["splits"][split] = {"tokens": n_tokens, "records": n_records,
                                 "max_record_tokens": max(len(ids) for ids, _ in records)}
    for name, data in (extra_files or {}).items():
        write_bytes(os.path.join(out_dir, name), data)
    write_meta(out_dir, meta)
    return meta


def write_records(out_dir, splits, tokenizer, extra_meta, answer_spans=None, extra_files=None):
    """Tokenize {split: [text, ...]} (one text = one record) and write them with write_encoded.
    answer_spans: {split: [[(start, end), ...] per record]} marks answer characters for the answer mask."""
    progress = Progress("tokenize records", sum(len(texts) for texts in splits.values()),
                        hint="fewer people (--max_people / --csv_people / --n_people)")
    encoded = {split: [encode_record(text, tokenizer, answer_spans[split][i] if answer_spans else None)
                       for i, text in enumerate(progress.track(texts))]
               for split, texts in splits.items()}
    return write_encoded(out_dir, encoded, tokenizer, extra_meta, extra_files)


def describe(out_dir, meta):
    """The one-line summary each prepare script prints."""
    parts = ", ".join(f"{s}: {v['records']} records / {v['tokens']:,} tokens" for s, v in meta["splits"].items())
    return f"wrote {out_dir} ({meta['tokenizer']}, vocab {meta['vocab_size']}): {parts}"


# ---------------------------------------------------------------------- datasets of people
FIELD_ORDERS = ("random", "schema")  # write_people: fields shuffled per record, or in schema order


def check_field_order(value, name="--field_order"):
    if value not in FIELD_ORDERS:
        raise UserError(f"{name} must be 'random' or 'schema', got {value!r}")


def check_canary_config(cfg):
    """Refuse bad canary settings (canary_reps, canaries_per_rep, n_control_canaries, secret_format)."""
    if any(not isinstance(k, int) or k < 0 for k in cfg["canary_reps"]):
        raise UserError(f"--canary_reps must be non-negative integers, got {cfg['canary_reps']}")
    if cfg["canaries_per_rep"] < 0 or cfg["n_control_canaries"] < 0:
        raise UserError("--canaries_per_rep and --n_control_canaries must be >= 0")
    if "#" not in cfg["secret_format"]:
        raise UserError(f"--secret_format needs at least one '#' (a random digit), got {cfg['secret_format']!r}")
    n = len(cfg["canary_reps"]) * cfg["canaries_per_rep"] + cfg["n_control_canaries"]
    if n > 10 ** cfg["secret_format"].count("#") // 2:
        raise UserError(f"--secret_format {cfg['secret_format']!r} has too few values for {n} distinct secrets")


def make_canaries(cfg, rng, new_people, canary_field):
    """[(repetitions, person with a secret in canary_field)]: canaries_per_rep per entry of canary_reps,
    then n_control_canaries controls (repetitions 0, never inserted). new_people(n) draws n made-up
    people (from `rng`, before the secrets are drawn)."""
    from utils.employees import random_secret
    reps = [k for k in cfg["canary_reps"] for _ in range(cfg["canaries_per_rep"])] + [0] * cfg["n_control_canaries"]
    people = new_people(len(reps))
    secrets = set()
    for person in people:
        secret = random_secret(rng, cfg["secret_format"])
        while secret in secrets:
            secret = random_secret(rng, cfg["secret_format"])
        secrets.add(secret)
        person[canary_field] = secret
    return list(zip(reps, people))


def write_people(out_dir, schema, people, canaries, tokenizer, cfg, extra_meta):
    """One record per person (people: unique by schema.person_field), split by person; each canary (a
    record of its secret's Q/A line alone) inserted as `repetitions` identical train records (a group of
    that size for DP), the train records shuffled so the copies scatter. Writes the splits,
    {split}_people.jsonl (one line per record, in record order), canaries.json and meta.json (with
    the schema). cfg: seed, val_frac, templates, field_order ('random': shuffled per record; 'schema':
    schema order), secret_format, canary_reps, canaries_per_rep, n_control_canaries. Returns meta."""
    seed = cfg["seed"]
    by_person = {schema.name(p): p for p in people}
    if len(by_person) != len(people):
        raise ValueError("write_people needs one entry per person")
    train_names, val_names = split_train_val(by_person, cfg["val_frac"], seed)
    template_rng = random.Random(f"templates:{seed}")

    def record(person, fields=None):  # (person, text, answer spans)
        text, examples = schema.render_examples(person, template_rng, fields, cfg["templates"],
                                                shuffle_fields=cfg["field_order"] == "random")
        return person, text, [(a, b) for _, _, a, b in examples]

    records = {split: [record(by_person[name]) for name in names]
               for split, names in (("train", train_names), ("val", val_names))}
    canary_list = []
    for i, (reps, p) in enumerate(canaries):
        _, text, spans = rec = record(p, fields=())  # the canary line alone: it fits wherever the records fit
        records["train"] += [rec] * reps
        canary_list.append({"id": f"canary-{i:03d}", "name": schema.name(p),
                            "prefix": text[:spans[0][0] + 1],  # the canary line comes first; its span starts at the space
                            "secret": p[schema.canary_field], "repetitions": reps, "split": "train"})
    random.Random(f"order:{seed}").shuffle(records["train"])  # scatter the canary copies

    canaries_json = {
        "secret_format": cfg["secret_format"], "field": schema.canary_field,
        "note": "prefix is the exact record text before the secret (it starts the record); a canary with "
                "repetitions k is k identical train records, a group of k for DP; repetitions 0 = control, "
                "never inserted",
        "canaries": canary_list,
    }
    extra_files = {f"{split}_people.jsonl": "".join(json.dumps(p) + "\n" for p, _, _ in recs).encode()
                   for split, recs in records.items()}
    extra_files["canaries.json"] = (json.dumps(canaries_json, indent=2) + "\n").encode()
    extra_meta = {
        **extra_meta, "fields": list(schema.fields), "n_templates": schema.n_templates,
        "templates": list(cfg["templates"]), "field_order": cfg["field_order"], "schema": schema.to_json(),
        "people": {"train": len(train_names), "val": len(val_names)},
        "canaries": {"field": schema.canary_field, "secret_format": cfg["secret_format"],
                     "canary_reps": list(cfg["canary_reps"]), "canaries_per_rep": cfg["canaries_per_rep"],
                     "n_control_canaries": cfg["n_control_canaries"],
                     "inserted_records": sum(reps for reps, _ in canaries)},
    }
    meta = write_records(out_dir, {s: [t for _, t, _ in r] for s, r in records.items()}, tokenizer,
                         extra_meta, answer_spans={s: [a for _, _, a in r] for s, r in records.items()},
                         extra_files=extra_files)
    print(describe(out_dir, meta))
    print(f"people: {len(train_names)} train / {len(val_names)} val; canaries: "
          f"{sum(1 for r, _ in canaries if r)} inserted ({extra_meta['canaries']['inserted_records']} records), "
          f"{sum(1 for r, _ in canaries if not r)} controls; longest record "
          f"{max(v['max_record_tokens'] for v in meta['splits'].values())} tokens")
    return meta
