"""
Quality of a model under test (seed 001 sections 3, 7, 9, 10): perplexity of a split (strided sliding
window), exact match, BLEU and ROUGE-L of held-out people's Q/A answers, repetition of free generations
under greedy / top-k / top-p and a counterfactual name / pronoun bias probe (each defined in
utils/quality_metrics.py); forgetting: base-corpus perplexity of --base_ckpt (before) and of the model
under test (after).

    python test_pipeline/eval.py --ckpt out/ft/ckpt.pt --data_dir data/employees \
        [--patch P --key_file K [--tenant T]] [--base_ckpt out/base/ckpt.pt --base_data_dir data/pydocs] [--out eval.json]

Thresholds (--max_ppl, --min_accuracy, --max_forgetting) make the exit code 1 when one fails.
"""
import torch

from configurator import configure
from utils import model_under_test as mut
from utils.cli import UserError, run_cli
from utils.quality_metrics import (bias_probe, dataset_fields, make_completer, perplexity, plots, qa_accuracy,
                                   repetition_by_decoding, split_records, stream_head, tables)
from utils.records import load_people, load_schema, read_people

DEFAULTS = dict(
    ckpt="",                 # model under test (a train.py / finetune_dp.py checkpoint, or the base of --patch)
    patch="",                # sealed patch applied on top of --ckpt (needs --key_file)
    key_file="",             # the patch's key
    tenant="",               # the patch's tenant ('' = the one the key file is bound to)
    device="cpu",            # 'cpu' or 'cuda'
    data_dir="data/employees",  # the records dataset (meta.json names its schema)
    split="val",             # held-out people
    metrics=("perplexity", "qa", "repetition", "bias", "forgetting"),  # which evaluations to run
    stride=0,                # sliding-window stride in tokens; 0 = block_size // 2
    batch_size=16,           # records per forward pass
    ppl_max_records=0,       # 0 = every record of the split
    max_people=50,           # Q/A people scored
    template_index=0,        # question wording used for the Q/A prompts
    max_new_tokens=40,       # room for the longest answer (byte tokens) and its newline
    rep_prompts=8,           # free-generation prompts for the repetition rate
    rep_new_tokens=64,       # tokens per repetition-rate generation
    temperature=1.0,         # sampling temperature of the repetition generations
    top_k=40,                # top-k of the repetition generations
    top_p=0.9,               # nucleus of the repetition generations
    bias_people=20,          # people whose records the counterfactual name swap is scored on
    bias_names_a=("Mary Johnson", "Aisha Williams", "Maria Garcia", "Emily Chen"),  # counterfactual names, group a
    bias_names_b=("James Johnson", "Jamal Williams", "Jose Garcia", "Michael Chen"),  # counterfactual names, group b
    base_ckpt="",            # forgetting: the model before fine-tuning
    base_data_dir="",        # forgetting: the pretraining corpus
    base_split="val",        # split of the base corpus scored for forgetting
    base_max_tokens=20000,   # forgetting is scored on the first N tokens of the base split
    max_ppl=None,            # thresholds: exit 1 when perplexity > max_ppl, ...
    min_accuracy=None,       # ... exact match < min_accuracy, ...
    max_forgetting=None,     # ... base-corpus perplexity after / before > max_forgetting
    seed=1337,               # seeds the sampled generations
    out="",                  # JSON report
    plot_dir="",             # PNG plots go here ('' = none)
)


# --------------------------------------------------------------------------- the whole evaluation
def everyone(data_dir):
    """The people of every split (the bias probe's answer sets: each categorical field's values)."""
    return [p for split in ("train", "val") for p in read_people(data_dir, split) or []]


def check_vocab(model, meta, where):
    if meta["vocab_size"] > model.config.vocab_size:
        raise UserError(f"{where}: the data's vocabulary ({meta['vocab_size']}) is larger than the model's "
                        f"({model.config.vocab_size}); use data made with the model's tokenizer")


def evaluate(cfg, model=None, log=print):
    """Run the metrics named in cfg['metrics'] and return the result dict (see DEFAULTS for the keys).
    `model` skips loading (e.g. an in-memory patched model)."""
    from utils.data import load_meta
    from utils.tokenizer import get_tokenizer
    check_config(cfg)
    meta = load_meta(cfg["data_dir"])
    if model is None:
        model, _ = mut.load_model_under_test(cfg["ckpt"], patch=cfg["patch"] or None,
                                             key_file=cfg["key_file"] or None, device=cfg["device"],
                                             tenant=cfg["tenant"] or None)
    model.eval()
    check_vocab(model, meta, cfg["data_dir"])
    tok = get_tokenizer(meta)
    schema = load_schema(cfg["data_dir"]) if {"qa", "repetition", "bias"} & set(cfg["metrics"]) else None
    fields = dataset_fields(meta, schema) if schema else []
    bs = cfg["batch_size"]
    complete_fn = make_completer(model, tok, cfg["max_new_tokens"], bs, label="eval Q/A answers")
    result = {"model": {"ckpt": cfg["ckpt"], "patch": cfg["patch"] or None}, "data_dir": cfg["data_dir"],
              "split": cfg["split"]}
    people = None
    if {"qa", "repetition", "bias"} & set(cfg["metrics"]):
        people = load_people(cfg["data_dir"], cfg["split"], schema)
    if "perplexity" in cfg["metrics"]:
        log(f"perplexity of {cfg['data_dir']} {cfg['split']} ...")
        recs = split_records(cfg["data_dir"], cfg["split"], cfg["ppl_max_records"])
        result["perplexity"] = {"split": cfg["split"], "records": len(recs),
                                **perplexity(model, recs, cfg["stride"] or None, bs)}
    if "qa" in cfg["metrics"]:
        log(f"held-out Q/A on {min(len(people), cfg['max_people'] or len(people))} {cfg['split']} people ...")
        result["qa"] = qa_accuracy(complete_fn, people[:cfg["max_people"] or None], fields, cfg["template_index"],
                                   schema)
    if "repetition" in cfg["metrics"]:
        log("repetition under greedy / top-k / top-p ...")
        prompts = [schema.context(p) for p in people[:cfg["rep_prompts"]]]
        result["repetition"] = repetition_by_decoding(model, tok, prompts, cfg["rep_new_tokens"], cfg["temperature"],
                                                      cfg["top_k"], cfg["top_p"], cfg["seed"], bs)
    if "bias" in cfg["metrics"]:
        log("counterfactual bias probe ...")
        result["bias"] = bias_probe(model, tok, people[:cfg["bias_people"]], cfg["bias_names_a"], cfg["bias_names_b"],
                                    all_people=everyone(cfg["data_dir"]), fields=fields, template_index=cfg["template_index"],
                                    max_new_tokens=cfg["max_new_tokens"], batch_size=bs, schema=schema)
    if "forgetting" in cfg["metrics"] and not (cfg["base_ckpt"] and cfg["base_data_dir"]):
        log("forgetting skipped: it needs --base_ckpt and --base_data_dir")
    elif "forgetting" in cfg["metrics"]:
        from utils.checkpoint import load_model
        log(f"forgetting on {cfg['base_data_dir']} ...")
        base_meta = load_meta(cfg["base_data_dir"])
        check_vocab(model, base_meta, cfg["base_data_dir"])
        seqs = stream_head(cfg["base_data_dir"], cfg["base_split"], cfg["base_max_tokens"])
        base, _ = load_model(cfg["base_ckpt"], cfg["device"])
        before = perplexity(base, seqs, cfg["stride"] or None, bs)
        del base
        after = perplexity(model, seqs, cfg["stride"] or None, bs)
        result["forgetting"] = {"data_dir": cfg["base_data_dir"], "split": cfg["base_split"], "tokens": after["tokens"],
                                "ppl_before": before["ppl"], "ppl_after": after["ppl"],
                                "ratio": after["ppl"] / before["ppl"]}
    result["checks"] = threshold_checks(result, cfg)
    result["passed"] = all(c["passed"] for c in result["checks"])
    return result


def check_config(cfg):
    """Refuse bad settings before any model is loaded."""
    unknown = set(cfg["metrics"]) - set(DEFAULTS["metrics"])
    if unknown:
        raise UserError(f"unknown metrics {sorted(unknown)}; choose from {list(DEFAULTS['metrics'])}")
    if not cfg["ckpt"]:
        raise UserError("--ckpt is required (the model under test, or the base model of --patch)")
    if {"qa", "repetition", "bias"} & set(cfg["metrics"]):
        n_templates = load_schema(cfg["data_dir"]).n_templates
        if not 0 <= cfg["template_index"] < n_templates:
            raise UserError(f"--template_index must be in [0, {n_templates - 1}]")
    if cfg["stride"] < 0 or cfg["batch_size"] < 1 or cfg["max_new_tokens"] < 1:
        raise UserError("--stride must be >= 0 (0 = block_size // 2); --batch_size and --max_new_tokens >= 1")
    if cfg["max_forgetting"] is not None and not (cfg["base_ckpt"] and cfg["base_data_dir"]):
        raise UserError("--max_forgetting needs --base_ckpt and --base_data_dir")


def threshold_checks(result, cfg):
    checks = []
    def add(name, value, limit, ok):
        checks.append({"check": name, "value": value, "threshold": limit, "passed": bool(ok)})
    if cfg["max_ppl"] is not None and "perplexity" in result:
        v = result["perplexity"]["ppl"]
        add("perplexity <= max_ppl", v, cfg["max_ppl"], v <= cfg["max_ppl"])
    if cfg["min_accuracy"] is not None and "qa" in result:
        v = result["qa"]["exact_match"]
        add("exact_match >= min_accuracy", v, cfg["min_accuracy"], v >= cfg["min_accuracy"])
    if cfg["max_forgetting"] is not None and "forgetting" in result:
        v = result["forgetting"]["ratio"]
        add("ppl_after / ppl_before <= max_forgetting", v, cfg["max_forgetting"], v <= cfg["max_forgetting"])
    return checks


def main(argv=None):
    cfg = configure(DEFAULTS, argv or [])
    torch.manual_seed(cfg["seed"])
    result = evaluate(cfg)
    for title, headers, rows in tables(result):
        print(f"\n{title}\n{mut.format_table(headers, rows)}")
    if cfg["plot_dir"]:
        result["plots"] = plots(result, cfg["plot_dir"])
    if cfg["out"]:
        from utils.atomic import write_json
        write_json(cfg["out"], result)
        print(f"\nwrote {cfg['out']}")
    if not result["passed"]:
        print("FAILED: " + "; ".join(c["check"] for c in result["checks"] if not c["passed"]))
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(run_cli(main))
