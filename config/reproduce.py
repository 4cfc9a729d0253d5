# The thesis experiments at the built-in CPU scale (make reproduce): about 14 minutes on 2 idle CPU cores.
#   python reproduce.py config/reproduce.py
#   python reproduce.py config/reproduce.py --methods=full,lora8 --steps=20     # a smaller matrix
# Every key is documented in reproduce.py's DEFAULTS; this file states the main ones explicitly.
out_dir = "out/reproduce"
results_dir = "results"
methods = ("full", "freeze75", "lora4", "lora8", "lora16", "dp1", "dp3", "dp8")
device = "cpu"

# data: bytes; one Q/A field per person (plus a canary's phone line) so that a record fits the 128-token block
tokenizer = "byte"
n_people = 200
val_frac = 0.5  # the held-out half: membership-inference non-members
fields = ("Department",)
templates = (0,)  # every record asks in the canonical wording, the one extraction prompts with
canary_reps = (1, 4, 16)

# base model: 4 blocks x 128 wide (0.83M parameters) pretrained on pydocs for 400 steps
n_layer = 4
n_head = 4
n_embd = 128
block_size = 128
pretrain_iters = 400

# fine-tuning on every token of the records: 15 epochs without DP (the repeated canaries are memorized;
# longer or at a higher rate, the full fine-tune mostly forgets pydocs), 10 with DP-SGD
loss_on = "all"
epochs = 15.0
batch_size = 8
learning_rate = 1e-3
lora_learning_rate = 5e-3
dp_epochs = 10.0
dp_batch_size = 64
dp_learning_rate = 5e-3

# tests
n_candidates = 10000
audit_m = 100
