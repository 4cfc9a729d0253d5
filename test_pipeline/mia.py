"""
Membership inference: can an attacker tell the records a model was trained on from records it never saw?

Members are training records, non-members validation records: the same generator, split by person
(so the attack measures memorization, not a distribution shift; Duan et al. 2024). Canary records (a
person with a "Phone") exist only in train and are left out, and each distinct record counts once.
Every score is "higher = more likely a member", from one batched forward per batch of records:

    loss         mean token log-prob (= -loss)
    zlib         -loss / zlib-compressed bytes of the text (Carlini et al. 2021)
    min_k        mean of the lowest k% token log-probs (Min-K% Prob, Shi et al. 2024)
    min_k_pp     mean of the lowest k% of (log p(x_t) - mu_t) / sigma_t, with mu_t, sigma_t the mean and
                 std of log p(z) for z drawn from the model's own next-token distribution (Min-K%++)
    reference    ref loss - loss, the base model as reference (--ref_ckpt; Carlini et al. 2021)

Reported: ROC AUC and TPR at 1% and 0.1% FPR (with fewer than 1000 non-members, 0.1% FPR means no false
positive at all), each with a stratified bootstrap 95% interval (--resamples); "too few records to
tell" where the AUC interval includes 0.5. No maximum over attacks: the attack is chosen on one random
half of the people and scored on the other half. A blind baseline (the text's zlib ratio, no model) is
scored too: if it beats chance the member/non-member split is biased and the report says so.

    python test_pipeline/mia.py --ckpt=out/ft/ckpt.pt --ref_ckpt=out/base/ckpt.pt --data_dir=data/employees \
        --out=mia.json --plot=roc.png [--max_auc=0.6]
"""
import sys
import zlib

import numpy as np

from configurator import configure
from test_pipeline.model_under_test import format_table, load_model_under_test, pyplot, save_figure, sequence_logprobs
from utils import bootstrap
from utils.atomic import write_json
from utils.audit_bounds import roc_auc, tpr_at_fpr as audit_tpr_at_fpr
from utils.cli import UserError, run_cli
from utils.data import answer_mask, load_meta, offsets, tokens
from utils.progress import Progress, batched
from utils.records import CANARY_FIELD, Schema, read_people
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

FPR_POINTS = (0.01, 0.001)


# ---------------------------------------------------------------- ROC, by hand (no sklearn)
def roc_curve(scores, labels):
    """(fpr, tpr) of the threshold rule "member if score >= t" for every distinct t, from (0, 0) to (1, 1).
    Tied scores move together, so the curve is the same whatever order ties come in."""
    scores, labels = np.asarray(scores, dtype=np.float64), np.asarray(labels, dtype=bool)
    if labels.all() or not labels.any():
        raise ValueError("need both members and non-members")
    order = np.argsort(-scores, kind="stable")
    s, y = scores[order], labels[order]
    last_of_tie = np.r_[np.nonzero(np.diff(s))[0], len(s) - 1]
    tp = np.cumsum(y)[last_of_tie]
    fp = np.cumsum(~y)[last_of_tie]
    return np.r_[0.0, fp / (~y).sum()], np.r_[0.0, tp / y.sum()]


def attack_metrics(scores, labels, resamples=0, seed=0):
    """AUC and TPR at FPR_POINTS (utils.audit_bounds: the one definition of each), with their bootstrap
    intervals when resamples > 0; and the ROC curve for the plot."""
    scores, labels = np.asarray(scores, dtype=np.float64), np.asarray(labels, dtype=bool)
    curve = roc_curve(scores, labels)
    pos, neg = scores[labels], scores[~labels]
    if resamples:
        return with_interval(pos, neg, resamples, seed), curve
    return dict(auc=roc_auc(pos, neg), **{f"tpr_at_{x:g}_fpr": audit_tpr_at_fpr(pos, neg, x) for x in FPR_POINTS}), curve


# ---------------------------------------------------------------- records and scores
def read_records(data_dir, split, block_size, meta, score_tokens):
    """Distinct records of a split as (token list, scored-position mask over record[1:]), canary people
    left out. Records longer than block_size + 1 tokens are cut (the model never saw past that)."""
    toks, off = tokens(data_dir, split, meta), offsets(data_dir, split)
    mask = answer_mask(data_dir, split) if score_tokens == "answer" else None
    if score_tokens == "answer" and mask is None:
        raise UserError(f"score_tokens='answer' needs {split}_answer_mask.bin, which {data_dir} lacks")
    people = read_people(data_dir, split)
    if people is not None and len(people) != len(off) - 1:
        raise UserError(f"{data_dir}/{split}_people.jsonl has {len(people)} people for {len(off) - 1} records; "
                        f"rerun the dataset's prepare.py")
    canary_field = Schema.from_json(meta["schema"]).canary_field if "schema" in meta else CANARY_FIELD
    seen, out = set(), []
    for i in range(len(off) - 1):
        if people is not None and canary_field and people[i].get(canary_field) is not None:
            continue  # a canary person: train-only, a distribution of its own
        a, b = int(off[i]), min(int(off[i + 1]), int(off[i]) + block_size + 1)
        rec = np.asarray(toks[a:b], dtype=np.int64)
        key = rec.tobytes()
        if key in seen or len(rec) < 2:
            continue
        seen.add(key)
        scored = mask[a + 1:b].astype(bool) if mask is not None else np.ones(len(rec) - 1, dtype=bool)
        if scored.any():
            out.append((rec.tolist(), scored))
    return out


def record_logprobs(model, records, batch_size, label, return_stats=False):
    """sequence_logprobs of every record (given its first token), in batches as it sorts them (longest
    first), with progress lines; with return_stats, (log-probs, mus, sigmas) lists."""
    def score(chunk):
        out = sequence_logprobs(model, [r[:1] for r, _ in chunk], [r[1:] for r, _ in chunk], batch_size,
                                return_stats=return_stats)
        return list(zip(*out)) if return_stats else out
    per_record = batched(score, records, batch_size, Progress(label, len(records), hint="--n_records"),
                         key=lambda r: -len(r[0]))
    return tuple(map(list, zip(*per_record))) if return_stats else per_record


def token_scores(model, records, batch_size):
    """Per record: token log-probs and the model's own mu, sigma at each position (one pass)."""
    return record_logprobs(model, records, batch_size, "MIA target scores", return_stats=True)


def lowest_mean(values, k_percent):
    k = max(1, int(len(values) * k_percent / 100))
    return float(np.mean(np.sort(values)[:k]))


def mia_scores(records, texts, target, reference, k_percent):
    """{attack: array of scores} (higher = member) from token_scores of the target and the reference."""
    lps, mus, sigmas = target
    out = {name: [] for name in ("loss", "zlib", "min_k", "min_k_pp")}
    if reference is not None:
        out["reference"] = []
    for j, ((_, scored), text) in enumerate(zip(records, texts)):
        lp = lps[j][scored]
        z = (lp - mus[j][scored]) / sigmas[j][scored]
        out["loss"].append(lp.mean())
        out["zlib"].append(lp.mean() / len(zlib.compress(text.encode("utf-8"))))
        out["min_k"].append(lowest_mean(lp, k_percent))
        out["min_k_pp"].append(lowest_mean(z, k_percent))
        if reference is not None:
            out["reference"].append(lp.mean() - reference[j][scored].mean())
    return {k: np.asarray(v) for k, v in out.items()}


def scored_text(tok, record, scored):
    """The text of the scored tokens (what zlib compresses)."""
    ids = np.asarray(record[1:])[scored]
    return tok.decode(ids.tolist())


# ---------------------------------------------------------------- statistics (intervals, selection, blind baseline)
def blind_scores(texts):
    """A score that never looks at the model: the text's zlib compression ratio (Das, Zhang & Tramer
    2024's blind baselines). If it tells members from non-members, the split itself is biased."""
    return np.array([len(zlib.compress(t.encode("utf-8"))) / max(1, len(t.encode("utf-8"))) for t in texts])


def with_interval(pos, neg, resamples, seed):
    """AUC and TPR at FPR_POINTS, each with its stratified bootstrap 95% interval, and a verdict:
    "too few records to tell" when the AUC interval includes 0.5."""
    out = dict(auc=roc_auc(pos, neg), auc_interval=bootstrap.interval(roc_auc, pos, neg, resamples, seed=seed))
    for x in FPR_POINTS:
        def rate(p, n, x=x):
            return audit_tpr_at_fpr(p, n, x)
        out[f"tpr_at_{x:g}_fpr"] = rate(pos, neg)
        out[f"tpr_at_{x:g}_fpr_interval"] = bootstrap.interval(rate, pos, neg, resamples, seed=seed)
    out["verdict"] = ("too few records to tell" if not bootstrap.tells_apart(*out["auc_interval"])
                      else "member" + (" > " if out["auc"] > 0.5 else " < ") + "non-member")
    return out


def select_and_score(scores, labels, seed, resamples=bootstrap.RESAMPLES):
    """No best-of-k optimism: the attack with the highest AUC on one random half of the people (members
    and non-members halved separately) is scored on the other half only."""
    rng = np.random.default_rng(seed)
    choose = np.zeros(len(labels), bool)
    for side in (labels, ~labels):
        idx = np.flatnonzero(side)
        choose[rng.permutation(idx)[:len(idx) // 2]] = True
    on_half = {k: roc_auc(s[choose & labels], s[choose & ~labels]) for k, s in scores.items()}
    best = max(on_half, key=on_half.get)
    held = ~choose
    return dict(attack=best, auc_on_selection_half=on_half[best], n_members=int((held & labels).sum()),
                n_nonmembers=int((held & ~labels).sum()),
                **with_interval(scores[best][held & labels], scores[best][held & ~labels], resamples, seed))


def fmt_ci(x, ci):
    return f"{x:.3f} [{ci[0]:.3f}, {ci[1]:.3f}]"


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
