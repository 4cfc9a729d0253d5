# GPT-2 124M shape from scratch on GPUs (nanoGPT's recipe): ~0.5M tokens per step.
#   torchrun --standalone --nproc_per_node=8 train.py config/train_gpt2.py
# 12 x 1024 tokens x 40 accumulation steps (5 per GPU on 8 GPUs) = 491,520 tokens per iteration.
out_dir = "out/gpt2"
dataset = "openwebtext"
eval_interval = 1000
eval_iters = 200
log_interval = 10

n_layer = 12
n_head = 12
n_embd = 768
block_size = 1024
dropout = 0.0
bias = False
batch_size = 12
gradient_accumulation_steps = 5 * 8

learning_rate = 6e-4
max_iters = 600000
lr_decay_iters = 600000
warmup_iters = 2000
min_lr = 6e-5
weight_decay = 1e-1
beta1 = 0.9
beta2 = 0.95
grad_clip = 1.0

device = "cuda"
dtype = "auto"  # bfloat16 where supported
compile = True
