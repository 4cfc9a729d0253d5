# DP synthetic employee records by private prediction, from the public base model.
#   python data/pydocs/prepare.py --tokenizer byte && python train.py config/train_pydocs.py
#   python data/employees/prepare.py --tokenizer byte --fields "Department,Full or Part-Time,Salary or Hourly,Annual Salary"
#   python synthesize_dp.py config/synthesize_employees.py --epsilon 8
# The base must not have seen data/employees (pretrained on pydocs: fine; a fine-tuned model: not DP).
# The privacy unit is a person: the prompts are people (a canary inserted k times is one person), and
# the canary's Phone is never a synthesized field, so no canary can come out.
ckpt = "out/base/ckpt.pt"
data_dir = "data/employees"
out = "out/synthetic/employees.jsonl"

epsilon = 8.0
delta = 1e-6  # well below 1 / (910 people)

# ~910 train people (900 + 10 canary people) in 4 disjoint batches: s = the expected size, fixed here,
# never read off the data. Fewer, larger batches give more private tokens in all (r grows as s^2).
n_batches = 4
s = 225
# tau = 0: the plan picks tau from the config and the public dry run alone: the smallest the budget pays
# for at max_examples_per_batch records per batch, but 2c/tau at most `sharpness`. A batch's vote gives
# p ~ exp(2c f / tau) for a value held by a fraction f of the batch (not p ~ f): ~6 fits a skewed
# 14-value field (past it the output collapses onto the mode), so at epsilon 8 the surplus buys records,
# not sharpness; at epsilon 1 tau rises to pay for them. Two-valued fields decode at 2c/tau = 2
# (record_synthesis.field_tau). rho per private token is (c/(s tau))^2/2.
c = 3.0
tau = 0.0
sharpness = 6.0
# The template is free and forced tokens too: what is left is value tokens the drafter cannot know, so
# the sparse vector technique would mostly answer "private" and cost 2/(s sigma)^2 more per token.
svt = False
max_examples_per_batch = 228  # records are free (every field released): about one per private person
whole_values = True  # a categorical value is one choice among its public values: every row votes on whole values
# Department x Full or Part-Time x Salary or Hourly (56 cells) released once per batch: one noisy table
# that every record draws its three fields from, for free, so they follow the batch's joint (p ~ f), not
# the vote's p ~ exp(2c f / tau). Each person adds its own values, read off its record (one-hot: L2 1):
# a DP contingency table. Read through the drafter's predictions instead (release_from = "drafter"), the
# table inherits its copying (85-88% per field on the public probe): at epsilon 8 Department TV 0.096
# against 0.046 for the DP histogram drawn to as many records. The drafter copies no digits at all
# (p(own salary | prompt) ~ 5e-7), so a voted salary only sharpens its uniform digits (KS 0.91 against its
# own 0.51): the salary's band (histogram_bins, 5,000 wide) given Full or Part-Time x Salary or Hourly is
# released too, the same way, and a value drawn uniform in the band. Every field is then released:
# release_share = 1 gives the two tables half of rho each (sigma 0.97 counts per cell at epsilon 8, 2.3
# at 3, 6.4 at 1) and no record costs a private token (a field without a public domain, e.g. Job Titles,
# would still be private-predicted token by token, after the released ones, with release_share < 1).
release_from = "records"
release_share = 1.0
release_bands = {"Annual Salary": ("Full or Part-Time", "Salary or Hourly")}

structured = True
fields = ("Department", "Full or Part-Time", "Salary or Hourly", "Annual Salary")
# Public domains (the City of Chicago's department abbreviations and codes), never read off the records.
domains = {
    "Department": ["POLICE", "FIRE", "STREETS & SAN", "WATER MGMNT", "AVIATION", "OEMC", "TRANSPORTN",
                   "PUBLIC LIBRARY", "HEALTH", "FAMILY & SUPPORT", "FINANCE", "BUILDINGS", "LAW", "ANIMAL CONTRL"],
    "Full or Part-Time": ["F", "P"],
    "Salary or Hourly": ["Salary", "Hourly"],
}
digits = {"Annual Salary": (4, 6)}  # 1000.00 .. 999999.99 (two decimals: the schema's)
record_header = "Employee record:\n"
# the public drafter's warm-up on public records, cached as drafter.pt: with every field released it is
# the epsilon-0 baseline of the utility table (and the private predictor of any field left to tokens);
# p(own value | prompt) at 300 / 600 steps: Department 0.96 / 0.85, Full or Part-Time 0.46 / 0.85, Salary
# or Hourly 0.90 / 0.88 (the base: 0.06)
drafter_steps = 600

utility_check = True
histogram_bins = {"Annual Salary": (0.0, 200000.0, 40)}
