"""Learning-rate schedules: nanoGPT's warmup + cosine (pretraining, by iteration) and the same shape over
a fine-tune's planned steps. One formula for both, so the two loops cannot drift apart."""
import math

FINETUNE_SCHEDULES = ("constant", "cosine", "wsd")  # finetune_lr's lr_schedule values


def get_lr(it, cfg):
    """Linear warmup for warmup_iters, then cosine decay to min_lr at lr_decay_iters, then min_lr."""
    if not cfg["decay_lr"]:
        return cfg["learning_rate"]
    if it < cfg["warmup_iters"]:
        return cfg["learning_rate"] * (it + 1) / (cfg["warmup_iters"] + 1)
    if it >= cfg["lr_decay_iters"]:
        return cfg["min_lr"]
    ratio = (it - cfg["warmup_iters"]) / (cfg["lr_decay_iters"] - cfg["warmup_iters"])
    return cfg["min_lr"] + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (cfg["learning_rate"] - cfg["min_lr"])


def finetune_lr(step, total_steps, cfg):
    """The learning rate of a fine-tune's step `step` (0-based, counted over the whole run, resumed parts
    included) of total_steps: constant; 'cosine': warmup_steps of linear warmup and a cosine down to
    min_lr_ratio x learning_rate at the last step; 'wsd' (warmup, stable, decay): the warmup, the peak, and
    over the last decay_fraction of the steps a straight line down to min_lr_ratio x learning_rate at the
    last step. Decaying at the end matters under DP: the last steps' noise is what the final weights keep,
    and 'wsd' lowers it without giving up the peak's progress the way a cosine from step 0 does."""
    if cfg["lr_schedule"] == "wsd":
        peak, warmup = cfg["learning_rate"], cfg["warmup_steps"]
        if step < warmup:
            return peak * (step + 1) / (warmup + 1)
        decay_start = max(warmup, total_steps - max(1, round(cfg["decay_fraction"] * total_steps)))
        if step <= decay_start:
            return peak
        low = cfg["min_lr_ratio"] * peak
        return peak + (low - peak) * min(1.0, (step - decay_start) / max(1, total_steps - 1 - decay_start))
    return get_lr(step, {"decay_lr": cfg["lr_schedule"] == "cosine", "learning_rate": cfg["learning_rate"],
                         "warmup_iters": cfg["warmup_steps"], "lr_decay_iters": max(total_steps - 1, cfg["warmup_steps"] + 1),
                         "min_lr": cfg["min_lr_ratio"] * cfg["learning_rate"]})
