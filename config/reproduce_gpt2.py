# The thesis experiments at GPT-2-124M scale on one CUDA GPU. UNTESTED: written without a GPU; expect to
# tune batch sizes and learning rates on first use.
#   python reproduce.py config/reproduce_gpt2.py
# The base is GPT-2 124M's weights (init_from: a transformers save_pretrained directory, or "gpt2" when the
# Hugging Face hub is reachable), continued on pydocs with the GPT-2 tokenizer; then every method fine-tunes
# it on all the employees fields.
out_dir = "out/reproduce_gpt2"
results_dir = "results_gpt2"
device = "cuda"
dtype = "bfloat16"

tokenizer = "gpt2"
n_people = 2000
val_frac = 0.2
fields = ("Job Titles", "Department", "Full or Part-Time", "Salary or Hourly", "Typical Hours", "Annual Salary",
          "Hourly Rate")
canary_reps = (1, 2, 4, 8, 16)
canaries_per_rep = 4
n_control_canaries = 10

init_from = "gpt2"  # GPT-2 124M: 12 layers, 12 heads, 768 wide (the shape keys below are ignored)
block_size = 256
pretrain_iters = 200
pretrain_batch_size = 16
pretrain_learning_rate = 1e-4

epochs = 4.0
dp_epochs = 4.0
batch_size = 32
microbatch_size = 16
dp_batch_size = 256
learning_rate = 1e-4
lora_learning_rate = 1e-3
dp_learning_rate = 1e-3
eval_interval = 25

audit_m = 1000
audit_k = 100
n_candidates = 10000
extraction_people = 200
mia_records = 500
eval_people = 100
latency_tokens = 64
