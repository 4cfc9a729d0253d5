"""
One-run privacy audits of a fine-tune, white-box and black-box in the same run: the CLI over
utils/dp_audit.py (which says what is drawn, how it is scored and bounded, and why m = 30,000 and
k = 0.02 m / 0.4 m). It prints both audits' bounds (Mahloujifar et al.'s f-DP estimator and Steinke et
al.'s), the maximum certifiable for the canaries used, AUC and TPR at 1% / 0.1% FPR with bootstrap
intervals; writes --out JSON and a --plot of the score histograms. Any bound above the claim exits 1:
the implementation or its accounting is broken.

    python test_pipeline/privacy_audit.py config/finetune_dp_employees.py --target_epsilon=8 --m=30000 \
        --accountant=prv --max_steps=50 --out=audit.json --plot=audit.png
    python test_pipeline/privacy_audit.py ... --noise_bug_factor=0.1     # a planted bug: must exit 1

Every finetune_dp key is accepted; this script changes data_dir (the dataset plus the included input
canaries, in a temporary folder), batch_size (full_batch) and save (False). A fixed audit_seed or
reproducible_noise_seed makes the audit replayable: fine for testing an implementation, void as a
guarantee.
"""
import math
import sys

import numpy as np
import torch

from configurator import configure
from utils.model_under_test import format_table, pyplot, save_figure
from utils import bootstrap, dp_audit
from utils.atomic import json_safe, write_json
from utils.cli import run_cli

DEFAULTS = dict(
    **dp_audit.DEFAULTS,
    out="",  # JSON report
    plot="",  # PNG: score histograms of included vs excluded canaries, both audits
    # finetune_dp keys this script sets differently from finetune_dp.py
    save=False,  # the audit's fine-tuned model is never written to disk
    out_dir="out/audit",  # only used with save=True
)


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
    report = dp_audit.run_audit(cfg)
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
