# The small base model pretrained on CPU on data/pydocs (python data/pydocs/prepare.py first).
# The vocabulary follows the prepared data: GPT-2 BPE (default, 50304 padded) or bytes (--tokenizer byte, 257).
#   python train.py config/train_pydocs.py
out_dir = "out/base"
dataset = "pydocs"
eval_interval = 100
eval_iters = 20
log_interval = 10
always_save_checkpoint = False  # keep the model with the best val loss

# 4 layers x 256 wide: ~3.2M parameters in the blocks
n_layer = 4
n_head = 4
n_embd = 256
block_size = 256
dropout = 0.1
batch_size = 16
gradient_accumulation_steps = 1

learning_rate = 1e-3
max_iters = 1000
lr_decay_iters = 1000  # = max_iters; keep it fixed when resuming with a larger max_iters
warmup_iters = 50
min_lr = 1e-4
beta2 = 0.99
patience = 5

device = "cpu"
compile = False
