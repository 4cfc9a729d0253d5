"""utils/pretrain.py, the pretraining loop, on tiny byte-level runs: the schedule, checkpoint and log,
exact resume, gradient accumulation and early stopping. train.py's command line is tests/test_train.py."""
import json
import math
import os
import random
import re

import pytest
import torch

from tests.conftest import make_record_dataset
from utils import pretrain
from utils.checkpoint import load_checkpoint, model_from_checkpoint

TINY = dict(n_layer=1, n_head=2, n_embd=32, block_size=32, batch_size=4, eval_interval=3, eval_iters=2,
            log_interval=1, warmup_iters=2, lr_decay_iters=8, max_iters=6, learning_rate=3e-3, min_lr=3e-4,
            peak_flops=1e9, device="cpu")


def quiet(*args, **kwargs):
    pass


def texts(n, seed):
    rng = random.Random(seed)
    words = "the a salary of city clerk worker paid hourly annual department police fire water".split()
    return [" ".join(rng.choice(words) for _ in range(rng.randint(20, 60))) for _ in range(n)]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return make_record_dataset(tmp_path_factory.mktemp("stream") / "data", texts(120, 0), texts(20, 1))


def run(data_dir, out_dir, log=quiet, **overrides):
    cfg = {**pretrain.DEFAULTS, **TINY, "data_dir": data_dir, "out_dir": str(out_dir), **overrides}
    return pretrain.train(cfg, log=log)


def weights(path):
    return load_checkpoint(path)["model"]


@pytest.fixture(scope="module")
def trained(data_dir, tmp_path_factory):
    """One finished run shared by the sample / inspect / plot tests: (out_dir, result, progress lines)."""
    out = tmp_path_factory.mktemp("run") / "out"
    lines = []
    result = run(data_dir, out, log=lines.append, patience=3)
    return out, result, lines


def test_train_end_to_end_checkpoint_and_log(trained):
    out, result, lines = trained
    ckpt = load_checkpoint(out / "ckpt.pt")
    assert ckpt["iter_num"] == 6 == result["iter_num"] and not result["stopped_early"]
    assert ckpt["model_args"]["vocab_size"] == 257 and ckpt["model_args"]["n_layer"] == 1
    assert ckpt["config"]["tokenizer"] == {"tokenizer": "byte", "vocab_size": 257}
    assert ckpt["config"]["init_origin"] == "scratch" and ckpt["config"]["batch_size"] == 4
    assert ckpt["optimizer"]["state"] and len(ckpt["rng"]) == 1 and ckpt["rng"][0]["cpu"].dtype == torch.uint8
    assert ckpt["sampler"].dtype == torch.uint8
    evals = result["history"]
    assert [e["iter"] for e in evals] == [0, 3, 6]
    assert evals[-1]["val_loss"] < evals[0]["val_loss"] - 0.05  # it learns
    assert ckpt["best_val_loss"] == min(e["val_loss"] for e in evals)
    model = model_from_checkpoint(ckpt)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), result["model"].state_dict().values()))
    assert sorted(os.listdir(out)) == ["ckpt.pt", "log.jsonl"]  # atomic writes leave no temp files

    records = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [r["iter"] for r in records if r["event"] == "train"] == [1, 2, 3, 4, 5, 6]
    for r in records:
        if r["event"] == "eval":
            assert r["val_ppl"] == pytest.approx(math.exp(r["val_loss"]))
        else:
            assert r["tokens_per_s"] > 0 and r["mfu"] > 0 and r["lr"] > 0
    progress = [line for line in lines if line.startswith("iter")]
    assert len(progress) == 6
    pattern = r"iter 6/6 \| loss \d+\.\d{4} \| lr \S+ \| [\d,]+ tok/s \| mfu [\d.]+% \| eta \d+m\d\ds"
    assert re.fullmatch(pattern, progress[-1])


def test_cpu_mfu_times_the_step_on_the_mfu_clock_not_the_wall(data_dir, tmp_path, monkeypatch):
    """On a CPU the step time MFU divides by is process CPU time (mfu_clock): wall time counts the time
    other processes hold the cores, which gave MFU > 100% on a shared machine. A fake clock that
    advances 2 s per reading makes every logged step exactly 2 s of it, whatever the wall says."""
    ticks = iter(range(0, 10_000, 2))
    monkeypatch.setattr(pretrain, "mfu_clock", lambda device: lambda: float(next(ticks)))
    result = run(data_dir, tmp_path / "out")
    records = [json.loads(line) for line in (tmp_path / "out" / "log.jsonl").read_text().splitlines()]
    expected = result["model"].estimate_mfu(TINY["batch_size"], 2.0, TINY["peak_flops"], TINY["block_size"])
    train = [r for r in records if r["event"] == "train"]
    assert len(train) == 6 and all(r["mfu"] == pytest.approx(expected) for r in train)


def test_resume_continues_exactly(data_dir, tmp_path):
    common = dict(dropout=0.1, gradient_accumulation_steps=2, max_iters=8)  # dropout: the RNG must resume too
    full = run(data_dir, tmp_path / "full", **common)
    half = run(data_dir, tmp_path / "split", **{**common, "max_iters": 4})
    half_weights = {k: v.clone() for k, v in half["model"].state_dict().items()}
    resumed = run(data_dir, tmp_path / "split", **common, init_from="resume")
    assert resumed["iter_num"] == 8
    a, b = full["model"].state_dict(), resumed["model"].state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], half_weights[k]) for k in a)  # the second half did train
    assert weights(tmp_path / "full" / "ckpt.pt").keys() == weights(tmp_path / "split" / "ckpt.pt").keys()
    iters = [json.loads(line)["iter"] for line in (tmp_path / "split" / "log.jsonl").read_text().splitlines()
             if '"eval"' in line]
    assert iters == [0, 3, 4, 6, 8]  # the log is continued, the resumed point not scored twice

    ckpt_bytes = (tmp_path / "split" / "ckpt.pt").read_bytes()
    scored = run(data_dir, tmp_path / "split", **common, init_from="resume", eval_only=True)
    assert scored["iter_num"] == 8 and len(scored["history"]) == 1
    assert (tmp_path / "split" / "ckpt.pt").read_bytes() == ckpt_bytes  # eval_only writes no checkpoint


def test_gradient_accumulation_equals_bigger_batch(data_dir, tmp_path):
    accumulated = run(data_dir, tmp_path / "a", batch_size=2, gradient_accumulation_steps=2, max_iters=3)
    whole = run(data_dir, tmp_path / "b", batch_size=4, gradient_accumulation_steps=1, max_iters=3)
    a, b = accumulated["model"].state_dict(), whole["model"].state_dict()
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-5


def test_early_stopping_after_patience_evals(data_dir, tmp_path):
    # learning rate 0: the val loss never improves after the first eval
    stopped = run(data_dir, tmp_path / "stop", learning_rate=0.0, decay_lr=False, eval_interval=2, patience=2,
                  max_iters=50)
    assert stopped["stopped_early"] and stopped["iter_num"] == 4
    last = json.loads((tmp_path / "stop" / "log.jsonl").read_text().splitlines()[-1])
    assert last == {"event": "stop", "iter": 4, "reason": "patience"}
