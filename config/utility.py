# issue 17's experiment at full scale: `make utility` (python bench/utility.py config/utility.py).
# The DP recipe below comes from the sweep on PUBLIC data (public_seed persons, never the evaluated
# ones): python bench/utility.py config/utility.py --sweep=True ; see bench/results_utility/sweep.md.
out_dir = "out/utility"
results_dir = "bench/results_utility"  # committed: RESULTS.md, sweep.md, results.json, the plots
n_persons = (1000, 10000, 30000)
n_heldout = 1000
methods = ("full", "freeze", "lora")
epsilons = (1.0, 3.0, 8.0)
# a fresh 2-layer d=128 byte model, first trained without DP on 5,000 PUBLIC persons (public_seed) whose
# records never ask the Department; or base_ckpt = your own public base (byte tokenizer, block 256)
base_ckpt = ""
pretrain_n = 5000
n_layer = 2
n_embd = 128
# the loss on each record's last answer only (the Department; a canary's one answer, its secret): the
# completion-only loss of supervised fine-tuning. With 'answer' each person's clipped gradient was spent
# mostly on their Job Titles answer, which the name cannot predict (public data, 1024 x 100, epsilon 8:
# 0.963 against 0.917 held-out accuracy, means of 2 and 3 runs; a canary's gradient was whole either way)
loss_on = "last_answer"
# DP recipe: a fixed number of steps at a large logical batch (q = batch / N, capped at 0.25)
dp_batch_size = 1024
dp_steps = 100
dp_learning_rate = 3e-3
max_grad_norm = 0.1
# freeze (the shipped method) has its own recipe, chosen on PUBLIC data (public_seed; BENCHMARKS.md,
# issue 17's ninth pass): 75 steps of 1024 records (q = 1024 / N, capped at 0.25), and the released model
# is the EMA (decay 0.9) of its DP iterates (post-processing: the same epsilon). With the last-answer loss
# the accuracy was there to spare, and fewer steps and the average cut the 16x canaries' exposure (public
# data, N = 10,000, epsilon 8, means of 2 runs: 0.936 held-out accuracy at a 1.6-bit gap, where 100
# steps' last iterate gave 0.963 at 3.8 bits and 512 x 300's 0.974 at 5.0). Its noise is calibrated with the PLD accountant
# (dp-accounting): the same epsilon for ~6% less noise than RDP's bound. full and LoRA keep the dp_*
# recipe above and RDP.
dp_method_recipes = {"freeze": {"accountant": "pld", "batch_size": 1024, "steps": 75, "ema_decay": 0.9}}
# run-to-run spread of the goal cells (issue 17: N >= 10,000 at epsilon 3 and 8) for the shipped method:
# each runs 3 times in all, with fresh DP noise and sampling on the same data (chosen before the runs)
repeat_cells = ((10000, "freeze", 3.0), (10000, "freeze", 8.0), (30000, "freeze", 3.0), (30000, "freeze", 8.0))
repeats = 3
