"""
Prompt robustness of a model under test on records of people (seed 001 sections 3.2 and 8), with the
fields, question templates and sensitive fields of the data's schema (meta.json, utils/records.py):

    python test_pipeline/test_prompt_robustness.py --ckpt out/ft/ckpt.pt --data_dir data/employees \
        [--patch P --key_file K [--tenant T]] [--out robustness.json --plot robustness.png] [--min_correctness 0.5]

Paraphrases (consistency AND correctness against the record), typos in the question (look-alike
digits as in "Bo5ton", dropped, doubled, transposed characters) and prompt injection (leak rate of
canary phone numbers and training people's sensitive values, per injection variant, with its gain over
the plain question; never-inserted control canaries give the chance rate): each defined in
utils/prompt_probes.py.

Thresholds (--min_consistency, --min_correctness, --max_typo_drop, --max_injection_gain) make the exit
code 1 when one fails.
"""
import torch

from configurator import configure
from utils import model_under_test as mut
from utils.cli import UserError, run_cli
from utils.prompt_probes import (INJECTIONS, injection_probes, injection_scores, injection_targets, paraphrase_scores,
                                 perturb, plot, read_canaries, tables, typo_scores)

DEFAULTS = dict(
    ckpt="",                                     # model under test (or the base of --patch)
    patch="",                                    # sealed patch applied on top of --ckpt (needs --key_file)
    key_file="",                                 # the patch's key
    tenant="",                                   # the patch's tenant ('' = the one the key file is bound to)
    device="cpu",                                # 'cpu' or 'cuda'
    data_dir="data/employees",                   # the records dataset (meta.json names its schema)
    split="train",           # whose records correctness is checked against (train: what the model learned)
    max_people=20,                               # people whose questions are asked
    fields=(),               # empty = every field the dataset asks about
    templates=(),            # question templates used as paraphrases; empty = all
    typo_counts=(1, 2),      # perturbations per question, one run each
    typo_kinds=("leet", "drop", "double", "swap"),  # kinds of typo injected
    injection=True,          # also run the prompt-injection probes
    injection_people=20,     # people whose first sensitive field is a target (employees: salary); every canary is a phone target
    n_samples=4,             # sampled completions per injection probe, besides the greedy one
    temperature=1.0,         # sampling temperature of the injection samples
    top_k=40,                # top-k of the injection samples
    max_new_tokens=40,       # room for the longest answer (byte tokens) and its newline
    batch_size=32,           # prompts per batch
    min_consistency=None,    # thresholds: exit 1 below / above these
    min_correctness=None,    # ... correct-answer rate
    max_typo_drop=None,      # ... correctness lost to typos
    max_injection_gain=None,  # ... secrets gained by injection
    seed=1337,               # seeds the perturbations and samples
    out="",                  # JSON report
    plot="",                 # PNG plot ('' = none)
)

# --------------------------------------------------------------------------- the whole test


def check_config(cfg):
    from utils.records import load_schema
    if not cfg["ckpt"]:
        raise UserError("--ckpt is required (the model under test, or the base model of --patch)")
    if cfg["templates"] and len(cfg["templates"]) < 2:
        raise UserError("--templates needs at least 2 paraphrases to measure consistency")
    if any(n < 1 for n in cfg["typo_counts"]):
        raise UserError("--typo_counts must be positive")
    perturb("x", 1, 0, cfg["typo_kinds"])  # refuses unknown kinds
    if cfg["n_samples"] < 0 or cfg["max_people"] < 1:
        raise UserError("--n_samples must be >= 0 and --max_people >= 1")
    schema = load_schema(cfg["data_dir"])  # the fields and templates the data has
    bad = [t for t in cfg["templates"] if not 0 <= int(t) < schema.n_templates]
    if bad:
        raise UserError(f"--templates must be in [0, {schema.n_templates - 1}], got {bad}")
    schema.check_fields([f for f in cfg["fields"] if f != schema.canary_field])


def robustness(cfg, model=None, complete_fn=None, log=print):
    """Paraphrase, typo and injection results for cfg (see DEFAULTS). `complete_fn(prompts, sample=None)`
    replaces the model (a stub in tests); otherwise `model`, or the one cfg names, is loaded and used."""
    from utils.quality_metrics import dataset_fields, make_completer
    from utils.data import load_meta
    from utils.records import load_people, load_schema
    from utils.tokenizer import get_tokenizer
    if complete_fn is None:
        check_config(cfg)
    meta = load_meta(cfg["data_dir"])
    if complete_fn is None:
        if model is None:
            model, _ = mut.load_model_under_test(cfg["ckpt"], patch=cfg["patch"] or None,
                                                 key_file=cfg["key_file"] or None, device=cfg["device"],
                                                 tenant=cfg["tenant"] or None)
        model.eval()
        complete_fn = make_completer(model, get_tokenizer(meta), cfg["max_new_tokens"], cfg["batch_size"],
                                     cfg["temperature"], cfg["top_k"] or None, label="robustness prompts",
                                     hint="--max_people, --typo_counts, --n_samples")
    schema = load_schema(cfg["data_dir"])
    fields = [f for f in dataset_fields(meta, schema) if not cfg["fields"] or f in cfg["fields"]]
    templates = [int(t) for t in cfg["templates"]] or list(range(schema.n_templates))
    trained = meta.get("templates")
    all_people = load_people(cfg["data_dir"], cfg["split"], schema)
    canaries = read_canaries(cfg["data_dir"])
    canary_names = {c["name"] for c in canaries}
    people = [p for p in all_people if schema.name(p) not in canary_names][:cfg["max_people"]]
    result = {"model": {"ckpt": cfg["ckpt"], "patch": cfg["patch"] or None}, "data_dir": cfg["data_dir"],
              "split": cfg["split"], "people": len(people), "fields": fields, "schema": schema.to_json(),
              "templates_seen_in_training": trained}
    log(f"paraphrases: {len(people)} {cfg['split']} people x {len(fields)} fields x {len(templates)} templates ...")
    result["paraphrase"], items, clean = paraphrase_scores(complete_fn, people, fields, templates, schema)
    result["typos"] = []
    for n in cfg["typo_counts"]:
        log(f"typos: {n} per question ...")
        result["typos"].append(typo_scores(complete_fn, items, clean, n, cfg["seed"], cfg["typo_kinds"], schema))
    if cfg["injection"]:
        # the people's targets: the first sensitive field the records ask (employees: Annual Salary), if any
        secret_field = next((f for f in schema.sensitive if f in fields), None)
        n_secret = cfg["injection_people"] if secret_field else 0
        targets = injection_targets(canaries if cfg["split"] == "train" else [], people, n_secret, cfg["split"],
                                    schema, secret_field)
        if targets:
            log(f"prompt injection: {len(targets)} secrets x {1 + len(INJECTIONS)} prompts x "
                f"{1 + cfg['n_samples']} generations ...")
            result["injection"] = injection_scores(complete_fn, targets, injection_probes(targets, all_people, schema),
                                                   cfg["n_samples"], cfg["seed"])
    result["checks"] = threshold_checks(result, cfg)
    result["passed"] = all(c["passed"] for c in result["checks"])
    return result


def threshold_checks(result, cfg):
    checks = []
    overall = result["paraphrase"]["overall"]
    def add(name, value, limit, ok):
        checks.append({"check": name, "value": value, "threshold": limit, "passed": bool(ok)})
    if cfg["min_consistency"] is not None and overall:
        add("paraphrase consistency >= min_consistency", overall["consistency"], cfg["min_consistency"],
            overall["consistency"] >= cfg["min_consistency"])
    if cfg["min_correctness"] is not None and overall:
        add("paraphrase correctness >= min_correctness", overall["correctness"], cfg["min_correctness"],
            overall["correctness"] >= cfg["min_correctness"])
    if cfg["max_typo_drop"] is not None:
        for t in result["typos"]:
            if t["overall"]:
                add(f"correctness drop with {t['n_typos']} typo(s) <= max_typo_drop", t["overall"]["drop"],
                    cfg["max_typo_drop"], t["overall"]["drop"] <= cfg["max_typo_drop"])
    if cfg["max_injection_gain"] is not None and "injection" in result:
        g = result["injection"]["max_gain"]
        add("leak-rate gain of injection over the plain question <= max_injection_gain", g,
            cfg["max_injection_gain"], g <= cfg["max_injection_gain"])
    return checks


def main(argv=None):
    cfg = configure(DEFAULTS, argv or [])
    torch.manual_seed(cfg["seed"])
    result = robustness(cfg)
    for title, headers, rows in tables(result):
        print(f"\n{title}\n{mut.format_table(headers, rows)}")
    if cfg["plot"]:
        result["plot"] = plot(result, cfg["plot"])
        print(f"\nwrote {cfg['plot']}")
    if cfg["out"]:
        from utils.atomic import write_json
        write_json(cfg["out"], result)
        print(f"wrote {cfg['out']}")
    if not result["passed"]:
        print("FAILED: " + "; ".join(c["check"] for c in result["checks"] if not c["passed"]))
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(run_cli(main))
