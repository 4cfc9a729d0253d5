"""
One-run privacy audits of a fine-tune (Steinke, Nasr & Jagielski 2023, "Privacy Auditing with One (1)
Training Run"), white-box and black-box in the same run, each scored with two estimators
(utils.audit_bounds: Steinke et al.'s bound, valid for any (eps, delta)-DP run, and Mahloujifar et al.
2024's f-DP estimator with the Gaussian tradeoff, tighter). Used by test_pipeline/privacy_audit.py (the
CLI) and reproduce.py (the audit columns).

- White-box (DP runs): m gradient canaries (utils.gradient_canaries): Dirac canaries, each included with
  probability 1/2 and then Poisson-sampled at the records' rate q each step, added as already-clipped
  contributions (norm max_grad_norm) just before the noise, for any grad_sample_mode (ghost, hooks, bk).
  They hook the optimizer through finetune's on_trainer_ready, so the run is the one fine-tuning loop.
  Scores come from the per-step privatized gradient sums, not from the released model.
- Black-box: m_input new-token canaries (Panda et al., ICLR 2025): records made of token ids that never
  occur in the dataset, so only the canary itself moves their embeddings and predictions; each included
  with probability 1/2 as one more training record. Scores come from the released model: how much
  training raised the canary's mean token log-prob. Also reported: AUC and TPR at 1% and 0.1% FPR, with
  bootstrap intervals (utils.bootstrap).

Power. A Dirac canary is one coordinate, so m is bounded only by the trainable parameters: m = 30,000
by default. Guesses: "in" for the k highest scores and "out" for the k lowest, k = k_fractions x m,
fixed before the run and each bound taken at confidence 1 - (1 - confidence) / len(k_fractions)
(Bonferroni), so choosing the better k after seeing the scores costs no validity. In simulations of the
exactly-Gaussian mechanism (30 runs, m = 30,000; tests/test_dp_audit.py keeps a smaller one) k = 0.02 m
gave the highest worst-case f-DP bound at claims 4 and 8 (worst 2.64 and 5.13; 0.005-0.05 were all
lower); 0.4 m (guesses on 80% of the canaries) lets a gross bug certify far above the claim (at
m = 30,000, 0.02 m alone can show at most 8.4). Both together: worst 2.49 and 4.85 of 30, above half the
claim. max_certifiable is the bound if every guess were right: the most this m can show. A one-run
audit of a Gaussian mechanism reaches about 0.6-0.7 of its epsilon at best, so read the bound as "at
least", never as the truth.

Full batch (full_batch=True, default): batch_size = every training record, q = 1, where the run's
tradeoff is exactly Gaussian (mu = sqrt(steps) / sigma), the f-DP estimator is exact, and the audit is
at its most powerful; any q works (full_batch=False keeps your batch_size; the Gaussian tradeoff is then
a central-limit approximation, Steinke's bound stays valid). The claim is the accountant's add/remove
epsilon (a canary is added or left out) for the CALIBRATED noise: noise_bug_factor < 1 draws that much
less noise while the optimizer and its accountant keep the calibrated multiplier (a planted bug: the
power check). 'pld' or 'prv' accountants give the tightest claims.

audit_seed < 0 draws the canaries' coins from OS entropy; a fixed audit_seed makes the audit
reproducible, which is fine for testing an implementation and void as a guarantee. The run's DP noise
and sampling come from a fresh OS secret unless reproducible_noise_seed is set (the same caveat:
replayable, so no guarantee).
"""
import math
import tempfile

import numpy as np

from utils import audit_bounds, bootstrap
from utils.cli import UserError
from utils.data import load_meta
from utils.gradient_canaries import GradientCanaries
from utils.input_canaries import canary_logprob, draw_new_token_canaries, unused_tokens, write_audit_dataset
from utils.tokenizer import get_tokenizer

DEFAULTS = dict(
    m=30000,  # white-box gradient canaries (DP runs), each included with probability 1/2; <= trainable params
    m_input=200,  # black-box new-token canary records, each included with probability 1/2; 0 = none
    input_length=8,  # tokens per new-token canary (+ end of text)
    k_fractions=(0.02, 0.4),  # guesses per side, as fractions of the canaries (fixed before the run)
    confidence=0.95,  # confidence of the reported epsilon lower bound
    audit_delta=-1.0,  # delta of the null hypothesis; < 0 = the run's claimed delta (1e-5 without DP)
    audit_seed=-1,  # < 0: OS entropy; >= 0: reproducible coins (testing only)
    full_batch=True,  # batch_size = every training record (q = 1): the audit's most powerful setting
    noise_bug_factor=1.0,  # < 1 plants a bug: that much less noise than the claim is calibrated for
    score_batch_size=64,  # canaries scored per forward pass
)
FPRS = (0.01, 0.001)
ROUTE = "already-clipped contribution just before the noise"


def check_settings(cfg):
    """One-line errors for bad audit settings, before any work."""
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
    if cfg["noise_bug_factor"] != 1.0 and not cfg["dp"]:
        raise UserError("noise_bug_factor needs a DP run")


def plant_noise_bug(optimizer, factor):
    """The planted bug: each noise draw uses factor x the optimizer's noise multiplier, which the optimizer
    and its accountant go on reading as calibrated (a wrong scale in the draw, invisible to the claim)."""
    draw = optimizer.add_noise

    def add_less_noise():
        calibrated = optimizer.noise_multiplier
        optimizer.noise_multiplier = calibrated * factor
        try:
            draw()
        finally:
            optimizer.noise_multiplier = calibrated
    optimizer.add_noise = add_less_noise


def train_with_canaries(ft_cfg, cfg, input_records, log):
    """One run of utils.finetune.finetune (DP or plain) with gradient canaries on its optimizer; returns
    (model, claim or None, canaries or None, input canaries' scores before training)."""
    from utils import finetune as ft_loop
    seen = {}

    def score_before(model):  # the prepared model, just ahead of the first step
        seen["lp"] = canary_logprob(model, input_records, cfg["score_batch_size"]) if input_records else None

    def hook_optimizer(trainer):
        seen["plan"], seen["canaries"] = trainer.plan, None
        if ft_cfg["dp"] and cfg["m"]:
            seed = None if cfg["audit_seed"] < 0 else cfg["audit_seed"]
            seen["canaries"] = GradientCanaries(trainer.optimizer, cfg["m"], trainer.plan["sample_rate"],
                                                trainer.plan["noise_multiplier"], ft_cfg["max_grad_norm"], seed)
        if cfg["noise_bug_factor"] != 1.0:  # wraps the canaries' wrapper: canaries are noised like records
            plant_noise_bug(trainer.optimizer, cfg["noise_bug_factor"])
            log(f"PLANTED BUG: noise multiplier {trainer.plan['noise_multiplier'] * cfg['noise_bug_factor']:.4g} "
                f"instead of {trainer.plan['noise_multiplier']:.4g}; the claim stays the calibrated one")

    result = ft_loop.finetune(ft_cfg, on_model_ready=score_before, on_trainer_ready=hook_optimizer, log=log)
    claim, privacy, plan = None, result["privacy"], seen["plan"]
    if privacy:
        claim = dict(epsilon=ft_loop.epsilon_after(privacy["steps"], plan["noise_multiplier"], plan["sample_rate"],
                                                   plan["delta"], plan["accountant"]),  # add/remove: one canary
                     delta=plan["delta"], noise_multiplier=plan["noise_multiplier"], sample_rate=plan["sample_rate"],
                     steps=privacy["steps"], accountant=plan["accountant"], grad_sample_mode=privacy["grad_sample_mode"],
                     max_grad_norm=ft_cfg["max_grad_norm"], noise_bug_factor=cfg["noise_bug_factor"])
    return result["model"], claim, seen["canaries"], seen["lp"]


def score_audit(scores, included, delta, cfg):
    """Both estimators at the planned ks (Bonferroni), plus AUC and TPR at FPRS with bootstrap intervals."""
    scores, included = np.asarray(scores, float), np.asarray(included, bool)
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
    """Draw, train once, score, guess, bound. cfg: utils.finetune keys + DEFAULTS. Returns the report dict."""
    from utils import finetune as ft_loop
    check_settings(cfg)
    meta = load_meta(cfg["data_dir"])
    rng = np.random.default_rng(None if cfg["audit_seed"] < 0 else cfg["audit_seed"] + 1)
    input_records, input_included = [], np.zeros(0, bool)
    if cfg["m_input"]:
        input_records, input_included = draw_new_token_canaries(unused_tokens(cfg["data_dir"]), cfg["m_input"],
                                                                cfg["input_length"], get_tokenizer(meta).eot, rng)
    with tempfile.TemporaryDirectory(prefix="audit_data_") as tmp:
        write_audit_dataset(cfg["data_dir"], tmp, input_records, input_included)
        ft_cfg = {k: cfg.get(k, default) for k, default in ft_loop.DEFAULTS.items()}
        ft_cfg.update(data_dir=tmp, save=False, eval_interval=0)  # one evaluation, at the end
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
        report["white_box"] = dict(route=ROUTE, scored_from="per-step privatized gradient sums",
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
