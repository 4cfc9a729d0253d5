"""
Membership inference scores and their statistics: can an attacker tell the records a model was trained
on from records it never saw? (test_pipeline/mia.py runs it on a checkpoint and prints the tables.)

Members are training records, non-members validation records: the same generator, split by person
(so the attack measures memorization, not a distribution shift; Duan et al. 2024). Canary records (a
person with a "Phone") exist only in train and are left out, and each distinct record counts once.
Every score is "higher = more likely a member", from one batched forward per batch of records:

    loss         mean token log-prob (= -loss)
    zlib         -loss / zlib-compressed bytes of the text (Carlini et al. 2021)
    min_k        mean of the lowest k% token log-probs (Min-K% Prob, Shi et al. 2024)
    min_k_pp     mean of the lowest k% of (log p(x_t) - mu_t) / sigma_t, with mu_t, sigma_t the mean and
                 std of log p(z) for z drawn from the model's own next-token distribution (Min-K%++)
    reference    ref loss - loss, the base model as reference (Carlini et al. 2021)

Statistics: ROC AUC and TPR at 1% and 0.1% FPR (with fewer than 1000 non-members, 0.1% FPR means no
false positive at all), each with a stratified bootstrap 95% interval; "too few records to tell" where
the AUC interval includes 0.5. No maximum over attacks: the attack is chosen on one random half of the
people and scored on the other half. A blind baseline (the text's zlib ratio, no model): if it beats
chance the member/non-member split is biased.
"""
import zlib

import numpy as np

from utils.model_under_test import sequence_logprobs
from utils import bootstrap
from utils.audit_bounds import roc_auc, tpr_at_fpr as audit_tpr_at_fpr
from utils.cli import UserError
from utils.data import answer_mask, offsets, tokens
from utils.progress import Progress, batched
from utils.records import CANARY_FIELD, Schema, read_people


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
