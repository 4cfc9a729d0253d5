"""
Quality metrics of a model under test (test_pipeline/eval.py runs them on a checkpoint; seed 001
sections 3, 7, 9, 10), and the completer the Q/A scoring and the robustness probes share:

- perplexity of a split, scored with a strided sliding window when a text is longer than block_size
  (every token is scored exactly once, with up to block_size - stride tokens of carried-over context);
- field accuracy / exact match of greedy answers on held-out people's Q/A, with BLEU (sacrebleu, its
  signature kept) and ROUGE-L (rouge-score) of the same answers;
- repetition of free generations (distinct-n, repeated n-gram rate) under greedy, top-k and top-p;
- a counterfactual bias probe: the same prompt with the person's name swapped for a minimal pair of
  names (and pronouns swapped), comparing the answer distributions, flips and log-prob gaps;
- the tables and bar figures of an evaluation's result (printed by eval.py, reused by report.py).
"""
import math
import os
import re

import numpy as np
import torch
import torch.nn.functional as F

from utils import model_under_test as mut
from utils.cli import UserError
from utils.employees import SCHEMA as EMPLOYEES  # what the scoring functions use when given no schema
from utils.progress import Progress, batched


# --------------------------------------------------------------------------- generation and scoring
def complete_texts(model, tokenizer, prompts, max_new_tokens, stop="\n", batch_size=32, seed=0,
                   label="completions", hint="--max_people", **sampling):
    """Batched completions (model_under_test.complete: left padding, KV cache; batches of prompts sorted by
    length, as it sorts them) decoded to text and cut at `stop` (None keeps everything), with progress
    lines for a long call. `sampling`: greedy / temperature / top_k / top_p."""
    device = next(model.parameters()).device
    gen = torch.Generator(device=device).manual_seed(seed)
    ids = [tokenizer.encode(p) for p in prompts]
    new = batched(lambda chunk: mut.complete(model, chunk, max_new_tokens, batch_size=batch_size, generator=gen,
                                             eot=getattr(tokenizer, "eot", None), **{"greedy": True, **sampling}),
                  ids, batch_size, Progress(label, len(ids), hint), key=len)
    texts = [tokenizer.decode(t) for t in new]
    return [t.split(stop)[0] if stop else t for t in texts]


def make_completer(model, tokenizer, max_new_tokens, batch_size=32, temperature=1.0, top_k=None, top_p=None,
                   label="completions", hint="--max_people"):
    """complete_fn(prompts, sample=None) -> first-line completions: greedy when sample is None, else sampled
    with seed `sample`. The scoring functions take such a function, so a stub can stand in for a model."""
    def complete_fn(prompts, sample=None):
        if sample is None:
            return complete_texts(model, tokenizer, prompts, max_new_tokens, batch_size=batch_size, label=label,
                                  hint=hint)
        return complete_texts(model, tokenizer, prompts, max_new_tokens, batch_size=batch_size, seed=sample,
                              label=f"{label} (sampled)", hint=hint, greedy=False, temperature=temperature,
                              top_k=top_k, top_p=top_p)
    return complete_fn


def answer_logprobs(model, tokenizer, prompts, answers, batch_size=32):
    """log p(" " + answer + newline | prompt) per pair: the answer exactly as the records render it."""
    lps = mut.sequence_logprobs(model, [tokenizer.encode(p) for p in prompts],
                                [tokenizer.encode(" " + a + "\n") for a in answers], batch_size)
    return [float(np.sum(lp)) for lp in lps]


# --------------------------------------------------------------------------- perplexity
def sliding_windows(ids, block_size, stride):
    """(input, target) windows over one token sequence that score every token after the first exactly once.
    Window inputs start at 0, stride, 2*stride, ...; each scores only targets no earlier window scored,
    so a token sees between block_size - stride and block_size tokens of context (stride == block_size:
    disjoint chunks). Targets not scored by a window are -1."""
    if not 1 <= stride <= block_size:
        raise ValueError(f"stride must be in [1, block_size={block_size}], got {stride}")
    ids = np.asarray(ids, dtype=np.int64)
    n = len(ids)
    last = 0  # index of the last target already scored (token 0 is never a target)
    begin = 0
    while last < n - 1:
        end = min(begin + block_size, n - 1)
        x = ids[begin:end]
        y = ids[begin + 1:end + 1].copy()
        y[:max(0, last - begin)] = -1  # targets up to index `last` were scored by earlier windows
        yield x, y
        last = end
        begin += stride


@torch.no_grad()
def sliding_window_nll(model, sequences, stride=None, batch_size=16):
    """(summed negative log-likelihood in nats, number of scored tokens) over token sequences."""
    bs = model.config.block_size
    stride = stride or max(1, bs // 2)
    device = next(model.parameters()).device
    windows = [w for seq in sequences for w in sliding_windows(seq, bs, stride)]
    nll, count = 0.0, 0
    progress = Progress("perplexity windows", len(windows), hint="--ppl_max_records, --base_max_tokens")
    for s in range(0, len(windows), batch_size):
        chunk = windows[s:s + batch_size]
        T = max(len(x) for x, _ in chunk)
        x = torch.zeros(len(chunk), T, dtype=torch.long)
        y = torch.full((len(chunk), T), -1, dtype=torch.long)
        for r, (xi, yi) in enumerate(chunk):
            x[r, :len(xi)], y[r, :len(yi)] = torch.from_numpy(xi), torch.from_numpy(yi)
        logits, _ = model(x.to(device))
        y = y.to(device)
        nll += F.cross_entropy(logits.float().transpose(1, 2), y, ignore_index=-1, reduction="sum").item()
        count += int((y >= 0).sum())
        progress.update(len(chunk))
    return nll, count


def perplexity(model, sequences, stride=None, batch_size=16):
    if stride and stride > model.config.block_size:
        raise UserError(f"--stride {stride} is larger than the model's block_size {model.config.block_size}: "
                        f"tokens would be skipped")
    nll, n = sliding_window_nll(model, sequences, stride, batch_size)
    if n == 0:
        raise UserError("nothing to score: every text is shorter than two tokens")
    return {"ppl": math.exp(nll / n), "nll_per_token": nll / n, "tokens": n,
            "stride": stride or max(1, model.config.block_size // 2), "block_size": model.config.block_size}


def split_records(data_dir, split, max_records=0):
    """A split's records as token arrays (each ending with end-of-text), through utils.data."""
    from utils.data import RecordDataset
    ds = RecordDataset(data_dir, split, block_size=1)  # block_size only matters for __getitem__
    n = len(ds) if not max_records else min(max_records, len(ds))
    return [ds.record(i) for i in range(n)]


def stream_head(data_dir, split, max_tokens):
    """The first max_tokens tokens of a split's token stream (pretraining corpora are scored as a stream)."""
    from utils.data import tokens
    data = tokens(data_dir, split)
    return [np.asarray(data[:max_tokens] if max_tokens else data, dtype=np.int64)]


# --------------------------------------------------------------------------- BLEU / ROUGE-L / exact match
def bleu(hypotheses, references):
    """Corpus BLEU through sacrebleu, with its signature (tokenizer, smoothing, version) for the report.
    effective_order: answers are often one or two words, and without it a corpus with no 4-gram scores
    0 even when every answer is exact."""
    from sacrebleu.metrics import BLEU
    metric = BLEU(effective_order=True)
    score = metric.corpus_score(list(hypotheses), [list(references)])
    return {"score": score.score, "signature": str(metric.get_signature())}


def rouge_l(hypotheses, references):
    """Mean ROUGE-L F-measure through rouge-score (stemming on)."""
    from rouge_score import rouge_scorer
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    if not hypotheses:
        return float("nan")
    return float(np.mean([scorer.score(r, h)["rougeL"].fmeasure for h, r in zip(hypotheses, references)]))


def exact_match(hypothesis, reference):
    return hypothesis.strip() == reference.strip()


def qa_accuracy(complete_fn, people, fields=None, template_index=0, schema=None):
    """Greedy answers to every (person, field) question, scored against the record: exact match per field
    and overall, BLEU and ROUGE-L over the same answers. schema: the data's (default: employees')."""
    schema = schema or EMPLOYEES
    fields = fields or schema.fields
    items = [(p, f) for p in people for f in fields if schema.has(p, f)]
    prompts = [schema.qa_prompt(p, f, template_index) for p, f in items]
    refs = [schema.answer(p, f).strip() for p, f in items]
    hyps = [h.strip() for h in complete_fn(prompts)]
    hits = [exact_match(h, r) for h, r in zip(hyps, refs)]
    per_field = {}
    for f in fields:
        fh = [h for (p, ff), h in zip(items, hits) if ff == f]
        if fh:
            per_field[f] = {"n": len(fh), "exact_match": float(np.mean(fh))}
    b = bleu(hyps, refs)
    return {"n": len(items), "exact_match": float(np.mean(hits)) if hits else float("nan"),
            "per_field": per_field, "bleu": b["score"], "bleu_signature": b["signature"],
            "rouge_l": rouge_l(hyps, refs),
            "examples": [{"prompt": p, "reference": r, "answer": h} for p, r, h in list(zip(prompts, refs, hyps))[:5]]}


# --------------------------------------------------------------------------- repetition
def ngrams(words, n):
    return [tuple(words[i:i + n]) for i in range(len(words) - n + 1)]


def repetition_stats(texts, distinct=(1, 2), repeated=(2, 3)):
    """distinct-n: distinct n-grams / all n-grams over every text together (Li et al. 2016);
    rep-n: per text, the share of its n-grams that already occurred earlier in it (1 - unique/total),
    averaged over texts with at least one n-gram (Welleck et al. 2019). Words are whitespace tokens."""
    words = [t.split() for t in texts]
    out = {}
    for n in distinct:
        grams = [g for w in words for g in ngrams(w, n)]
        out[f"distinct_{n}"] = len(set(grams)) / len(grams) if grams else float("nan")
    for n in repeated:
        rates = [1 - len(set(g)) / len(g) for g in (ngrams(w, n) for w in words) if g]
        out[f"rep_{n}"] = float(np.mean(rates)) if rates else float("nan")
    return out


def repetition_by_decoding(model, tokenizer, prompts, new_tokens, temperature=1.0, top_k=40, top_p=0.9, seed=0,
                           batch_size=32):
    """repetition_stats of free generations (no stop at newline) under greedy, top-k and top-p sampling."""
    sampled = dict(greedy=False, temperature=temperature)
    decodings = {"greedy": dict(greedy=True), f"top_k={top_k}": dict(top_k=top_k, **sampled),
                 f"top_p={top_p}": dict(top_p=top_p, **sampled)}
    out = {}
    for name, kw in decodings.items():
        texts = complete_texts(model, tokenizer, prompts, new_tokens, stop=None, batch_size=batch_size, seed=seed, **kw)
        out[name] = {**repetition_stats(texts), "example": texts[0] if texts else ""}
    return out


# --------------------------------------------------------------------------- counterfactual bias
PRONOUN_SWAPS = {"he": "she", "she": "he", "him": "her", "his": "her", "her": "his", "hers": "his",
                 "himself": "herself", "herself": "himself", "mr": "ms", "ms": "mr", "man": "woman", "woman": "man"}


def swap_pronouns(text):
    """Swap gendered pronouns and titles word by word, keeping capitalisation ('her' maps to 'his')."""
    def repl(m):
        w = m.group(0)
        s = PRONOUN_SWAPS[w.lower()]
        return s.capitalize() if w[0].isupper() else s
    return re.sub(r"\b(" + "|".join(PRONOUN_SWAPS) + r")\b", repl, text, flags=re.IGNORECASE)


def categorical_values(people, field, max_values=20, schema=None):
    """The field's distinct answers when it is categorical (few values), else None."""
    schema = schema or EMPLOYEES
    values = sorted({schema.answer(p, field) for p in people if schema.has(p, field)})
    return values if 1 < len(values) <= max_values else None


def bias_probe(model, tokenizer, people, names_a, names_b, all_people=None, fields=None, template_index=0,
               max_new_tokens=32, batch_size=32, schema=None):
    """Counterfactual pairs: each (person, field) prompt with the person's name replaced by names_a[i] and by
    names_b[i] (minimal pairs, e.g. the same surname with a female / male first name).
    Per field: the total-variation distance between the two answer distributions over the field's values
    (categorical fields), the rate at which the greedy answer flips, and the mean log-prob gap
    log p(record's answer | a) - log p(... | b). A pronoun-swapped variant is scored the same way where
    the prompt contains pronouns."""
    schema = schema or EMPLOYEES
    fields = fields or schema.fields
    if len(names_a) != len(names_b) or not names_a:
        raise UserError("bias_names_a and bias_names_b must be non-empty lists of the same length")
    pairs = []  # (field, prompt_a, prompt_b, true answer, kind)
    for i, p in enumerate(people):
        for f in fields:
            if not schema.has(p, f):
                continue
            ans = schema.answer(p, f)
            prompt = schema.qa_prompt(p, f, template_index)
            name = schema.name(p)
            if name in prompt:
                k = i % len(names_a)
                pairs.append((f, prompt.replace(name, names_a[k]), prompt.replace(name, names_b[k]), ans, "name"))
            swapped = swap_pronouns(prompt)
            if swapped != prompt:
                pairs.append((f, prompt, swapped, ans, "pronoun"))
    if not pairs:
        return {"n_pairs": 0, "per_field": {}, "overall": {}}
    # one scoring call for every (prompt, candidate) and one generate() for every prompt
    cats = {f: categorical_values(all_people or people, f, schema=schema) for f in fields}
    score_prompts, score_answers, slots = [], [], []
    for j, (f, pa, pb, ans, _) in enumerate(pairs):
        cands = cats[f] if cats[f] and ans in cats[f] else [ans]
        for side, pr in (("a", pa), ("b", pb)):
            for c in cands:
                score_prompts.append(pr)
                score_answers.append(c)
                slots.append((j, side, c))
    lps = answer_logprobs(model, tokenizer, score_prompts, score_answers, batch_size)
    table = {}
    for (j, side, c), lp in zip(slots, lps):
        table.setdefault((j, side), {})[c] = lp
    gens = complete_texts(model, tokenizer, [pa for _, pa, _, _, _ in pairs] + [pb for _, _, pb, _, _ in pairs],
                          max_new_tokens, batch_size=batch_size)
    gen_a, gen_b = gens[:len(pairs)], gens[len(pairs):]
    rows = []
    for j, (f, pa, pb, ans, kind) in enumerate(pairs):
        la, lb = table[(j, "a")], table[(j, "b")]
        tv = None
        if len(la) > 1:
            va = np.array([la[c] for c in la])
            vb = np.array([lb[c] for c in la])
            pa_, pb_ = np.exp(va - va.max()), np.exp(vb - vb.max())
            tv = 0.5 * float(np.abs(pa_ / pa_.sum() - pb_ / pb_.sum()).sum())
        rows.append({"field": f, "kind": kind, "tv": tv, "gap": la[ans] - lb[ans],
                     "flip": gen_a[j].strip() != gen_b[j].strip()})

    def summary(rs):
        tvs = [r["tv"] for r in rs if r["tv"] is not None]
        return {"n": len(rs), "tv_distance": float(np.mean(tvs)) if tvs else None,
                "flip_rate": float(np.mean([r["flip"] for r in rs])),
                "mean_logprob_gap": float(np.mean([r["gap"] for r in rs])),
                "mean_abs_logprob_gap": float(np.mean([abs(r["gap"]) for r in rs]))}
    per_field = {f"{f} ({k})": summary([r for r in rows if r["field"] == f and r["kind"] == k])
                 for f in fields for k in ("name", "pronoun") if any(r["field"] == f and r["kind"] == k for r in rows)}
    return {"n_pairs": len(pairs), "names_a": list(names_a), "names_b": list(names_b),
            "per_field": per_field, "overall": summary(rows)}


# --------------------------------------------------------------------------- the dataset's fields
def dataset_fields(meta, schema=None):
    """The schema fields the dataset's records ask about (meta 'fields'), in schema order."""
    schema = schema or EMPLOYEES
    asked = meta.get("fields") or schema.fields
    return [f for f in schema.fields if f in asked]


# --------------------------------------------------------------------------- tables and figures of a result
def tables(result):
    """(title, headers, rows) for each part of an evaluate() result: printed here, reused by report.py."""
    out = []
    if "perplexity" in result:
        p = result["perplexity"]
        out.append(("Perplexity", ["split", "records", "tokens", "block_size", "stride", "nll/token", "perplexity"],
                    [[p["split"], p["records"], p["tokens"], p["block_size"], p["stride"], p["nll_per_token"], p["ppl"]]]))
    if "qa" in result:
        q = result["qa"]
        rows = [[f, v["n"], v["exact_match"]] for f, v in q["per_field"].items()] + [["all fields", q["n"], q["exact_match"]]]
        out.append(("Held-out Q/A exact match", ["field", "n", "exact match"], rows))
        out.append(("Generated answers vs records", ["BLEU", "ROUGE-L (F)", "sacrebleu signature"],
                    [[q["bleu"], q["rouge_l"], q["bleu_signature"]]]))
    if "repetition" in result:
        r = result["repetition"]
        keys = [k for k in next(iter(r.values())) if k != "example"]
        out.append(("Repetition of free generations", ["decoding"] + keys,
                    [[name] + [v[k] for k in keys] for name, v in r.items()]))
    if "bias" in result and result["bias"]["n_pairs"]:
        b = result["bias"]
        cols = ["n", "tv_distance", "flip_rate", "mean_logprob_gap", "mean_abs_logprob_gap"]
        rows = [[f] + [v[c] for c in cols] for f, v in b["per_field"].items()] + [["overall"] + [b["overall"][c] for c in cols]]
        out.append((f"Counterfactual bias ({', '.join(b['names_a'])} vs {', '.join(b['names_b'])})",
                    ["field (swap)", "pairs", "TV distance", "answer flips", "log-prob gap a-b", "|gap|"], rows))
    if "forgetting" in result:
        f = result["forgetting"]
        out.append(("Forgetting (base-corpus perplexity)", ["data", "tokens", "before", "after", "after / before"],
                    [[f["data_dir"], f["tokens"], f["ppl_before"], f["ppl_after"], f["ratio"]]]))
    if result.get("checks"):
        out.append(("Thresholds", ["check", "value", "threshold", "passed"],
                    [[c["check"], c["value"], c["threshold"], c["passed"]] for c in result["checks"]]))
    return out


def plots(result, plot_dir):
    """Per-field exact match and repetition per decoding as PNG bar charts; returns the paths written."""
    from utils.plot import plot_bars, title_for
    paths, who = [], title_for(result["model"]["ckpt"], result["model"]["patch"]) + "\n"  # which model
    if "qa" in result and result["qa"]["per_field"]:
        path = os.path.join(plot_dir, "eval_field_accuracy.png")
        plot_bars({"exact match": {f: v["exact_match"] for f, v in result["qa"]["per_field"].items()}}, path,
                  who + "Held-out exact match per field", ylim=(0, 1))
        paths.append(path)
    if "repetition" in result:
        rep = result["repetition"]
        metrics = [k for k in next(iter(rep.values())) if k != "example"]
        path = os.path.join(plot_dir, "eval_repetition.png")
        plot_bars({name: {m: v[m] for m in metrics} for name, v in rep.items()}, path,
                  who + "Repetition of generations by decoding", ylim=(0, 1))
        paths.append(path)
    return paths
