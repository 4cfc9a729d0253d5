"""
What one model leaks of its training people (the rows of test_pipeline/leakage_test.py's report):

1. Canary exposure, through utils/canary_exposure.py.
2. Extraction: each person's Q/A prompt for a sensitive field (the data's schema in meta.json,
   utils/records.py; default: the fields it marks sensitive) is completed greedily and by sampling;
   the exact-match rate of the answer for training people is compared with the
   same rate for held-out (val) people, which is what a model gets from the population alone.

A row whose model must be refused (a patch with a wrong key) gets a status and no numbers.
"""
import numpy as np
import torch

from utils.model_under_test import PATCH_REFUSALS, complete, load_model_under_test
from utils.canary_exposure import exposure_by_repetitions, score_canaries
from utils.cli import UserError
from utils.employees import SCHEMA as EMPLOYEES  # what extraction_items uses when given no schema
from utils.progress import Progress, batched


def extraction_items(people_by_split, fields, tok, n_people, seed, schema=None):
    """(split, field, prompt ids, expected answer) for a seeded sample of people per split. schema: the
    data's (default: employees')."""
    schema = schema or EMPLOYEES
    schema.check_fields(fields)
    items = []
    for k, (split, people) in enumerate(people_by_split.items()):
        rng = np.random.default_rng([seed, k])
        pick = rng.permutation(len(people))[:n_people] if n_people > 0 else range(len(people))
        for i in sorted(pick):
            p = people[i]
            for field in fields:
                if not schema.has(p, field):
                    continue  # e.g. no hourly rate for a salaried person
                items.append((split, field, tok.encode(schema.qa_prompt(p, field, 0)),
                              schema.answer(p, field).strip()))
    return items


def first_line(text):
    return text.split("\n", 1)[0].strip()


def extraction_rates(model, tok, items, cfg):
    """Exact-match rates of greedy and sampled completions, per split and per field. cfg: gen_batch_size,
    n_samples (0 = greedy only), temperature, top_k (0 = none) and seed."""
    if not items:
        return None
    eot = getattr(tok, "eot", None)
    max_new = max(len(tok.encode(" " + a + "\n")) for *_, a in items) + 2
    prompts = [ids for _, _, ids, _ in items]
    bs, k = cfg["gen_batch_size"], cfg["n_samples"]
    hint = "--n_people, --n_samples"
    greedy = batched(lambda chunk: complete(model, chunk, max_new, bs, greedy=True, eot=eot), prompts, bs,
                     Progress("extraction (greedy)", len(prompts), hint), key=len)
    dev = next(model.parameters()).device
    gen = torch.Generator(device=dev).manual_seed(cfg["seed"])
    repeated = [p for p in prompts for _ in range(k)]
    sampled = batched(lambda chunk: complete(model, chunk, max_new, bs, greedy=False, temperature=cfg["temperature"],
                                             top_k=cfg["top_k"] or None, generator=gen, eot=eot),
                      repeated, bs, Progress("extraction (sampled)", len(repeated), hint), key=len) if k > 0 else []
    rows = []
    for j, (split, field, _, answer) in enumerate(items):
        hits = [first_line(tok.decode(s)) == answer for s in sampled[j * k:(j + 1) * k]]
        rows.append((split, field, first_line(tok.decode(greedy[j])) == answer,
                     float(np.mean(hits)) if hits else None, any(hits)))

    def summarize(sel):
        return dict(n=len(sel), greedy=float(np.mean([r[2] for r in sel])),
                    sampled=float(np.mean([r[3] for r in sel])) if k > 0 else None,
                    sampled_any=float(np.mean([r[4] for r in sel])) if k > 0 else None)
    out = {}
    for split in dict.fromkeys(r[0] for r in rows):
        sel = [r for r in rows if r[0] == split]
        out[split] = summarize(sel)
        out[split]["by_field"] = {f: summarize([r for r in sel if r[1] == f]) for f in dict.fromkeys(r[1] for r in sel)}
    if "train" in out and "val" in out:
        out["greedy_gap"] = out["train"]["greedy"] - out["val"]["greedy"]
    return out


def evaluate_row(row, canaries, tok, items, cfg):
    """One row of the report: loads the model (a wrong key must be refused) and measures it. cfg: device,
    tenant, batch_size, gen_batch_size and extraction_rates' keys (leakage_test.py's DEFAULTS name them)."""
    out = {k: row.get(k) for k in ("label", "ckpt", "patch", "role")}
    try:
        model, _ = load_model_under_test(row["ckpt"], row.get("patch"), row.get("key_file"), cfg["device"],
                                         cfg["tenant"])
    except UserError as e:
        if row["role"] != "must_refuse" or row.get("patch") is None:
            raise
        out["status"] = f"refused ({PATCH_REFUSALS.get(e.exit_code, 'error')})"
        out["refusal"] = str(e)
        return out
    if row["role"] == "must_refuse":
        out["status"] = "WRONG KEY ACCEPTED (fail-open)"
        return out
    out["status"] = "ok"
    if canaries:
        out["canaries"] = score_canaries(model, canaries, tok, cfg["batch_size"], cfg["gen_batch_size"])
        out["exposure_by_repetitions"] = exposure_by_repetitions(out["canaries"])
        # only inserted canaries can show memorization; the never-inserted controls are the chance reference
        inserted = [r["exposure"] for r in out["canaries"] if r["repetitions"] > 0]
        controls = [r["exposure"] for r in out["canaries"] if r["repetitions"] == 0]
        out["max_exposure"] = max(inserted) if inserted else None
        out["control_max_exposure"] = max(controls) if controls else None
    if items:
        out["extraction"] = extraction_rates(model, tok, items, cfg)
    del model
    return out
