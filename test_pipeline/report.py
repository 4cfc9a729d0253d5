"""
One report for a run directory: leakage, membership inference, the one-run privacy audit (optional),
prompt robustness and quality, side by side for every model of the run, in REPORT.md with its figures.

    python test_pipeline/report.py --run_dir out/run1 [--data_dir data/employees] [--base_data_dir data/pydocs] \
        [--key_file key.hex] [--quick] [--audit]

Run directory layout:

    base/ckpt.pt         the base model (required): a row of its own, the MIA's reference model, the
                         'before' of forgetting, and the model every patch applies to
    <name>/ckpt.pt       a fine-tuned model; privacy.json beside it when it was trained with DP
    <name>/*.patch       a sealed patch over base/ckpt.pt (finetune_encrypt_memmap --export); its key is
                         <name>/<patch stem>.key or <name>/key.hex, else --key_file; its tenant is the
                         one the key file is bound to, else --tenant
    run.json (optional)  {"data_dir": ..., "base_data_dir": ..., "models": [{"name", "ckpt", "patch",
                         "key_file", "tenant"}, ...]}: paths relative to the run directory; replaces the discovery

Every sub-run is its script's command line (leakage_test.py, mia.py, privacy_audit.py,
test_prompt_robustness.py, eval.py), run in this process as `python SCRIPT ...` would run it
(utils.script_steps.run_script), which writes the JSON this script reads; each one's stdout and stderr
go to a log under <run_dir>/report/. The audit fine-tunes its own model from base/ckpt.pt (--audit_config: the
finetune_dp config it trains with). A patched model is also tested with a freshly generated wrong key, which must be
refused. Writes <run_dir>/REPORT.md and <run_dir>/report/report.json; exit code 1 when a sub-run fails its
checks or errors, 0 otherwise.
"""
import datetime
import glob
import json
import math
import os
import sys
import tempfile
import time

from configurator import configure
from utils.atomic import write_bytes, write_json
from utils.cli import UserError, run_cli
from utils.progress import Progress
from utils.report_io import get, read_json
from utils.script_steps import opts, run_script

DEFAULTS = dict(
    run_dir="",             # the run folder (run.json, checkpoints, patches); REPORT.md goes here
    data_dir="",            # the fine-tuning data (default: run.json's, else data/employees)
    base_data_dir="",       # the pretraining corpus, for forgetting (default: run.json's; '' = skip)
    key_file="",            # key of patches that have no key file beside them
    tenant="",              # tenant of patches whose key file is bound to none (run.json: a model's "tenant")
    tests=("leakage", "mia", "robustness", "eval", "figures"),  # which parts to run
    audit=False,            # also run privacy_audit (it fine-tunes with DP itself: slow)
    audit_config="",        # the finetune_dp config file the audit trains with (e.g. config/finetune_dp_employees.py)
    quick=False,            # small sample sizes (demos, tests); the full sizes otherwise
    report="",              # REPORT.md path (default <run_dir>/REPORT.md)
    max_exposure=-1.0,      # > 0: leakage fails when a tested model's canary exposure exceeds it (bits)
    device="cpu",           # 'cpu' or 'cuda'
    seed=1337,              # seeds the tests' sampling
)
KNOWN_TESTS = ("leakage", "mia", "robustness", "eval", "figures")

# sample sizes: (full, quick)
SIZES = dict(n_candidates=(10000, 1000), leak_people=(200, 20), samples=(4, 2), rob_people=(20, 6),
             eval_people=(50, 12), bias_people=(20, 6), rep_prompts=(8, 3))


# --------------------------------------------------------------------------- the run directory
def discover(run_dir, key_file="", tenant=""):
    """(settings from run.json, [model dicts]) for a run directory; see the layout above."""
    if not os.path.isdir(run_dir):
        raise UserError(f"run directory {run_dir} does not exist")
    spec = {}
    spec_path = os.path.join(run_dir, "run.json")
    if os.path.isfile(spec_path):
        try:
            with open(spec_path) as f:
                spec = json.load(f)
        except json.JSONDecodeError as e:
            raise UserError(f"{spec_path} is not valid JSON ({e})") from None

    def here(p):  # run.json paths are relative to the run directory
        return p if not p or os.path.isabs(p) else os.path.join(run_dir, p)
    base = os.path.join(run_dir, "base", "ckpt.pt")
    if spec.get("models"):
        bad = [m for m in spec["models"] if not isinstance(m, dict) or not m.get("name") or not m.get("ckpt")]
        names = [m.get("name") for m in spec["models"] if isinstance(m, dict)]
        if bad or len(set(names)) != len(names):
            raise UserError(f"{spec_path}: every model needs a unique 'name' and a 'ckpt'")
        models = [{"name": m["name"], "ckpt": here(m["ckpt"]), "patch": here(m.get("patch", "")),
                   "key_file": here(m.get("key_file", "")) or key_file, "tenant": m.get("tenant", "")}
                  for m in spec["models"]]
        base = next((m["ckpt"] for m in models if m["name"] == "base"), base)
        models = [m for m in models if m["name"] != "base"]
    else:
        models = []
        for sub in sorted(os.listdir(run_dir)):
            folder = os.path.join(run_dir, sub)
            if sub in ("base", "report") or not os.path.isdir(folder):
                continue
            if os.path.isfile(os.path.join(folder, "ckpt.pt")):
                models.append({"name": sub, "ckpt": os.path.join(folder, "ckpt.pt"), "patch": "", "key_file": ""})
            for patch in sorted(glob.glob(os.path.join(folder, "*.patch"))):
                stem = os.path.splitext(patch)[0]
                key = next((k for k in (stem + ".key", os.path.join(folder, "key.hex")) if os.path.isfile(k)), key_file)
                models.append({"name": f"{sub} (patched)", "ckpt": base, "patch": patch, "key_file": key})
    if not os.path.isfile(base):
        raise UserError(f"{run_dir} has no base model: expected {base} (see the layout in report.py's docstring)")
    for m in models:
        if m["patch"] and not m["key_file"]:
            raise UserError(f"patch {m['patch']} has no key: put key.hex beside it or give --key_file")
        if m["patch"]:  # the tenant every sub-run must expect: never whichever tenant the patch names
            from utils.patch_keys import key_file_tenant
            m["tenant"] = m.get("tenant") or key_file_tenant(m["key_file"]) or tenant
            if not m["tenant"]:
                raise UserError(f"patch {m['patch']}: no expected tenant: bind its key file to one (keygen --tenant), "
                                f"or give --tenant (run.json: the model's \"tenant\")", exit_code=4)
        m["privacy"], m["dp"] = privacy_of(m)
    return spec, [{"name": "base", "ckpt": base, "patch": "", "key_file": "", "privacy": None, "dp": None}] + models


def privacy_of(m):
    """(privacy report, DP on/off/None=unknown) of a model: privacy.json beside a checkpoint (absent = no DP),
    PATCH.privacy.json beside a sealed patch (written by the seal; absent = unknown)."""
    if m["patch"]:
        side = read_json(m["patch"] + ".privacy.json") or {}
        return side.get("privacy"), side.get("dp")
    privacy = read_json(os.path.join(os.path.dirname(m["ckpt"]), "privacy.json"))
    return privacy, privacy is not None


# --------------------------------------------------------------------------- running the sub-runs
def sub_run(script, argv, out, log_path):
    """`python test_pipeline/SCRIPT argv...`, writing its JSON result to `out`; its exit status (0, 1 failed
    checks, 2+ errors) and its log (stdout and stderr)."""
    if os.path.exists(out):
        os.remove(out)  # a result an earlier report left must not stand in for this run's
    code = run_script([os.path.join("test_pipeline", script)] + argv, log_path)
    with open(log_path, encoding="utf-8", errors="replace") as f:
        return code, f.read()


def result_or_error(out, log):
    """A sub-run's JSON result, or {'error': its last line, 'passed': False} when it wrote none (e.g. a
    refused patch: 'error: ...' is the last line a script prints)."""
    result = read_json(out)
    if result is None:
        return {"error": last_line(log).removeprefix("error: "), "passed": False}
    return result


def run_leakage(models, cfg, out_dir, size):
    """One leakage_test run with the base, every fine-tuned checkpoint and the first patch (with its key
    and a fresh wrong key); one more run per further patch. Returns the merged result."""
    from utils.patch_keys import generate_key_file
    base = models[0]["ckpt"]
    ckpts = [m["ckpt"] for m in models[1:] if not m["patch"]]
    patched = [m for m in models if m["patch"]]
    wrong_key = generate_key_file(os.path.join(tempfile.mkdtemp(prefix="report-"), "wrong.hex")) if patched else ""
    common = [f"--data_dir={cfg['data_dir']}", f"--base_ckpt={base}", f"--device={cfg['device']}",
              f"--seed={cfg['seed']}", f"--n_candidates={size('n_candidates')}", f"--n_people={size('leak_people')}",
              f"--n_samples={size('samples')}", f"--max_exposure={cfg['max_exposure']}"]
    runs = [(ckpts, patched[0] if patched else None)] + [([], p) for p in patched[1:]]
    merged = {"models": [], "codes": [], "plots": []}
    try:
        for i, (cks, patch) in enumerate(runs):
            out, png = os.path.join(out_dir, f"leakage_{i}.json"), os.path.join(out_dir, f"exposure_{i}.png")
            argv = common + [f"--out={out}", f"--plot={png}"] + ([f"--ckpt={','.join(cks)}"] if cks else [])
            if patch:
                argv += [f"--patch={patch['patch']}", f"--key_file={patch['key_file']}", f"--wrong_key_file={wrong_key}",
                         f"--tenant={patch['tenant']}"]
            code, log = sub_run("leakage_test.py", argv, out, os.path.join(out_dir, f"leakage_{i}.log"))
            res = read_json(out)
            merged["codes"].append(code)
            if res is None:
                merged.setdefault("errors", []).append(last_line(log))
                continue
            merged["models"] += [r for r in res["models"] if i == 0 or r["role"] != "base"]
            merged["n_candidates"] = res.get("n_candidates")
            merged.setdefault("failures", []).extend(res.get("failures", []))
            if os.path.isfile(png):
                merged["plots"].append(png)
    finally:
        if wrong_key:
            os.remove(wrong_key)
            os.rmdir(os.path.dirname(wrong_key))
    merged["passed"] = all(c == 0 for c in merged["codes"])
    return merged


def run_mia(models, cfg, out_dir, size):
    """mia.py on every model: the base model is the reference of the others, and its own row is the
    no-memorization baseline (AUC near 0.5)."""
    results = {}
    for i, m in enumerate(models):
        out, png = os.path.join(out_dir, f"mia_{i}.json"), os.path.join(out_dir, f"roc_{i}.png")
        ref = [f"--ref_ckpt={models[0]['ckpt']}"] if i else []
        argv = [f"--ckpt={m['ckpt']}", f"--data_dir={cfg['data_dir']}", f"--out={out}", f"--plot={png}",
                f"--device={cfg['device']}", f"--seed={cfg['seed']}"] + ref
        if m["patch"]:
            argv += [f"--patch={m['patch']}", f"--key_file={m['key_file']}", f"--tenant={m['tenant']}"]
        code, log = sub_run("mia.py", argv, out, os.path.join(out_dir, f"mia_{i}.log"))
        results[m["name"]] = {"code": code, "result": read_json(out), "plot": png if os.path.isfile(png) else None,
                              "error": None if code in (0, 1) else last_line(log)}
    return {"models": results, "passed": all(r["code"] == 0 for r in results.values())}


def run_audit(models, cfg, out_dir):
    """privacy_audit.py once: it fine-tunes its own DP model from the base on the data."""
    out, png = os.path.join(out_dir, "audit.json"), os.path.join(out_dir, "audit.png")
    argv = ([cfg["audit_config"]] if cfg["audit_config"] else []) + [
        f"--base_ckpt={models[0]['ckpt']}", f"--data_dir={cfg['data_dir']}", f"--out={out}", f"--plot={png}",
        f"--device={cfg['device']}", f"--seed={cfg['seed']}"]
    code, log = sub_run("privacy_audit.py", argv, out, os.path.join(out_dir, "audit.log"))
    return {"code": code, "result": read_json(out), "passed": code == 0, "plot": png if os.path.isfile(png) else None,
            "error": None if code in (0, 1) else last_line(log)}


def model_flags(m):
    """The flags that name a model under test: its checkpoint, and its patch with the key and tenant when it has one."""
    return opts(ckpt=m["ckpt"]) + (opts(patch=m["patch"], key_file=m["key_file"], tenant=m["tenant"]) if m["patch"] else [])


def run_robustness(models, cfg, out_dir, size):
    """test_prompt_robustness.py on every model but the base (which learned no records), with its plot."""
    results = {}
    for i, m in enumerate(models[1:]):
        out = os.path.join(out_dir, f"robustness_{i}.json")
        argv = model_flags(m) + opts(data_dir=cfg["data_dir"], device=cfg["device"], seed=cfg["seed"],
                                     max_people=size("rob_people"), injection_people=size("rob_people"),
                                     n_samples=size("samples"), plot=os.path.join(out_dir, f"robustness_{i}.png"), out=out)
        _, log = sub_run("test_prompt_robustness.py", argv, out, os.path.join(out_dir, f"robustness_{i}.log"))
        results[m["name"]] = result_or_error(out, log)
    return results


def run_eval(models, cfg, out_dir, size):
    """eval.py on every model; forgetting (against the base corpus) for all but the base itself."""
    results = {}
    for i, m in enumerate(models):
        out = os.path.join(out_dir, f"eval_{i}.json")
        metrics = ("perplexity", "qa", "repetition", "bias") + (("forgetting",) if i else ())
        argv = model_flags(m) + opts(data_dir=cfg["data_dir"], device=cfg["device"], seed=cfg["seed"],
                                     max_people=size("eval_people"), bias_people=size("bias_people"),
                                     rep_prompts=size("rep_prompts"), metrics=metrics, out=out)
        if i and cfg["base_data_dir"]:
            argv += opts(base_ckpt=models[0]["ckpt"], base_data_dir=cfg["base_data_dir"])
        _, log = sub_run("eval.py", argv, out, os.path.join(out_dir, f"eval_{i}.log"))
        results[m["name"]] = result_or_error(out, log)
    return results


def run_figures(models, cfg, out_dir):
    """Attention maps and gradient saliency of the first fine-tuned model (else the base) for one Q/A prompt."""
    from utils.model_under_test import load_model_under_test
    from utils.data import load_meta
    from utils.plot import model_title, plot_attention_maps, plot_saliency
    from utils.quality_metrics import dataset_fields
    from utils.records import load_people, load_schema
    from utils.tokenizer import get_tokenizer
    m = next((x for x in models[1:] if not x["patch"]), models[0])
    meta, schema = load_meta(cfg["data_dir"]), load_schema(cfg["data_dir"])
    fields = dataset_fields(meta, schema)
    person, field = next((p, f) for p in load_people(cfg["data_dir"], "train", schema) for f in fields
                         if schema.has(p, f))  # a canary has no field of the schema: the first person who has
    prompt = schema.qa_prompt(person, field, 0)
    model, _ = load_model_under_test(m["ckpt"], device=cfg["device"])
    tok = get_tokenizer(meta)
    att, sal = os.path.join(out_dir, "attention.png"), os.path.join(out_dir, "saliency.png")
    title = model_title(m["name"], m["ckpt"], m["patch"], m.get("privacy"))  # which model, patch, DP setting
    plot_attention_maps(model, tok, prompt, att, title=title)
    plot_saliency(model, tok, prompt, sal, title=title)
    return {"model": m["name"], "prompt": prompt, "attention": att, "saliency": sal}


# --------------------------------------------------------------------------- REPORT.md
def md_table(headers, rows):
    def cell(v):
        if v is None:
            return "–"
        if isinstance(v, float):
            return "nan" if math.isnan(v) else f"{v:.4g}"
        return str(v).replace("|", "\\|").replace("\n", " ")
    lines = ["| " + " | ".join(map(str, headers)) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    return "\n".join(lines + ["| " + " | ".join(cell(v) for v in r) + " |" for r in rows])


def last_line(text):
    lines = [ln for ln in text.strip().splitlines() if ln.strip()]
    return lines[-1] if lines else "no output"


def summary_rows(report):
    """The headline table: one row per model, one column per key number."""
    leak = {(r["ckpt"], r.get("patch") or ""): r for r in get(report, "leakage", "models") or []
            if r["role"] != "must_refuse"}
    rows = []
    for m in report["models"]:
        name = m["name"]
        lrow = leak.get((m["ckpt"], m["patch"] or ""))
        ev = get(report, "eval", name) or {}
        rb = get(report, "robustness", name) or {}
        mia = get(report, "mia", "models", name, "result") or {}
        typo = (rb.get("typos") or [{}])[0].get("overall", {})
        rows.append([name, get(m, "privacy", "epsilon"), get(lrow, "max_exposure"),
                     get(lrow, "extraction", "greedy_gap"), mia_selected(mia), get(ev, "perplexity", "ppl"),
                     get(ev, "qa", "exact_match"), get(ev, "qa", "bleu"), get(ev, "qa", "rouge_l"),
                     get(ev, "forgetting", "ratio"), get(rb, "paraphrase", "overall", "consistency"),
                     get(rb, "paraphrase", "overall", "correctness"), typo.get("drop"),
                     get(rb, "injection", "max_gain")])
    headers = ["model", "ε (claimed)", "max exposure, inserted (bits)", "extraction gap",
               "MIA AUC (attack chosen on half, scored on the other) [95% CI]", "val ppl",
               "held-out EM", "BLEU", "ROUGE-L", "forgetting (ppl ×)", "paraphrase consistency",
               "paraphrase correctness", "typo drop", "injection gain (max)"]
    return headers, rows


# --------------------------------------------------------------------------- statistics: intervals, verdicts
def with_ci(value, ci):
    """'0.612 [0.540, 0.690]'; the value alone when there is no interval."""
    if value is None:
        return None
    return f"{value:.3f}" + (f" [{ci[0]:.3f}, {ci[1]:.3f}]" if ci else "")


def mia_selected(result):
    """The summary's MIA cell: the attack chosen on one half of the people, scored on the other, with its
    interval, and "too few records to tell" when the interval includes 0.5. Never a maximum over attacks."""
    sel = get(result, "selected")
    if not sel:
        return None
    cell = f"{with_ci(sel['auc'], sel.get('auc_interval'))} ({sel['attack']})"
    return cell + ("; too few records to tell" if sel.get("verdict") == "too few records to tell" else "")


def mia_md(result):
    ci = lambda m, k: with_ci(m.get(k), m.get(f"{k}_interval"))  # noqa: E731
    attacks = [*result["metrics"].items()] + ([("blind baseline (text only, no model)", result["blind"])]
                                              if result.get("blind") else [])
    rows = [[name, ci(m, "auc"), ci(m, "tpr_at_0.01_fpr"), ci(m, "tpr_at_0.001_fpr"), m.get("verdict")]
            for name, m in attacks]
    lines = [f"{result['n_members']} members (train) vs {result['n_nonmembers']} non-members (val), split by person; "
             f"intervals: stratified bootstrap 95%, {result.get('resamples', '?')} resamples.",
             md_table(["attack", "AUC", "TPR @ 1% FPR", "TPR @ 0.1% FPR", "verdict"], rows)]
    sel = result.get("selected")
    if sel:
        lines.append(f"Chosen on one half of the people: **{sel['attack']}**; on the other half "
                     f"({sel['n_members']} + {sel['n_nonmembers']}): AUC {with_ci(sel['auc'], sel['auc_interval'])}, "
                     f"{sel['verdict']}.")
    if get(result, "blind", "biased_split"):
        lines.append("**The blind baseline, which never looks at the model, beats chance: the member/non-member "
                     "split is biased, and the attacks above measure the split as much as the model.**")
    return "\n\n".join(lines)


def audit_md(a):
    claim = a.get("claimed_epsilon")
    rows = []
    for name in ("white_box", "black_box"):
        x = a.get(name)
        if x:
            rows.append([name.replace("_", "-"), x.get("scored_from"), x.get("m"), x.get("included"),
                         f"{x.get('v')}/{x.get('r')}", x.get("epsilon_lower"), x.get("epsilon_lower_steinke"),
                         x.get("max_certifiable"), "none (no DP)" if claim is None else claim,
                         with_ci(x.get("tpr_at_0.01"), x.get("tpr_at_0.01_interval")),
                         with_ci(x.get("tpr_at_0.001"), x.get("tpr_at_0.001_interval"))])
    note = ("White-box: gradient canaries added as already-clipped contributions just before the noise; "
            "black-box: new-token canary records scored on the released model. ε lower bounds at "
            f"{a.get('confidence', 0.95):.0%} confidence, δ = {a.get('delta')}; max certifiable is the most "
            "this many canaries can show. passed: " + str(a.get("passed")))
    return md_table(["audit", "scored from", "canaries m", "included", "correct", "ε ≥ (f-DP)", "ε ≥ (Steinke)",
                     "max certifiable", "claimed ε", "TPR @ 1% FPR", "TPR @ 0.1% FPR"], rows) + "\n\n" + note


def leakage_md(leak):
    from utils.canary_exposure import CHANCE_EXPOSURE
    lines = []
    reps = sorted({int(k) for r in leak["models"] for k in (r.get("exposure_by_repetitions") or {})})
    n = leak.get("n_candidates")
    lines.append(f"Canary exposure in bits (rank among {n} same-format candidates; maximum "
                 f"{math.log2(n + 1):.1f}, chance {CHANCE_EXPOSURE:.2f}). Cells: mean exposure (>= the lowest "
                 f"rank-based 95% lower bound) [skew-normal extrapolation: a fitted model, not a measurement], "
                 f"canaries ranked first / canaries. reps=0 are never-inserted controls, the chance reference; "
                 f"'max inserted' counts inserted canaries only." if n else "Canary exposure in bits.")
    rows = []
    for r in leak["models"]:
        by = {int(k): v for k, v in (r.get("exposure_by_repetitions") or {}).items()}
        rows.append([r["label"], r["status"]] + [
            f"{by[k]['mean_exposure']:.1f} (>= {by[k].get('exposure_lower', 0):.1f}) "
            f"[{by[k]['mean_exposure_extrapolated']:.1f}] {by[k]['ranked_first']}/{by[k]['n']}"
            if k in by else None for k in reps] + [r.get("max_exposure"), r.get("control_max_exposure")])
    lines.append(md_table(["model", "status"] + [f"reps={k}" for k in reps] + ["max inserted", "max control"], rows))
    ext = [r for r in leak["models"] if r.get("extraction")]
    if ext:
        lines.append("Extraction: exact-match rate of the sensitive answers of training people vs held-out "
                     "people (the held-out rate is what guessing from the population gives).")
        lines.append(md_table(["model", "greedy train", "greedy val", "gap", "sampled train", "sampled val"],
                              [[r["label"], get(r, "extraction", "train", "greedy"), get(r, "extraction", "val", "greedy"),
                                get(r, "extraction", "greedy_gap"), get(r, "extraction", "train", "sampled"),
                                get(r, "extraction", "val", "sampled")] for r in ext]))
    for f in leak.get("failures", []) + leak.get("errors", []):
        lines.append(f"- **FAIL**: {f}")
    return "\n\n".join(lines)


def write_markdown(report, path):
    from utils import prompt_probes, quality_metrics
    where = os.path.dirname(os.path.abspath(path))
    fig = lambda p, alt: f"![{alt}]({os.path.relpath(p, where)})"  # noqa: E731
    md = [f"# Test report: {report['run_dir']}", "",
          f"Generated {report['generated']} on {report['device']}; data {report['data_dir']}"
          + (f", base corpus {report['base_data_dir']}" if report["base_data_dir"] else "")
          + (" (quick sample sizes)" if report["quick"] else "") + ".",
          "", overall_md(report)]
    for s in report.get("skipped", []):
        md.append(f"- skipped {s}")
    for f in report["failures"]:
        md.append(f"- {f}")
    dp_word = {True: "on", False: "off", None: "unknown"}
    md += ["", "## Models", "", md_table(["model", "checkpoint", "patch", "DP", "claimed ε", "δ"],
                                         [[m["name"], m["ckpt"], m["patch"] or None,
                                           "base" if m["name"] == "base" else dp_word[m.get("dp")],
                                           get(m, "privacy", "epsilon"), get(m, "privacy", "delta")]
                                          for m in report["models"]])]
    md += ["", "## Summary", "", md_table(*summary_rows(report))]
    if "leakage" in report:
        md += ["", "## Leakage (canary exposure and extraction)", "", leakage_md(report["leakage"])]
        for p in report["leakage"]["plots"]:
            md += ["", fig(p, "canary exposure by repetitions")]
    if "mia" in report:
        md += ["", "## Membership inference"]
        for name, r in report["mia"]["models"].items():
            md += ["", f"### {name}", "", mia_md(r["result"]) if r["result"] else f"error: {r['error']}"]
            if r["plot"]:
                md += ["", fig(r["plot"], f"ROC {name}")]
    if "audit" in report:
        a = report["audit"]
        md += ["", "## One-run privacy audit (Steinke, Nasr, Jagielski 2023)", "",
               audit_md(a["result"]) if a["result"] else f"error: {a['error']}"]
        if a.get("plot"):
            md += ["", fig(a["plot"], "audit scores")]
    for key, title, mod in (("robustness", "Prompt robustness", prompt_probes), ("eval", "Quality", quality_metrics)):
        if key not in report:
            continue
        md += ["", f"## {title}"]
        for name, r in report[key].items():
            md += ["", f"### {name}", ""]
            if "error" in r:
                md.append(f"error: {r['error']}")
                continue
            for t, headers, rows in mod.tables(r):
                md += [f"**{t}**", "", md_table(headers, rows), ""]
            if r.get("plot"):
                md.append(fig(r["plot"], f"{title} {name}"))
    if "figures" in report:
        f = report["figures"]
        md += ["", "## Interpretability", "", f"Model {f['model']}, prompt `{f['prompt']}`.", "",
               fig(f["attention"], "attention maps"), "", fig(f["saliency"], "gradient x input saliency")]
    md += ["", "Seconds per part: " + ", ".join(f"{k} {v}" for k, v in report.get("seconds", {}).items()) + "."]
    write_bytes(path, ("\n".join(md) + "\n").encode())


# --------------------------------------------------------------------------- the whole report
def build_report(cfg, log=print):
    """Run the selected sub-runs on cfg['run_dir'] and write REPORT.md + report/report.json; returns the
    report dict (its 'passed' says whether every sub-run passed)."""
    unknown = set(cfg["tests"]) - set(KNOWN_TESTS)
    if unknown:
        raise UserError(f"unknown tests {sorted(unknown)}; choose from {list(KNOWN_TESTS)}")
    if not cfg["run_dir"]:
        raise UserError("--run_dir is required (a folder with base/ckpt.pt; see report.py's docstring)")
    spec, models = discover(cfg["run_dir"], cfg["key_file"], cfg["tenant"])
    cfg = {**cfg, "data_dir": cfg["data_dir"] or spec.get("data_dir") or "data/employees",
           "base_data_dir": cfg["base_data_dir"] or spec.get("base_data_dir") or ""}
    from utils.data import load_meta
    load_meta(cfg["data_dir"])  # a clear error now rather than in every sub-run
    out_dir = os.path.join(cfg["run_dir"], "report")
    os.makedirs(out_dir, exist_ok=True)
    size = lambda k: SIZES[k][1 if cfg["quick"] else 0]  # noqa: E731
    report = {"run_dir": cfg["run_dir"], "generated": datetime.datetime.now().isoformat(timespec="seconds"),
              "device": cfg["device"], "data_dir": cfg["data_dir"], "base_data_dir": cfg["base_data_dir"],
              "quick": cfg["quick"], "models": models}
    log(f"{len(models)} models: {', '.join(m['name'] for m in models)}")
    steps = [("leakage", lambda: run_leakage(models, cfg, out_dir, size)),
             ("mia", lambda: run_mia(models, cfg, out_dir, size)),
             ("audit", lambda: run_audit(models, cfg, out_dir)),
             ("robustness", lambda: run_robustness(models, cfg, out_dir, size)),
             ("eval", lambda: run_eval(models, cfg, out_dir, size)),
             ("figures", lambda: run_figures(models, cfg, out_dir))]
    steps = [(name, step) for name, step in steps
             if (cfg["audit"] if name == "audit" else name in cfg["tests"])
             and not (name == "robustness" and len(models) == 1)]
    progress = Progress("report steps", len(steps), hint="--quick=True, or fewer --tests")
    for name, step in steps:
        log(f"{name} ...")
        start = time.perf_counter()
        try:
            report[name] = step()
        except ImportError as e:  # a sibling script that is not there (yet)
            report.setdefault("skipped", []).append(f"{name}: {e}")
        report.setdefault("seconds", {})[name] = round(time.perf_counter() - start, 1)
        progress.update()
    report["thresholds"] = {"max_exposure": cfg["max_exposure"]}
    report["failures"] = failures(report)
    report["passed"] = not report["failures"]
    report_path = cfg["report"] or os.path.join(cfg["run_dir"], "REPORT.md")
    write_json(os.path.join(out_dir, "report.json"), report)
    write_markdown(report, report_path)
    report["path"] = report_path
    return report


def gates(report):
    """The checks that had a stated threshold: (what, threshold, passed). Only these decide PASS/FAIL."""
    out = []
    leak = report.get("leakage")
    if leak:
        if any(r["role"] == "must_refuse" for r in leak.get("models", [])):
            out.append(("leakage: a wrong key is refused", "must fail closed",
                        not any(r["role"] == "must_refuse" and not r["status"].startswith("refused")
                                for r in leak["models"])))
        if (report.get("thresholds") or {}).get("max_exposure", -1) > 0:
            out.append(("leakage: inserted canaries' max exposure", f"<= {report['thresholds']['max_exposure']} bits",
                        leak["passed"]))
    audit = get(report, "audit", "result")
    if audit and audit.get("dp"):
        out.append(("privacy audit: ε lower bounds", f"<= the claimed ε {audit.get('claimed_epsilon')}",
                    bool(audit.get("passed"))))
    for key in ("robustness", "eval"):
        for n, r in (report.get(key) or {}).items():
            for c in r.get("checks") or []:
                out.append((f"{key} {n}: {c['check']}", c.get("threshold"), bool(c["passed"])))
    return out


def overall_md(report):
    """PASS/FAIL only per stated threshold; with none, which checks ran and that none was gated."""
    ran = [k for k in ("leakage", "mia", "audit", "robustness", "eval", "figures") if k in report]
    g = gates(report)
    if not g and not report["failures"]:
        return (f"**Overall: no thresholds were set, so nothing was gated.** Checks that ran: "
                f"{', '.join(ran) or 'none'}. The numbers below are measurements, not verdicts.")
    head = f"**Overall: {'PASS' if report['passed'] else 'FAIL'}** against {len(g)} stated threshold(s):"
    return "\n".join([head, ""] + [f"- {'PASS' if ok else 'FAIL'}: {what} ({limit})" for what, limit, ok in g])


def failures(report):
    out = []
    if "leakage" in report and not report["leakage"]["passed"]:
        out += [f"leakage: {f}" for f in report["leakage"].get("failures", []) + report["leakage"].get("errors", [])] \
            or ["leakage: failed"]
    if "mia" in report:
        out += [f"mia {n}: " + (r["error"] or "failed its checks") for n, r in report["mia"]["models"].items() if r["code"]]
    if "audit" in report and not report["audit"]["passed"]:
        out.append("privacy audit: " + (report["audit"]["error"] or "the lower bound exceeds the claimed epsilon"))
    for key in ("robustness", "eval"):
        for n, r in (report.get(key) or {}).items():
            if "error" in r:
                out.append(f"{key} {n}: {r['error']}")
            elif not r.get("passed", True):
                out.append(f"{key} {n}: " + "; ".join(c["check"] for c in r["checks"] if not c["passed"]))
    return out


def main(argv=None):
    cfg = configure(DEFAULTS, argv or [])
    report = build_report(cfg)
    headers, rows = summary_rows(report)
    from utils.model_under_test import format_table
    print("\n" + format_table(headers, rows))
    for s in report.get("skipped", []):
        print(f"skipped {s}")
    for f in report["failures"]:
        print(f"FAIL: {f}", file=sys.stderr)
    print(f"wrote {report['path']} and {os.path.join(cfg['run_dir'], 'report', 'report.json')}")
    return 0 if report["passed"] else 1


if __name__ == "__main__":
    raise SystemExit(run_cli(main))
