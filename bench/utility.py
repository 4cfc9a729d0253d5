"""
DP utility at realistic scale (issue 17): does DP-SGD keep what holds across the population while
forgetting what is specific to one person? One command runs the matrix and writes the results:

    python bench/utility.py config/utility.py                        # make utility: N = 1k, 10k, 30k
    python bench/utility.py config/utility.py "--n_persons=(1000,)" "--methods=('full',)" "--epsilons=(8.0,)"
    python bench/utility.py config/utility.py --report_only=True     # the table of the runs finished so far
    python bench/utility.py config/utility.py --sweep=True           # tune the recipe on PUBLIC data only

Data: the synthetic employees generator (utils/employees.py, data/employees/prepare.py) at N training
persons plus n_heldout held-out persons (the val split: scored, never trained on), with canaries inserted
1, 4 and 16 times and never-inserted controls. Records ask two fields, Job Titles then Department (schema
order, as a CSV row has them: field_order='schema'; prepare.py's default shuffles them per record, which
leaves half the records asking the department before the title, from the name alone: 0.55 against 0.76
held-out accuracy at the same recipe in the sweep), with the canonical question wording, byte
tokenizer: a record is ~190 bytes (at most ~240: block_size 256; each batch is cut to its longest record),
so a 2-layer d=128 model trains on ~60 records a second on 2 idle cores; a byte vocabulary (257)
keeps the head and embedding small (BPE would cut T to ~60 but give a 50k-row head that dominates
both the compute and the DP noise, which grows with the trainable dimension).

Task (population level, scored on held-out persons): greedy completion of the Department answer after
the person's own job-title line. In this generator a title belongs to one department, so the ceiling is
100%; the floor is the majority-class rate (the commonest train department's share of the held-out
persons). Privacy side of the same runs: canary exposure (utils/canary_exposure.py; Carlini et al.
2019), 16x canaries against the controls, and membership inference (utils/membership.py: the attack
chosen on one half of the people, scored with a bootstrap interval on the other).

Runs: per N, methods full / freeze (first freeze_first_blocks blocks and the embeddings fixed) / lora at
every target epsilon, and the non-private full fine-tune, the reference of every row's "% of non-private"
(utils.finetune.finetune, grad_sample_mode 'bk', the loss on loss_on's bytes: config/utility.py asks for
'last_answer', each record's last answer only, i.e. the Department, and a canary's secret: the names,
the question scaffold and the Job Titles answer, which the name cannot predict, would take a share of
each person's clipped gradient, while a canary's would stay whole). Every run has a fixed budget of steps x batch (DP: ~100k records seen, ~17 CPU minutes
whatever N >= 4,096; non-private: ~19k), so a larger N does not cost more: it lowers the DP sample rate q = batch / N, and with it
the noise needed for the same epsilon (the fixed-steps view of Sander et al. 2023, TAN). The base
is base_ckpt, or, with base_ckpt='', a fresh model seeded with `seed`, trained without DP on
pretrain_n PUBLIC persons (public_seed) whose records ask pretrain_fields: Job Titles and Salary or
Hourly, never the Department. The base thus knows the record format, names and titles, as the anchors'
pretrained GPT-2 knows English (dp-transformers, Li et al. 2022), while what the task needs (the
department answers, and which title goes with which department) comes only from the private data. A
fresh model with no pretraining (pretrain_n=0) spends 60 non-private steps at N=1,000 learning only the
format (0% task accuracy in the check of this harness), and DP far more.

Recipe (--sweep=True): batch size, steps, clip norm, learning rate, its schedule and method, at sweep_epsilon, on the
generator with public_seed, which shares nothing with the evaluated data but the public generator: tuning
on the private data would leak (Papernot & Steinke 2022). The ranking, with the 16x canaries' exposure
gap (the public data has canaries too), goes to results_dir/sweep.md, and sweep_frontier.png plots accuracy against that gap.

The data seed is a reproducible mode: whoever knows it recomputes people and canary secrets, so the
canaries measure memorization and are no secret from such an adversary. The DP guarantee rests only on
the fine-tune's secret noise and sampling (never a reproducible_noise_seed here).
Each run's results go to out_dir/runs/<run>.json as it ends, and a rerun skips runs already there
(--fresh=True redoes them): an interrupted experiment resumes. A run whose recipe changed runs again,
and the earlier run's JSON moves to out_dir/runs/superseded/ (never overwritten).
"""
import copy
import itertools
import json
import os
import subprocess
import sys
import time
from collections import Counter

import numpy as np
import torch

from configurator import configure
from model import GPT, GPTConfig
from utils.model_under_test import complete, pyplot, save_figure
from utils.canary_exposure import chance_gap_sd, exposure_by_repetitions, prepare_canaries, score_canaries
from utils.membership import attack_metrics, blind_scores, mia_scores, read_records, scored_text, select_and_score, token_scores
from utils.model_leakage import first_line
from utils.atomic import write_bytes, write_json
from utils.audit_bounds import clopper_pearson
from utils.checkpoint import load_checkpoint, model_from_checkpoint
from utils.cli import UserError, run_cli
from utils.data import LOSS_ON, load_meta, offsets
from utils.employees import SCHEMA, load_people
from utils.finetune import finetune
from utils.iterate_averaging import ParameterEMA
from utils.lr_schedule import FINETUNE_SCHEDULES
from utils.machine import describe_machine
from utils.prepare import check_field_order
from utils.progress import Progress
from utils.tokenizer import get_tokenizer

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TASK_INPUT, TASK_TARGET = "Job Titles", "Department"

DEFAULTS = dict(
    out_dir="out/utility",  # datasets, and one JSON per finished run (resume reads them)
    results_dir="results/utility",  # RESULTS.md, results.json, PNG plots (and sweep.md with --sweep)
    fresh=False,  # redo runs whose JSON exists
    sweep=False,  # True: tune the recipe on the public-seed data instead of running the matrix
    # data
    n_persons=(1000, 10000, 30000),  # training persons per experiment (the Chicago file has ~31,600)
    n_heldout=1000,  # held-out persons (val split): the task is scored on them, MIA non-members
    seed=1337,  # the evaluated data's generator seed
    public_seed=2027,  # the sweep's generator seed: data public with respect to the evaluation
    field_order="schema",  # records ask Job Titles, then Department (a CSV row's order): every record shows the task
    canary_reps=(1, 4, 16),  # inserted canaries' repetition counts
    canaries_per_rep=4,  # distinct canaries per repetition count
    n_control_canaries=8,  # drawn like canaries, never inserted
    # model (base_ckpt='' = a fresh seeded model, byte vocabulary)
    base_ckpt="",  # a base checkpoint on the byte tokenizer ('' = fresh model from seed, pretrained below)
    pretrain_n=5000,  # fresh base: public persons (public_seed) it is first trained on without DP (0 = none)
    pretrain_fields=("Job Titles", "Salary or Hourly"),  # what the public records ask: never the task's Department
    pretrain_epochs=4.0,  # passes of the base over the public persons
    n_layer=2,  # fresh model blocks
    n_head=4,  # fresh model heads
    n_embd=128,  # fresh model width
    block_size=256,  # fresh model context (a record of the two fields is <= ~240 bytes; a longer one is refused)
    # the matrix
    methods=("full", "freeze", "lora"),  # what is trained (METHODS)
    epsilons=(1.0, 3.0, 8.0),  # DP targets of every method (nodp_methods also run without DP)
    freeze_first_blocks=1,  # 'freeze': these blocks and the embeddings stay fixed
    lora_rank=8,  # 'lora': adapter rank on attention and MLP
    # the recipe, non-private (the reference every DP run is compared with: full fine-tune, no noise)
    nodp_methods=("full",),  # methods that also run without DP ('full' is the reference of every row)
    batch_size=64,  # expected batch (records)
    steps=300,  # logical steps (~19k records seen: at N >= 10,000 about one pass or less)
    learning_rate=2e-3,  # peak learning rate (constant)
    loss_on="answer",  # 'answer': the loss (and so each person's clipped gradient) only on answer bytes; 'last_answer': on the last one
    # the recipe, DP: a fixed number of steps at a fixed large batch, so a run costs the same at every N
    # and a larger N only lowers q = batch / N (and so the noise for the same epsilon); Sander et al. 2023
    dp_batch_size=1024,  # expected logical batch; capped at N/4 so that q = batch/N stays <= 0.25
    dp_steps=100,  # logical DP steps
    dp_learning_rate=3e-3,  # peak learning rate
    dp_lr_schedule="constant",  # 'constant' | 'cosine' | 'wsd' (utils/lr_schedule.py: the peak, then down to a tenth at the end)
    dp_warmup_steps=0,  # 'cosine' / 'wsd': linear warmup steps
    dp_decay_fraction=0.2,  # 'wsd': the last share of the steps over which the rate falls
    dp_accountant="rdp",  # 'rdp' | 'pld' (dp-accounting's privacy loss distribution: tighter, so less noise for the same epsilon)
    dp_ema_decay=0.0,  # > 0: the DP model is the EMA of its iterates at this decay (post-processing, same epsilon); 0 = the last iterate
    dp_method_recipes={},  # per method, DP settings that replace the ones above, e.g. {'freeze': {'accountant': 'pld'}}
    max_grad_norm=0.1,  # per-person clipping norm
    microbatch_size=64,  # physical batch (work split only)
    # the sweep (DP at sweep_epsilon on public_seed data of sweep_n persons, dp_accountant; every combination runs)
    sweep_n=10000,  # training persons of the sweep data (batch sizes are capped at sweep_n / 4)
    sweep_epsilon=8.0,  # the target the recipe is tuned for
    sweep_batch_sizes=(512, 1024),  # logical batch sizes tried
    sweep_steps=(100,),  # DP steps tried
    sweep_clip=(0.1,),  # clip norms tried
    sweep_learning_rates=(1e-3, 3e-3),  # learning rates tried
    sweep_methods=("full",),  # what is trained, tried
    sweep_lr_schedules=("constant",),  # learning-rate schedules tried (with dp_warmup_steps)
    sweep_ema_decays=(),  # EMA decays of each sweep run's iterates scored too, each a row (free: the same run)
    report_only=False,  # True: write RESULTS.md from the finished runs of this matrix, train nothing (a run of
    # an earlier recipe is shown, marked; its repeats are left out of the spread)
    # run-to-run spread (fresh DP noise and sampling, the same data; the spread table: every run, mean, sd)
    repeat_cells=(),  # DP cells (N, method, target epsilon) of the matrix to run `repeats` times in all
    repeats=3,  # runs per repeated cell, the matrix's included
    # scoring
    n_candidates=1000,  # random secrets each canary is ranked among
    mia_records=500,  # members and non-members each
    resamples=1000,  # bootstrap resamples of the MIA intervals
    eval_batch_size=64,  # prompts / records per forward when scoring
    device="cpu",  # 'cpu' or 'cuda'
)

METHODS = {"full": "full fine-tune", "freeze": "freeze first blocks + embeddings", "lora": "LoRA (attn, mlp)"}


def check_config(cfg):
    """Refuse bad settings before any data is written or any model trained."""
    bad = [m for m in (*cfg["methods"], *cfg["nodp_methods"], *cfg["sweep_methods"]) if m not in METHODS]
    if bad:
        raise UserError(f"unknown method(s) {bad}; choose from {', '.join(METHODS)}")
    if not cfg["n_persons"] or any(not isinstance(n, int) or n < 8 for n in cfg["n_persons"]):
        raise UserError(f"n_persons must be integers >= 8, got {cfg['n_persons']}")
    if any(not e > 0 for e in (*cfg["epsilons"], cfg["sweep_epsilon"])):
        raise UserError("every epsilon must be > 0 (nodp_methods give the non-private runs)")
    if cfg["n_heldout"] < 4 or cfg["mia_records"] < 2 or cfg["resamples"] < 100:
        raise UserError("need n_heldout >= 4, mia_records >= 2 and resamples >= 100")
    check_field_order(cfg["field_order"], "field_order")
    if cfg["loss_on"] not in LOSS_ON:
        raise UserError(f"loss_on must be one of {', '.join(LOSS_ON)}, got {cfg['loss_on']!r}")
    if cfg["seed"] == cfg["public_seed"]:
        raise UserError("public_seed must differ from seed: the recipe must not be tuned on the evaluated data")
    if not 0 <= cfg["freeze_first_blocks"] <= cfg["n_layer"] or cfg["lora_rank"] < 1:
        raise UserError("freeze_first_blocks must be in 0..n_layer and lora_rank >= 1")
    if cfg["base_ckpt"] and not os.path.isfile(cfg["base_ckpt"]):
        raise UserError(f"base_ckpt {cfg['base_ckpt']} does not exist")
    if cfg["repeats"] < 1 or any(len(c) != 3 or c[1] not in cfg["methods"] or c[2] not in cfg["epsilons"]
                                 for c in cfg["repeat_cells"]):
        raise UserError("repeats must be >= 1 and each repeat_cells entry an (N, method, epsilon) of the matrix, "
                        f"got {cfg['repeat_cells']}")
    recipe_keys = {"batch_size", "steps", "learning_rate", "lr_schedule", "max_grad_norm", "decay_fraction", "accountant",
                   "ema_decay"}
    if not isinstance(cfg["dp_method_recipes"], dict) or any(
            m not in METHODS or not isinstance(r, dict) or not set(r) <= recipe_keys for m, r in cfg["dp_method_recipes"].items()):
        raise UserError(f"dp_method_recipes must map methods ({', '.join(METHODS)}) to dicts of {sorted(recipe_keys)}, "
                        f"got {cfg['dp_method_recipes']!r}")
    schedules = {cfg["dp_lr_schedule"], *cfg["sweep_lr_schedules"],
                 *(r.get("lr_schedule", "constant") for r in cfg["dp_method_recipes"].values())}
    accountants = {cfg["dp_accountant"], *(r.get("accountant", "rdp") for r in cfg["dp_method_recipes"].values())}
    if not accountants <= {"rdp", "pld"}:
        raise UserError(f"accountants must be 'rdp' or 'pld', got {sorted(accountants)}")
    if not schedules <= set(FINETUNE_SCHEDULES) or not 0 < cfg["dp_decay_fraction"] <= 1:
        raise UserError(f"learning-rate schedules must be among {FINETUNE_SCHEDULES} (got {sorted(schedules)}) "
                        "and dp_decay_fraction in (0, 1]")
    emas = {cfg["dp_ema_decay"], *(r.get("ema_decay", 0.0) for r in cfg["dp_method_recipes"].values())}
    if not all(isinstance(e, (int, float)) and 0 <= e < 1 for e in emas):
        raise UserError(f"EMA decays must be in [0, 1) (0 = the last iterate), got {sorted(map(str, emas))}")
    if not all(isinstance(d, (int, float)) and 0 < d < 1 for d in cfg["sweep_ema_decays"]):
        raise UserError(f"sweep_ema_decays must be in (0, 1), got {cfg['sweep_ema_decays']}")
    if cfg["sweep_ema_decays"] and cfg["dp_ema_decay"]:
        raise UserError("sweep_ema_decays scores averages of a last-iterate sweep run: set dp_ema_decay=0 with it")
    if TASK_TARGET in cfg["pretrain_fields"] or cfg["pretrain_n"] < 0:
        raise UserError(f"pretrain_fields must not ask {TASK_TARGET} (the task the private data teaches) and "
                        "pretrain_n must be >= 0")


# ----------------------------------------------------------------------------- data and model
def prepare_data(cfg, n, seed, fields=(TASK_INPUT, TASK_TARGET), canaries=True):
    """The employees records of n training + n_heldout held-out persons, with canaries unless told not
    (prepare.py, run as its own script, the way reproduce.py runs it). Returns the data folder; existing
    data is reused."""
    order = cfg["field_order"] if canaries else "random"  # the base learns the format at any field position
    data_dir = os.path.join(cfg["out_dir"], f"data_n{n}_seed{seed}" + (f"_{order}" if canaries else "_public_base"))
    if os.path.isfile(os.path.join(data_dir, "meta.json")) and not cfg["fresh"]:
        return data_dir
    total = n + cfg["n_heldout"]
    args = [f"--out_dir={data_dir}", f"--n_people={total}", f"--val_frac={cfg['n_heldout'] / total!r}",
            f"--seed={seed}", "--tokenizer=byte", f"--fields={tuple(fields)!r}", "--templates=(0,)",
            f"--field_order={order}",
            f"--canary_reps={tuple(cfg['canary_reps'])!r}", f"--canaries_per_rep={cfg['canaries_per_rep'] * canaries}",
            f"--n_control_canaries={cfg['n_control_canaries'] * canaries}"]
    subprocess.run([sys.executable, os.path.join(REPO, "data", "employees", "prepare.py"), *args], check=True)
    return data_dir


def base_model(cfg, block_size):
    """The public base: base_ckpt, or a fresh byte-vocabulary GPT seeded with cfg['seed'], trained without DP
    on pretrain_n public persons (out_dir/base_public<n>_block<T>/ckpt.pt: public data only, so a plaintext
    checkpoint; reused when it exists)."""
    if cfg["base_ckpt"]:
        return model_from_checkpoint(load_checkpoint(cfg["base_ckpt"]), cfg["base_ckpt"])
    public = prepare_data(cfg, cfg["pretrain_n"], cfg["public_seed"], cfg["pretrain_fields"], False) \
        if cfg["pretrain_n"] else None
    torch.manual_seed(cfg["seed"])
    need = max(block_size, longest_record(public) if public else 0)
    if need > cfg["block_size"]:
        raise UserError(f"records of {need} tokens do not fit block_size={cfg['block_size']}: raise --block_size")
    model = GPT(GPTConfig(block_size=cfg["block_size"], vocab_size=257,
                          n_layer=cfg["n_layer"], n_head=cfg["n_head"], n_embd=cfg["n_embd"], dropout=0.0))
    if not public:
        return model
    out_dir = os.path.join(cfg["out_dir"], f"base_public{cfg['pretrain_n']}_block{model.config.block_size}")
    ckpt = os.path.join(out_dir, "ckpt.pt")
    if not os.path.isfile(ckpt) or cfg["fresh"]:
        batch = min(cfg["batch_size"], max(1, cfg["pretrain_n"] // 4))
        finetune(dict(data_dir=public, out_dir=out_dir, dp=False, batch_size=batch,
                      microbatch_size=min(cfg["microbatch_size"], batch), epochs=cfg["pretrain_epochs"],
                      learning_rate=cfg["learning_rate"], untie_weights=False, eval_interval=0, eval_records=200,
                      log_interval=50, checkpoint_interval=0, seed=cfg["seed"], device=cfg["device"]), model=model)
    return model_from_checkpoint(load_checkpoint(ckpt), ckpt)


def longest_record(data_dir):
    """Tokens of the longest record (end-of-text included): the fresh model's block size."""
    return max(int(np.diff(offsets(data_dir, s)).max()) for s in load_meta(data_dir)["splits"])


def run_config(cfg, data_dir, n, method, epsilon, recipe=None):
    """The finetune config of one run: the non-private or the DP recipe, and what the method trains."""
    r = recipe or {}
    dp = epsilon is not None
    run = dict(data_dir=data_dir, save=False, dp=dp, grad_sample_mode="bk", microbatch_size=cfg["microbatch_size"],
               loss_on=cfg["loss_on"], eval_interval=0, eval_records=200, log_interval=10, seed=cfg["seed"],
               device=cfg["device"])
    if dp:
        batch = min(r.get("batch_size", cfg["dp_batch_size"]), max(1, n // 4))
        run.update(target_epsilon=float(epsilon), batch_size=batch, max_steps=r.get("steps", cfg["dp_steps"]),
                   learning_rate=r.get("learning_rate", cfg["dp_learning_rate"]),
                   lr_schedule=r.get("lr_schedule", cfg["dp_lr_schedule"]), warmup_steps=cfg["dp_warmup_steps"],
                   max_grad_norm=r.get("max_grad_norm", cfg["max_grad_norm"]))
        run["accountant"] = r.get("accountant", cfg["dp_accountant"])
        if run["lr_schedule"] == "wsd":
            run["decay_fraction"] = r.get("decay_fraction", cfg["dp_decay_fraction"])
        ema = r.get("ema_decay", cfg["dp_ema_decay"])
        if ema:
            run["ema_decay"] = float(ema)
    else:
        run.update(batch_size=min(cfg["batch_size"], max(1, n // 4)), max_steps=cfg["steps"],
                   learning_rate=cfg["learning_rate"])
    run["microbatch_size"] = min(run["microbatch_size"], run["batch_size"])
    if method == "freeze":
        run.update(freeze_first_blocks=cfg["freeze_first_blocks"], freeze_embeddings=True)
    elif method == "lora":
        run.update(lora_rank=cfg["lora_rank"], lora_targets=("attn", "mlp"))
    return run


def recipe_of(run_cfg):
    """What a finished run's JSON must match to be reused (everything but paths and logging, and the
    records' field order, from the data's meta.json)."""
    order = load_meta(run_cfg["data_dir"]).get("field_order", "random")
    return json.loads(json.dumps({"field_order": order} | {k: run_cfg.get(k) for k in ("dp", "target_epsilon", "batch_size", "max_steps", "learning_rate",
                                         "max_grad_norm", "loss_on", "freeze_first_blocks", "freeze_embeddings",
                                         "lora_rank", "lora_targets", "lr_schedule", "warmup_steps")}
                      | ({"decay_fraction": run_cfg["decay_fraction"]} if "decay_fraction" in run_cfg else {})
                      # the RDP runs predate this key: only another accountant makes a run's recipe differ
                      | ({"accountant": run_cfg["accountant"]} if run_cfg.get("accountant", "rdp") != "rdp" else {})
                      | ({"ema_decay": run_cfg["ema_decay"]} if run_cfg.get("ema_decay") else {})))  # so do the last-iterate runs


# ----------------------------------------------------------------------------- scoring
def majority_rate(data_dir):
    """(the commonest Department among train persons, its share of the held-out persons)."""
    train = [p for p in load_people(data_dir, "train") if SCHEMA.has(p, TASK_TARGET)]
    held = load_people(data_dir, "val")
    top = Counter(p[TASK_TARGET] for p in train).most_common(1)[0][0]
    return top, sum(p[TASK_TARGET] == top for p in held) / len(held)


def task_prompts(data_dir, tok):
    """(prompt ids, expected department) per held-out person: the title line, then the department question."""
    items = []
    for p in load_people(data_dir, "val"):
        text = f"{SCHEMA.qa_prompt(p, TASK_INPUT)} {SCHEMA.answer(p, TASK_INPUT)}\n{SCHEMA.qa_prompt(p, TASK_TARGET)}"
        items.append((tok.encode(text), SCHEMA.answer(p, TASK_TARGET)))
    return items


def task_accuracy(model, items, tok, batch_size):
    longest = max(len(tok.encode(" " + want)) for _, want in items) + 2
    outs = complete(model, [ids for ids, _ in items], longest, batch_size=batch_size, greedy=True, eot=tok.eot)
    hits = sum(first_line(tok.decode(o)) == want for o, (_, want) in zip(outs, items))
    lo, hi = clopper_pearson(hits, len(items))
    return dict(accuracy=hits / len(items), accuracy_interval=[lo, hi], n_scored=len(items))


def gap_noise(cfg):
    """The exposure gap's spread when nothing was memorized, in words, for the reports."""
    sd = chance_gap_sd(cfg["canaries_per_rep"], cfg["n_control_canaries"])
    return (f"with {cfg['canaries_per_rep']} canaries against {cfg['n_control_canaries']} controls a model that memorized "
            f"nothing shows a gap of standard deviation {sd:.2f} bits, so a gap below ~{2 * sd:.1f} bits is within chance")


def exposure_gap(model, canaries, tok, batch_size):
    """Mean exposure per repetition count, and the 16x (most repeated) canaries' mean minus the controls'."""
    by_reps = exposure_by_repetitions(score_canaries(model, canaries, tok, 512, batch_size))
    top = max(by_reps)
    gap = by_reps[top]["mean_exposure"] - by_reps[0]["mean_exposure"] if 0 in by_reps and top else None
    return dict(exposure={str(k): v["mean_exposure"] for k, v in by_reps.items()}, exposure_gap_bits=gap,
                exposure_gap_reps=top)


def membership(model, data_dir, meta, cfg):
    """The selected MIA attack's held-out-half AUC with its bootstrap interval (utils/membership.py)."""
    bs = model.config.block_size
    members, nonmembers = (read_records(data_dir, s, bs, meta, "all") for s in ("train", "val"))
    n = min(len(members), len(nonmembers), cfg["mia_records"])
    rng = np.random.default_rng(cfg["seed"])
    records = ([members[i] for i in sorted(rng.permutation(len(members))[:n])]
               + [nonmembers[i] for i in sorted(rng.permutation(len(nonmembers))[:n])])
    labels = np.r_[np.ones(n, bool), np.zeros(n, bool)]
    tok = get_tokenizer(meta)
    texts = [scored_text(tok, r, s) for r, s in records]
    scores = mia_scores(records, texts, token_scores(model, records, cfg["eval_batch_size"]), None, 20.0)
    sel = select_and_score(scores, labels, cfg["seed"], cfg["resamples"])
    blind, _ = attack_metrics(blind_scores(texts), labels, cfg["resamples"], cfg["seed"])  # a biased split shows here
    return dict(mia_attack=sel["attack"], mia_auc=sel["auc"], mia_auc_interval=list(sel["auc_interval"]),
                mia_verdict=sel["verdict"], mia_blind_auc=blind["auc"], mia_blind_interval=list(blind["auc_interval"]))


# ----------------------------------------------------------------------------- one run
def run_one(cfg, base, data_dir, n, method, epsilon, score_privacy=True, recipe=None, tag=None, averages=()):
    """Fine-tune a copy of the base, score it; the JSON is written as soon as the run ends. averages: EMA
    decays of the same run's iterates scored too (post-processing, the same epsilon), each its own row and
    JSON (tag + _ema<d>, the recipe with that ema_decay); then a list of rows, the run's own first."""
    tag = tag or f"n{n}_{method}_{'nodp' if epsilon is None else f'eps{epsilon:g}'}"
    run_cfg = run_config(cfg, data_dir, n, method, epsilon, recipe)
    this_recipe = recipe_of(run_cfg)
    wanted = [(tag, this_recipe)] + [(f"{tag}_ema{d:g}", dict(this_recipe, ema_decay=float(d))) for d in averages]
    done = [finished_run(cfg, t, r) for t, r in wanted]
    if cfg["report_only"] or all(d is not None for d in done):
        done = [d for d in done if d is not None]
        return done if averages else (done[0] if done else None)
    meta = load_meta(data_dir)
    tok = get_tokenizer(meta)
    items = task_prompts(data_dir, tok)  # prepared once, scored for the run and each average
    canaries = (prepare_canaries(os.path.join(data_dir, "canaries.json"), tok, cfg["n_candidates"], cfg["seed"])
                if score_privacy else None)
    emas = {}

    def track_averages(trainer):  # extra EMAs of the iterates the DP optimizer releases
        params = [p for g in trainer.optimizer.original_optimizer.param_groups for p in g["params"]]
        for d in averages:
            emas[d] = ParameterEMA(params, d)
            trainer.optimizer.original_optimizer.register_step_post_hook(emas[d].update)

    t0, cpu0 = time.time(), time.process_time()
    out = finetune(run_cfg, model=copy.deepcopy(base), **({"on_trainer_ready": track_averages} if averages else {}))
    train_cpu_s = time.process_time() - cpu0
    model = out["model"].eval()
    privacy, last_eval = out["privacy"] or {}, (out["history"] or [{}])[-1]
    row = dict(tag=tag, n=n, method=method, target_epsilon=epsilon, epsilon=privacy.get("epsilon"),
               delta=privacy.get("delta"), steps=last_eval.get("step"), val_loss=last_eval.get("val_loss"),
               noise_multiplier=privacy.get("noise_multiplier"), sample_rate=privacy.get("sample_rate"), batch_size=run_cfg["batch_size"],
               epochs=(last_eval.get("step") or 0) * run_cfg["batch_size"] / n, learning_rate=run_cfg["learning_rate"],
               lr_schedule=run_cfg.get("lr_schedule", "constant"),
               max_grad_norm=run_cfg.get("max_grad_norm") if epsilon is not None else None,
               train_time_s=out["train_time_s"], train_cpu_s=train_cpu_s, threads=torch.get_num_threads(),
               recipe=this_recipe)
    row.update(score(cfg, model, items, canaries, data_dir, meta, tok))
    row["wall_s"] = time.time() - t0
    save_run(cfg, tag, row)
    rows = [row]
    if averages:
        params = next(iter(emas.values())).params
        iterates = [p.detach().clone() for p in params]
        for (avg_tag, avg_recipe), d in zip(wanted[1:], averages):
            t1 = time.time()
            with torch.no_grad():
                emas[d].copy_to_params()
            avg = dict(row, tag=avg_tag, recipe=avg_recipe, averaged_from=tag, val_loss=None,  # val loss: the iterate's
                       **score(cfg, model, items, canaries, data_dir, meta, tok))
            with torch.no_grad():
                for p, x in zip(params, iterates):
                    p.copy_(x)
            avg["wall_s"] = time.time() - t1  # scoring only: the training is the run's (its wall_s)
            save_run(cfg, avg_tag, avg)
            rows.append(avg)
    return rows if averages else row


def finished_run(cfg, tag, recipe):
    """The finished run's row when its JSON has this recipe; with report_only, a run of another recipe
    (marked earlier_recipe: a real run, of the recipe its own columns name); else None."""
    path = os.path.join(cfg["out_dir"], "runs", f"{tag}.json")
    if not os.path.isfile(path) or cfg["fresh"]:
        return None
    with open(path) as f:
        done = json.load(f)
    if done.get("recipe") == recipe:
        return done
    if cfg["report_only"]:
        return dict(done, earlier_recipe=True)
    print(f"{tag}: the finished run used another recipe; running it again")
    return None


def score(cfg, model, items, canaries, data_dir, meta, tok):
    """Held-out task accuracy on items (task_prompts); with canaries (prepare_canaries; None = accuracy
    only), their exposure gap and membership inference."""
    with torch.no_grad():
        out = task_accuracy(model, items, tok, cfg["eval_batch_size"])
        if canaries is not None:
            out.update(exposure_gap(model, canaries, tok, cfg["eval_batch_size"]))
    if canaries is not None:
        out.update(membership(model, data_dir, meta, cfg))
    return out


def save_run(cfg, tag, row):
    """Write the run's JSON; a run it replaces (another recipe's, or --fresh) is kept, moved only now."""
    path = os.path.join(cfg["out_dir"], "runs", f"{tag}.json")
    if os.path.isfile(path):
        old = os.path.join(cfg["out_dir"], "runs", "superseded", f"{tag}.{int(os.path.getmtime(path))}.json")
        os.makedirs(os.path.dirname(old), exist_ok=True)
        os.replace(path, old)
        print(f"{tag}: the earlier recipe's run moved to {old}")
    write_json(path, row)


# ----------------------------------------------------------------------------- report
def fmt(x, digits=3):
    return "-" if x is None else f"{x:.{digits}f}"


def results_markdown(rows, majority, cfg, machine, wall_s, planned, again=()):
    reference = {r["n"]: r["accuracy"] for r in rows if r["target_epsilon"] is None and r["method"] == "full"}
    lines = ["# DP utility at realistic scale (issue 17)", "",
             f"Machine (at report time): {machine}. Runs: {sorted({r.get('threads', 1) for r in rows})} torch "
             f"thread(s) each; wall time of the runs {wall_s / 60:.1f} min; train CPU s is the process CPU time of "
             "the fine-tune alone (the honest figure on a shared machine).", "",
             f"Task: greedy Department after the held-out person's job-title line ({cfg['n_heldout']} held-out "
             "persons per N); 95% Clopper-Pearson intervals; % of non-private: against the non-private full "
             "fine-tune at the same N; % of its gain over majority: (accuracy - majority rate) / (non-private - "
             "majority rate), what DP keeps of what the data taught beyond the commonest answer. Records: Job Titles, "
             f"then Department ({cfg['field_order']} field order), canonical wording, byte tokenizer, "
             f"loss on {cfg['loss_on']} bytes. Recipe: non-private batch {cfg['batch_size']} x {cfg['steps']} steps, "
             f"lr {cfg['learning_rate']:g}; DP batch {cfg['dp_batch_size']} (at most N/4) x {cfg['dp_steps']} steps, "
             f"lr {cfg['dp_learning_rate']:g} ({cfg['dp_lr_schedule']}), clip {cfg['max_grad_norm']:g}, AdamW, "
             + (f"the EMA of the iterates (decay {cfg['dp_ema_decay']:g}), " if cfg["dp_ema_decay"] else "") +
             f"{cfg['dp_accountant']} accountant"
             + "".join(f"; {m}: {', '.join(f'{k} {v}' for k, v in r.items())}" for m, r in cfg["dp_method_recipes"].items())
             + " (the accountant and schedule columns: each row's own), tuned on public-seed data "
             "(sweep.md). Privacy unit: a person (add/remove one person; each row's accountant, calibrating its σ). Exposure gap: mean "
             f"exposure of the {max(cfg['canary_reps'])}x canaries minus the never-inserted controls "
             f"({cfg['n_candidates']} candidates; {gap_noise(cfg)}). MIA: the attack chosen on one half of the people, AUC on the "
             "other half with a bootstrap 95% interval; blind AUC: the text's zlib ratio, no model (away from "
             "0.5 = a biased member/non-member split). The data seed is reproducible (canaries are no secret "
             "from whoever knows it); the DP noise and sampling come from a fresh OS secret per run.", "",
             "| N | method | DP target ε | ε spent | accountant | q | σ | steps | schedule | accuracy [95%] | % of non-private "
             "| % of its gain over majority | majority rate | val loss | exposure gap (bits) | MIA AUC [95%] | blind AUC | train CPU s |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in sorted(rows, key=lambda r: (r["n"], list(METHODS).index(r["method"]), -1 if r["target_epsilon"] is None else r["target_epsilon"])):
        ref = reference.get(r["n"])
        share = f"{100 * r['accuracy'] / ref:.0f}%" if ref else "-"
        floor = majority[r["n"]]
        gain = f"{100 * (r['accuracy'] - floor) / (ref - floor):.0f}%" if ref and ref > floor else "-"
        lo, hi = r["accuracy_interval"]
        mia = (f"{r['mia_auc']:.3f} [{r['mia_auc_interval'][0]:.3f}, {r['mia_auc_interval'][1]:.3f}]"
               if r.get("mia_auc") is not None else "-")
        lines.append(f"| {r['n']} | {r['method']} | {fmt(r['target_epsilon'], 0) if r['target_epsilon'] else 'none'} "
                     f"| {fmt(r['epsilon'], 2)} | {accountant_name(r) if r['target_epsilon'] else '-'} "
                     f"| {fmt(r.get('sample_rate'), 3)} | {fmt(r.get('noise_multiplier'), 2)} "
                     f"| {r['steps'] or '-'} | {schedule_name(r) if r['target_epsilon'] else '-'}{' †' * bool(r.get('earlier_recipe'))} "
                     f"| {r['accuracy']:.3f} [{lo:.3f}, {hi:.3f}] "
                     f"| {share} | {gain} | {floor:.3f} | {fmt(r.get('val_loss'))} | {fmt(r.get('exposure_gap_bits'), 2)} "
                     f"| {mia} | {fmt(r.get('mia_blind_auc'))} | {fmt(r.get('train_cpu_s'), 0)} |")
    lines += spread_markdown(rows, again, reference, cfg)
    earlier = [r for r in rows if r.get("earlier_recipe")]
    if earlier:
        lines += ["", f"† {len(earlier)} run(s) of an earlier recipe, shown by their own steps, q and schedule "
                  "columns, and named here by their loss where it was another (the same command reruns them under "
                  "this one): " + ", ".join(f"N={r['n']} {r['method']} " + ("no DP" if r["target_epsilon"] is None else f"ε={r['target_epsilon']:g}")
                                            + ("" if r["recipe"]["loss_on"] == cfg["loss_on"] else f" (loss on {r['recipe']['loss_on']})")
                                            for r in earlier) + "."]
    done = ({(r["n"], r["method"], r["target_epsilon"]) for r in rows}
            | {(r["n"], r["method"], r["target_epsilon"], r["repeat"]) for r in again})
    missing = [p for p in planned if p not in done]  # (N, method, eps) of the matrix, + the run number of a repeat
    if missing:
        lines += ["", f"Not run yet ({len(missing)} of {len(planned)} planned runs): "
                  + ", ".join(f"N={p[0]} {p[1]} {'no DP' if p[2] is None else f'ε={p[2]:g}'}"
                              + (f" run {p[3]}" if len(p) > 3 else "") for p in missing)
                  + ". The same command runs them (finished runs are reused)."]
    return "\n".join(lines) + "\n"


def spread_markdown(rows, again, reference, cfg):
    """The repeated cells: each run's accuracy and exposure gap, their mean and sd (run 1 is the matrix's)."""
    rows = [r for r in rows if not r.get("earlier_recipe")]  # a spread is one recipe's
    cells = sorted({(r["n"], r["method"], r["target_epsilon"]) for r in again})
    if not cells:
        return []
    lines = ["", f"## Run-to-run spread ({cfg['repeats']} runs planned per cell; each row lists those finished)", "",
             "The same data and recipe, fresh DP noise and Poisson sampling in each run (run 1 is the row above, "
             "unless it is an earlier recipe's). "
             "Each run is its own release at the cell's ε; the mean describes the recipe, not one model.", "",
             "| N | method | DP target ε | accuracy per run | mean ± sd | % of non-private (mean) "
             "| exposure gap per run (bits) | mean gap | MIA AUC per run |",
             "|---|---|---|---|---|---|---|---|---|"]
    for n, method, eps in cells:
        runs = [r for r in rows if (r["n"], r["method"], r["target_epsilon"]) == (n, method, eps)]
        runs += sorted((r for r in again if (r["n"], r["method"], r["target_epsilon"]) == (n, method, eps)),
                       key=lambda r: r["repeat"])
        acc = np.array([r["accuracy"] for r in runs])
        gaps = [r.get("exposure_gap_bits") for r in runs]
        ref = reference.get(n)
        lines.append(f"| {n} | {method} | {eps:g} | {', '.join(f'{a:.3f}' for a in acc)} "
                     f"| {acc.mean():.3f} ± {acc.std(ddof=1) if len(acc) > 1 else 0:.3f} "
                     f"| {f'{100 * acc.mean() / ref:.1f}%' if ref else '-'} | {', '.join(fmt(g, 2) for g in gaps)} "
                     f"| {fmt(float(np.mean([g for g in gaps if g is not None])) if any(g is not None for g in gaps) else None, 2)} "
                     f"| {', '.join(fmt(r.get('mia_auc')) for r in runs)} |")
    return lines


def plot_results(rows, majority, cfg, results_dir):
    """utility_vs_epsilon.png (a panel per N, a line per method, non-private dotted) and
    exposure_vs_epsilon.png (a line per N and method)."""
    plt = pyplot()
    ns = sorted({r["n"] for r in rows})
    fig, axes = plt.subplots(1, len(ns), figsize=(4.5 * len(ns), 3.5), squeeze=False)
    for ax, n in zip(axes[0], ns):
        for i, method in enumerate(m for m in METHODS if m in cfg["methods"]):
            dp = sorted((r for r in rows if r["n"] == n and r["method"] == method and r["target_epsilon"]),
                        key=lambda r: r["target_epsilon"])
            color = f"C{i}"
            now = [r for r in dp if not r.get("earlier_recipe")]
            ax.plot([r["target_epsilon"] for r in now], [r["accuracy"] for r in now], "o-", color=color, label=method)
            before = [r for r in dp if r.get("earlier_recipe")]
            if before:
                ax.plot([r["target_epsilon"] for r in before], [r["accuracy"] for r in before], "o", mfc="none",
                        color=color, label=f"{method}, earlier recipe")
            for r in rows:
                if r["n"] == n and r["method"] == method and r["target_epsilon"] is None:
                    ax.axhline(r["accuracy"], color=color, ls=":", lw=1)
        ax.axhline(majority[n], color="gray", ls="--", lw=1, label="majority class")
        ax.set(title=f"N = {n} (dotted: full fine-tune, no DP)", xlabel="target ε", ylabel="held-out accuracy", ylim=(0, 1.02),
               **(dict(xscale="log", xlim=(min(cfg["epsilons"]) / 1.5, max(cfg["epsilons"]) * 1.5)) if cfg["epsilons"] else {}))
        ax.legend(fontsize=7)
    save_figure(fig, os.path.join(results_dir, "utility_vs_epsilon.png"))
    fig, ax = plt.subplots(figsize=(5, 3.5))
    for n, method in itertools.product(ns, cfg["methods"]):
        dp = sorted((r for r in rows if r["n"] == n and r["method"] == method and r["target_epsilon"]
                     and r.get("exposure_gap_bits") is not None and not r.get("earlier_recipe")),
                    key=lambda r: r["target_epsilon"])
        if dp:
            ax.plot([r["target_epsilon"] for r in dp], [r["exposure_gap_bits"] for r in dp], "o-",
                    label=f"N={n} {method}")
    ax.axhline(2.0, color="gray", ls="--", lw=1, label="goal: 2 bits")
    ax.set(xlabel="target ε", ylabel=f"exposure gap, {max(cfg['canary_reps'])}x − controls (bits)",
           xscale="log" if any(r["target_epsilon"] for r in rows) else "linear")
    ax.legend(fontsize=7)
    save_figure(fig, os.path.join(results_dir, "exposure_vs_epsilon.png"))


def on_frontier(row, rows):
    """No other row has both a higher-or-equal accuracy and a smaller-or-equal exposure gap, one strictly."""
    a, g = row["accuracy"], row["exposure_gap_bits"]
    return not any(r["accuracy"] >= a and r["exposure_gap_bits"] <= g and (r["accuracy"], r["exposure_gap_bits"]) != (a, g)
                   for r in rows)


def plot_sweep(rows, cfg, results_dir):
    """sweep_frontier.png: held-out accuracy against the 16x canaries' exposure gap, a point per sweep run
    that scored its canaries (marker: the loss), the frontier's named: what a setting buys in accuracy, it
    pays (or not) in memorization."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    scored = [r for r in rows if r.get("exposure_gap_bits") is not None]
    for (i, method), (loss, marker) in itertools.product(enumerate(METHODS), (("answer", "o"), ("last_answer", "^"))):
        mine = [r for r in scored if r["method"] == method and r["recipe"]["loss_on"] == loss]
        if not mine:
            continue
        ax.scatter([r["exposure_gap_bits"] for r in mine], [r["accuracy"] for r in mine], color=f"C{i}",
                   marker=marker, label=f"{method}, loss on {loss}", s=16)
        for r in (r for r in mine if on_frontier(r, scored)):  # names on the frontier only: readable
            schedule = "" if schedule_name(r) == "constant" else f" {schedule_name(r).removeprefix('constant, ')}"
            ax.annotate(f"b{r['batch_size']} s{r['steps']} lr{r['learning_rate']:g}{schedule}",
                        (r["exposure_gap_bits"], r["accuracy"]), fontsize=6, xytext=(3, 2), textcoords="offset points")
    ax.axvline(2.0, color="gray", ls="--", lw=1, label="goal: gap <= 2 bits")
    ax.set(xlabel=f"exposure gap, {max(cfg['canary_reps'])}x canaries − controls (bits)", ylabel="held-out accuracy",
           title=f"sweep on public data (seed {cfg['public_seed']}), N={cfg['sweep_n']}, ε={cfg['sweep_epsilon']:g}")
    ax.legend(fontsize=7)
    save_figure(fig, os.path.join(results_dir, "sweep_frontier.png"))


# ----------------------------------------------------------------------------- the two modes
def method_recipe(cfg, method, epsilon):
    """The DP settings dp_method_recipes gives this method (None: the dp_* recipe; non-private runs: None)."""
    return cfg["dp_method_recipes"].get(method) if epsilon is not None else None


def run_matrix(cfg):
    """The matrix, then the repeats of repeat_cells (tags <cell>_r2, _r3, ...: run 1 is the matrix's).
    Returns (rows, repeat rows, majority rate per N, wall seconds, planned runs: the matrix's (N, method,
    epsilon), then the repeats' (N, method, epsilon, run number))."""
    runs = [(n, m, e) for n in cfg["n_persons"] for m in cfg["methods"]
            for e in ((None,) if m in cfg["nodp_methods"] else ()) + tuple(cfg["epsilons"])]
    repeats = [(n, m, e, k) for n, m, e in cfg["repeat_cells"] if n in cfg["n_persons"] for k in range(2, cfg["repeats"] + 1)]
    progress = Progress("utility runs", len(runs) + len(repeats), hint="--n_persons, --methods, --epsilons, --repeats",
                        interval=0)
    rows, again, majority = [], [], {}
    for n in cfg["n_persons"]:
        data_dir = prepare_data(cfg, n, cfg["seed"])
        majority[n] = majority_rate(data_dir)[1]
        base = None if cfg["report_only"] else base_model(cfg, longest_record(data_dir))
        for _, method, eps in (r for r in runs if r[0] == n):
            row = run_one(cfg, base, data_dir, n, method, eps, recipe=method_recipe(cfg, method, eps))
            rows += [row] if row else []
            progress.update()
        for _, method, eps, k in (r for r in repeats if r[0] == n):
            row = run_one(cfg, base, data_dir, n, method, eps, recipe=method_recipe(cfg, method, eps),
                          tag=f"n{n}_{method}_eps{eps:g}_r{k}")
            again += [dict(row, repeat=k)] if row and not row.get("earlier_recipe") else []  # else: not run yet
            progress.update()
    if cfg["report_only"]:
        print(f"{len(rows) + len(again)} of {len(runs) + len(repeats)} runs finished: the tables show those")
    return rows, again, majority, sum(r["wall_s"] for r in rows + again), runs + repeats


def run_sweep(cfg):
    t0 = time.time()
    n = cfg["sweep_n"]
    grid = list(itertools.product(cfg["sweep_methods"], cfg["sweep_batch_sizes"], cfg["sweep_steps"],
                                  cfg["sweep_clip"], cfg["sweep_learning_rates"], cfg["sweep_lr_schedules"]))
    data_dir = prepare_data(cfg, n, cfg["public_seed"])
    if cfg["report_only"]:  # rank every finished sweep run at this N and epsilon, from any grid
        rows = []
        for name in sorted(os.listdir(os.path.join(cfg["out_dir"], "runs"))):
            if name.startswith(f"sweep_n{n}_"):
                with open(os.path.join(cfg["out_dir"], "runs", name)) as f:
                    row = json.load(f)
                rows += [row] if row["target_epsilon"] == cfg["sweep_epsilon"] else []
        return rows, majority_rate(data_dir)[1], sum(r["wall_s"] for r in rows)
    base = base_model(cfg, longest_record(data_dir))
    progress = Progress("sweep runs", len(grid), hint="--sweep_* (fewer values)", interval=0)
    rows = []
    for method, batch, steps, clip, lr, schedule in grid:
        recipe = dict(batch_size=batch, steps=steps, max_grad_norm=clip, learning_rate=lr, lr_schedule=schedule)
        tag = (f"sweep_n{n}_{cfg['field_order']}_{method}_b{batch}_s{steps}_c{clip:g}_lr{lr:g}"
               + ("" if schedule == "constant" else f"_{schedule}")
               + (f"{cfg['dp_decay_fraction']:g}" if schedule == "wsd" else "")
               + ("" if cfg["dp_accountant"] == "rdp" else f"_{cfg['dp_accountant']}")  # RDP tags predate this
               + (f"_ema{cfg['dp_ema_decay']:g}" if cfg["dp_ema_decay"] else "")
               + ("" if cfg["loss_on"] == "answer" else f"_{cfg['loss_on']}"))  # the 'answer' tags predate this
        got = run_one(cfg, base, data_dir, n, method, cfg["sweep_epsilon"], True, recipe, tag, cfg["sweep_ema_decays"])
        rows += got if cfg["sweep_ema_decays"] else [got]
        progress.update()
    return rows, majority_rate(data_dir)[1], time.time() - t0


def accountant_name(row):
    """'rdp' or 'pld': the accountant that calibrated a DP run's noise (the RDP runs predate the recipe key)."""
    return row["recipe"].get("accountant", "rdp")


def schedule_name(row):
    """'constant', 'cosine', or 'wsd (last 20%)': a run's learning-rate schedule, for the tables; ', EMA 0.9'
    when the model is the average of its iterates."""
    name, share = row.get("lr_schedule") or "constant", row["recipe"].get("decay_fraction")
    ema = row["recipe"].get("ema_decay")
    return (f"{name} (last {100 * share:.0f}%)" if share is not None else name) + (f", EMA {ema:g}" if ema else "")


def sweep_markdown(rows, majority, cfg, machine, wall_s):
    lines = ["# Recipe sweep (issue 17)", "",
             f"Tuned on PUBLIC data: the employees generator with public_seed={cfg['public_seed']} (the evaluation "
             f"uses seed={cfg['seed']}), {cfg['sweep_n']} training persons, DP at target ε = {cfg['sweep_epsilon']:g}. "
             f"Majority-class rate {majority:.3f}. Machine (at report time; a run may have run on another): "
             f"{machine}. Wall time of the runs {wall_s / 60:.1f} min.", "",
             "Ranked by held-out accuracy, then validation loss (on the bytes of its loss, so comparable within one "
             "loss only; '-' for an average of a run's iterates, scored beside the run). A setting run again (fresh "
             "DP noise and sampling) has a row per run. Exposure gap: the "
             f"{max(cfg['canary_reps'])}x canaries' mean exposure minus the controls' ({gap_noise(cfg)}).", "",
             "| rank | field order | loss on | method | batch | steps | epochs | clip | lr | schedule | ε spent | accountant "
             "| val loss | accuracy [95%] | exposure gap (bits) |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for i, r in enumerate(sorted(rows, key=lambda r: (-r["accuracy"], r.get("val_loss") or 0.0)), 1):
        lo, hi = r["accuracy_interval"]
        lines.append(f"| {i} | {r['recipe'].get('field_order', 'random')} | {r['recipe']['loss_on']} | {r['method']} | {r['batch_size']} | {r['steps']} | {r['epochs']:.2f} | {r['max_grad_norm']:g} "
                     f"| {r['learning_rate']:g} | {schedule_name(r)} | {fmt(r['epsilon'], 2)} | {accountant_name(r)} "
                     f"| {fmt(r.get('val_loss'))} "
                     f"| {r['accuracy']:.3f} [{lo:.3f}, {hi:.3f}] | {fmt(r.get('exposure_gap_bits'), 2)} |")
    return "\n".join(lines) + "\n"


def main(argv=None):
    cfg = configure(DEFAULTS, sys.argv[1:] if argv is None else argv)
    check_config(cfg)
    os.makedirs(cfg["results_dir"], exist_ok=True)
    if cfg["sweep"]:
        rows, majority, wall = run_sweep(cfg)
        machine = describe_machine()
        write_bytes(os.path.join(cfg["results_dir"], "sweep.md"), sweep_markdown(rows, majority, cfg, machine, wall).encode())
        write_json(os.path.join(cfg["results_dir"], "sweep.json"), dict(rows=rows, majority_rate=majority,
                                                                         machine=machine, wall_s=wall))
        plot_sweep(rows, cfg, cfg["results_dir"])
        print(f"wrote {cfg['results_dir']}/sweep.md, sweep_frontier.png ({len(rows)} settings ranked)")
        return rows
    rows, again, majority, wall, planned = run_matrix(cfg)
    machine = describe_machine()
    write_bytes(os.path.join(cfg["results_dir"], "RESULTS.md"),
                results_markdown(rows, majority, cfg, machine, wall, planned, again).encode())
    write_json(os.path.join(cfg["results_dir"], "results.json"),
               dict(rows=rows, repeats=again, majority_rate={str(k): v for k, v in majority.items()}, machine=machine,
                    wall_s=wall))
    plot_results(rows, majority, cfg, cfg["results_dir"])
    print(f"wrote {cfg['results_dir']}/RESULTS.md, results.json, utility_vs_epsilon.png, exposure_vs_epsilon.png")
    return rows


if __name__ == "__main__":
    run_cli(main)
