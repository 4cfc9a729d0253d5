"""
Pretrain a GPT on a token stream, nanoGPT style.

    python train.py config/train_pydocs.py [--key=value ...]                   # one process (CPU or GPU)
    torchrun --standalone --nproc_per_node=2 train.py config/train_pydocs.py    # DDP: nccl on CUDA, gloo on CPU
    python train.py config/train_pydocs.py --init_from=resume --max_iters=4000  # continue out_dir/ckpt.pt exactly
    python train.py config/train_pydocs.py --init_from=gpt2                     # start from GPT-2 weights

The loop, its defaults, batching and exact resume are in utils/pretrain.py.
"""
from configurator import configure
from utils.cli import run_cli
from utils.pretrain import DEFAULTS, train


def main(argv=None):
    cfg = configure(DEFAULTS, argv or [])
    train(cfg)


if __name__ == "__main__":
    run_cli(main)
