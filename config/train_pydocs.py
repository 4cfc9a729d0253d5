# The small base model pretrained on CPU on data/pydocs (python data/pydocs/prepare.py first).
# The vocabulary follows the prepared data: bytes (257; prepare with --tokenizer byte) are what a CPU trains in
# minutes; GPT-2 BPE (50304 padded) makes the tied embedding/head 4x the blocks and each step ~10x slower.
#   python train.py config/train_pydocs.py
out_dir = "out/base"
dataset = "pydocs"
eval_interval = 50
eval_iters = 10
log_interval = 10
always_save_checkpoint = False  # keep the model with the best val loss

# 4 layers x 256 wide: ~3.2M parameters in the blocks
n_layer = 4
n_head = 4
n_embd = 256
block_size = 256
dropout = 0.0  # a short run underfits; dropout only slows it down
batch_size = 8
gradient_accumulation_steps = 1

learning_rate = 2e-3
max_iters = 300  # ~600k tokens, a few minutes on 2 CPU cores with the byte vocabulary
lr_decay_iters = 300  # = max_iters; keep it fixed when resuming with a larger max_iters
warmup_iters = 20
min_lr = 2e-4
beta2 = 0.99
patience = 5

device = "cpu"
compile = False
