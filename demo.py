"""
The headline story at small scale, offline, on the built-in data (what `make demo` runs; ~4 minutes on
2 CPU cores):

    python demo.py                      # everything into out/demo
    python demo.py --out_dir=/tmp/demo --pretrain_iters=200

1. prepare the pydocs corpus and the synthetic employees records (byte tokenizer; one short Q/A field per
   person so a record fits the block; canary phone numbers inserted 1, 4 and 16 times, plus controls
   that are never inserted);
2. pretrain a small base model on pydocs and print a sample;
3. fine-tune it on the employees records without DP and with DP-SGD (epsilon 8);
4. fine-tune again and keep the result only as an encrypted patch over the base (key file: mode 0600);
5. the leakage table: canary exposure for the base, the non-private and the DP model, the patched base
   with the key and with a wrong key (refused: no numbers).

Every step prints the shell command it runs and runs exactly that command in a subprocess, so the demo is
also a recipe. The expected outcome is checked at the end (exit 1 when the story does not hold).
"""
import json
import os
import time

from configurator import configure
from utils.cli import UserError, run_cli
from utils.script_steps import Steps, opts, repo_path

DEFAULTS = dict(
    out_dir="out/demo",  # every file the demo writes goes under here
    # base model: config/train_pydocs.py, narrower and with a shorter block so it trains in a few minutes
    pretrain_iters=400,  # base model training iterations
    n_layer=4,           # base model blocks
    n_embd=128,          # base model width
    block_size=128,      # base model context in tokens
    batch_size=16,       # pretraining batch (windows)
    # employees records
    n_people=200,        # synthetic employees
    canary_reps=(1, 4, 16),  # repetition counts of the planted canaries
    # fine-tuning (the same for all three runs, so the patch holds what the non-private run learned)
    epochs=12.0,         # non-private fine-tuning epochs
    learning_rate=5e-3,  # non-private fine-tuning learning rate
    ft_batch_size=16,    # non-private fine-tuning batch (records)
    dp_epsilon=8.0,      # target epsilon of the DP run
    # DP: the recipe of bench/utility.py (tuned on public data): a large batch (here N/4), 75 steps at a
    # constant learning rate of 3e-3, a small clip norm, the first half of the blocks and the embeddings
    # fixed, and the released model the EMA (decay 0.9) of the DP iterates (post-processing: the same epsilon)
    dp_steps=75,         # DP fine-tuning steps
    dp_ema_decay=0.9,    # decay of the EMA of the DP iterates that is the DP model (0: the last iterate)
    dp_batch_size=50,    # DP expected batch (records; ~N/4 of the 200 people)
    dp_learning_rate=3e-3,  # DP fine-tuning learning rate
    dp_clip=0.1,         # DP per-person clipping norm
    # leakage test: each canary ranked among this many random phone numbers (exposure up to log2 of it)
    n_candidates=2000,   # random phone numbers each canary is ranked among
    # checks of the story: exposure in bits of the most repeated canaries without DP must be above
    # min_exposure_nonprivate; with DP, that of the canaries inserted at most dp_group times below max_exposure_dp
    min_exposure_nonprivate=8.0,  # bits; below it the non-private run 'did not memorise' and the demo fails
    max_exposure_dp=4.0,  # bits; above it the DP run leaked and the demo fails
    dp_group=4,          # the DP check covers canaries inserted at most this many times
)


def exposure_of(models, label_start, reps):
    """Mean exposure of the canaries inserted `reps` times (a list: all of them together) for the leakage
    row whose label starts with label_start; None when the row has no numbers."""
    row = next((m for m in models if m["label"].startswith(label_start)), None)
    if row is None or row.get("status") != "ok":
        return None
    values = [c["exposure"] for c in row["canaries"] if c["repetitions"] in (reps if isinstance(reps, list) else [reps])]
    return sum(values) / len(values) if values else None


def check_story(report, cfg):
    """(lines, all good): the non-private model memorizes the repeated canaries, the DP model does not
    (up to group privacy), the patch with its key is the non-private model, a wrong key is refused."""
    models, reps = report["models"], sorted(k for k in cfg["canary_reps"] if k > 0)
    top, few = reps[-1], [k for k in reps if k <= cfg["dp_group"]]
    nonprivate, dp = "fine-tuned (finetune)", "fine-tuned (finetune_dp)"
    ex = {(who, tuple(r) if isinstance(r, list) else r): exposure_of(models, who, r)
          for who in (nonprivate, dp, "patched + key") for r in (top, few, 0)}
    wrong = next((m for m in models if m["label"] == "patched + wrong key"), {})
    f = lambda v: "none" if v is None else f"{v:.1f}"  # noqa: E731
    eps, copies = cfg["dp_epsilon"], ", ".join(map(str, few))
    checks = [
        (f"without DP the {top}x canaries are memorized: exposure {f(ex[nonprivate, top])} bits > "
         f"{cfg['min_exposure_nonprivate']} (never-inserted controls: {f(ex[nonprivate, 0])})",
         (ex[nonprivate, top] or 0) > cfg["min_exposure_nonprivate"]),
        (f"with DP (epsilon {eps}) the canaries inserted {copies} times are not: exposure {f(ex[dp, tuple(few)])} "
         f"bits < {cfg['max_exposure_dp']} (chance 1.44; without DP {f(ex[nonprivate, tuple(few)])})",
         ex[dp, tuple(few)] is not None and ex[dp, tuple(few)] < cfg["max_exposure_dp"]),
        (f"the patch with its key is the non-private model: exposure {f(ex['patched + key', top])} bits",
         ex["patched + key", top] is not None and abs(ex["patched + key", top] - ex[nonprivate, top]) < 1e-6),
        (f"a wrong key is refused, no numbers: {wrong.get('status')}", str(wrong.get("status", "")).startswith("refused")),
    ]
    lines = [("PASS  " if ok else "FAIL  ") + text for text, ok in checks]
    lines.append(f"note: DP bounds what one record can change; {top} copies of a record are a group of {top}, "
                 f"protected only at epsilon {top} x {eps:g} = {top * eps:g}: the DP model's exposure of the {top}x "
                 f"canaries is {f(ex[dp, top])} bits. Deduplicate records, or count a person's records as one unit.")
    return lines, all(ok for _, ok in checks)


def main(argv=None):
    cfg = configure(DEFAULTS, argv or [])
    out = cfg["out_dir"]
    pydocs, employees = os.path.join(out, "data", "pydocs"), os.path.join(out, "data", "employees")
    base = os.path.join(out, "base", "ckpt.pt")
    key, wrong_key, patch = os.path.join(out, "key.hex"), os.path.join(out, "wrong.hex"), os.path.join(out, "demo.patch")
    steps = Steps()
    t_start = time.perf_counter()

    steps.run("prepare the pydocs corpus (bytes)", ["data/pydocs/prepare.py", *opts(tokenizer="byte", out_dir=pydocs)])
    steps.run("prepare the employees records with canaries",
              ["data/employees/prepare.py", *opts(tokenizer="byte", out_dir=employees, n_people=cfg["n_people"],
                                                   fields="Annual Salary", canary_reps=cfg["canary_reps"],
                                                   canaries_per_rep=3, n_control_canaries=4)])
    steps.run("pretrain the small base model",
              ["train.py", repo_path("config/train_pydocs.py"),
               *opts(data_dir=pydocs, out_dir=os.path.dirname(base), n_layer=cfg["n_layer"], n_embd=cfg["n_embd"],
                     block_size=cfg["block_size"], batch_size=cfg["batch_size"], max_iters=cfg["pretrain_iters"],
                     lr_decay_iters=cfg["pretrain_iters"], warmup_iters=max(1, min(20, cfg["pretrain_iters"] // 10)),
                     eval_interval=max(1, cfg["pretrain_iters"] // 4),
                     log_interval=max(1, cfg["pretrain_iters"] // 8), patience=0)])
    steps.run("a sample from the base model",
              ["sample.py", *opts(ckpt=base, start="The ", num_samples=1, max_new_tokens=200, device="cpu")])

    finetune = opts(base_ckpt=base, data_dir=employees, loss_on="answer", epochs=cfg["epochs"],
                    batch_size=cfg["ft_batch_size"], microbatch_size=cfg["ft_batch_size"],
                    learning_rate=cfg["learning_rate"], eval_interval=0, log_interval=20)
    steps.run("fine-tune without DP", ["finetune_dp.py", *finetune, *opts(dp=False, out_dir=os.path.join(out, "finetune"))])
    # hooks, one microbatch: for a model this small on a CPU, ghost clipping's second backward costs more
    # than the per-sample gradients it avoids (BENCHMARKS.md); both clip exactly the same way.
    dp_finetune = opts(base_ckpt=base, data_dir=employees, loss_on="answer", max_steps=cfg["dp_steps"],
                       max_grad_norm=cfg["dp_clip"], batch_size=cfg["dp_batch_size"], microbatch_size=cfg["dp_batch_size"],
                       grad_sample_mode="hooks", learning_rate=cfg["dp_learning_rate"], eval_interval=0,
                       log_interval=5, freeze_first_blocks=cfg["n_layer"] // 2, freeze_embeddings=True,
                       accountant="pld",  # the same epsilon as RDP's bound for ~6% less noise
                       ema_decay=cfg["dp_ema_decay"])
    steps.run(f"fine-tune with DP-SGD (epsilon {cfg['dp_epsilon']})",
              ["finetune_dp.py", *dp_finetune, *opts(dp=True, target_epsilon=cfg["dp_epsilon"],
                                                      out_dir=os.path.join(out, "finetune_dp"))])
    for path in (key, wrong_key):
        steps.run("a random 256-bit key, readable by its owner only" if path == key else "another key (the wrong one)",
                  ["finetune_encrypt_memmap.py", "keygen", *opts(out=path), "--force"])
    steps.run("fine-tune without DP again, keeping the result only as an encrypted patch",
              ["finetune_encrypt_memmap.py", *finetune, *opts(dp=False, key_file=key, tenant="demo", export=patch)])
    leakage_json = os.path.join(out, "leakage.json")
    code = steps.run("leakage: base, non-private, DP, patched with the key, patched with a wrong key",
                     ["test_pipeline/leakage_test.py",
                      *opts(data_dir=employees, base_ckpt=base, ckpt=[os.path.join(out, "finetune", "ckpt.pt"),
                                                                      os.path.join(out, "finetune_dp", "ckpt.pt")],
                            patch=patch, key_file=key, wrong_key_file=wrong_key, tenant="demo", n_candidates=cfg["n_candidates"],
                            fields="Annual Salary", n_people=20, n_samples=0, out=leakage_json,
                            plot=os.path.join(out, "exposure.png"))], check=False)
    if code not in (0, 1) or not os.path.isfile(leakage_json):
        raise UserError(f"the leakage test failed (exit code {code})", exit_code=1)
    with open(leakage_json) as f:
        lines, ok = check_story(json.load(f), cfg)
    print("\n=== the story\n" + "\n".join(lines))
    print("\n=== time per step (cpu s = user + system seconds of the step's processes)\n" + steps.summary())
    print(f"\ndemo finished in {time.perf_counter() - t_start:.0f} s; outputs in {out}/ "
          f"(key files are mode 0600: {oct(os.stat(key).st_mode & 0o777)})")
    if not ok:
        raise UserError("the demo's story did not hold (see FAIL above)", exit_code=1)
    return 0


if __name__ == "__main__":
    run_cli(main)
