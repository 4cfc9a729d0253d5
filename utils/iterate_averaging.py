"""
Iterate averaging for fine-tuning: an exponential moving average (EMA) of the trained parameters,
updated after every optimizer step and put into the model after the last one (utils/finetune.py,
ema_decay > 0).

Why: DP-SGD's last iterate carries its last steps' noise at full weight; an average of the recent
iterates cancels part of that noise (Polyak-Ruppert averaging; De et al. 2022 use an EMA for their DP
ImageNet results). It reads only the iterates the DP optimizer already released, so it is
post-processing: the (epsilon, delta) guarantee is unchanged and costs nothing. The average starts at the
weights training starts from (with decay d their share after k steps is d**k: 3e-5 after 100 steps at
0.9), and it lives beside the optimizer state in the periodic checkpoints, so a resumed run continues it.
"""
import torch

from utils.cli import UserError


class ParameterEMA:
    def __init__(self, params, decay):
        if not 0.0 < decay < 1.0:
            raise UserError(f"ema_decay must be in (0, 1), got {decay}")
        self.params = list(params)
        self.decay = float(decay)
        self.average = [p.detach().clone() for p in self.params]

    @torch.no_grad()
    def update(self, *_):
        """average <- decay * average + (1 - decay) * params; signature of an optimizer step post-hook."""
        for avg, p in zip(self.average, self.params):
            avg.lerp_(p.detach(), 1.0 - self.decay)

    @torch.no_grad()
    def copy_to_params(self):
        for avg, p in zip(self.average, self.params):
            p.copy_(avg)

    def state_dict(self):
        return {"decay": self.decay, "average": [a.clone() for a in self.average]}

    def load_state_dict(self, state):
        shapes = [tuple(a.shape) for a in state["average"]]
        if shapes != [tuple(p.shape) for p in self.params]:
            raise UserError("the checkpoint's parameter average does not match the trained parameters")
        self.average = [a.to(device=p.device, dtype=p.dtype).clone() for a, p in zip(state["average"], self.params)]
