# issue 17's experiment at full scale: `make utility` (python bench/utility.py config/utility.py).
# The DP recipe below is the harness's starting point, NOT yet tuned: run
#   python bench/utility.py config/utility.py --sweep=True
# (public_seed data only) and copy the winner of results/utility/sweep.md here.
out_dir = "out/utility"
results_dir = "results/utility"
n_persons = (1000, 10000, 30000)
n_heldout = 1000
methods = ("full", "freeze", "lora")
epsilons = (1.0, 3.0, 8.0)
# a fresh 2-layer d=128 byte model, first trained without DP on 5,000 PUBLIC persons (public_seed) whose
# records never ask the Department; or base_ckpt = your own public base (byte tokenizer, block >= ~230)
base_ckpt = ""
pretrain_n = 5000
n_layer = 2
n_embd = 128
# DP recipe: large logical batches (Li et al. 2022); q = batch / N is capped at 0.25
dp_batch_size = 1024
dp_epochs = 4.0
dp_learning_rate = 4e-3
max_grad_norm = 0.5
