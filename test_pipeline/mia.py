"""
Membership inference on one model: can an attacker tell the records it was trained on from records it
never saw? Members are the train split's records, non-members the val split's (split by person, canary
people left out). Each attack (loss, zlib, Min-K%, Min-K%++ and, with --ref_ckpt, the reference score;
defined, with their papers, in utils/membership.py) is reported with ROC AUC and TPR at 1% and 0.1% FPR,
each with a stratified bootstrap 95% interval (--resamples), and "too few records to tell" where the AUC
interval includes 0.5. No maximum over attacks: the attack is chosen on one random half of the people and
scored on the other half. A blind baseline (the text's zlib ratio, no model) is scored too: if it beats
chance the member/non-member split is biased and the report says so.

    python test_pipeline/mia.py --ckpt=out/ft/ckpt.pt --ref_ckpt=out/base/ckpt.pt --data_dir=data/employees \
        --out=mia.json --plot=roc.png [--max_auc=0.6]
"""
import sys

import numpy as np

from configurator import configure
from utils.model_under_test import format_table, load_model_under_test, pyplot, save_figure
from utils.atomic import write_json
from utils.cli import UserError, run_cli
from utils.data import load_meta
from utils.membership import (attack_metrics, blind_scores, fmt_ci, mia_scores, read_records, record_logprobs,
                              scored_text, select_and_score, token_scores)
from utils.tokenizer import get_tokenizer

DEFAULTS = dict(
    ckpt="",  # the model under attack
    patch="",  # optional sealed patch applied to ckpt with key_file
    key_file="",  # the patch's key
    tenant="",    # the patch's tenant ('' = the one the key file is bound to)
    ref_ckpt="",  # the reference model (the base model before fine-tuning); '' = no reference score
    data_dir="data/employees",  # members = its train split, non-members = its val split
    n_records=500,  # members and non-members each (0 = as many as the smaller side has)
    k_percent=20.0,  # Min-K% and Min-K%++ average the lowest k% of token scores
    score_tokens="all",  # 'all' | 'answer' (answer tokens only; needs {split}_answer_mask.bin)
    batch_size=32,  # records per forward pass
    seed=1337,      # seeds which records are drawn
    device="cpu",   # 'cpu' or 'cuda'
    out="",  # JSON report
    plot="",  # PNG: ROC curves (log-log)
    max_auc=-1.0,  # > 0: fail (exit 1) when any attack's AUC exceeds this
    resamples=1000,  # bootstrap resamples for every interval (>= 100)
)


# ---------------------------------------------------------------- output
def plot_roc(curves, metrics, path, n_members, n_nonmembers):
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(5.5, 5))
    floor = 1.0 / max(n_nonmembers, 1) / 2
    for name, (fpr, tpr) in curves.items():
        ax.step(np.maximum(fpr, floor), np.maximum(tpr, floor), where="post",
                label=f"{name} (AUC {fmt_ci(metrics[name]['auc'], metrics[name]['auc_interval'])})"
                if "auc_interval" in metrics[name] else f"{name} (AUC {metrics[name]['auc']:.3f})")
    grid = np.logspace(np.log10(floor), 0, 50)
    ax.plot(grid, grid, ls="--", c="gray", lw=0.8, label="chance")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("false positive rate")
    ax.set_ylabel("true positive rate")
    ax.set_title(f"Membership inference ({n_members} members, {n_nonmembers} non-members)")
    ax.legend(fontsize=8, loc="lower right")
    save_figure(fig, path)


def main(argv=None):
    cfg = configure(DEFAULTS, sys.argv[1:] if argv is None else argv)
    if not cfg["ckpt"]:
        raise UserError("--ckpt is required (the model under attack)")
    if cfg["score_tokens"] not in ("all", "answer"):
        raise UserError(f"score_tokens must be 'all' or 'answer', got {cfg['score_tokens']!r}")
    if not 0 < cfg["k_percent"] <= 100:
        raise UserError("k_percent must be in (0, 100]")
    if cfg["resamples"] < 100:
        raise UserError(f"--resamples must be >= 100 (a 95% interval from fewer is noise), got {cfg['resamples']}")
    if cfg["n_records"] < 0:
        raise UserError(f"--n_records must be >= 0 (0 = all), got {cfg['n_records']}")
    meta = load_meta(cfg["data_dir"])
    tok = get_tokenizer(meta)
    model, _ = load_model_under_test(cfg["ckpt"], cfg["patch"] or None, cfg["key_file"] or None, cfg["device"],
                                     cfg["tenant"])
    bs = model.config.block_size
    members = read_records(cfg["data_dir"], "train", bs, meta, cfg["score_tokens"])
    nonmembers = read_records(cfg["data_dir"], "val", bs, meta, cfg["score_tokens"])
    n = min(len(members), len(nonmembers))
    if cfg["n_records"] > 0:
        n = min(n, cfg["n_records"])
    if n < 2:
        raise UserError(f"{cfg['data_dir']}: too few distinct records ({len(members)} train, {len(nonmembers)} val)")
    rng = np.random.default_rng(cfg["seed"])
    records = ([members[i] for i in sorted(rng.permutation(len(members))[:n])]
               + [nonmembers[i] for i in sorted(rng.permutation(len(nonmembers))[:n])])
    labels = np.r_[np.ones(n, dtype=bool), np.zeros(n, dtype=bool)]
    texts = [scored_text(tok, r, s) for r, s in records]

    print(f"scoring {n} members and {n} non-members with {cfg['ckpt']}" + (" (patched)" if cfg["patch"] else ""))
    target = token_scores(model, records, cfg["batch_size"])
    del model
    reference = None
    if cfg["ref_ckpt"]:
        ref_model, _ = load_model_under_test(cfg["ref_ckpt"], device=cfg["device"])
        if ref_model.config.block_size < bs:
            raise UserError(f"the reference model's block_size {ref_model.config.block_size} < the target's {bs}")
        reference = record_logprobs(ref_model, records, cfg["batch_size"], "MIA reference scores")
        del ref_model
    scores = mia_scores(records, texts, target, reference, cfg["k_percent"])
    metrics, curves = {}, {}
    for name, s in scores.items():
        metrics[name], curves[name] = attack_metrics(s, labels, cfg["resamples"], cfg["seed"])
        metrics[name]["member_mean"] = float(s[labels].mean())
        metrics[name]["nonmember_mean"] = float(s[~labels].mean())
    selected = select_and_score(scores, labels, cfg["seed"], cfg["resamples"])
    blind, _ = attack_metrics(blind_scores(texts), labels, cfg["resamples"], cfg["seed"])
    blind["biased_split"] = blind["verdict"] != "too few records to tell"

    print(f"\nMembership inference on {cfg['ckpt']}: {n} members (train) vs {n} non-members (val), "
          f"tokens scored: {cfg['score_tokens']}, k = {cfg['k_percent']:g}%; "
          f"[intervals]: bootstrap 95%, {cfg['resamples']} resamples")
    rows = [[k, fmt_ci(m["auc"], m["auc_interval"]), fmt_ci(m["tpr_at_0.01_fpr"], m["tpr_at_0.01_fpr_interval"]),
             fmt_ci(m["tpr_at_0.001_fpr"], m["tpr_at_0.001_fpr_interval"]), m["verdict"]]
            for k, m in [*metrics.items(), ("blind (no model)", blind)]]
    print(format_table(["attack", "AUC", "TPR@1%FPR", "TPR@0.1%FPR", "verdict"], rows))
    print(f"selected attack: {selected['attack']} (best AUC on a random half of the people), scored on the other "
          f"half ({selected['n_members']} + {selected['n_nonmembers']}): AUC "
          f"{fmt_ci(selected['auc'], selected['auc_interval'])}, {selected['verdict']}")
    if blind["biased_split"]:
        print("WARNING: the blind baseline, which never looks at the model, tells members from non-members: "
              "the member/non-member split is biased, so the attacks' AUCs measure the split, not the model")
    if n < 1000:
        print(f"(with {n} non-members, TPR@0.1%FPR is the TPR at zero false positives)")
    fails = [f"{k}: AUC {m['auc']:.3f} > {cfg['max_auc']}" for k, m in metrics.items()
             if cfg["max_auc"] > 0 and m["auc"] > cfg["max_auc"]]
    report = dict(config=cfg, n_members=n, n_nonmembers=n, metrics=metrics, selected=selected, blind=blind,
                  resamples=cfg["resamples"], failures=fails, passed=not fails)
    if cfg["out"]:
        write_json(cfg["out"], report)
        print(f"wrote {cfg['out']}")
    if cfg["plot"]:
        plot_roc(curves, metrics, cfg["plot"], n, n)
        print(f"wrote {cfg['plot']}")
    for f in fails:
        print(f"FAIL: {f}", file=sys.stderr)
    if fails:
        sys.exit(1)
    return report


if __name__ == "__main__":
    run_cli(main)
