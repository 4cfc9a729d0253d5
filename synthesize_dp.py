"""
DP synthetic records by private prediction (Amin et al. 2024, "Private prediction for large-scale
synthetic text generation"). Inference only: the model is never trained on the sensitive records.

    python synthesize_dp.py config/synthesize_employees.py --epsilon 8

What happens, in order:
1. the (epsilon, delta) and r (private tokens per batch) from the config alone (utils/private_prediction.py);
2. the public drafter: the base model, taught the record format on public records only
   (utils/record_synthesis.py; cached beside the output as drafter.pt);
3. the plan, before any record is read: a dry run of the public drafter on the template gives the
   private tokens a record costs at most, hence the records each batch can finish; below one per
   batch the run is refused with the numbers and the knobs that help;
4. each person's record in its own prompt, disjoint batches (keyed hash), one KV-cached decoder per
   batch: labels and forced tokens free, field values through the mechanism; discarded records are
   counted with the reason, never written. With release_share > 0 the leading categorical fields are
   released once per batch as a noisy joint table (Gaussian, a share of the batch's rho) that every
   record of the batch draws them from (each row's drafter probabilities, or with release_from='records'
   its own values: a DP contingency table), so only the remaining fields cost private tokens; a numeric
   field in release_bands is released the same way as a table of public bands (given some of those
   fields), and each record draws a value uniform within its band;
5. the output (JSONL: fields, public name, the record in the schema's Q/A form), the privacy report,
   and the utility table beside it (utils/synthetic_utility.py; computed on real data: not private).

With structured=False (data without a schema) each record's text is shown whole and continued freely
(prompt_template); every token then goes through the mechanism (or the SVT's public drafter).
The checkpoint must be public with respect to the records (pretrained on another corpus): the
guarantee covers the records in the prompts, not whatever the model was trained on. A fixed --seed
makes the noise reproducible by whoever knows it, which voids the guarantee (tests and benchmarks only).
"""
import json
import os
import secrets
import time
from collections import Counter

import numpy as np

from configurator import configure
from utils import private_prediction as pp
from utils import record_synthesis as rs
from utils import synthetic_utility as su
from utils.atomic import write_bytes, write_json
from utils.checkpoint import load_model, save_checkpoint
from utils.cli import UserError, run_cli
from utils.data import RecordDataset, load_meta
from utils.progress import Progress
from utils.records import load_people, load_schema
from utils.secure_rng import RunSecret
from utils.tokenizer import get_tokenizer

DEFAULTS = dict(
    ckpt="out/base/ckpt.pt",        # the public base model (never trained on data_dir)
    data_dir="data/employees",      # prepared records (structured: with a schema and {split}_people.jsonl)
    split="train",                  # the private people
    out="out/synthetic/synthetic.jsonl",  # synthetic records (JSONL); the reports go beside it
    report="",                      # privacy report JSON; '' = beside out as <name>.privacy.json
    epsilon=0.0,                    # target epsilon (r is solved from it); set this or r
    delta=1e-6,                     # must stay below 1 / N
    r=0,                            # private tokens per batch (epsilon is computed from it); set this or epsilon
    s=250,                          # expected batch size: the divisor of the aggregate
    n_batches=8,                    # fixed in advance (about N / s), never derived from the data
    max_batch_size=0,               # 0 = no cap; a cap truncates full batches and quadruples rho
    batch_salt="",                  # '' = a fresh random salt (written to the report)
    label="",                       # the records' label (class), part of the batch hash
    c=10.0,                         # clipping range of the recentred logits
    tau=2.0,                        # temperature of the private exponential mechanism; 0 = from the plan (structured)
    sharpness=6.0,                  # tau=0: the plan's tau is the smallest the budget pays for, but 2c/tau <= this
    svt=True,                       # public drafter + sparse vector technique
    sigma=0.5,                      # SVT Laplace scale: Lap(sigma) on the threshold, Lap(2 sigma) on d
    theta=0.8,                      # SVT threshold on d in [0, 2]
    tau_pub=1.0,                    # temperature of the free public tokens
    public_top_k=0,                 # >0: private sampling restricted to the public logits' top k
    max_examples_per_batch=16,      # records (free text: examples) tried per batch at most
    use_kv_cache=True,              # False recomputes the context every token (checks and benchmarks)
    seed=-1,                        # -1 = OS CSPRNG; a fixed seed makes the noise predictable (no guarantee)
    device="cpu",                   # cpu or cuda
    # structured records (a schema in meta.json)
    structured=True,                # template free, values private; False = free text (prompt_template)
    fields=("Department", "Full or Part-Time", "Salary or Hourly", "Annual Salary"),  # fields synthesized
    domains={},                     # {categorical field: [public values]}: never read off the records
    digits={},                      # {numeric field: (min, max) integer digits}; decimals from the schema
    record_header="Employee record:\n",  # the template's first line (the public prompt)
    max_value_tokens=40,            # length cap of one value (a record hitting it is discarded)
    whole_values=True,              # a categorical value is one choice among the public values (not byte by byte)
    release_share=0.0,              # > 0: this share of rho releases the leading categorical fields' joint once per batch
    release_from="drafter",         # the joint sums each row's drafter probabilities ('drafter') or its own values ('records')
    release_bands={},               # {numeric field: [released fields]}: its histogram_bins band given them, released too
    plan_records=8,                 # public dry-run records behind the plan
    drafter_steps=200,              # warm-up steps of the public drafter on public records (0 = the base as is)
    drafter_ckpt="",                # '' = beside out as drafter.pt (reused when present)
    drafter_batch_size=16,          # warm-up batch (records)
    drafter_learning_rate=2e-3,     # warm-up learning rate
    # free text (structured=False)
    prompt_template="Here is a record:\n{record}\n\nWrite another record like it:\n",  # {record}, {eot}
    public_prompt="Write a record:\n",  # the prompt without any record
    max_new_tokens=128,             # free text: tokens per synthetic example
    keep_unfinished=False,          # free text: keep examples that hit max_new_tokens
    # utility (on the real data, without privacy: for the operator)
    utility_check=True,             # structured: marginals vs the public drafter and a DP histogram
    histogram_bins={"Annual Salary": (0.0, 200000.0, 40)},  # {numeric field: (low, high, bins)} for the DP histogram
    downstream=False,               # also fine-tune the base on N synthetic vs N real people (slow)
    utility_steps=150,              # downstream fine-tuning steps
    utility_batch_size=16,          # downstream batch (Q/A lines)
    utility_learning_rate=1e-3,     # downstream learning rate
    utility_people=100,             # held-out people scored
)


# ----------------------------------------------------------------------------- checks and plan
def check_config(cfg):
    if cfg["tau"] == 0 and not (cfg["structured"] and cfg["epsilon"] > 0 and cfg["sharpness"] > 0):
        raise UserError("tau=0 (the plan picks tau) needs --structured=True, an --epsilon and --sharpness > 0: "
                        "give --tau otherwise")
    if cfg["max_examples_per_batch"] <= 0 or cfg["max_new_tokens"] <= 0 or cfg["max_value_tokens"] <= 0:
        raise UserError("max_examples_per_batch, max_new_tokens and max_value_tokens must be positive")
    if cfg["release_share"] > 0 and not (cfg["structured"] and cfg["whole_values"] and cfg["fields"]
                                         and cfg["fields"][0] in cfg["domains"]):
        raise UserError("release_share > 0 releases the leading categorical fields' joint: it needs --structured=True, "
                        "--whole_values=True and a first field with public values (--domains)")
    if cfg["release_from"] not in ("drafter", "records"):
        raise UserError(f"release_from must be 'drafter' or 'records', got {cfg['release_from']!r}")
    leading = rs.leading_categorical(cfg["fields"], cfg["domains"])
    for field, given in cfg["release_bands"].items():
        if field not in cfg["digits"] or field not in cfg["histogram_bins"] or not set(given) <= set(leading):
            raise UserError(f"release_bands: {field!r} needs --digits and --histogram_bins (its public bands), and "
                            f"its given fields must be among the released ones {leading}, got {list(given)}")
    if cfg["structured"]:
        missing = [f for f in cfg["fields"] if f not in cfg["domains"] and f not in cfg["digits"]]
        if not cfg["fields"] or missing:
            raise UserError(f"each synthesized field needs public values (--domains) or digits (--digits): "
                            f"{missing or 'no fields'}")
        return
    if "{record}" not in cfg["prompt_template"]:
        raise UserError("prompt_template must contain {record}")
    if "{record}" in cfg["public_prompt"]:
        raise UserError("public_prompt must not contain {record}: it is the prompt without any record")


def load_public_model(cfg, log):
    model, ckpt = load_model(cfg["ckpt"], cfg["device"])
    conf = ckpt.get("config") or {}
    seen = str(conf.get("data_dir") or conf.get("dataset") or "")
    if seen and os.path.basename(os.path.normpath(seen)) == os.path.basename(os.path.normpath(cfg["data_dir"])):
        log(f"warning: {cfg['ckpt']} was trained on '{seen}'; the guarantee covers only the prompts, "
            "not what the model memorised in training")
    return model


def public_drafter(cfg, template, model, log):
    """The base taught the template on public records (values uniform over the grammars), cached."""
    if cfg["drafter_steps"] <= 0:
        return model
    path = cfg["drafter_ckpt"] or os.path.join(os.path.dirname(cfg["out"]) or ".", "drafter.pt")
    key = {"base": os.path.abspath(cfg["ckpt"]), "header": template.header, "fields": template.fields,
           "domains": template.domains, "digits": template.digits, "steps": cfg["drafter_steps"],
           "batch_size": cfg["drafter_batch_size"], "learning_rate": cfg["drafter_learning_rate"],
           "warmup": "copy the context record's values; draft from the header (loss on values only)"}
    if os.path.isfile(path):
        drafter, ckpt = load_model(path, cfg["device"])
        conf = ckpt.get("config") or {}
        if conf.get("drafter") == key:
            drafter.copy_probability = conf.get("copy_probability", {})
            log(f"public drafter: {path} (reused); p(own value | prompt) on held-out public records: "
                + copy_report(drafter.copy_probability))
            return drafter
    rng = rs.seeded(-1)
    records, masks = zip(*[template.warmup_record(rng) for _ in range(cfg["drafter_steps"] * cfg["drafter_batch_size"])])
    log(f"public drafter: {cfg['drafter_steps']} warm-up steps on {len(records)} public records (no private data)")
    run = su.finetuned_on_records(list(records), template.tok, cfg["ckpt"], cfg["drafter_steps"],
                                  cfg["drafter_batch_size"], cfg["drafter_learning_rate"], cfg["device"],
                                  seed=secrets.randbits(31), loss_masks=list(masks), log=log)
    drafter = run["model"].eval()
    copying = drafter.copy_probability = rs.copy_probability(drafter, template, rs.seeded(-1))  # fresh records
    save_checkpoint(path, drafter, config={"dataset": "public warm-up records", "drafter": key,
                                           "copy_probability": copying})
    log(f"public drafter: trained in {run.get('train_time_s', 0):.0f}s, saved to {path}; p(own value | prompt) "
        f"on held-out public records: {copy_report(copying)}")
    return drafter


def copy_report(copying):
    return ", ".join(f"{f} {p:.2f}" for f, p in copying.items()) or "not measured"


def plan(cfg, privacy, template, model, gen, log):
    """From the config and the public drafter alone: the private tokens a record costs at most (every
    token neither a label nor forced), with tau=0 the tau that pays for max_examples_per_batch such records
    (pp.planned_tau), the records each batch can finish, the expected total. Returns (plan, privacy)."""
    decoder = pp.BatchDecoder(model, [template.public_ids()], template.max_new_tokens(), cfg["use_kv_cache"])
    mech = pp.Mechanism.from_config(cfg)
    joint = rs.public_joint(decoder, template) if cfg["release_share"] > 0 else None  # released fields: free
    bands = [rs.public_band(template, f, given, cfg["histogram_bins"][f]) for f, given in cfg["release_bands"].items()]
    drafts, _, _ = rs.synthesize_records(decoder, 0, mech, template, 0, gen, cfg["plan_records"], public_only=True,
                                         max_value_tokens=cfg["max_value_tokens"], whole_values=cfg["whole_values"],
                                         joint=joint, bands=bands)
    per_record = float(np.mean([c["public"] for _, c in drafts])) if drafts else float("inf")
    if per_record > 0 and privacy["r"] == 0:
        raise UserError(f"release_share={cfg['release_share']:g} leaves no private token for the fields a record still "
                        f"decodes ({per_record:.1f} tokens each): release them too (--release_bands) or lower release_share")
    forced = float(np.mean([c["forced"] for _, c in drafts])) if drafts else 0.0
    if cfg["planned_tau"]:
        # 10% over the dry run's mean: private draws run a little longer than the drafter's (e.g. 6 digits)
        tau = pp.planned_tau(cfg, 1.1 * cfg["max_examples_per_batch"] * per_record) if drafts else None
        cfg["tau"] = tau or 2 * cfg["c"] / cfg["sharpness"]
        privacy = pp.privacy_budget(cfg)
        log(f"plan: tau={cfg['tau']:.3g} (2c/tau = {2 * cfg['c'] / cfg['tau']:.2f}, at most --sharpness="
            f"{cfg['sharpness']:g}), from the config and the public dry run alone")
        log_privacy(privacy, log)
    affordable = cfg["max_examples_per_batch"] if per_record == 0 else int(privacy["r"] // per_record)
    per_batch = min(cfg["max_examples_per_batch"], affordable) if drafts else 0
    out = {"batches": cfg["n_batches"], "s": cfg["s"], "r": privacy["r"], "private_tokens_per_record": per_record,
           "forced_tokens_per_record": forced, "records_per_batch": per_batch,
           "expected_records": per_batch * cfg["n_batches"], "dry_run_records": len(drafts)}
    log(f"plan: {out['batches']} batches, s={out['s']}, r={out['r']} private tokens per batch; a record costs at "
        f"most {per_record:.1f} private tokens ({forced:.1f} forced and the labels free; public dry run of "
        f"{len(drafts)}) -> {per_batch} records per batch, {out['expected_records']} expected")
    if per_batch < 1:
        raise UserError(f"the plan finishes {int(privacy['r'] // per_record) if drafts else 0} records per batch "
                        f"(r={privacy['r']} private tokens, about {per_record:.1f} per record): raise --epsilon, "
                        f"--s (and lower --n_batches: s ~ N / n_batches), --tau or lower --c, use fewer --fields, or "
                        + ("--svt=False (the SVT costs a share of r)" if cfg["svt"] else "a larger --sigma with --svt"))
    out["tau"] = cfg["tau"]
    out["drafter_copy_probability"] = getattr(model, "copy_probability", None)
    if joint is not None:
        out["released_fields"], out["released_cells"] = joint.fields, len(joint.combos)
        log(f"plan: {' x '.join(joint.fields)} ({len(joint.combos)} cells) released once per batch from the "
            + ("drafter's predictions" if cfg["release_from"] == "drafter" else "records' own values")
            + f", noise sigma {privacy['release']['sigma']:.3g} per cell (counts): every record draws them for free")
    for band in bands:
        out.setdefault("released_bands", {})[band.field] = {"given": band.given, "cells": band.probs.numel()}
        log(f"plan: {band.field} band ({band.probs.size(1)} public bands) x {' x '.join(band.given) or 'nothing'} "
            f"({band.probs.numel()} cells) released once per batch from the records, the same sigma; a value "
            "uniform within the drawn band")
    return out, privacy


def log_privacy(privacy, log):
    release = privacy.get("release")
    log(f"privacy: epsilon={privacy['epsilon']:.4g} delta={privacy['delta']:.3g} rho={privacy['rho']:.4g} "
        f"r={privacy['r']} private tokens per batch (rho {privacy['rho_per_private_token']:.3g} each)"
        + (f" + a released joint per batch (rho {release['rho']:.3g}, sigma {release['sigma']:.3g})" if release else ""))


# ----------------------------------------------------------------------------- the run
def synthesize(cfg, model=None, log=print):
    """Run the mechanism. Returns {"examples", "privacy", "plan", "drafts"}. Nothing is written."""
    cfg = {**DEFAULTS, **cfg}
    check_config(cfg)
    cfg["planned_tau"] = cfg["tau"] == 0
    if not cfg["batch_salt"]:
        cfg["batch_salt"] = secrets.token_hex(16)
    # before any data is read; with tau=0 provisional (checks the budget) until the plan sets tau
    privacy = pp.privacy_budget({**cfg, "tau": 2 * cfg["c"] / cfg["sharpness"]} if cfg["planned_tau"] else cfg)
    if not cfg["planned_tau"]:
        log_privacy(privacy, log)
    if cfg["seed"] >= 0:
        log(f"warning: seed={cfg['seed']} fixes the noise; whoever knows it can replay the sampling, which voids "
            "the guarantee (keep the default -1 for a release)")
    meta = load_meta(cfg["data_dir"])
    model = (model or load_public_model(cfg, log)).eval()
    tok = get_tokenizer(meta)
    if meta["vocab_size"] > model.config.vocab_size:
        raise UserError(f"the data's vocabulary ({meta['vocab_size']}) is larger than the model's "
                        f"({model.config.vocab_size}): use a checkpoint trained with this tokenizer")
    gen = pp.make_generator(cfg["seed"])
    if not cfg["structured"]:
        return synthesize_text(cfg, privacy, model, tok, gen, log)
    schema = load_schema(cfg["data_dir"])
    unknown = [f for f in cfg["fields"] if f not in schema.fields]
    if unknown:
        raise UserError(f"{cfg['data_dir']} asks about {schema.fields}, not {unknown}: prepare it with them, e.g. "
                        f"python data/employees/prepare.py --tokenizer byte --fields \"{','.join(cfg['fields'])}\"")
    template = rs.RecordTemplate(schema, cfg["fields"], cfg["domains"], cfg["digits"], tok, cfg["record_header"])
    model = public_drafter(cfg, template, model, log)
    the_plan, privacy = plan(cfg, privacy, template, model, gen, log)  # still no record read
    people = load_people(cfg["data_dir"], cfg["split"], schema)
    if cfg["delta"] >= 1 / len(people):
        log(f"warning: delta={cfg['delta']:.3g} is not below 1/N = {1 / len(people):.3g}: use a smaller delta")
    room = model.config.block_size - template.max_new_tokens()
    if room <= len(template.public_ids()):
        raise UserError(f"a record of up to {template.max_new_tokens()} tokens leaves no room for the prompts in "
                        f"block_size {model.config.block_size}: use fewer --fields or shorter --domains")
    keys = [json.dumps(p, sort_keys=True) for p in people]  # a person's batch depends on that person only
    batches, n_dropped = pp.assign_batches(keys, cfg["label"], cfg["batch_salt"], cfg["n_batches"], cfg["max_batch_size"])
    sizes = [len(b) for b in batches]
    log(f"{len(people)} people in {cfg['n_batches']} batches (sizes {min(sizes)}..{max(sizes)}, s={cfg['s']}); "
        f"{n_dropped} dropped by max_batch_size")
    mech, examples, discards, t0 = pp.Mechanism.from_config(cfg), [], Counter(), time.time()
    release = privacy.get("release")
    if release:  # the DP noise of the released joints: a fresh OS secret (a fixed seed replays it: no guarantee)
        stream = RunSecret.shared(cfg["seed"] if cfg["seed"] >= 0 else None).stream("synthesis release")
    progress = Progress("synthetic records tried", cfg["n_batches"] * cfg["max_examples_per_batch"],
                        hint="--max_examples_per_batch or --n_batches")
    for b, members in enumerate(batches):  # empty batches run too: skipping them would reveal they are empty
        prompts = [template.prompt_ids(people[i], room) for i in members] + [template.public_ids()]
        decoder = pp.BatchDecoder(model, prompts, template.max_new_tokens(), cfg["use_kv_cache"])
        batch_people = [people[i] for i in members]
        from_records = batch_people if cfg["release_from"] == "records" else None
        joint = rs.release_joint(decoder, len(members), template, release["sigma"], stream, from_records) if release else None
        bands = [rs.release_band(batch_people, template, f, given, cfg["histogram_bins"][f], release["sigma"], stream)
                 for f, given in cfg["release_bands"].items()]
        kept, why, spent = rs.synthesize_records(decoder, len(members), mech, template, privacy["r"], gen,
                                                 cfg["max_examples_per_batch"], max_value_tokens=cfg["max_value_tokens"],
                                                 whole_values=cfg["whole_values"], joint=joint, bands=bands,
                                                 on_record=progress.update)
        assert spent <= privacy["r"]
        discards += why
        examples += [{"values": v, "batch": b, "private_tokens": c["private"], "public_tokens": c["public"],
                      "forced_tokens": c["forced"]} for v, c in kept]
    progress.update(progress.total)
    dt = time.time() - t0
    rng = rs.seeded(cfg["seed"])
    synthetic_people, texts = rs.qa_records(template, [e["values"] for e in examples], rng)
    for e, person, text in zip(examples, synthetic_people, texts):
        e.update(name=schema.name(person), fields={f: person[f] for f in template.fields},
                 record=template.render(e.pop("values")), text=text)
    n_priv = sum(e["private_tokens"] for e in examples)
    n_free = sum(e["public_tokens"] + e["forced_tokens"] for e in examples)
    privacy["diagnostics"] = {
        "note": "counts read off the output (the mechanism's answers); not parameters of the guarantee",
        "records": len(examples), "discarded": dict(discards), "private_tokens": n_priv,
        "public_or_forced_value_tokens": n_free, "seconds": round(dt, 1),
        "seed": "fixed by the config (noise reproducible: no guarantee)" if cfg["seed"] >= 0 else "OS CSPRNG"}
    log(f"{len(examples)} records kept, {sum(discards.values())} discarded {dict(discards) or ''}; {n_priv} private "
        f"value tokens, {n_free} public or forced, labels free; {dt:.1f}s")
    return {"examples": examples, "privacy": privacy, "plan": the_plan, "template": template, "model": model,
            "gen": gen, "people": people, "schema": schema}


def synthesize_text(cfg, privacy, model, tok, gen, log):
    """Free-text records: each record's whole text in its own prompt, continued token by token."""
    ds = RecordDataset(cfg["data_dir"], cfg["split"], model.config.block_size, meta=load_meta(cfg["data_dir"]))
    recs = [ids[:-1] if ids and ids[-1] == tok.eot else ids for ids in (ds.record(i).tolist() for i in range(len(ds)))]
    texts = [tok.decode(ids) for ids in recs]
    public_ids = pp.encode_template(cfg["public_prompt"], tok) or [tok.eot]
    room = model.config.block_size - cfg["max_new_tokens"] - len(pp.encode_template(cfg["prompt_template"], tok))
    if room <= 0 or len(public_ids) + cfg["max_new_tokens"] > model.config.block_size:
        raise UserError(f"max_new_tokens={cfg['max_new_tokens']} leaves no room for the prompts in block_size "
                        f"{model.config.block_size}: lower it")
    batches, n_dropped = pp.assign_batches(texts, cfg["label"], cfg["batch_salt"], cfg["n_batches"], cfg["max_batch_size"])
    mech, examples, discards = pp.Mechanism.from_config(cfg), [], Counter()
    progress = Progress("synthesis batches", cfg["n_batches"], hint="--n_batches or --max_examples_per_batch")
    for b, members in enumerate(batches):
        prompts = [pp.encode_template(cfg["prompt_template"], tok, recs[i][:room]) for i in members]
        decoder = pp.BatchDecoder(model, prompts + [public_ids], cfg["max_new_tokens"], cfg["use_kv_cache"])
        found, spent = pp.synthesize_batch(decoder, len(prompts), mech, privacy["r"], gen, tok.eot,
                                           cfg["max_new_tokens"], cfg["max_examples_per_batch"], tok.vocab_size)
        assert spent <= privacy["r"]
        for ex in found:
            text = tok.decode(ex["tokens"])
            why = ("length cap" if not ex["finished"] and not cfg["keep_unfinished"] else
                   "empty" if not text.strip() else "")
            if why:
                discards[why] += 1
                continue
            examples.append({"text": text, "batch": b, "private_tokens": ex["private_tokens"],
                             "public_tokens": ex["public_tokens"]})
        progress.update()
    privacy["diagnostics"] = {"note": "counts read off the output", "records": len(examples),
                              "discarded": dict(discards), "private_tokens": sum(e["private_tokens"] for e in examples)}
    log(f"{len(examples)} synthetic texts kept, discarded {dict(discards)}; {n_dropped} records dropped by max_batch_size")
    return {"examples": examples, "privacy": privacy, "plan": None}


# ----------------------------------------------------------------------------- utility
def utility(cfg, result, log=print):
    """The utility table (marginals against the public drafter and the DP histogram; names, canaries;
    downstream when cfg['downstream']). Reads the real data without privacy: for the operator only."""
    template, schema, real = result["template"], result["schema"], result["people"]
    n, fields = len(result["examples"]), template.fields
    categorical, numeric = [f for f in fields if f in template.domains], [f for f in fields if f in template.digits]
    synthetic = [e["fields"] for e in result["examples"]]
    decoder = pp.BatchDecoder(result["model"], [template.public_ids()], template.max_new_tokens(), cfg["use_kv_cache"])
    joint = rs.public_joint(decoder, template) if cfg["release_share"] > 0 else None  # every token public
    drafts, _, _ = rs.synthesize_records(decoder, 0, pp.Mechanism.from_config(cfg), template, 0, result["gen"],
                                         max(n, 1), public_only=True, max_value_tokens=cfg["max_value_tokens"],
                                         whole_values=cfg["whole_values"], joint=joint)
    drafter_people, _ = rs.qa_records(template, [v for v, _ in drafts], rs.seeded(cfg["seed"]))
    hist = su.histogram_baseline(real, categorical, template.domains, numeric, cfg["histogram_bins"],
                                 result["privacy"]["epsilon"], cfg["delta"], max(n, 1),
                                 np.random.default_rng(None if cfg["seed"] < 0 else cfg["seed"]))
    ours, public = su.fidelity(synthetic, real, categorical, numeric), su.fidelity(drafter_people, real, categorical, numeric)
    table = {k: {"synthetic": ours[k], "public_drafter": public[k], "dp_histogram": hist[k][0],
                 "dp_histogram_n_samples": hist[k][1], "metric": "KS" if k in numeric else "TV"} for k in ours}
    private_names = {schema.name(p) for p in real}
    canaries = []
    if os.path.isfile(os.path.join(cfg["data_dir"], "canaries.json")):
        with open(os.path.join(cfg["data_dir"], "canaries.json")) as f:
            canaries = [c["secret"] for c in json.load(f)["canaries"]]
    out = {"note": "computed on the real records without privacy: for the operator, not for release",
           "records": n, "epsilon": result["privacy"]["epsilon"], "delta": cfg["delta"], "marginals": table,
           "names_shared_with_private": sum(e["name"] in private_names for e in result["examples"]),
           "names_shared_public_drafter": sum(schema.name(p) in private_names for p in drafter_people),
           "canaries_reproduced": sum(any(s in e["text"] for s in canaries) for e in result["examples"])}
    if cfg["downstream"]:
        out["downstream"] = downstream(cfg, result, drafter_people, log)
    return out


def downstream(cfg, result, drafter_people, log):
    """Field accuracy on held-out real people: the base, and the base fine-tuned on N synthetic, N real,
    N public-drafter people (the same Q/A rendering for all)."""
    template, schema = result["template"], result["schema"]
    categorical = [f for f in template.fields if f in template.domains]
    held_out = load_people(cfg["data_dir"], "val", schema)[:cfg["utility_people"]]
    n, rng = len(result["examples"]), rs.seeded(cfg["seed"])
    real = [result["people"][i] for i in sorted(rng.sample(range(len(result["people"])), min(n, len(result["people"]))))]
    sets = {"synthetic": [e["text"] for e in result["examples"]],
            "real": [schema.render_record(p, rng, fields=template.fields) for p in real],
            "public drafter": rs.qa_records(template, [{f: schema.format_value(f, p[f]) for f in template.fields}
                                                       for p in drafter_people], rng)[1]}
    base = load_model(cfg["ckpt"], cfg["device"])[0]
    scores = {"base (no fine-tune)": su.field_accuracy(base, template.tok, schema, held_out, categorical, template.domains)}
    for name, texts in sets.items():
        if texts:
            model = su.finetuned_on(texts, template.tok, cfg["ckpt"], cfg["utility_steps"], cfg["utility_batch_size"],
                                    cfg["utility_learning_rate"], cfg["device"], log)
            scores[name] = su.field_accuracy(model, template.tok, schema, held_out, categorical, template.domains)
    return {"people": n, "held_out": len(held_out), "steps": cfg["utility_steps"], "accuracy": scores}


def report_path(cfg):
    return cfg["report"] or os.path.splitext(cfg["out"])[0] + ".privacy.json"


def main(argv=None):
    cfg = configure(DEFAULTS, argv or [])
    result = synthesize(cfg)
    privacy = result["privacy"]
    keys = ("name", "fields", "record", "text", "batch", "private_tokens", "public_tokens", "forced_tokens")
    lines = "".join(json.dumps({k: e[k] for k in keys if k in e}) + "\n" for e in result["examples"])
    write_bytes(cfg["out"], lines.encode())
    write_json(report_path(cfg), {**privacy, "plan": result["plan"]})
    print(f"wrote {len(result['examples'])} synthetic records to {cfg['out']} and the privacy report to "
          f"{report_path(cfg)} (epsilon={privacy['epsilon']:.4g}, delta={privacy['delta']:.3g})")
    if cfg["utility_check"] and cfg["structured"]:
        result["utility"] = utility(cfg, result)
        base = os.path.splitext(cfg["out"])[0]
        write_json(base + ".utility.json", result["utility"])
        text = su.utility_markdown(result["utility"])
        write_bytes(base + ".utility.md", text.encode())
        print(text + f"wrote the utility table to {base}.utility.md (not private: keep it with the real data)")
    return result


if __name__ == "__main__":
    run_cli(main)
