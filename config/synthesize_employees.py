# DP synthetic employee records by private prediction, from the public base model.
#   python data/employees/prepare.py && python train.py config/train_pydocs.py
#   python synthesize_dp.py config/synthesize_employees.py [--epsilon 3] [--utility_check=True]
# The base must not have seen data/employees (pretrained on pydocs: fine; a fine-tuned model: not DP).
# A canary inserted k times is k identical records: they hash to the same batch, so it is protected
# as a group of k (k * epsilon), exactly as under DP-SGD.
ckpt = "out/base/ckpt.pt"
data_dir = "data/employees"
out = "out/synthetic/employees.jsonl"

epsilon = 1.0
delta = 1e-6  # well below 1 / (about 960 train records)

# ~962 train records (900 people + 62 canary copies) in 4 disjoint batches: s = expected size.
# n_batches and s are fixed here, never read off the data.
n_batches = 4
s = 240
c = 10.0
tau = 2.0

# Structured records: most tokens (the Q/A template, the repeated name) are predictable without the
# data, so the public drafter + SVT pays only for the rest (see bench/results_synthesis.md).
svt = True
sigma = 0.5
theta = 0.8
tau_pub = 1.0

# A base model pretrained on a stream of documents separated by end-of-text: show it one record and
# let it write the next one; the public prompt is the bare document boundary.
prompt_template = "{record}{eot}"
public_prompt = "{eot}"
max_new_tokens = 140          # a record is ~130 GPT-2 tokens; block_size 256 leaves 114 for the shown one
max_examples_per_batch = 8
