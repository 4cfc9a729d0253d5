"""
How much of the claimed epsilon the one-run white-box audit (utils/dp_audit.py) certifies, run after run:
`runs` audits per claimed epsilon, each with FRESH secret DP noise and fresh canary coins (no seed:
the setting whose guarantee holds), for the current defaults (m = 30,000, k = 0.02 m / 0.4 m) and for
the previous ones (m = 2,000, k = 0.05 m / 0.4 m) side by side, interleaved run by run; then the planted
bug (10x less noise than claimed) once. The instance is the tests' (tests/test_dp_audit.py): a 2-block x
32-wide byte model, 20 records, full batch (q = 1), 20 steps, PRV accountant.

    python bench/audit_power.py                      # ~4 min of CPU on 2 cores
    python bench/audit_power.py --runs=3 --claims=4.0,

Prints the machine, its load (uptime), process CPU time per audit and a markdown table (min, median,
max of the f-DP and Steinke bounds; runs reaching half the claim; runs above the claim), which
bench/results_audit_power.md holds a copy of.
"""
import os
import subprocess
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from configurator import configure  # noqa: E402
from tests.test_leakage import build_employees, save_base  # noqa: E402  (the tests' tiny instance)
from utils import dp_audit  # noqa: E402
from utils import finetune as ft_loop  # noqa: E402
from utils.cli import run_cli  # noqa: E402
from utils.machine import describe_machine  # noqa: E402

DEFAULTS = dict(
    runs=6,  # audits per claim and setting
    claims=(4.0, 8.0),  # target epsilons
)
SETTINGS = {"m=30000, k=0.02m/0.4m (now)": dict(m=30000, k_fractions=(0.02, 0.4)),
            "m=2000, k=0.05m/0.4m (before)": dict(m=2000, k_fractions=(0.05, 0.4))}
INSTANCE = dict(eval_interval=0, log_interval=10 ** 9, microbatch_size=64, learning_rate=1e-3, max_steps=20,
                m_input=0, accountant="prv", save=False)


def one_audit(base_ckpt, data_dir, **kw):
    cfg = {**ft_loop.DEFAULTS, **dp_audit.DEFAULTS, **INSTANCE, "base_ckpt": base_ckpt, "data_dir": data_dir, **kw}
    t = time.process_time()
    rep = dp_audit.run_audit(cfg, log=lambda *a, **k: None)
    return rep, time.process_time() - t


def main(argv=None):
    cfg = configure(DEFAULTS, sys.argv[1:] if argv is None else argv)
    uptime = subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
    print(describe_machine(f"uptime: {uptime}"))
    with tempfile.TemporaryDirectory(prefix="audit_power_") as tmp:
        data_dir = str(build_employees(os.path.join(tmp, "employees"), n_train=20, n_val=10, canary_reps=()))
        base = save_base(os.path.join(tmp, "base", "ckpt.pt"))
        found = {(c, s): [] for c in cfg["claims"] for s in SETTINGS}
        cpu = []
        total, done = len(found) * cfg["runs"], 0
        for i in range(cfg["runs"]):
            for claim in cfg["claims"]:
                for name, setting in SETTINGS.items():  # interleaved: the settings share the load
                    rep, spent = one_audit(base, data_dir, target_epsilon=claim, **setting)
                    wb = rep["white_box"]
                    found[claim, name].append((wb["epsilon_lower"], wb["epsilon_lower_steinke"], rep["claimed_epsilon"],
                                               wb["max_certifiable"]))
                    cpu.append(spent)
                    done += 1
                    print(f"{done}/{total}: claim {claim}, {name}: f-DP {wb['epsilon_lower']:.2f}, Steinke "
                          f"{wb['epsilon_lower_steinke']:.2f} (claimed {rep['claimed_epsilon']:.3f}), {spent:.1f} s CPU; "
                          f"ETA {np.mean(cpu) * (total - done):.0f} s CPU", flush=True)
        broken, spent = one_audit(base, data_dir, target_epsilon=8.0, noise_bug_factor=0.1)
    print(f"\nload after: {subprocess.run(['uptime'], capture_output=True, text=True).stdout.strip()}")
    print("\n| claim | setting | f-DP bound min / median / max | Steinke min / median / max | runs >= claim/2 "
          "| runs > claim | max certifiable |\n|---|---|---|---|---|---|---|")
    for (claim, name), rows in found.items():
        f, s, c, most = (np.array(x) for x in zip(*rows))
        print(f"| {claim:g} | {name} | {f.min():.2f} / {np.median(f):.2f} / {f.max():.2f} | {s.min():.2f} / "
              f"{np.median(s):.2f} / {s.max():.2f} | {(f >= claim / 2).sum()}/{len(f)} | {(f > c).sum()}/{len(f)} "
              f"| {most[0]:.2f} |")
    print(f"\nplanted bug (noise x0.1, claim {broken['claimed_epsilon']:.3f}): f-DP bound "
          f"{broken['white_box']['epsilon_lower']:.2f}, passed={broken['passed']}; "
          f"{np.mean(cpu):.1f} s CPU per audit (mean of {len(cpu)})")


if __name__ == "__main__":
    run_cli(main)
