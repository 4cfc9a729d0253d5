"""
One-run privacy audit (Steinke, Nasr, Jagielski 2023, "Privacy Auditing with One (1) Training Run").

m random canary records are drawn; each is included in the training set independently with probability
1/2 (seeded). One fine-tune runs through utils.finetune.finetune with your config (DP or not) on the
dataset's training records plus the included canaries. Each canary is scored by how much training raised
its log-likelihood (mean token log-prob after - before, the "before" taken from the prepared model just
ahead of the first step). The auditor guesses "included" for the k_plus highest scores and "excluded"
for the k_minus lowest, abstaining on the rest: r = k_plus + k_minus guesses, v of them correct.

If training is (eps, delta)-DP, v is stochastically dominated by Binomial(r, q), q = e^eps / (1 + e^eps),
up to a delta term (the paper's Theorem; p-value as in its reference algorithm):

    p(eps) = P[Binomial(r, q) >= v] + 2 m delta * max_{i=1..v} P[v - i <= Binomial(r, q) < v] / i

The reported lower bound is the largest eps with p(eps) <= 1 - confidence: "training is not
(eps, delta)-DP" holds at that confidence. delta is the claimed delta of the run (0 for a non-private
run, or --audit_delta). A correct DP implementation gives a bound above its claimed epsilon with
probability at most 1 - confidence, so a bound above the claim is reported as an implementation failure
(exit 1). A one-run audit is weak by design: perfect guesses on r = 100 certify only eps ~ 3.5.

    python test_pipeline/privacy_audit.py config/finetune_dp_employees.py --m=1000 --k_plus=100 --k_minus=100 \
        --out=audit.json --plot=audit.png

Every finetune_dp key is accepted (--target_epsilon, --noise_multiplier, --max_steps, ...); this script
changes only data_dir (the audit dataset, in a temporary folder), and save defaults to False here.
"""
import math
import os
import sys
import tempfile

import numpy as np
import torch
from scipy.stats import binom

from configurator import configure
from test_pipeline.model_under_test import format_table, pyplot, save_figure, sequence_logprobs
from utils.atomic import write_json
from utils.cli import UserError, run_cli
from utils.data import answer_mask, load_meta, offsets, tokens, write_meta, write_split
from utils.tokenizer import get_tokenizer

DEFAULTS = dict(
    m=1000,  # canaries, each included with probability 1/2
    k_plus=100,  # guesses "included" for the k_plus highest scores
    k_minus=100,  # guesses "excluded" for the k_minus lowest
    confidence=0.95,
    audit_delta=-1.0,  # delta of the null hypothesis; < 0 = the run's claimed delta (0 without DP)
    canary_digits=12,  # random digits in each canary's secret
    audit_seed=0,  # draws the canaries and which of them are included
    score_batch_size=64,
    out="",  # JSON report
    plot="",  # PNG: score histograms of included vs excluded canaries with the guess cut-offs
    # finetune_dp keys this script sets differently from finetune_dp.py
    save=False,  # True: the audited model goes to out_dir/ckpt.pt (+ privacy.json)
    out_dir="out/audit",
)


# ---------------------------------------------------------------- the bound
def audit_p_value(eps, r, v, delta=0.0, m=None):
    """P-value of "training is (eps, delta)-DP" after v correct guesses out of r (m canaries)."""
    if not 0 <= v <= r:
        raise ValueError(f"need 0 <= v <= r, got v={v}, r={r}")
    q = 1.0 / (1.0 + math.exp(-eps))  # accuracy of eps-DP randomized response
    p = float(binom.sf(v - 1, r, q))  # P[Binomial(r, q) >= v]
    if delta > 0 and v > 0:
        if m is None or m < r:
            raise ValueError("the delta term needs m, the number of canaries (m >= r)")
        below = np.cumsum(binom.pmf(np.arange(v - 1, -1, -1), r, q))  # P[v - i <= B < v], i = 1..v
        p += 2 * m * delta * float(np.max(below / np.arange(1, v + 1)))
    return min(p, 1.0)


def epsilon_lower_bound(r, v, confidence=0.95, delta=0.0, m=None):
    """The largest eps rejected at `confidence`: p(eps) <= 1 - confidence (0 when nothing is rejected)."""
    alpha = 1.0 - confidence
    if not 0 < alpha < 1:
        raise ValueError("confidence must be in (0, 1)")
    if r == 0 or audit_p_value(0.0, r, v, delta, m) > alpha:
        return 0.0
    lo, hi = 0.0, 1.0
    while audit_p_value(hi, r, v, delta, m) <= alpha:  # p grows with eps (q -> 1)
        lo, hi = hi, 2 * hi
        if hi > 1e3:
            return math.inf  # unreachable for finite r: p(eps) -> 1
    for _ in range(60):  # bisection: p(lo) <= alpha < p(hi)
        mid = (lo + hi) / 2
        if audit_p_value(mid, r, v, delta, m) <= alpha:
            lo = mid
        else:
            hi = mid
    return lo


def guesses(scores, included, k_plus, k_minus):
    """(r, v): guess "in" for the k_plus highest scores, "out" for the k_minus lowest; count the correct."""
    order = np.argsort(scores, kind="stable")
    top, bottom = order[len(order) - k_plus:] if k_plus else order[:0], order[:k_minus]
    return k_plus + k_minus, int(included[top].sum() + (~included[bottom]).sum())


# ---------------------------------------------------------------- canaries and the audit dataset
def draw_canaries(m, digits, seed):
    """m random canary texts split as (prompt, secret) and the inclusion coin of each (seeded)."""
    rng = np.random.default_rng(seed)
    letters = np.array(list("abcdefghijklmnopqrstuvwxyz"))
    canaries = []
    for _ in range(m):
        uid = "".join(rng.choice(letters, 8))
        secret = "".join(str(d) for d in rng.integers(0, 10, digits))
        canaries.append((f"Canary {uid}: secret code", f" {secret}\n"))
    return canaries, rng.random(m) < 0.5


def encode_canary(tok, prompt, secret):
    """(token ids ending in end-of-text, answer mask): the secret is the canary's answer."""
    p, s = tok.encode(prompt), tok.encode(secret)
    return p + s + [tok.eot], [0] * len(p) + [1] * len(s) + [0]


def write_audit_dataset(src_dir, dst_dir, canary_records, included):
    """The source's train records + the included canaries (train) and its val records, same contract."""
    meta = load_meta(src_dir)
    has_mask = answer_mask(src_dir, "train") is not None
    splits = {}
    for split in ("train", "val"):
        if not os.path.isfile(os.path.join(src_dir, f"{split}_offsets.bin")):
            continue
        toks, off = tokens(src_dir, split, meta), offsets(src_dir, split)
        mask = answer_mask(src_dir, split) if has_mask else None
        recs = [np.asarray(toks[off[i]:off[i + 1]]).tolist() for i in range(len(off) - 1)]
        masks = [mask[off[i]:off[i + 1]].tolist() for i in range(len(off) - 1)] if has_mask else None
        if split == "train":
            recs += [ids for (ids, _), inc in zip(canary_records, included) if inc]
            if has_mask:
                masks += [msk for (_, msk), inc in zip(canary_records, included) if inc]
        n_tok, n_rec = write_split(dst_dir, split, recs, meta["vocab_size"], masks)
        splits[split] = {"tokens": n_tok, "records": n_rec}
    write_meta(dst_dir, {**meta, "splits": splits, "audit": {"source": os.path.abspath(src_dir),
                                                             "canaries_included": int(included.sum())}})


def canary_logprob(model, canary_records, batch_size):
    """Mean token log-prob of each canary record under the model (one batched pass)."""
    was_training = model.training
    model.eval()
    lps = sequence_logprobs(model, [ids[:1] for ids, _ in canary_records], [ids[1:] for ids, _ in canary_records],
                            batch_size)
    model.train(was_training)
    return np.array([lp.mean() for lp in lps])


def run_audit(cfg, log=print):
    """Draw, train once, score, guess, bound. Returns the report dict."""
    from utils import finetune as ft_loop
    m, kp, km = cfg["m"], cfg["k_plus"], cfg["k_minus"]
    if m < 2 or kp < 0 or km < 0 or kp + km == 0 or kp + km > m:
        raise UserError(f"need m >= 2 and 0 < k_plus + k_minus <= m; got m={m}, k_plus={kp}, k_minus={km}")
    if not 0 < cfg["confidence"] < 1:
        raise UserError("confidence must be in (0, 1)")
    tok = get_tokenizer(load_meta(cfg["data_dir"]))
    texts, included = draw_canaries(m, cfg["canary_digits"], cfg["audit_seed"])
    canary_records = [encode_canary(tok, p, s) for p, s in texts]
    before = {}

    def score_before(model):  # the prepared model, just before the first step
        before["lp"] = canary_logprob(model, canary_records, cfg["score_batch_size"])

    with tempfile.TemporaryDirectory(prefix="audit_data_") as tmp:
        write_audit_dataset(cfg["data_dir"], tmp, canary_records, included)
        ft_cfg = {k: cfg[k] for k in ft_loop.DEFAULTS}
        ft_cfg["data_dir"] = tmp
        log(f"auditing: {m} canaries, {int(included.sum())} included; fine-tuning "
            + (f"with DP (target epsilon {cfg['target_epsilon']})" if cfg["dp"] else "without DP"))
        result = ft_loop.finetune(ft_cfg, on_model_ready=score_before, log=log)
    scores = canary_logprob(result["model"], canary_records, cfg["score_batch_size"]) - before["lp"]
    r, v = guesses(scores, included, kp, km)
    privacy = result["privacy"]
    claimed_eps = privacy["epsilon"] if privacy else math.inf
    claimed_delta = privacy["delta"] if privacy else 0.0
    delta = claimed_delta if cfg["audit_delta"] < 0 else cfg["audit_delta"]
    bound = epsilon_lower_bound(r, v, cfg["confidence"], delta, m)
    return dict(m=m, included=int(included.sum()), k_plus=kp, k_minus=km, r=r, v=v, accuracy=v / r,
                confidence=cfg["confidence"], delta=delta, epsilon_lower_bound=bound,
                claimed_epsilon=claimed_eps, claimed_delta=claimed_delta, dp=bool(cfg["dp"]),
                max_certifiable=epsilon_lower_bound(r, r, cfg["confidence"], delta, m),
                p_value_at_claim=audit_p_value(claimed_eps, r, v, delta, m) if math.isfinite(claimed_eps) else None,
                privacy=privacy, scores=scores.tolist(), included_mask=included.tolist())


def plot_scores(report, path):
    plt = pyplot()
    s, inc = np.array(report["scores"]), np.array(report["included_mask"])
    fig, ax = plt.subplots(figsize=(6.5, 4))
    bins = np.linspace(s.min(), s.max(), 40) if s.max() > s.min() else 10
    ax.hist(s[inc], bins=bins, alpha=0.6, label="included")
    ax.hist(s[~inc], bins=bins, alpha=0.6, label="excluded")
    order = np.sort(s)
    if report["k_minus"]:
        ax.axvline(order[report["k_minus"] - 1], c="k", ls=":", lw=1, label="guess cut-offs")
    if report["k_plus"]:
        ax.axvline(order[len(order) - report["k_plus"]], c="k", ls=":", lw=1)
    claim = "no DP" if not report["dp"] else f"claimed {report['claimed_epsilon']:.2f}"
    ax.set_title(f"One-run audit: {report['v']}/{report['r']} correct, eps >= {report['epsilon_lower_bound']:.2f} ({claim})")
    ax.set_xlabel("log-likelihood gain from training (mean per token)")
    ax.set_ylabel("canaries")
    ax.legend(fontsize=8)
    save_figure(fig, path)


def _finite(x):
    return x if isinstance(x, (int, float)) and math.isfinite(x) else None


def main(argv=None):
    from utils import finetune as ft_loop
    cfg = configure({**ft_loop.DEFAULTS, **DEFAULTS}, sys.argv[1:] if argv is None else argv)
    torch.manual_seed(cfg["seed"])
    report = run_audit(cfg)
    claim = report["claimed_epsilon"]
    print(f"\nOne-run privacy audit (Steinke, Nasr, Jagielski 2023), {report['confidence']:.0%} confidence")
    print(format_table(
        ["m", "included", "k+", "k-", "guesses r", "correct v", "accuracy", "delta", "eps lower bound",
         "claimed eps", "max certifiable"],
        [[report["m"], report["included"], report["k_plus"], report["k_minus"], report["r"], report["v"],
          report["accuracy"], report["delta"], report["epsilon_lower_bound"],
          claim if math.isfinite(claim) else "none (no DP)", report["max_certifiable"]]]))
    failed = report["epsilon_lower_bound"] > claim
    report["passed"] = not failed
    if cfg["out"]:
        write_json(cfg["out"], {**{k: _finite(v) if isinstance(v, float) else v for k, v in report.items()},
                                "config": {k: _finite(v) if isinstance(v, float) else v for k, v in cfg.items()},
                                "privacy": report["privacy"] or None})
        print(f"wrote {cfg['out']}")
    if cfg["plot"]:
        plot_scores(report, cfg["plot"])
        print(f"wrote {cfg['plot']}")
    if failed:
        print(f"FAIL: the audit's lower bound {report['epsilon_lower_bound']:.3f} exceeds the claimed epsilon "
              f"{claim:.3f}: the DP implementation or its accounting is broken", file=sys.stderr)
        sys.exit(1)
    return report


if __name__ == "__main__":
    run_cli(main)
