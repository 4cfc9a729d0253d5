# DP-SGD fine-tuning of the pydocs base model (config/train_pydocs.py -> out/base) on the employees Q/A
# records. Prepare the data with the base model's tokenizer first (python data/employees/prepare.py).
#   python finetune_dp.py config/finetune_dp_employees.py
#   python finetune_dp.py config/finetune_dp_employees.py --target_epsilon=3
#   python finetune_dp.py config/finetune_dp_employees.py --dp=False       # the non-private reference
#   python finetune_dp.py config/finetune_dp_employees.py --lora_rank=8 --freeze_first_blocks=0 --freeze_embeddings=False
#   python finetune_dp.py config/finetune_dp_employees.py --init_from=resume   # continue after a crash
base_ckpt = "out/base/ckpt.pt"
data_dir = "data/employees"
out_dir = "out/finetune_dp_employees"
loss_on = "answer"  # learn the answers, not the question templates

# privacy: one person = one record; delta defaults to min(1e-5, 1/(10 N)). add_remove treats N (hence
# q and the steps) as public; with N public by design use adjacency="replace_one", accountant="pld"
# (this config's 8.00 add/remove is about 16 replace-one at the default 900 persons: roughly a group of
# 2). DP randomness is a fresh OS secret per run;
# reproducible_noise_seed=<int> replays it, and then the guarantee does not hold against whoever knows it.
target_epsilon = 8.0
max_grad_norm = 0.1  # small: nearly every person's gradient is clipped, so the update is their mean direction
accountant = "pld"  # dp-accounting's PLD: the same epsilon as RDP's bound for ~6% less noise (q ~ 0.1-0.25)
adjacency = "add_remove"
grad_sample_mode = "bk"  # book-keeping clipping: one backward pass, exact for a tied head

# The recipe of bench/utility.py, tuned on public-seed data (bench/results_utility/sweep.md, BENCHMARKS.md),
# never on these records: a large logical batch (~N/4 here: ~960 records, q ~ 0.25; 1024 at larger N),
# 75 steps at a constant learning rate of 3e-3 (a cosine decay to 0.1x lost a third of the accuracy in 100
# steps), clip 0.1, and the released model is the EMA (decay 0.9) of the DP iterates (post-processing: the
# same epsilon). Fewer steps and the average cut what the model keeps of records repeated 16 times
# (public data, means of 2 runs: a 1.6-bit canary gap at 75 steps with the EMA, 3.8 at 100 steps' last
# iterate) and cost little accuracy. bench/utility.py also puts the loss on each record's last answer only
# (loss_on='last_answer': the field it predicts); this config keeps every answer, since its records
# teach every field.
batch_size = 240
microbatch_size = 48
max_steps = 75
learning_rate = 3e-3
weight_decay = 0.0
ema_decay = 0.9
# What is trained: the first half of the blocks (of the 4-block pydocs base) and the embeddings stay fixed.
# The public sweep's best at 100 steps (0.923 vs 0.892 for the full fine-tune), and in the matrix it beat
# the full fine-tune at every N and epsilon. LoRA freezes every base weight itself: with --lora_rank, set
# these two to 0 / False (the run says so).
freeze_first_blocks = 2
freeze_embeddings = True

eval_interval = 25
checkpoint_interval = 25  # a crash loses at most 25 steps (--init_from=resume)
eval_records = 100
log_interval = 5
