"""
How useful DP synthetic records are, against the baselines that tell whether the budget bought
anything (issue 15). Computed on the real records without privacy: for the operator, never for release.

- marginal fidelity: total variation distance between the synthetic and the private people's
  distribution of each categorical field and of each pair of them (joints); Kolmogorov-Smirnov distance
  (scipy's ks_2samp statistic) for numeric fields;
- the DP histogram baseline: the Gaussian mechanism on the same marginal at the same (epsilon, delta)
  (one person moves one count by 1: L2 sensitivity 1, rho = 1 / (2 sigma^2) zCDP, converted as the
  synthesis is), clipped at 0 and normalised; also N samples drawn from it, N = the synthetic count, so
  both carry the same sampling error. A numeric field is histogrammed over public bins;
- downstream: field accuracy on held-out real people, each field's answer chosen among its public
  values by the model's log-probability (so a format slip is not an error), after fine-tuning the base
  on N synthetic people, on N real ones, or not at all.
"""
import itertools
import math
import os
import tempfile

import numpy as np
from scipy.stats import ks_2samp

from utils.model_under_test import sequence_logprobs
from utils.data import write_meta, write_split
from utils.private_prediction import max_rho_for_epsilon
from utils.record_synthesis import band_edges, band_of


def distribution(values):
    keys, counts = np.unique(np.array([repr(v) for v in values]), return_counts=True)
    return dict(zip(keys, counts / max(1, counts.sum())))


def total_variation(p, q):
    """TV between two distributions given as {key: probability}."""
    return 0.5 * sum(abs(p.get(k, 0.0) - q.get(k, 0.0)) for k in set(p) | set(q))


def tv(synthetic, real):
    return total_variation(distribution(synthetic), distribution(real))


def ks(synthetic, real):
    synthetic, real = [float(v) for v in synthetic if v is not None], [float(v) for v in real if v is not None]
    return float(ks_2samp(synthetic, real).statistic) if synthetic and real else float("nan")


def marginals(people, categorical, numeric):
    """{name: values}: each categorical field, each pair of them (tuples), each numeric field."""
    out = {f: [p.get(f) for p in people] for f in categorical + numeric}
    for a, b in itertools.combinations(categorical, 2):
        out[f"{a} x {b}"] = [(p.get(a), p.get(b)) for p in people]
    return out


def fidelity(synthetic_people, real_people, categorical, numeric):
    """{marginal: distance}: TV for categorical fields and joints, KS for numeric fields."""
    syn, real = marginals(synthetic_people, categorical, numeric), marginals(real_people, categorical, numeric)
    return {k: (ks if k in numeric else tv)(syn[k], real[k]) for k in real} if synthetic_people else \
        {k: float("nan") for k in real}


def gaussian_sigma(epsilon, delta):
    """Noise of the Gaussian mechanism (L2 sensitivity 1) whose zCDP converts to (epsilon, delta)."""
    return math.sqrt(1.0 / (2.0 * max_rho_for_epsilon(epsilon, delta)))


def dp_histogram(values, cells, epsilon, delta, rng):
    """Noisy counts over the public `cells`, clipped at 0 and normalised: {repr(cell): probability}."""
    counts = {repr(c): 0.0 for c in cells}
    for v in values:
        if repr(v) in counts:
            counts[repr(v)] += 1
    sigma = gaussian_sigma(epsilon, delta)
    noisy = {k: max(0.0, c + rng.normal(0.0, sigma)) for k, c in counts.items()}
    total = sum(noisy.values())
    return {k: c / total if total else 1.0 / len(noisy) for k, c in noisy.items()}  # all clipped: uniform


def histogram_baseline(real_people, categorical, domains, numeric, bins, epsilon, delta, n_samples, rng):
    """{marginal: (distance of the noisy histogram, distance of n_samples drawn from it)}."""
    real = marginals(real_people, categorical, numeric)
    out = {}
    for name, values in real.items():
        if name in numeric:
            bands = band_edges(bins[name])  # the synthesis's own bands (release_bands)
            edges, k = bands.numpy(), len(bands) - 1
            hist = dp_histogram([band_of(bands, v) for v in values if v is not None], range(k), epsilon, delta, rng)
            probs = np.array([hist[repr(c)] for c in range(k)])
            which = rng.choice(k, size=n_samples, p=probs)
            draws = rng.uniform(edges[which], edges[which + 1])
            mids = (edges[:-1] + edges[1:]) / 2  # the noisy histogram as a distribution on bin centres
            whole = rng.choice(mids, size=20000, p=probs)
            out[name] = (ks(whole, values), ks(draws, values))
            continue
        fields = name.split(" x ")
        cells = list(itertools.product(*[domains[f] for f in fields])) if len(fields) > 1 else list(domains[name])
        hist = dp_histogram(values, cells, epsilon, delta, rng)
        draws = rng.choice(len(cells), size=n_samples, p=np.array([hist[repr(c)] for c in cells]))
        real_dist = distribution(values)
        out[name] = (total_variation(hist, real_dist), total_variation(distribution([cells[i] for i in draws]), real_dist))
    return out


# ---------------------------------------------------------------------- downstream
def field_accuracy(model, tok, schema, people, fields, domains, batch_size=64):
    """{field: accuracy, 'mean': ...}: the answer to qa_prompt(person, field) picked among domains[field]
    by log p(' ' + value + newline | prompt), compared with the person's own answer."""
    model.eval()
    asked = [(p, f) for p in people for f in fields if schema.has(p, f)]
    prefixes, targets = [], []
    for p, f in asked:
        prompt = tok.encode(schema.qa_prompt(p, f, 0))
        for v in domains[f]:
            prefixes.append(prompt)
            targets.append(tok.encode(f" {v}\n"))
    lps = iter(float(np.sum(lp)) for lp in sequence_logprobs(model, prefixes, targets, batch_size))
    right = {f: [] for f in fields}
    for p, f in asked:
        scores = [next(lps) for _ in domains[f]]
        right[f].append(domains[f][int(np.argmax(scores))] == schema.answer(p, f))
    acc = {f: float(np.mean(v)) if v else float("nan") for f, v in right.items()}
    acc["mean"] = float(np.nanmean(list(acc.values())))
    return acc


def qa_lines(tok, texts):
    """One token record per Q/A line (a person's whole record can exceed block_size)."""
    return [tok.encode(line + "\n") + [tok.eot] for t in texts for line in t.splitlines() if line.strip()]


def finetuned_on_records(records, tok, base_ckpt, steps, batch_size, learning_rate, device="cpu", seed=0,
                         loss_masks=None, log=None):
    """The run of utils/finetune.py without privacy on token `records` (a temp dataset, removed afterwards):
    the dict finetune() returns. loss_masks (0/1 per token, like records): the loss on the 1s only. log:
    finetune's progress lines (every 50 steps), for public records only; None = silent."""
    from utils.finetune import finetune
    with tempfile.TemporaryDirectory(prefix="synth_finetune_") as folder:
        n_tok, n_rec = write_split(folder, "train", records, tok.vocab_size, loss_masks)
        write_split(folder, "val", records[:2], tok.vocab_size, loss_masks and loss_masks[:2])
        write_meta(folder, {"tokenizer": tok.name, "vocab_size": tok.vocab_size, "dtype": "uint16",
                            "splits": {"train": {"tokens": n_tok, "records": n_rec}}})
        batch = min(batch_size, n_rec)
        return finetune({"base_ckpt": base_ckpt, "data_dir": folder, "save": False, "dp": False,
                         "sampling": "shuffle", "max_steps": steps, "batch_size": batch, "microbatch_size": batch,
                         "learning_rate": learning_rate, "eval_interval": 0, "device": device, "seed": seed,
                         "loss_on": "all" if loss_masks is None else "answer", "log_interval": 50},
                        log=log or (lambda *a, **k: None))


def finetuned_on(texts, tok, base_ckpt, steps, batch_size, learning_rate, device="cpu", log=print):
    """The base fine-tuned without privacy on `texts`' Q/A lines."""
    records = qa_lines(tok, texts)
    log(f"utility: fine-tuning on {len(texts)} people ({len(records)} Q/A lines) for {steps} steps")
    return finetuned_on_records(records, tok, base_ckpt, steps, batch_size, learning_rate, device)["model"]


def utility_markdown(u):
    lines = [f"Utility of {u['records']} synthetic records at epsilon={u['epsilon']:.3g}, delta={u['delta']:.3g} "
             "(distance to the private people's distribution; lower is better; computed on real data: not private)", "",
             "| marginal | metric | synthetic | public drafter (eps 0) | DP histogram | DP histogram, N samples |",
             "|---|---|---|---|---|---|"]
    for k, v in u["marginals"].items():
        lines.append(f"| {k} | {v['metric']} | {v['synthetic']:.3f} | {v['public_drafter']:.3f} | "
                     f"{v['dp_histogram']:.3f} | {v['dp_histogram_n_samples']:.3f} |")
    lines += ["", f"Names shared with the private people: {u['names_shared_with_private']} (the public drafter alone, "
              f"same count: {u['names_shared_public_drafter']}); canaries reproduced: {u['canaries_reproduced']}."]
    if "downstream" in u:
        d = u["downstream"]
        fields = [k for k in next(iter(d["accuracy"].values())) if k != "mean"]
        lines += ["", f"Downstream: field accuracy on {d['held_out']} held-out real people after fine-tuning on "
                  f"{d['people']} people ({d['steps']} steps):", "",
                  "| model | " + " | ".join(fields) + " | mean |", "|---|" + "---|" * (len(fields) + 1)]
        for name, acc in d["accuracy"].items():
            lines.append(f"| {name} | " + " | ".join(f"{acc[f]:.3f}" for f in fields) + f" | {acc['mean']:.3f} |")
    return "\n".join(lines) + "\n"
