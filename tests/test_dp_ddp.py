"""DP-DDP: two torchrun processes on gloo give the weights of one process (noise 0, every record sampled),
private (Opacus's DifferentiallyPrivateDistributedDataParallel) and not."""
import json
import os
import subprocess
import sys

import torch

from conftest import REPO
from utils.finetune import finetune
from utils.checkpoint import load_checkpoint

HELPER = """
import json, sys
import torch.distributed as dist
dist.init_process_group("gloo")
from utils.finetune import finetune
runs = json.loads(sys.argv[1])
for cfg in runs:
    finetune(cfg, log=lambda *a: None)
dist.destroy_process_group()
"""


def test_two_processes_equal_one(records_dir, tiny_ckpt, tmp_path):
    # batch_size = N: Poisson sampling at rate 1 takes every record, so both runs see the same batches
    common = dict(data_dir=records_dir, base_ckpt=tiny_ckpt, batch_size=10, microbatch_size=2, max_steps=2,
                  noise_multiplier=0.0, target_epsilon=None, dtype="float64", eval_interval=0, block_size=48,
                  max_grad_norm=0.05, learning_rate=1e-2)
    runs = [dict(common, dp=True, out_dir=str(tmp_path / "dp2")), dict(common, dp=False, out_dir=str(tmp_path / "plain2"))]
    helper = tmp_path / "helper.py"
    helper.write_text(HELPER)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": REPO}
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                        str(helper), json.dumps(runs)], capture_output=True, text=True, env=env, cwd=tmp_path,
                       timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    privacy = json.loads((tmp_path / "dp2" / "privacy.json").read_text())
    assert privacy["world_size"] == 2 and privacy["steps"] == 2

    base = load_checkpoint(tiny_ckpt)["model"]
    for run in runs:
        one = dict(run, out_dir=run["out_dir"].replace("2", "1"))
        finetune(one, log=lambda *a: None)
        w1 = load_checkpoint(os.path.join(one["out_dir"], "ckpt.pt"))["model"]
        w2 = load_checkpoint(os.path.join(run["out_dir"], "ckpt.pt"))["model"]
        assert w1.keys() == w2.keys()
        moved = (w1["transformer.h.0.mlp.c_fc.weight"] - base["transformer.h.0.mlp.c_fc.weight"].double()).norm()
        assert moved > 0
        for k in w1:
            assert torch.allclose(w1[k], w2[k], rtol=0, atol=1e-9 * float(moved)), (run["dp"], k)
