"""
Fine-tune a GPT on a records dataset with DP-SGD (Opacus), or without privacy (--dp=False), in one loop.

    python finetune_dp.py config/finetune_dp_employees.py [--key=value ...]
    torchrun --standalone --nproc_per_node=2 finetune_dp.py config/finetune_dp_employees.py

The loop, its defaults and what is private how are in utils/finetune.py.
"""
import sys

from configurator import configure
from utils.cli import run_cli
from utils.finetune import DEFAULTS, finetune


def main(argv=None):
    cfg = configure(DEFAULTS, sys.argv[1:] if argv is None else argv)
    result = finetune(cfg)
    p = result["privacy"]
    spent = (f", epsilon {p['epsilon']:.3f} at delta {p['delta']:.3g} ({p['adjacency']})"
             + (f", this run alone {p['epsilon_this_run']:.3f}" if len(p["history"]) > 1 else "")
             + (" (stopped at the budget)" if p["stopped_at_budget"] else "")
             + ("" if p["guarantee_holds"] else " -- reproducible_noise_seed: NOT private against whoever knows it")
             ) if p else " (non-private)"
    print(f"done{spent}, training {result['train_time_s']:.1f} s")
    return result


if __name__ == "__main__":
    run_cli(main)
