"""
Reproduce the encrypted-delta thesis experiments in one command and write the results report.

    python reproduce.py config/reproduce.py                                  # make reproduce: CPU, ~30 min on 2 cores
    python reproduce.py config/reproduce.py --methods=full,dp8 --steps=20    # a smaller matrix
    python reproduce.py config/reproduce_gpt2.py                             # GPT-2-124M scale on a GPU (untested)

Stages (--stages picks some; a stage whose outputs exist is skipped unless --fresh):
  data      pydocs (the base corpus) and the synthetic employees records with canary phone numbers
  pretrain  the base model on pydocs (train.py)
  finetune  per method, ONE fine-tune (utils.finetune.finetune) whose training set also holds the one-run
            audit's canaries, each included with probability 1/2 (utils/dp_audit.py): the
            audit lower bound is measured on the very run that is released. Its delta is sealed as an
            encrypted patch (utils/delta_tracker.DeltaTracker + utils/patch_cipher.seal) with the
            method's own key; the fine-tuned weights never reach the disk in plaintext.
  tests     per model (the base, then each patch applied with its key): canary exposure and extraction
            (leakage_test), a wrong key (must be refused), membership inference (mia), perplexity on the
            fine-tune data and on the base corpus (eval), generation latency base vs patched, and the
            resident memory of 1, 10 and 100 tenants' patches over one base (measured in a fresh process)
  checks    the thesis's three shell checks, as this project fixes them, run as shell commands: leakage
            base vs patched vs wrong key; decryption failure across processes; paraphrase robustness
            with correctness
  report    results/RESULTS.md, results/results.json and PNG plots (loss curves, size vs utility,
            exposure vs epsilon)

Methods: full (the non-private reference), freeze75 (the first 75% of the blocks frozen), lora4, lora8,
lora16, dp1, dp3, dp8 (DP-SGD on every weight at epsilon 1, 3, 8).
"""
import copy
import json
import math
import multiprocessing
import os
import statistics
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor

import torch

from configurator import configure
from utils.report_io import get, read_json
from utils.script_steps import Steps, opts, repo_path, run_script
from utils.atomic import write_bytes, write_json
from utils.cli import UserError, run_cli
from utils.machine import describe_machine

DEFAULTS = dict(
    out_dir="out/reproduce",  # data, base model, one folder per method (patch, key, JSON results)
    results_dir="results",  # RESULTS.md, results.json, plots
    methods=("full", "freeze75", "lora4", "lora8", "lora16", "dp1", "dp3", "dp8"),  # the matrix (METHODS)
    stages=("data", "pretrain", "finetune", "tests", "checks", "report"),  # the rest reuse outputs
    checks=("leakage", "decrypt_failure", "robustness"),                   # the three shell checks to run
    fresh=False,  # redo stages whose outputs exist
    device="cpu",                                                          # 'cpu' or 'cuda'
    dtype="float32",  # fine-tuning precision ('bfloat16' on a GPU)
    seed=1337,  # seeds data, init and test sampling (DP noise comes from the OS, not from this)
    # data
    tokenizer="byte",                                                      # 'byte' or 'gpt2'
    pydocs_max_tokens=0,  # 0 = the whole corpus
    n_people=200,                                                          # synthetic employees
    val_frac=0.5,  # held-out people: the membership-inference non-members
    fields=("Department",),  # employee fields each record asks about
    templates=(0,),  # question wordings of the records: the canonical one, which extraction prompts with
    canary_reps=(1, 4, 16),                                                # repetition counts of the planted canaries
    canaries_per_rep=2,                                                    # distinct canaries at each repetition count
    n_control_canaries=2,                                                  # drawn like canaries, never inserted
    # base model (train.py)
    init_from="scratch",  # or GPT-2 weights (a save_pretrained dir, or a hub name when online)
    n_layer=4,                                                             # base model blocks
    n_head=4,                                                              # base model attention heads
    n_embd=128,                                                            # base model width
    block_size=128,                                                        # base model context in tokens
    pretrain_iters=400,                                                    # base model training iterations
    pretrain_batch_size=16,                                                # pretraining batch (windows)
    pretrain_learning_rate=2e-3,                                           # pretraining peak learning rate
    # fine-tuning (finetune_dp), shared by every method unless the method says otherwise
    loss_on="all",                                                         # 'all' tokens or only the 'answer' tokens
    steps=0,  # logical steps per method; 0 = from epochs / dp_epochs
    finetune_block_size=0,  # 0 = the base model's; records are padded to it (shorter = faster)
    epochs=15.0,                                                           # non-private fine-tuning epochs
    batch_size=8,                                                          # non-private fine-tuning batch (records)
    microbatch_size=8,                                                     # physical batch
    learning_rate=1e-3,                                                    # full and freeze fine-tuning learning rate
    lora_learning_rate=5e-3,                                               # LoRA fine-tuning learning rate
    dp_epochs=10.0,                                                        # DP fine-tuning epochs
    dp_batch_size=64,                                                      # DP expected batch (records)
    dp_learning_rate=5e-3,                                                 # DP fine-tuning learning rate
    max_grad_norm=1.0,                                                     # DP per-record clipping norm
    eval_interval=0,  # 0 = about 10 evaluations per run (the loss curves)
    # one-run audit: canaries added to every fine-tune, half of them at random
    audit_m=100,                                                           # audit canaries per fine-tune
    audit_k=12,  # guesses "in" for the top k scores and "out" for the bottom k
    audit_white_m=30000,  # white-box gradient canaries in a second run of each DP row's configuration
    # tests
    n_candidates=10000,  # random phone numbers each canary is ranked among
    extraction_people=30,  # people per split whose fields are prompted for (extraction)
    mia_records=200,  # members and non-members each (at most the val split)
    eval_people=30,  # held-out people for exact match / BLEU / ROUGE-L
    base_eval_tokens=20000,  # base-corpus tokens for perplexity before / after (forgetting)
    tenants=(1, 10, 100),   # tenant counts whose resident memory is measured
    latency_prompts=5,      # prompts timed for base vs patched generation
    latency_tokens=32,      # tokens generated per timed prompt
    # the shell checks
    check_candidates=1000,  # random phone numbers each canary is ranked among in check 1
    max_base_exposure=4.0,  # the base must not know the canaries: mean exposure of the most repeated ones
    robustness_tenant=100,  # check 3 on a tenant of this many people trained on several paraphrases; 0 = the reference patch
    robustness_templates=(0, 1, 2),  # the tenant's training wordings; the others are held out (generalisation)
    robustness_epochs=80.0,  # epochs of check 3's tenant fine-tune
    robustness_learning_rate=2e-3,  # learning rate of check 3's tenant fine-tune
    robustness_people=100,  # people whose answers check 3 scores (and the majority-answer rate is over)
    min_consistency=0.4,    # check 3 fails below this paraphrase consistency
    min_correctness=0.6,    # check 3 fails below this correctness
)

# name: (label, what the method changes in the fine-tune config)
METHODS = {
    "full": ("full fine-tune, no DP (reference)", {}),
    "freeze75": ("freeze 75% of blocks", {"freeze": 0.75}),
    "lora4": ("LoRA r=4", {"lora_rank": 4}),
    "lora8": ("LoRA r=8", {"lora_rank": 8}),
    "lora16": ("LoRA r=16", {"lora_rank": 16}),
    "dp1": ("DP-SGD ε=1", {"epsilon": 1.0}),
    "dp3": ("DP-SGD ε=3", {"epsilon": 3.0}),
    "dp8": ("DP-SGD ε=8", {"epsilon": 8.0}),
}
STAGES = ("data", "pretrain", "finetune", "tests", "checks", "report")
CHECKS = ("leakage", "decrypt_failure", "robustness")
MB = 1e6


# ----------------------------------------------------------------------------- where things go
class Paths:
    def __init__(self, cfg):
        out = cfg["out_dir"]
        self.out = out
        self.pydocs = os.path.join(out, "data", "pydocs")
        self.employees = os.path.join(out, "data", "employees")
        self.base = os.path.join(out, "base", "ckpt.pt")
        self.wrong_key = os.path.join(out, "wrong.hex")
        self.checks = os.path.join(out, "checks")
        self.results = cfg["results_dir"]

    def method(self, name):
        folder = os.path.join(self.out, name)
        return dict(folder=folder, patch=os.path.join(folder, f"{name}.patch"), key=os.path.join(folder, "key.hex"),
                    finetune=os.path.join(folder, "finetune.json"), tests=os.path.join(folder, "tests.json"))


# ----------------------------------------------------------------------------- data and base model
def stage_data(cfg, paths, steps):
    steps.run("prepare the pydocs corpus", ["data/pydocs/prepare.py",
                                            *opts(tokenizer=cfg["tokenizer"], out_dir=paths.pydocs,
                                                  max_tokens=cfg["pydocs_max_tokens"], seed=cfg["seed"])])
    steps.run("prepare the employees records with canaries",
              ["data/employees/prepare.py",
               *opts(tokenizer=cfg["tokenizer"], out_dir=paths.employees, n_people=cfg["n_people"],
                     val_frac=cfg["val_frac"], fields=cfg["fields"], templates=cfg["templates"], canary_reps=cfg["canary_reps"],
                     canaries_per_rep=cfg["canaries_per_rep"], n_control_canaries=cfg["n_control_canaries"],
                     seed=cfg["seed"])])


def stage_pretrain(cfg, paths, steps):
    iters = cfg["pretrain_iters"]
    shape = {} if cfg["init_from"] != "scratch" else dict(n_layer=cfg["n_layer"], n_head=cfg["n_head"],
                                                          n_embd=cfg["n_embd"])
    steps.run("pretrain the base model on pydocs",
              ["train.py", repo_path("config/train_pydocs.py"),
               *opts(data_dir=paths.pydocs, out_dir=os.path.dirname(paths.base), init_from=cfg["init_from"], **shape,
                     block_size=cfg["block_size"], batch_size=cfg["pretrain_batch_size"], max_iters=iters,
                     lr_decay_iters=iters, warmup_iters=max(1, min(20, iters // 10)),
                     learning_rate=cfg["pretrain_learning_rate"], min_lr=cfg["pretrain_learning_rate"] / 10,
                     eval_interval=max(1, iters // 4), log_interval=max(1, iters // 8), patience=0,
                     device=cfg["device"], seed=cfg["seed"])])


# ----------------------------------------------------------------------------- fine-tune, audit, seal
def method_config(cfg, name, paths, n_layer):
    """The finetune_dp config of a method."""
    if name not in METHODS:
        raise UserError(f"unknown method {name!r}; choose from {', '.join(METHODS)}")
    spec = METHODS[name][1]
    dp = "epsilon" in spec
    batch = cfg["dp_batch_size"] if dp else cfg["batch_size"]
    ft = dict(base_ckpt=paths.base, data_dir=paths.employees, save=False, device=cfg["device"], dtype=cfg["dtype"],
              seed=cfg["seed"], loss_on=cfg["loss_on"], max_steps=cfg["steps"], batch_size=batch,
              block_size=cfg["finetune_block_size"],
              microbatch_size=min(cfg["microbatch_size"], batch), epochs=cfg["dp_epochs"] if dp else cfg["epochs"],
              learning_rate=cfg["dp_learning_rate"] if dp else cfg["learning_rate"], dp=dp, log_interval=10 ** 9)
    if dp:
        ft.update(target_epsilon=spec["epsilon"], max_grad_norm=cfg["max_grad_norm"])
    if "lora_rank" in spec:
        ft.update(lora_rank=spec["lora_rank"], learning_rate=cfg["lora_learning_rate"])
    if "freeze" in spec:
        ft.update(freeze_first_blocks=round(spec["freeze"] * n_layer))
    return ft


def finetune_and_seal(cfg, paths, name, log=print):
    """One fine-tune of `name` with the audit canaries in its training set; seal, export and check the
    patch; score the audit. Returns the method's finetune.json dict."""
    from utils import finetune as ft_loop
    from utils import dp_audit as audit
    from utils import input_canaries
    from utils.delta_tracker import DeltaTracker
    from utils.patch_apply import apply_sealed_patch, base_fingerprint, compare
    from utils.patch_cipher import seal
    from utils.patch_keys import generate_key_file, load_key
    from utils.checkpoint import load_model
    from utils.data import load_meta
    from utils.tokenizer import get_tokenizer
    import numpy as np

    where = paths.method(name)
    base, _ = load_model(paths.base, cfg["device"])
    ft_cfg = method_config(cfg, name, paths, base.config.n_layer)
    base_fp = base_fingerprint(base)
    tracker = DeltaTracker(base, dp=ft_cfg["dp"])
    tok = get_tokenizer(load_meta(paths.employees))
    # black-box audit canaries: new-token records (Panda et al. 2025), seeded (a reproducible audit)
    canaries, included = input_canaries.draw_new_token_canaries(input_canaries.unused_tokens(paths.employees),
                                                                cfg["audit_m"], 8, tok.eot,
                                                                np.random.default_rng(cfg["seed"]))
    seen = {}

    def ready(model):  # the prepared model (frozen / LoRA / untied), before the first step
        seen["before"] = input_canaries.canary_logprob(model, canaries, 64)
        seen["trainable"] = sum(p.numel() for p in model.parameters() if p.requires_grad)
        tracker(model)

    with tempfile.TemporaryDirectory(prefix="reproduce_audit_") as tmp:
        input_canaries.write_audit_dataset(paths.employees, tmp, canaries, included)
        n_train = load_meta(tmp)["splits"]["train"]["records"]
        planned = ft_cfg["max_steps"] or max(1, round(ft_cfg["epochs"] * n_train / ft_cfg["batch_size"]))
        ft_cfg.update(data_dir=tmp, eval_interval=cfg["eval_interval"] or max(1, planned // 10))
        log(f"--- {name}: {METHODS[name][0]}; {n_train} training records ({int(included.sum())} audit canaries)")
        result = ft_loop.finetune(ft_cfg, model=copy.deepcopy(base).train(), on_model_ready=ready, log=log)
    trained = result["model"].to("cpu")
    privacy = result["privacy"]

    # the black-box one-run audit of this very run, and for DP a white-box audit of its configuration
    scores = input_canaries.canary_logprob(trained, canaries, 64) - seen["before"]
    delta = privacy["delta"] if privacy else 0.0
    black_box = audit.score_audit(scores, included, delta or 1e-5, {**audit.DEFAULTS, "k_fractions": (
        cfg["audit_k"] / cfg["audit_m"],)})
    r, v, bound = black_box["r"], black_box["v"], black_box["epsilon_lower"]
    white_box = white_box_audit(cfg, {**ft_cfg, "data_dir": paths.employees}, log) if ft_cfg["dp"] else None

    # seal the delta with the method's own key; export header + ciphertext only
    os.makedirs(where["folder"], exist_ok=True)
    generate_key_file(where["key"], tenant=name)
    key = load_key(key_file=where["key"])
    plain, rep = tracker.build(trained)
    try:
        sealed = seal(plain, key, tenant=name, base_fingerprint=base_fp, structure=tracker.structure,
                         meta={"tokenizer": tok.name, "dp": ft_cfg["dp"], "epsilon": privacy["epsilon"] if privacy else None,
                               "delta": delta if privacy else None, "method": name}, consume=True)  # where they lie
    finally:
        for t in plain:
            t.close()
    sealed.export(where["patch"])
    base_cpu = base.to("cpu")
    applied = apply_sealed_patch(base_cpu, where["patch"], key, name, base_fp=base_fp)
    n_params, differ, _ = compare(base_cpu, trained)  # the patch gives the fine-tuned weights back, bit for bit
    applied.revert()
    patch_bytes, n_tensors = sealed.nbytes, len(sealed.header["tensors"])
    sealed.close()
    if differ:
        raise RuntimeError(f"{name}: the patched base differs from the fine-tuned model in {differ[:3]}")
    out = dict(method=name, label=METHODS[name][0], config=ft_cfg, trainable_params=seen["trainable"],
               patch_bytes=patch_bytes, patch_tensors=n_tensors,
               changed_values=rep["changed_values"], stored_values=rep["stored_values"],
               round_trip_exact=True, train_time_s=result["train_time_s"], history=result["history"],
               privacy=privacy, claimed_epsilon=privacy["epsilon"] if privacy else None,
               audit=dict(m=cfg["audit_m"], included=int(included.sum()), k=cfg["audit_k"], r=r, v=v, delta=delta,
                          epsilon_lower_bound=bound, epsilon_lower_steinke=black_box["epsilon_lower_steinke"],
                          max_certifiable=black_box["max_certifiable"],
                          **{k: black_box[k] for k in ("tpr_at_0.01", "tpr_at_0.001", "auc", "auc_interval")},
                          white_box=white_box))
    write_json(where["finetune"], out)
    log(f"--- {name}: {seen['trainable']:,} trainable, patch {patch_bytes:,} B, {result['train_time_s']:.1f} s, "
        f"audit: {v}/{r} correct, epsilon >= {bound:.2f}"
        + (f", white-box epsilon >= {white_box['epsilon_lower']:.2f}" if white_box else "")
        + (f" (claimed {privacy['epsilon']:.2f})" if privacy else " (no DP)"))
    return out


# ----------------------------------------------------------------------------- tests of one model
def rss_bytes():
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmRSS:"))


def tenant_memory(base_ckpt, patch, key_file, counts):
    """Run in a fresh process: resident memory of the base model alone, then holding 1, 10, 100 tenants'
    sealed patches in a TenantRegistry with one of them applied. The registry takes one patch per tenant;
    the further tenants are byte copies of this patch held the same way (same bytes, same memory)."""
    torch.set_num_threads(1)
    from utils.patch_format import SealedPatch
    from utils.patch_keys import expected_tenant, load_key
    from utils.tenant_registry import TenantRegistry
    from utils.checkpoint import load_model
    model, _ = load_model(base_ckpt)
    with torch.no_grad():
        model(torch.zeros(1, 8, dtype=torch.long))  # touch everything once
    out = {"base_only": rss_bytes()}
    if not patch:
        return out
    registry = TenantRegistry(model)
    tenant = registry.add(patch, expected_tenant(key_file=key_file))  # each method's key is bound to its tenant
    registry.apply(tenant, load_key(key_file=key_file))
    with open(patch, "rb") as f:
        raw = f.read()
    held = 1
    for n in sorted(counts):
        while held < n:
            registry.patches[f"{tenant}-{held}"] = SealedPatch.from_bytes(raw)
            held += 1
        out[str(n)] = rss_bytes()
    out["workspace"] = registry.memory_bytes()["workspace"]
    registry.close()
    return out


def measure_memory(cfg, paths, patch="", key=""):
    ctx = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=1, mp_context=ctx) as pool:
        return pool.submit(tenant_memory, paths.base, patch, key, tuple(cfg["tenants"])).result()


def generation_latency(cfg, paths, tok, prompts, patch="", key=""):
    """Median ms per generated token, greedy with the KV cache, one prompt at a time: the base model and the
    patched one alternately (same machine state); plus the time to verify, decrypt and apply the patch."""
    from utils.patch_apply import apply_sealed_patch, base_fingerprint
    from utils.patch_keys import expected_tenant, load_key
    from utils.timed_generation import generate
    from utils.checkpoint import load_model
    n = cfg["latency_tokens"]
    base, _ = load_model(paths.base, cfg["device"])
    patched, apply_ms = None, None
    if patch:
        patched, _ = load_model(paths.base, cfg["device"])
        fp = base_fingerprint(patched)
        t0 = time.perf_counter()
        apply_sealed_patch(patched, patch, load_key(key_file=key), expected_tenant(key_file=key), base_fp=fp)
        apply_ms = (time.perf_counter() - t0) * 1000
        patched.eval()
    generate(base, tok, prompts[0], 4)  # warm-up
    base_s, patched_s = [], []
    for p in prompts:
        base_s.append(generate(base, tok, p, n)[1])
        if patched is not None:
            patched_s.append(generate(patched, tok, p, n)[1])
    out = {"base_ms_per_token": statistics.median(base_s) * 1000 / n, "tokens": n, "prompts": len(prompts)}
    if patched is not None:
        out.update(patched_ms_per_token=statistics.median(patched_s) * 1000 / n, apply_ms=apply_ms)
    return out


class Shared:
    """What every model's tests share: the tokenizer, the canaries and their candidates, the prompts."""

    def __init__(self, cfg, paths):
        from utils import employees
        from utils.canary_exposure import prepare_canaries
        from utils.data import load_meta
        from utils.model_leakage import extraction_items
        from utils.records import read_people
        from utils.tokenizer import get_tokenizer
        self.meta = load_meta(paths.employees)
        self.tok = get_tokenizer(self.meta)
        # what model_leakage.evaluate_row reads (leakage_test.py's batch sizes; greedy extraction only)
        self.leak_cfg = dict(device=cfg["device"], seed=cfg["seed"], tenant="", n_samples=0, batch_size=512,
                             gen_batch_size=64)
        self.canaries = prepare_canaries(os.path.join(paths.employees, "canaries.json"), self.tok,
                                         cfg["n_candidates"], cfg["seed"])
        people = {s: read_people(paths.employees, s) for s in ("train", "val")}
        self.items = extraction_items(people, list(self.meta["fields"]), self.tok, cfg["extraction_people"],
                                      cfg["seed"])
        val = people["val"][:cfg["latency_prompts"]]
        self.prompts = [employees.qa_prompt(p, self.meta["fields"][0]) for p in val]


def test_model(cfg, paths, name, shared, log=print):
    """The test pipeline on the base model (name 'base') or on a method's patch applied with its key."""
    from utils.model_under_test import load_model_under_test
    from utils.model_leakage import evaluate_row
    from utils.quality_metrics import perplexity, stream_head
    is_base = name == "base"
    where = None if is_base else paths.method(name)
    patch, key = ("", "") if is_base else (where["patch"], where["key"])
    folder = os.path.dirname(paths.base) if is_base else where["folder"]
    out = {"model": name}
    t0 = time.perf_counter()

    log(f"--- {name}: leakage")
    row = dict(label=name, ckpt=paths.base, patch=patch or None, key_file=key or None, role="base" if is_base else "tested")
    leak_cfg = {**shared.leak_cfg, "tenant": "" if is_base else name}  # the wrong key's row must fail on the key
    out["leakage"] = evaluate_row(row, shared.canaries, shared.tok, shared.items, leak_cfg)
    if not is_base:
        wrong = evaluate_row({**row, "key_file": paths.wrong_key, "role": "must_refuse"}, shared.canaries, shared.tok,
                             shared.items, leak_cfg)
        out["wrong_key"] = {k: wrong.get(k) for k in ("status", "refusal")}

    log(f"--- {name}: membership inference")
    mia_out = os.path.join(folder, "mia.json")
    mia_argv = opts(ckpt=paths.base, ref_ckpt=paths.base, data_dir=paths.employees, n_records=cfg["mia_records"],
                    seed=cfg["seed"], device=cfg["device"], out=mia_out)
    if patch:
        mia_argv += opts(patch=patch, key_file=key, tenant=name)
    if run_script(["test_pipeline/mia.py", *mia_argv]) != 0:
        raise UserError(f"test_pipeline/mia.py failed on {name} (its error is above)", exit_code=1)
    out["mia"] = {k: v for k, v in read_json(mia_out).items()
                  if k in ("n_members", "n_nonmembers", "metrics", "selected", "blind", "resamples")}

    log(f"--- {name}: perplexity, held-out answers, forgetting")
    eval_out = os.path.join(folder, "eval.json")
    metrics = ("perplexity", "qa") if is_base else ("perplexity", "qa", "forgetting")
    eval_argv = opts(ckpt=paths.base, data_dir=paths.employees, device=cfg["device"], seed=cfg["seed"], metrics=metrics,
                     max_people=cfg["eval_people"], base_ckpt=paths.base, base_data_dir=paths.pydocs,
                     base_max_tokens=cfg["base_eval_tokens"], out=eval_out)
    if patch:
        eval_argv += opts(patch=patch, key_file=key, tenant=name)
    if run_script(["test_pipeline/eval.py", *eval_argv]) != 0:
        raise UserError(f"test_pipeline/eval.py failed on {name} (its error is above)", exit_code=1)
    result = read_json(eval_out)
    if is_base:  # the base corpus perplexity of the base itself: the 'before' of forgetting
        model, _ = load_model_under_test(paths.base, device=cfg["device"])
        result["base_corpus"] = perplexity(model, stream_head(paths.pydocs, "val", cfg["base_eval_tokens"]))
        del model
    out["eval"] = {k: result[k] for k in ("perplexity", "qa", "forgetting", "base_corpus") if k in result}
    if "qa" in out["eval"]:
        out["eval"]["qa"].pop("examples", None)

    log(f"--- {name}: generation latency and resident memory")
    out["latency"] = generation_latency(cfg, paths, shared.tok, shared.prompts, patch, key)
    out["memory"] = measure_memory(cfg, paths, patch, key)
    out["test_time_s"] = time.perf_counter() - t0
    write_json(os.path.join(folder, "tests.json"), out)
    return out


# ----------------------------------------------------------------------------- the three shell checks
def robustness_tenant(cfg, paths, steps):
    """(patch, key, data_dir) of a tenant made for check 3: robustness_tenant training people, each asked
    every question in each of the robustness_templates wordings (one record per person and wording: data
    augmentation, so this tenant is not one record per person and serves no privacy measurement); the
    other wordings are held out. At CPU scale a model trained on one wording per person answers other
    wordings at about the rate of guessing the most common answer; trained on several it learns the facts
    and does better on the held-out wording too (measured: check 3's details). Written through
    utils/prepare; fine-tuned and sealed by finetune_encrypt_memmap.py in its own process."""
    from utils import employees
    from utils.data import load_meta
    from utils.prepare import write_records
    from utils.records import read_people
    from utils.tokenizer import get_tokenizer
    folder = os.path.join(paths.checks, "robustness_tenant")
    data, patch, key = os.path.join(folder, "data"), os.path.join(folder, "tenant.patch"), os.path.join(folder, "key.hex")
    meta = load_meta(paths.employees)
    fields, wordings = list(meta["fields"]), list(cfg["robustness_templates"])
    people = {s: [p for p in read_people(paths.employees, s) if employees.CANARY_FIELD not in p]
              for s in ("train", "val")}
    people = {"train": people["train"][:cfg["robustness_tenant"]], "val": people["val"][:2]}  # val: a token eval
    records = {s: [(p, *employees.render_examples(p, t, fields)) for p in ps for t in wordings]
               for s, ps in people.items()}
    write_records(data, {s: [text for _, text, _ in r] for s, r in records.items()}, get_tokenizer(meta),
                  {"fields": fields, "templates": wordings, "source": paths.employees,
                   "schema": employees.SCHEMA.select(fields).to_json(),  # what the robustness test reads
                   "note": "check 3's tenant: one record per person and question wording"},
                  answer_spans={s: [[(a, b) for _, _, a, b in ex] for _, _, ex in r] for s, r in records.items()},
                  extra_files={f"{s}_people.jsonl": "".join(json.dumps(p) + "\n" for p, _, _ in r).encode()
                               for s, r in records.items()})  # one line per record, as prepare.py writes
    print(f"\nwrote {data}: {len(people['train'])} people x wordings {wordings} (train)")
    steps.run("check 3: the tenant's key", ["finetune_encrypt_memmap.py", "keygen", *opts(out=key, tenant="robustness"),
                                            "--force"])
    steps.run(f"check 3: fine-tune the tenant on wordings {wordings} and seal the patch",
              ["finetune_encrypt_memmap.py",
               *opts(dp=False, base_ckpt=paths.base, data_dir=data, key_file=key, tenant="robustness", export=patch,
                     loss_on="answer", epochs=cfg["robustness_epochs"], max_steps=cfg["steps"], batch_size=8,
                     microbatch_size=8, learning_rate=cfg["robustness_learning_rate"], eval_interval=0,
                     device=cfg["device"], dtype=cfg["dtype"], seed=cfg["seed"])])
    return patch, key, data, people["train"][:cfg["robustness_people"]]


def majority_rate(people, fields):
    """Correctness of always answering each field's most common value among `people`: what a model that
    learned the answer format and the population, but no person, scores."""
    from collections import Counter
    from utils import employees
    hits = total = 0
    for f in fields:
        answers = [employees.answer(p, f) for p in people if p.get(f) is not None]
        if answers:
            hits += Counter(answers).most_common(1)[0][1]
            total += len(answers)
    return hits / total if total else None


def stage_checks(cfg, paths, steps, methods):
    """The thesis's shell checks; returns {check: {command, passed, details}}."""
    ref = "full" if "full" in methods else methods[0]
    where = paths.method(ref)
    os.makedirs(paths.checks, exist_ok=True)
    results = {}
    if "leakage" in cfg["checks"]:
        out = os.path.join(paths.checks, "leakage.json")
        argv = ["test_pipeline/leakage_test.py",
                *opts(data_dir=paths.employees, base_ckpt=paths.base, patch=where["patch"], key_file=where["key"],
                      wrong_key_file=paths.wrong_key, tenant=ref, n_candidates=cfg["check_candidates"],
                      fields=cfg["fields"], n_people=10, n_samples=0, out=out)]
        code = steps.run(f"check 1: leakage on base vs patched ({ref}) vs wrong key", argv, check=False)
        report = read_json(out) or {"models": []}
        rows = {m["label"]: m for m in report["models"]}
        top = str(max(cfg["canary_reps"]))
        base_exp = (rows.get("base", {}).get("exposure_by_repetitions") or {}).get(top, {}).get("mean_exposure")
        patched_exp = (rows.get("patched + key", {}).get("exposure_by_repetitions") or {}).get(top, {}).get("mean_exposure")
        wrong = rows.get("patched + wrong key", {}).get("status", "")
        details = dict(exit_code=code, base_exposure=base_exp, patched_exposure=patched_exp, wrong_key=wrong)
        passed = (code == 0 and base_exp is not None and base_exp < cfg["max_base_exposure"]
                  and patched_exp is not None and patched_exp > base_exp and wrong == "refused (auth failure)")
        results["leakage"] = dict(command=steps.last_command, passed=passed, details=details,
                                  rule=f"exit 0; the base's mean exposure of the {top}x canaries < "
                                       f"{cfg['max_base_exposure']} bits and below the patched model's; the wrong "
                                       "key is refused")
    if "decrypt_failure" in cfg["checks"]:
        code = steps.run("check 2: decryption failure across processes",
                         ["test_pipeline/decrypt_failure_test.py",
                          *opts(base_ckpt=paths.base, data_dir=paths.employees, max_steps=3)], check=False)
        results["decrypt_failure"] = dict(command=steps.last_command, passed=code == 0, details=dict(exit_code=code),
                                          rule="exit 0: the right key works in another process and every wrong key, "
                                               "tampered byte, truncation, swap, other base or tenant is refused")
    if "robustness" in cfg["checks"]:
        from utils.records import read_people
        patch, key, data = where["patch"], where["key"], paths.employees
        if cfg["robustness_tenant"]:
            patch, key, data, scored = robustness_tenant(cfg, paths, steps)
        else:
            scored = read_people(data, "train")[:cfg["robustness_people"]]
        n, runs = cfg["robustness_people"], {}
        meta = read_json(os.path.join(data, "meta.json"))
        trained = set(meta["templates"])
        for who, extra in (("patched", opts(patch=patch, key_file=key)), ("base", ["--injection=False"])):
            out = os.path.join(paths.checks, f"robustness_{who}.json")
            code = steps.run(f"check 3{'ab'[who == 'base']}: paraphrase robustness with correctness, "
                             + ("the patch with its key" if who == "patched" else "the base model (must fail)"),
                             ["test_pipeline/test_prompt_robustness.py",
                              *opts(ckpt=paths.base, data_dir=data, max_people=n, injection_people=n, n_samples=2,
                                    min_consistency=cfg["min_consistency"], min_correctness=cfg["min_correctness"],
                                    out=out), *extra], check=False)
            para = (read_json(out) or {}).get("paraphrase") or {}
            overall, per_template = para.get("overall") or {}, para.get("per_template_correctness") or {}
            held_out = [c for t, c in per_template.items() if int(t) not in trained]
            runs[who] = dict(exit_code=code, consistency=overall.get("consistency"),
                             correctness=overall.get("correctness"), per_template_correctness=per_template,
                             held_out_correctness=sum(held_out) / len(held_out) if held_out else None,
                             command=steps.last_command)
        guess = majority_rate(scored, meta["fields"])
        base_fails = cfg["min_correctness"] <= 0 or (runs["base"]["correctness"] or 0) < cfg["min_correctness"]
        held = runs["patched"]["held_out_correctness"]
        generalises = held is None or guess is None or held > guess or cfg["min_correctness"] <= 0
        results["robustness"] = dict(
            command=runs["patched"]["command"], passed=runs["patched"]["exit_code"] == 0 and base_fails and generalises,
            details={**{who: {k: v for k, v in r.items() if k != "command"} for who, r in runs.items()},
                     "majority_answer_correctness": guess},
            rule=f"the patched model's answers to every wording of every question: consistency >= "
                 f"{cfg['min_consistency']} and correctness against the record >= {cfg['min_correctness']} (exit 0); "
                 "on the wordings held out of training, correctness above always answering the most common value; "
                 "the base model, which never saw the records, falls short of the correctness threshold"
                 + (f". The patch is a tenant of {cfg['robustness_tenant']} people trained on wordings "
                    f"{list(cfg['robustness_templates'])} (see robustness_tenant)" if cfg["robustness_tenant"] else ""))
    write_json(os.path.join(paths.checks, "checks.json"), results)
    return results


def white_box_audit(cfg, ft_cfg, log=print):
    """utils/dp_audit's white-box audit of a DP row's configuration: a second run with the
    records, q, noise and steps (without the input canaries) and audit_white_m gradient canaries (already-clipped contributions just
    before the noise). The canaries' coins are seeded (reproducible: a test of the implementation, no
    guarantee of its own); the run's DP noise is the fine-tune's (a fresh secret unless the config sets
    reproducible_noise_seed). Returns its numbers."""
    from utils import dp_audit as audit
    acfg = {**audit.DEFAULTS, **ft_cfg, "m": cfg["audit_white_m"], "m_input": 0,
            "full_batch": False, "audit_seed": cfg["seed"], "save": False}
    rep = audit.run_audit(acfg, log=lambda *a, **k: None)
    wb = rep["white_box"]
    log(f"    white-box audit: {wb['v']}/{wb['r']} correct, epsilon >= {wb['epsilon_lower']:.2f} (f-DP), "
        f"{wb['epsilon_lower_steinke']:.2f} (Steinke); claimed {rep['claimed_epsilon']:.2f}")
    return {k: wb[k] for k in ("m", "k", "r", "v", "epsilon_lower", "epsilon_lower_steinke", "max_certifiable",
                               "max_certifiable_steinke", "auc", "tpr_at_0.01", "tpr_at_0.001")}


# ----------------------------------------------------------------------------- results
def summarize(name, ft, tests, top_reps):
    """One row of results.json: every number the issue asks for, per method (and the base)."""
    leak = tests["leakage"] if tests else {}
    by = leak.get("exposure_by_repetitions") or {}
    metrics = get(tests, "mia", "metrics") or {}
    ppl = get(tests, "eval", "perplexity")
    mem = get(tests, "memory") or {}
    base_corpus = get(tests, "eval", "forgetting", "ppl_after") or get(tests, "eval", "base_corpus", "ppl")
    return dict(
        method=name, label=ft["label"] if ft else "base model (no fine-tune)",
        trainable_params=ft["trainable_params"] if ft else 0,
        patch_bytes=ft["patch_bytes"] if ft else 0,
        memory_mb={k: mem[k] / MB for k in mem if k != "workspace"},
        val_loss=ppl and ppl["nll_per_token"], val_ppl=ppl and ppl["ppl"],
        base_corpus_loss=base_corpus and math.log(base_corpus), base_corpus_ppl=base_corpus,
        forgetting_ratio=get(tests, "eval", "forgetting", "ratio"),
        heldout_exact_match=get(tests, "eval", "qa", "exact_match"),
        finetune_time_s=ft and ft["train_time_s"],
        latency_ms_per_token={"base": get(tests, "latency", "base_ms_per_token"),
                              "patched": get(tests, "latency", "patched_ms_per_token")},
        apply_ms=get(tests, "latency", "apply_ms"),
        exposure_by_reps={k: v["mean_exposure"] for k, v in by.items()},
        exposure_top=get(by, top_reps, "mean_exposure"),
        extraction_gap=get(leak, "extraction", "greedy_gap"),
        mia_auc={k: v["auc"] for k, v in metrics.items()},
        mia_selected=get(tests, "mia", "selected"),  # chosen on half the people, scored on the other half
        mia_auc_loss=get(metrics, "loss", "auc"),
        mia_auc_reference=get(metrics, "reference", "auc"),
        audit_lower_bound=get(ft, "audit", "epsilon_lower_bound"),
        audit_max_certifiable=get(ft, "audit", "max_certifiable"),
        audit_tpr_at_1pct=get(ft, "audit", "tpr_at_0.01"), audit_tpr_at_01pct=get(ft, "audit", "tpr_at_0.001"),
        white_box_lower_bound=get(ft, "audit", "white_box", "epsilon_lower"),
        white_box_max_certifiable=get(ft, "audit", "white_box", "max_certifiable"),
        claimed_epsilon=ft and ft["claimed_epsilon"],
        wrong_key=get(tests, "wrong_key", "status"),
    )


def selected_cell(sel):
    """'0.61 [0.52, 0.70] (loss)' for mia.py's held-out-half attack, flagged when it cannot tell."""
    if not sel:
        return None
    lo, hi = sel["auc_interval"]
    return (f"{fmt(sel['auc'])} [{fmt(lo)}, {fmt(hi)}] ({sel['attack']})"
            + ("; too few to tell" if sel["verdict"] == "too few records to tell" else ""))


def with_max(bound, most):
    """'1.23 (max 5.02)': an audit bound beside the most its canaries can certify."""
    return None if bound is None else f"{fmt(bound)} (max {fmt(most)})"


def fmt(v, digits=3):
    if v is None:
        return "–"
    if isinstance(v, float):
        return f"{v:.{digits}g}" if abs(v) < 1e5 else f"{v:,.0f}"
    if isinstance(v, int):
        return f"{v:,}"
    return str(v).replace("|", "\\|")


def md_table(headers, rows):
    return "\n".join(["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
                     + ["| " + " | ".join(fmt(c) for c in r) + " |" for r in rows])


def plots(rows, finetunes, results_dir):
    """loss_curves.png, size_vs_utility.png, exposure_vs_epsilon.png; returns their file names."""
    from utils.model_under_test import pyplot, save_figure
    plt = pyplot()
    made = []
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for i, (name, ft) in enumerate(finetunes.items()):
        hist = [h for h in ft["history"] if h.get("val_loss") is not None]
        if hist:
            ax.plot([h["step"] for h in hist], [h["val_loss"] for h in hist], marker=".", color=f"C{i % 10}",
                    label=f"{name} val")
            ax.plot([h["step"] for h in hist], [h["train_loss"] for h in hist], ls=":", color=f"C{i % 10}", alpha=0.6)
    ax.set_xlabel("fine-tuning step")
    ax.set_ylabel("loss (nats/token; dotted: train)")
    ax.set_title("Fine-tuning loss per method")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    save_figure(fig, os.path.join(results_dir, "loss_curves.png"))
    made.append("loss_curves.png")

    fig, ax = plt.subplots(figsize=(7, 4.5))
    base = next((r for r in rows if r["method"] == "base"), None)
    for r in rows:
        if r["method"] != "base" and r["patch_bytes"] and r["val_ppl"]:
            ax.scatter(r["patch_bytes"], r["val_ppl"], s=30)
            ax.annotate(r["method"], (r["patch_bytes"], r["val_ppl"]), fontsize=8, xytext=(4, 4),
                        textcoords="offset points")
    if base and base["val_ppl"]:
        ax.axhline(base["val_ppl"], ls="--", c="gray", lw=0.8, label="base model (no patch)")
        ax.legend(fontsize=8)
    ax.set_xscale("log")
    ax.set_xlabel("encrypted patch (bytes, log scale)")
    ax.set_ylabel("perplexity on the fine-tune val data")
    ax.set_title("Patch size vs utility")
    ax.grid(alpha=0.3)
    save_figure(fig, os.path.join(results_dir, "size_vs_utility.png"))
    made.append("size_vs_utility.png")

    points = [r for r in rows if r["method"].startswith("dp") or r["method"] == "full"]
    if points:
        finite_eps = [r["claimed_epsilon"] for r in points if r["claimed_epsilon"]]
        no_dp_x = 2 * max(finite_eps) if finite_eps else 16.0
        x = lambda r: r["claimed_epsilon"] or no_dp_x  # noqa: E731
        points.sort(key=x)
        fig, ax = plt.subplots(figsize=(7, 4.5))
        reps = sorted({int(k) for r in points for k in r["exposure_by_reps"]})
        for k in reps:
            ax.plot([x(r) for r in points], [r["exposure_by_reps"].get(str(k)) for r in points], marker="o",
                    label=f"canary exposure, {k}x" if k else "exposure, controls (never inserted)")
        ax.plot([x(r) for r in points], [r["audit_lower_bound"] for r in points], marker="s", ls="--", c="k",
                label="one-run audit: ε lower bound")
        ax.axhline(1 / math.log(2), ls=":", c="gray", lw=0.8, label="chance exposure")
        ax.set_xscale("log")
        ax.set_xticks([x(r) for r in points], [f"{r['claimed_epsilon']:g}" if r["claimed_epsilon"] else "∞ (no DP)"
                                               for r in points])
        ax.set_xlabel("claimed ε (δ per run)")
        ax.set_ylabel("bits (exposure) / ε (audit)")
        ax.set_title("Canary exposure vs privacy budget")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
        save_figure(fig, os.path.join(results_dir, "exposure_vs_epsilon.png"))
        made.append("exposure_vs_epsilon.png")
    return made


def write_results(cfg, paths, methods, checks, timings):
    finetunes = {m: read_json(paths.method(m)["finetune"]) for m in methods}
    tests = {m: read_json(paths.method(m)["tests"]) for m in methods}
    missing = [m for m in methods if finetunes[m] is None or tests[m] is None]
    if missing:
        raise UserError(f"no fine-tune/test results for {', '.join(missing)}: run the finetune and tests stages")
    top = str(max(cfg["canary_reps"]))
    base_tests = read_json(os.path.join(os.path.dirname(paths.base), "tests.json"))
    rows = [summarize("base", None, base_tests, top)] + [summarize(m, finetunes[m], tests[m], top) for m in methods]
    os.makedirs(paths.results, exist_ok=True)
    figures = plots(rows, finetunes, paths.results)
    data_meta = read_json(os.path.join(paths.employees, "meta.json")) or {}
    results = dict(generated=time.strftime("%Y-%m-%d %H:%M:%S"), machine=describe_machine(), config=cfg, methods=rows,
                   checks=checks, timings=timings, figures=figures,
                   data={"employees": data_meta.get("splits"), "fields": data_meta.get("fields"),
                         "canaries": data_meta.get("canaries")})
    write_json(os.path.join(paths.results, "results.json"), results)
    write_bytes(os.path.join(paths.results, "RESULTS.md"), results_markdown(cfg, rows, checks, timings, figures,
                                                                            finetunes).encode())
    return results


def check_summary(name, d):
    """The measured numbers behind a check's verdict, in one line."""
    f = lambda x: "-" if x is None else f"{x:.2f}"  # noqa: E731
    if name == "leakage":
        return (f"mean exposure of the most repeated canaries: base {f(d.get('base_exposure'))} bits, patched "
                f"{f(d.get('patched_exposure'))} bits; wrong key: {d.get('wrong_key') or '-'}")
    if name == "robustness":
        p, b = d.get("patched", {}), d.get("base", {})
        return (f"patched: consistency {f(p.get('consistency'))}, correctness {f(p.get('correctness'))} "
                f"(held-out wordings {f(p.get('held_out_correctness'))} vs {f(d.get('majority_answer_correctness'))} "
                f"for always the most common answer); base: correctness {f(b.get('correctness'))}")
    return f"exit code {d.get('exit_code')}"


def results_markdown(cfg, rows, checks, timings, figures, finetunes):
    top = max(cfg["canary_reps"])
    n = sorted(cfg["tenants"])
    any_ft = next(iter(finetunes.values()))
    md = ["# Results: encrypted parameter deltas, fine-tuning methods and DP", "",
          f"Generated {time.strftime('%Y-%m-%d %H:%M')} by `python reproduce.py` on {describe_machine()}.", "",
          f"Base: {cfg['n_layer']} blocks x {cfg['n_embd']} wide, block {cfg['block_size']}, pretrained "
          f"{cfg['pretrain_iters']} steps on pydocs ({cfg['tokenizer']} tokens). Fine-tune data: "
          f"{cfg['n_people']} synthetic employees ({', '.join(cfg['fields'])}; {int(cfg['val_frac'] * 100)}% of the "
          f"people held out), canary phone numbers inserted {', '.join(map(str, cfg['canary_reps']))} times, plus "
          f"{any_ft['audit']['m']} one-run-audit canaries of which {any_ft['audit']['included']} were included. "
          "Every number below is measured on the sealed patch applied to the base with its key.", "",
          "## Per method", "",
          md_table(["method", "trainable params", "patch bytes", "RSS base alone (MB)",
                    *[f"RSS {k} tenant{'s' * (k > 1)} (MB)" for k in n],
                    "val loss", "val ppl", "base-corpus ppl (forgetting ×)", "fine-tune s"],
                   [[r["method"], r["trainable_params"], r["patch_bytes"], r["memory_mb"].get("base_only"),
                     *[r["memory_mb"].get(str(k)) for k in n],
                     r["val_loss"], r["val_ppl"],
                     f"{fmt(r['base_corpus_ppl'])}" + (f" ({fmt(r['forgetting_ratio'])}×)" if r["forgetting_ratio"] else ""),
                     r["finetune_time_s"]] for r in rows]), "",
          md_table(["method", f"exposure {top}x (bits)", "exposure controls", "extraction gap", "MIA AUC (reference)",
                    "MIA AUC (loss)", "MIA AUC, chosen attack [95% CI]", "black-box audit ε ≥ (max)",
                    "black-box TPR @ 1% / 0.1% FPR", "white-box audit ε ≥ (max)", "claimed ε",
                    "latency base / patched (ms/token)", "apply (ms)", "wrong key"],
                   [[r["method"], r["exposure_top"], r["exposure_by_reps"].get("0"), r["extraction_gap"],
                     r["mia_auc_reference"], r["mia_auc_loss"], selected_cell(r.get("mia_selected")),
                     with_max(r["audit_lower_bound"], r["audit_max_certifiable"]),
                     f"{fmt(r['audit_tpr_at_1pct'])} / {fmt(r['audit_tpr_at_01pct'])}" if r["audit_tpr_at_1pct"]
                     is not None else None, with_max(r["white_box_lower_bound"], r["white_box_max_certifiable"]),
                     r["claimed_epsilon"] if r["method"] != "base" and r["claimed_epsilon"]
                     else ("∞ (no DP)" if r["method"] != "base" else None),
                     f"{fmt(r['latency_ms_per_token']['base'])} / {fmt(r['latency_ms_per_token']['patched'])}",
                     r["apply_ms"], r["wrong_key"]] for r in rows]), "",
          "What the numbers mean:", "",
          "- **trainable params**: parameters the method updates; **patch bytes**: the sealed file (header + "
          "AES-256-GCM ciphertext of the changed tensors / embedding rows / LoRA adapters).",
          "- **RSS k tenants**: resident memory of one process holding the base model and k tenants' sealed patches "
          "(one applied), measured in a fresh process, next to the same process with the base model alone.",
          "- **val loss / ppl**: per-token loss (nats) and perplexity on every token of the held-out people's "
          "records; **base-corpus ppl**: perplexity on pydocs val after fine-tuning (× = after / before: forgetting).",
          f"- **exposure**: log2(candidates) - log2(rank) of each canary's secret among {cfg['n_candidates']:,} random "
          f"phone numbers (max {math.log2(cfg['n_candidates'] + 1):.1f} bits, chance 1.44); controls were never "
          "inserted. **extraction gap**: greedy exact-match rate of the records' answers, training people minus held-out people.",
          "- **MIA AUC**: membership inference (training vs held-out people), 0.5 = chance. **reference**: the score is "
          "the base model's loss minus the patched model's, which cancels what the two groups differ in by chance (the "
          "base model's own loss AUC shows how much that is with this many people); **loss**: the model's loss alone; "
          "**chosen attack**: of loss, zlib, Min-K%, Min-K%++ and reference, the best on a random half of the people, "
          "scored on the other half with a bootstrap 95% interval (no best-of-five optimism); \"too few to tell\" when "
          "the interval includes 0.5.",
          "- **black-box audit ε ≥**: one-run audit (Steinke, Nasr & Jagielski 2023) of this very fine-tune with "
          f"{any_ft['audit']['m']} new-token canary records (Panda et al. 2025), scored on the released model, bound by "
          "Mahloujifar et al. 2024's f-DP estimator at 95% confidence; (max) is the most these canaries can certify. "
          "**white-box audit ε ≥**: DP rows only, a second run of the same configuration with "
          f"{cfg['audit_white_m']} gradient canaries added as already-clipped contributions just before the noise, "
          "scored from the per-step privatized gradient sums (utils/dp_audit.py). Both must stay below "
          "the claimed ε; the audits' coins are seeded here (reproducible, so they test the implementation, not a "
          "deployment).",
          "- **latency**: median ms per generated token (greedy, KV cache, batch 1), base vs patched; **apply**: "
          "verify + decrypt + apply the patch.", ""]
    if checks:
        md += ["## The thesis's shell checks", "",
               md_table(["check", "command", "rule", "result"],
                        [[name, f"`{c['command']}`", c["rule"],
                          ("PASS: " if c["passed"] else "FAIL: ") + check_summary(name, c["details"])]
                         for name, c in checks.items()]), ""]
    md += ["## Figures", ""] + [f"![{f}]({f})" for f in figures] + [""]
    if timings:
        md += ["## Time", "", md_table(["stage", "wall s", "cpu s"], [[t, w, c] for t, w, c in timings]), ""]
    return "\n".join(md)


# ----------------------------------------------------------------------------- the run
def cpu_seconds():
    """CPU seconds of this process and of every finished child process (user + system)."""
    import resource
    own, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


def check_names(cfg):
    for key, valid in (("methods", METHODS), ("stages", STAGES), ("checks", CHECKS)):
        bad = [x for x in cfg[key] if x not in valid]
        if bad:
            raise UserError(f"unknown {key} {bad}; choose from {', '.join(valid)}")
    if not cfg["methods"]:
        raise UserError("--methods is empty: name at least one of " + ", ".join(METHODS))


def main(argv=None):
    cfg = configure(DEFAULTS, argv or [])
    check_names(cfg)
    methods, wanted = list(cfg["methods"]), set(cfg["stages"])
    paths, steps = Paths(cfg), Steps()
    timings_json = os.path.join(paths.out, "timings.json")
    timings = {} if cfg["fresh"] else {t[0]: t for t in read_json(timings_json) or []}  # from earlier runs
    t_all = time.perf_counter()

    def run_stage(label, fn, outputs):
        """fn() unless every output exists already (and --fresh is off); its wall and CPU seconds."""
        if outputs and all(os.path.isfile(p) for p in outputs) and not cfg["fresh"]:
            print(f"\n##### {label}: outputs exist, skipped (--fresh redoes it)")
            return None
        print(f"\n##### {label}", flush=True)
        t0, c0 = time.perf_counter(), cpu_seconds()
        value = fn()
        timings[label] = (label, time.perf_counter() - t0, cpu_seconds() - c0)
        write_json(timings_json, list(timings.values()))
        return value

    if "data" in wanted:
        run_stage("data", lambda: stage_data(cfg, paths, steps),
                  [os.path.join(paths.pydocs, "meta.json"), os.path.join(paths.employees, "meta.json")])
    if "pretrain" in wanted:
        run_stage("pretrain", lambda: stage_pretrain(cfg, paths, steps), [paths.base])
    if "finetune" in wanted:
        for name in methods:
            where = paths.method(name)
            run_stage(f"finetune {name}", lambda: finetune_and_seal(cfg, paths, name), [where["finetune"], where["patch"]])
    if wanted & {"tests", "checks"} and (cfg["fresh"] or not os.path.isfile(paths.wrong_key)):
        from utils.patch_keys import generate_key_file
        generate_key_file(paths.wrong_key)  # no patch was sealed with it
    if "tests" in wanted:
        shared = {}
        for name in ["base"] + methods:
            folder = os.path.dirname(paths.base) if name == "base" else paths.method(name)["folder"]
            run_stage(f"tests {name}", lambda: test_model(cfg, paths, name, shared.get("x") or shared.setdefault(
                "x", Shared(cfg, paths))), [os.path.join(folder, "tests.json")])
    checks_json = os.path.join(paths.checks, "checks.json")
    if "checks" in wanted:
        run_stage("checks", lambda: stage_checks(cfg, paths, steps, methods), [checks_json])
    checks = read_json(checks_json)
    if "report" in wanted:
        results = write_results(cfg, paths, methods, checks, list(timings.values()))
        print_summary(results)
        print(f"\nwrote {paths.results}/RESULTS.md, results.json and {len(results['figures'])} plots; this run "
              f"{time.perf_counter() - t_all:.0f} s; all stages so far {sum(t[1] for t in timings.values()):.0f} s wall, "
              f"{sum(t[2] for t in timings.values()):.0f} s CPU")
    failed = [name for name, c in (checks or {}).items() if not c["passed"]]
    if failed:
        raise UserError(f"shell check(s) failed: {', '.join(failed)} (see {paths.checks})", exit_code=1)
    return 0


def print_summary(results):
    from utils.model_under_test import format_table
    rows = results["methods"]
    print("\n" + format_table(
        ["method", "trainable", "patch B", "val ppl", "exposure top", "MIA AUC (ref.)", "audit ε ≥", "claimed ε"],
        [[r["method"], r["trainable_params"], r["patch_bytes"], r["val_ppl"], r["exposure_top"], r["mia_auc_reference"],
          r["audit_lower_bound"], r["claimed_epsilon"]] for r in rows]))
    for name, c in (results["checks"] or {}).items():
        print(f"check {name}: {'PASS' if c['passed'] else 'FAIL'} {c['details']}")


if __name__ == "__main__":
    run_cli(main)
