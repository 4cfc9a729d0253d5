# DP-SGD fine-tuning of the pydocs base model (config/train_pydocs.py -> out/base) on the employees Q/A
# records. Prepare the data with the base model's tokenizer first (python data/employees/prepare.py).
#   python finetune_dp.py config/finetune_dp_employees.py
#   python finetune_dp.py config/finetune_dp_employees.py --target_epsilon=3
#   python finetune_dp.py config/finetune_dp_employees.py --dp=False       # the non-private reference
#   python finetune_dp.py config/finetune_dp_employees.py --lora_rank=8    # LoRA: less noise per weight
base_ckpt = "out/base/ckpt.pt"
data_dir = "data/employees"
out_dir = "out/finetune_dp_employees"
loss_on = "answer"  # learn the answers, not the question templates

# privacy: one person = one record; delta defaults to min(1e-5, 1/(10 N))
target_epsilon = 8.0
max_grad_norm = 1.0
accountant = "rdp"
grad_sample_mode = "bk"  # book-keeping clipping: one backward pass, exact for a tied head

# ~960 records: an expected logical batch of 64 is a sample rate of ~0.067; 3 epochs = ~45 steps
batch_size = 64
microbatch_size = 16
epochs = 3.0
learning_rate = 2e-3
weight_decay = 0.0

eval_interval = 15
eval_records = 100
log_interval = 5
