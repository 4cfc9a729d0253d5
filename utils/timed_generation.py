"""Greedy continuation of one prompt, timed: the base-vs-patched comparisons of the sealing CLI and
reproduce.py's latency check."""
import time

import torch


@torch.no_grad()
def generate(model, tok, prompt, max_new_tokens):
    """(greedy continuation text, seconds)."""
    device = next(model.parameters()).device
    ids = tok.encode(prompt)[-model.config.block_size:] or [tok.eot]
    t0 = time.perf_counter()
    out = model.generate(torch.tensor([ids], device=device), max_new_tokens, greedy=True)[0, len(ids):].tolist()
    dt = time.perf_counter() - t0
    if tok.eot in out:
        out = out[:out.index(tok.eot)]
    return tok.decode(out), dt
