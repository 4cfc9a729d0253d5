"""
One-run privacy audits of a fine-tune (Steinke, Nasr & Jagielski 2023, "Privacy Auditing with One (1)
Training Run"), white-box and black-box in the same run, each scored with two estimators
(utils.audit_bounds: Steinke et al.'s bound, valid for any (eps, delta)-DP run, and Mahloujifar et al.
2024's f-DP estimator with the Gaussian tradeoff, tighter).

- White-box (DP runs): m gradient canaries (utils.gradient_canaries): Dirac canaries, each included with
  probability 1/2 and then Poisson-sampled at the records' rate q each step, added as already-clipped
  contributions (norm max_grad_norm) just before the noise, for any grad_sample_mode (ghost, hooks, bk).
  Scores come from the per-step privatized gradient sums, not from the released model.
- Black-box: m_input new-token canaries (Panda et al., ICLR 2025): records made of token ids that never
  occur in the dataset, so only the canary itself moves their embeddings and predictions; each included
  with probability 1/2 as one more training record. Scores come from the released model: how much
  training raised the canary's mean token log-prob. Also reported: AUC and TPR at 1% and 0.1% FPR, with
  bootstrap intervals (utils.bootstrap).

Guesses: "in" for the k highest scores and "out" for the k lowest, k = k_fractions x canaries, fixed
before the run: 0.05 maximizes the bound in simulations of the Gaussian mechanism at claims 4 and 8;
0.4 (guesses on 80% of the canaries, fewer than either side holds) lets a gross bug certify more than 8
(with m = 2000, k = 0.05 m can show at most 6). The best of the two is reported, each at half the
significance (Bonferroni).
max_certifiable is the bound if every guess were right: the most this m can show. A one-run audit of a Gaussian mechanism reaches about half its epsilon at best
(simulations in tests/test_audit_bounds.py), so read the bound as "at least", never as the truth.

Full batch (full_batch=True, default): batch_size = every training record, q = 1, where the run's
tradeoff is exactly Gaussian (mu = sqrt(steps) / sigma) and the audit is at its most powerful; any q
works (full_batch=False keeps your batch_size). The claim is the accountant's epsilon for the CALIBRATED
noise: noise_bug_factor < 1 runs with that much less noise while claiming the same epsilon (a planted
bug: the power check). The claim is always the add/remove epsilon (a canary is added or left out), from
the run's accountant ('pld' or 'prv' give the tightest claims). Any bound above the claim exits 1: the
implementation or its accounting is broken.

    python test_pipeline/privacy_audit.py config/finetune_dp_employees.py --target_epsilon=8 --m=2000 \
        --accountant=prv --max_steps=50 --out=audit.json --plot=audit.png
    python test_pipeline/privacy_audit.py ... --noise_bug_factor=0.1     # must exit 1

Every finetune_dp key is accepted; this script changes data_dir (the dataset plus the included input
canaries, in a temporary folder), batch_size (full_batch) and save (False). audit_seed < 0 draws the
canaries' coins from OS entropy; a fixed audit_seed makes the audit reproducible, which is fine for
testing an implementation and void as a guarantee. The run's DP noise and sampling come from a fresh
OS secret unless reproducible_noise_seed is set (the same caveat: replayable, so no guarantee).
"""
import math
import os
import sys
import tempfile

import numpy as np
import torch
from opacus.utils.batch_memory_manager import BatchMemoryManager

from configurator import configure
from test_pipeline.model_under_test import format_table, pyplot, save_figure
from utils import audit_bounds, bootstrap
from utils.atomic import json_safe, write_json
from utils.cli import UserError, run_cli
from utils.data import load_meta
from utils.gradient_canaries import GradientCanaries
from utils.input_canaries import canary_logprob, draw_new_token_canaries, unused_tokens, write_audit_dataset
from utils.progress import Progress
from utils.tokenizer import get_tokenizer

DEFAULTS = dict(
    m=2000,  # white-box gradient canaries (DP runs), each included with probability 1/2
    m_input=200,  # black-box new-token canary records, each included with probability 1/2; 0 = none
    input_length=8,  # tokens per new-token canary (+ end of text)
    k_fractions=(0.05, 0.4),  # guesses per side, as fractions of the canaries (fixed before the run)
    confidence=0.95,  # confidence of the reported epsilon lower bound
    audit_delta=-1.0,  # delta of the null hypothesis; < 0 = the run's claimed delta (1e-5 without DP)
    audit_seed=-1,  # < 0: OS entropy; >= 0: reproducible coins (testing only)
    full_batch=True,  # batch_size = every training record (q = 1): the audit's most powerful setting
    noise_bug_factor=1.0,  # < 1 plants a bug: that much less noise than the claim is calibrated for
    score_batch_size=64,  # canaries scored per forward pass
    out="",  # JSON report
    plot="",  # PNG: score histograms of included vs excluded canaries, both audits
    # finetune_dp keys this script sets differently from finetune_dp.py
    save=False,  # the audit's fine-tuned model is never written to disk
    out_dir="out/audit",  # only used with save=True
)
FPRS = (0.01, 0.001)


# ---------------------------------------------------------------- the run
def train_with_canaries(ft_cfg, cfg, input_records, log):
    """One DP-SGD (or plain) run with gradient canaries on its optimizer; returns (model, claim, canaries,
    input scores before training)."""
    from utils import finetune as ft_loop
    before = {}

    def score_before(model):  # the prepared model, just ahead of the first step
        before["lp"] = canary_logprob(model, input_records, cfg["score_batch_size"]) if input_records else None

    run = ft_loop.build_run(ft_cfg, on_model_ready=score_before, log=log)
    tr, plan = run.trainer, run.plan
    canaries = None
    if ft_cfg["dp"] and cfg["m"]:
        seed = None if cfg["audit_seed"] < 0 else cfg["audit_seed"]
        canaries = GradientCanaries(tr.optimizer, cfg["m"], plan["sample_rate"], plan["noise_multiplier"],
                                    ft_cfg["max_grad_norm"], seed)
    if cfg["noise_bug_factor"] != 1.0:
        if not ft_cfg["dp"]:
            raise UserError("noise_bug_factor needs a DP run")
        tr.optimizer.noise_multiplier = plan["noise_multiplier"] * cfg["noise_bug_factor"]
        log(f"PLANTED BUG: noise multiplier {tr.optimizer.noise_multiplier:.4g} instead of "
            f"{plan['noise_multiplier']:.4g}; the claim stays the calibrated one")
    progress = Progress("audit training steps", plan["steps"], hint="--max_steps")
    with BatchMemoryManager(data_loader=tr.loader, max_physical_batch_size=ft_cfg["microbatch_size"],
                            optimizer=tr.optimizer) as batches:
        while tr.steps < plan["steps"]:
            for x, y in batches:
                done = tr.steps
                tr.train_microbatch(x, y)
                progress.update(tr.steps - done)
                if tr.steps >= plan["steps"]:
                    break
    claim = None
    if ft_cfg["dp"]:
        claim = dict(epsilon=ft_loop.epsilon_after(tr.steps, plan["noise_multiplier"], plan["sample_rate"],
                                                   plan["delta"], plan["accountant"]),
                     delta=plan["delta"], noise_multiplier=plan["noise_multiplier"], sample_rate=plan["sample_rate"],
                     steps=tr.steps, accountant=plan["accountant"], grad_sample_mode=tr.mode,
                     max_grad_norm=ft_cfg["max_grad_norm"], noise_bug_factor=cfg["noise_bug_factor"])
    return tr.close(), claim, canaries, before["lp"]


def score_audit(scores, included, delta, cfg):
    """Both estimators at the one planned k, plus AUC and TPR at FPRS with bootstrap intervals."""
    m = len(scores)
    ks = sorted({max(1, int(round(f * m))) for f in cfg["k_fractions"]})
    out = {name: audit_bounds.audit(scores, included, delta, cfg["confidence"], name, ks)
           for name in audit_bounds.ESTIMATORS}
    pos, neg = scores[included], scores[~included]
    rates = dict(auc=audit_bounds.roc_auc(pos, neg),
                 auc_interval=bootstrap.interval(audit_bounds.roc_auc, pos, neg))
    for fpr in FPRS:
        def tpr(p, n, fpr=fpr):
            return audit_bounds.tpr_at_fpr(p, n, fpr)
        rates[f"tpr_at_{fpr:g}"] = tpr(pos, neg)
        rates[f"tpr_at_{fpr:g}_interval"] = bootstrap.interval(tpr, pos, neg)
    return dict(m=m, included=int(included.sum()), k=out["fdp"]["k"], ks=ks, epsilon_lower=out["fdp"]["epsilon"],
                epsilon_lower_steinke=out["steinke"]["epsilon"], max_certifiable=out["fdp"]["max_certifiable"],
                max_certifiable_steinke=out["steinke"]["max_certifiable"], r=out["fdp"]["r"], v=out["fdp"]["v"],
                resamples=bootstrap.RESAMPLES, **rates, scores=scores.tolist(), included_mask=included.tolist())


def run_audit(cfg, log=print):
    """Draw, train once, score, guess, bound. Returns the report dict."""
    from utils import finetune as ft_loop
    for key in ("m", "m_input"):
        if cfg[key] < 0 or cfg[key] == 1:
            raise UserError(f"{key} must be 0 or >= 2; got {cfg[key]}")
    if not cfg["m_input"] and not (cfg["dp"] and cfg["m"]):
        raise UserError("nothing to audit: gradient canaries need dp=True and m >= 2; or set m_input >= 2")
    if not cfg["k_fractions"] or not all(0 < f <= 0.5 for f in cfg["k_fractions"]):
        raise UserError(f"k_fractions must be fractions in (0, 0.5]; got {cfg['k_fractions']}")
    if not 0 < cfg["confidence"] < 1:
        raise UserError("confidence must be in (0, 1)")
    if not 0 < cfg["noise_bug_factor"] <= 1:
        raise UserError(f"noise_bug_factor must be in (0, 1]; got {cfg['noise_bug_factor']}")
    meta = load_meta(cfg["data_dir"])
    rng = np.random.default_rng(None if cfg["audit_seed"] < 0 else cfg["audit_seed"] + 1)
    input_records, input_included = [], np.zeros(0, bool)
    if cfg["m_input"]:
        input_records, input_included = draw_new_token_canaries(unused_tokens(cfg["data_dir"]), cfg["m_input"],
                                                                cfg["input_length"], get_tokenizer(meta).eot, rng)
    with tempfile.TemporaryDirectory(prefix="audit_data_") as tmp:
        write_audit_dataset(cfg["data_dir"], tmp, input_records, input_included)
        ft_cfg = {k: cfg.get(k, default) for k, default in ft_loop.DEFAULTS.items()}
        ft_cfg.update(data_dir=tmp, save=False)
        if cfg["full_batch"]:
            ft_cfg["batch_size"] = load_meta(tmp)["splits"]["train"]["records"]
            ft_cfg["microbatch_size"] = min(ft_cfg["microbatch_size"], ft_cfg["batch_size"])
        log(f"auditing: {cfg['m'] if cfg['dp'] else 0} gradient canaries, {cfg['m_input']} new-token canaries "
            f"({int(input_included.sum())} included); "
            + (f"DP-SGD, target epsilon {cfg['target_epsilon']}" if cfg["dp"] else "without DP"))
        model, claim, grad_canaries, before = train_with_canaries(ft_cfg, cfg, input_records, log)
    delta = cfg["audit_delta"] if cfg["audit_delta"] >= 0 else (claim["delta"] if claim else 1e-5)
    report = dict(dp=bool(cfg["dp"]), claimed_epsilon=claim["epsilon"] if claim else math.inf,
                  claimed_delta=claim["delta"] if claim else None, delta=delta, confidence=cfg["confidence"],
                  privacy=claim, white_box=None, black_box=None)
    if grad_canaries is not None:
        report["white_box"] = dict(route="already-clipped contribution just before the noise",
                                   scored_from="per-step privatized gradient sums",
                                   **score_audit(grad_canaries.scores(), grad_canaries.included, delta, cfg))
    if input_records:
        gain = canary_logprob(model, input_records, cfg["score_batch_size"]) - before
        report["black_box"] = dict(canaries="new-token (ids the dataset never uses)", scored_from="released model",
                                   **score_audit(gain, input_included, delta, cfg))
    bounds = [report[a][k] for a in ("white_box", "black_box") if report[a]
              for k in ("epsilon_lower", "epsilon_lower_steinke")]
    report["epsilon_lower_bound"] = max(bounds)
    report["passed"] = report["epsilon_lower_bound"] <= report["claimed_epsilon"]
    return report


def plot_scores(report, path):
    plt = pyplot()
    audits = [(name, report[name]) for name in ("white_box", "black_box") if report[name]]
    fig, axes = plt.subplots(1, len(audits), figsize=(6.5 * len(audits), 4), squeeze=False)
    claim = "no DP" if not report["dp"] else f"claimed eps {report['claimed_epsilon']:.2f}"
    for ax, (name, a) in zip(axes[0], audits):
        s, inc = np.array(a["scores"]), np.array(a["included_mask"])
        bins = np.linspace(s.min(), s.max(), 40) if s.max() > s.min() else 10
        ax.hist(s[inc], bins=bins, alpha=0.6, label="included")
        ax.hist(s[~inc], bins=bins, alpha=0.6, label="excluded")
        order = np.sort(s)
        ax.axvline(order[a["k"] - 1], c="k", ls=":", lw=1, label=f"guess cut-offs (k={a['k']} per side)")
        ax.axvline(order[len(order) - a["k"]], c="k", ls=":", lw=1)
        ax.set_title(f"{name.replace('_', '-')}: {a['v']}/{a['r']} right, eps >= {a['epsilon_lower']:.2f} "
                     f"(max {a['max_certifiable']:.2f}; {claim})", fontsize=9)
        ax.set_xlabel("log-likelihood ratio (per-step updates)" if name == "white_box"
                      else "log-likelihood gain from training (released model)")
        ax.set_ylabel("canaries")
        ax.legend(fontsize=8)
    save_figure(fig, path)


def _fmt_interval(x, ci):
    return f"{x:.3f} [{ci[0]:.3f}, {ci[1]:.3f}]"


def main(argv=None):
    from utils import finetune as ft_loop
    cfg = configure({**ft_loop.DEFAULTS, **DEFAULTS}, sys.argv[1:] if argv is None else argv)
    torch.manual_seed(cfg["seed"])
    report = run_audit(cfg)
    claim = report["claimed_epsilon"]
    print(f"\nOne-run privacy audits, {report['confidence']:.0%} confidence, delta {report['delta']:.3g}; "
          f"intervals: bootstrap 95%, {bootstrap.RESAMPLES} resamples")
    rows = []
    for name in ("white_box", "black_box"):
        a = report[name]
        if a:
            rows.append([name.replace("_", "-"), a["m"], a["included"], a["k"], f"{a['v']}/{a['r']}",
                         a["epsilon_lower"], a["epsilon_lower_steinke"], a["max_certifiable"],
                         claim if math.isfinite(claim) else "none (no DP)", _fmt_interval(a["auc"], a["auc_interval"]),
                         _fmt_interval(a["tpr_at_0.01"], a["tpr_at_0.01_interval"]),
                         _fmt_interval(a["tpr_at_0.001"], a["tpr_at_0.001_interval"])])
    print(format_table(["audit", "m", "included", "k/side", "correct", "eps lower (f-DP)", "eps lower (Steinke)",
                        "max certifiable", "claimed eps", "AUC", "TPR@1%FPR", "TPR@0.1%FPR"], rows))
    if cfg["out"]:
        write_json(cfg["out"], json_safe({**report, "config": cfg}))
        print(f"wrote {cfg['out']}")
    if cfg["plot"]:
        plot_scores(report, cfg["plot"])
        print(f"wrote {cfg['plot']}")
    if not report["passed"]:
        print(f"FAIL: the audit's lower bound {report['epsilon_lower_bound']:.3f} exceeds the claimed epsilon "
              f"{claim:.3f}: the DP implementation or its accounting is broken", file=sys.stderr)
        sys.exit(1)
    return report


if __name__ == "__main__":
    run_cli(main)
