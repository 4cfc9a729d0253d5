"""
Plotting functions (matplotlib, Agg backend: no display needed). Each writes one PNG atomically.

    python utils/plot.py --logs=out/base/log.jsonl --out=loss.png             # loss curves of train.py runs
    python utils/plot.py --logs=out/a/log.jsonl,out/b/log.jsonl --out=cmp.png
"""
import json
import os

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from configurator import configure  # noqa: E402
from utils.atomic import atomic_path  # noqa: E402
from utils.cli import UserError, run_cli  # noqa: E402

DEFAULTS = dict(
    logs=["out/base/log.jsonl"],  # comma-separated JSONL logs written by train.py
    out="loss.png",                       # the PNG to write
    title="",                             # figure title ('' = "loss curves")
)


def model_title(name, ckpt, patch=None, privacy=None):
    """Which model a figure shows: its name, checkpoint, patch and DP setting (privacy None: not known)."""
    dp = ""
    if privacy is not None:
        dp = (f" (DP-SGD ε={privacy['epsilon']:.3g}, δ={privacy['delta']:.2g})" if privacy.get("epsilon") is not None
              else " (no DP)")
    return f"{name}: {os.path.basename(os.path.dirname(os.path.abspath(ckpt)))}/{os.path.basename(ckpt)}" + \
        (f" + patch {os.path.basename(patch)}" if patch else "") + dp


def title_for(ckpt, patch=None):
    """model_title from the files: the DP setting from the privacy.json finetune_dp writes beside a
    checkpoint ("no DP" without one; a patch is titled by its file, its privacy is its own tenant's)."""
    privacy = {}
    path = os.path.join(os.path.dirname(os.path.abspath(ckpt)), "privacy.json")
    if not patch and os.path.isfile(path):
        with open(path) as f:
            privacy = json.load(f)
    name = os.path.basename(os.path.dirname(os.path.abspath(patch or ckpt)))
    return model_title(name, ckpt, patch, None if patch else privacy)


def save_png(fig, out_png):
    with atomic_path(out_png) as tmp:
        fig.savefig(tmp, format="png", dpi=120, bbox_inches="tight")
    plt.close(fig)


def read_log(path):
    """The events of one JSONL training log."""
    if not os.path.isfile(path):
        raise UserError(f"log {path} does not exist")
    events = []
    with open(path) as f:
        for n, line in enumerate(f, 1):
            if line.strip():
                try:
                    events.append(json.loads(line))
                except json.JSONDecodeError:
                    raise UserError(f"{path} line {n} is not JSON") from None
    return events


def plot_loss_curves(log_jsonl_paths, out_png, title=""):
    """Train loss (every logged step) and eval train/val loss against iteration, one colour per log."""
    fig, ax = plt.subplots(figsize=(7, 4.5))
    plotted = 0
    for i, path in enumerate(log_jsonl_paths):
        events = read_log(path)
        name = os.path.basename(os.path.dirname(os.path.abspath(path))) or path
        color = f"C{i % 10}"
        train = [(e["iter"], e["loss"]) for e in events if e.get("event") == "train"]
        evals = [e for e in events if e.get("event") == "eval"]
        if train:
            ax.plot(*zip(*train), color=color, alpha=0.35, lw=1, label=f"{name} train (step)")
        if evals:
            its = [e["iter"] for e in evals]
            ax.plot(its, [e["train_loss"] for e in evals], color=color, ls="--", marker=".",
                    label=f"{name} train (eval)")
            ax.plot(its, [e["val_loss"] for e in evals], color=color, marker="o", label=f"{name} val")
        plotted += bool(train or evals)
    if not plotted:
        plt.close(fig)
        raise UserError(f"no loss events in {', '.join(log_jsonl_paths)}")
    ax.set_xlabel("iteration")
    ax.set_ylabel("cross-entropy loss (nats/token)")
    ax.set_title(title or "loss curves")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    save_png(fig, out_png)
    return out_png


def plot_bars(groups, out_png, title="", ylim=None):
    """Grouped bar chart: groups = {series: {label: value}}; one colour per series, bars side by side."""
    labels = list(dict.fromkeys(label for series in groups.values() for label in series))
    if not labels:
        raise UserError("plot_bars: nothing to plot")
    fig, ax = plt.subplots(figsize=(max(5.0, 0.8 * len(labels) * max(1, len(groups))), 4))
    width = 0.8 / len(groups)
    for i, (series, values) in enumerate(groups.items()):
        xs = [j + (i - (len(groups) - 1) / 2) * width for j in range(len(labels))]
        ax.bar(xs, [values.get(label, 0.0) for label in labels], width, label=series, color=f"C{i % 10}")
    ax.set_xticks(range(len(labels)))
    ax.set_xticklabels(labels, rotation=30, ha="right", fontsize=8)
    if ylim:
        ax.set_ylim(*ylim)
    ax.set_title(title)
    ax.grid(axis="y", alpha=0.3)
    if len(groups) > 1:
        ax.legend(fontsize=8)
    save_png(fig, out_png)
    return out_png


# ---------------------------------------------------------------- interpretability (seed 001 section 3.3)
def token_labels(tokenizer, ids):
    """One printable label per token (spaces and newlines made visible)."""
    eot = getattr(tokenizer, "eot", None)
    return [("<eot>" if i == eot else tokenizer.decode([int(i)]).replace(" ", "\u2423").replace("\n", "\\n")) or "?"
            for i in ids]


def _prompt_ids(model, tokenizer, prompt):
    import torch
    ids = tokenizer.encode(prompt)[-model.config.block_size:]  # the window the model would see
    if not ids:
        raise UserError("the prompt is empty")
    return torch.tensor([ids], device=next(model.parameters()).device)


def attention_maps(model, idx):
    """(n_layer, n_head, T, T) attention weights for one sequence idx (1, T): row = query, column = key.
    Each attention module keeps its weights (need_weights) for this one forward only."""
    import torch
    from utils.checkpoint import unwrap
    gpt = unwrap(model)
    attns = [block.attn for block in gpt.transformer.h]
    try:
        for a in attns:
            a.need_weights = True
        with torch.no_grad():
            gpt(idx)
        return torch.stack([a.last_attn[0] for a in attns]).float().cpu()
    finally:
        for a in attns:
            a.need_weights, a.last_attn = False, None


def tick_every(labels, most=40):
    """(positions, labels) showing every k-th token so that at most `most` stay readable."""
    k = max(1, -(-len(labels) // most))
    return list(range(0, len(labels), k)), labels[::k]


def plot_attention_maps(model, tokenizer, prompt, out_png, max_panels=64, title=""):
    """A grid of attention maps for the prompt: one panel per (layer, head), or one per layer (mean over
    heads) when there are more than max_panels heads in all, the axes labelled with the prompt's tokens
    (every k-th past 40), one colour bar for all panels, and `title` (which model: name, patch, DP
    setting) above. Returns the (L, H, T, T) weights (numpy)."""
    import math
    was_training = model.training
    model.eval()
    idx = _prompt_ids(model, tokenizer, prompt)
    try:
        maps = attention_maps(model, idx)
    finally:
        model.train(was_training)
    L, H, T, _ = maps.shape
    per_head = L * H <= max_panels
    panels = ([(f"layer {l} head {h}", maps[l, h]) for l in range(L) for h in range(H)] if per_head else
              [(f"layer {l} (mean of {H} heads)", maps[l].mean(0)) for l in range(L)])
    cols = H if per_head else min(4, L)
    rows = math.ceil(len(panels) / cols)
    side = min(4.0, max(2.2, 0.12 * T))
    fig, axes = plt.subplots(rows, cols, figsize=(side * cols, side * rows), squeeze=False)
    ticks, labels = tick_every(token_labels(tokenizer, idx[0].tolist()))
    for ax, (name, m) in zip(axes.flat, panels):
        image = ax.imshow(m.numpy(), cmap="viridis", vmin=0.0, vmax=1.0)
        ax.set_title(name, fontsize=8)
        ax.set_xticks(ticks, labels, fontsize=5, rotation=90)
        ax.set_yticks(ticks, labels, fontsize=5)
        ax.set_xlabel("key token", fontsize=6)
        ax.set_ylabel("query token", fontsize=6)
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    fig.colorbar(image, ax=list(axes.flat), shrink=0.8, label="attention weight")
    fig.suptitle((title + "\n" if title else "") + "Attention weights (row: query token, column: key token)",
                 fontsize=10)
    save_png(fig, out_png)
    return maps.numpy()


def saliency(model, idx, target=None):
    """Gradient x input: for each input token t, (d logit / d e_t) . e_t, with e_t the token's input
    embedding and logit the last position's logit of `target` (default: the model's top prediction).
    Returns (scores (T,) numpy, target id). Only the embedding output gets a gradient, no weight .grad."""
    import torch
    from utils.checkpoint import unwrap
    gpt = unwrap(model)
    kept = {}

    def hook(module, inputs, out):
        kept["emb"] = out.detach().requires_grad_(True)
        return kept["emb"]
    handle = gpt.transformer.wte.register_forward_hook(hook)
    try:
        with torch.enable_grad():
            logits, _ = gpt(idx, last_only=True)
            last = logits[0, -1]
            target = int(last.argmax()) if target is None else int(target)
            (grad,) = torch.autograd.grad(last[target], kept["emb"])
    finally:
        handle.remove()
    return (grad[0] * kept["emb"][0].detach()).sum(-1).float().cpu().numpy(), target


def plot_saliency(model, tokenizer, prompt, out_png, target=None, title=""):
    """Bar chart of the gradient x input saliency of each prompt token for the next-token logit of
    `target` (a token id, or a string whose first token is taken; default the top prediction).
    Returns the scores (numpy, one per prompt token)."""
    was_training = model.training
    model.eval()
    idx = _prompt_ids(model, tokenizer, prompt)
    if isinstance(target, str):
        target = tokenizer.encode(target)[0]
    try:
        scores, target = saliency(model, idx, target)
    finally:
        model.train(was_training)
    labels = token_labels(tokenizer, idx[0].tolist())
    fig, ax = plt.subplots(figsize=(max(6.0, 0.22 * len(labels)), 3.5))
    ax.bar(range(len(scores)), scores, color=["tab:red" if s < 0 else "tab:blue" for s in scores])
    ax.set_xticks(range(len(labels)), labels, fontsize=6 if len(labels) > 40 else 8, rotation=90)
    ax.axhline(0, c="gray", lw=0.6)
    ax.set_ylabel("gradient x input")
    ax.set_title((title + "\n" if title else "")
                 + f"Saliency of the next-token logit of {token_labels(tokenizer, [target])[0]!r}", fontsize=10)
    save_png(fig, out_png)
    return scores


def main(argv=None):
    cfg = configure(DEFAULTS, argv or [])
    print(plot_loss_curves(list(cfg["logs"]), cfg["out"], cfg["title"]))


if __name__ == "__main__":
    run_cli(main)
