"""finetune_dp's privacy budget against Google's dp-accounting, stopping at the budget, its outputs,
and its one-line refusals of bad input."""
import json
import os
import subprocess
import sys

import pytest
import torch
from dp_accounting import dp_event
from dp_accounting.rdp import rdp_privacy_accountant

from conftest import REPO, make_record_dataset, tiny_model
from finetune_dp import main
from utils.finetune import finetune
from utils.checkpoint import load_model, save_checkpoint
from utils.cli import UserError, run_cli

QUIET = dict(log=lambda *a: None)


def google_rdp_epsilon(sigma, q, steps, delta):
    acc = rdp_privacy_accountant.RdpAccountant()
    acc.compose(dp_event.SelfComposedDpEvent(dp_event.PoissonSampledDpEvent(q, dp_event.GaussianDpEvent(sigma)), steps))
    return acc.get_epsilon(delta)


def small_cfg(records_dir, **kw):
    return {**dict(data_dir=records_dir, batch_size=4, microbatch_size=2, save=False, eval_interval=0,
                   block_size=48), **kw}


def test_reported_epsilon_matches_dp_accounting_and_outputs_are_written(records_dir, tiny_ckpt, tmp_path):
    out = tmp_path / "run"
    cfg = small_cfg(records_dir, base_ckpt=tiny_ckpt, target_epsilon=2.0, max_steps=4, save=True, out_dir=str(out),
                    eval_interval=2)
    lines = []
    result = finetune(cfg, log=lines.append)
    p = result["privacy"]
    n = 10
    assert p["dataset_size"] == n and p["sample_rate"] == pytest.approx(4 / n) and p["steps"] == 4
    assert p["delta"] < 1 / n  # the default stays below 1/N
    reference = google_rdp_epsilon(p["noise_multiplier"], p["sample_rate"], p["steps"], p["delta"])
    assert p["epsilon"] == pytest.approx(reference, rel=0.01)
    assert p["epsilon"] <= 2.0 and p["epsilon"] > 1.9  # calibrated to the target, not far below it
    assert not p["stopped_at_budget"]
    assert [e["step"] for e in p["eval_epsilons"]] == [2, 4]
    assert p["eval_epsilons"][0]["epsilon"] < p["eval_epsilons"][1]["epsilon"] == pytest.approx(p["epsilon"])
    assert any("epsilon" in line and "loss" in line for line in lines if line.startswith("step "))
    on_disk = json.loads((out / "privacy.json").read_text())
    for key in ("epsilon", "delta", "noise_multiplier", "sample_rate", "steps", "epochs", "accountant",
                "max_grad_norm", "privacy_unit", "dataset_size", "grad_sample_mode", "trainable_params"):
        assert on_disk[key] == p[key], key
    model, ckpt = load_model(out / "ckpt.pt")
    for a, b in zip(model.state_dict().values(), result["model"].state_dict().values()):
        assert torch.equal(a, b)
    events = [json.loads(line)["event"] for line in (out / "log.jsonl").read_text().splitlines()]
    assert events[0] == "config" and events[-1] == "done" and "eval" in events


def test_training_stops_before_the_step_that_would_overshoot(records_dir):
    sigma, q = 1.2, 0.4
    e3, e4 = (google_rdp_epsilon(sigma, q, s, 1e-5) for s in (3, 4))
    target = (e3 + e4) / 2
    lines = []
    result = finetune(small_cfg(records_dir, noise_multiplier=sigma, target_epsilon=target, max_steps=40),
                      model=tiny_model(block_size=48), log=lines.append)
    p = result["privacy"]
    assert p["steps"] == 3 and p["planned_steps"] == 40 and p["stopped_at_budget"]
    assert p["epsilon"] <= target
    assert any("would spend epsilon" in line for line in lines)
    assert any("stopped at the privacy budget" in line for line in lines)


def test_prv_accountant_is_used_when_asked(records_dir):
    result = finetune(small_cfg(records_dir, accountant="prv", noise_multiplier=2.0, target_epsilon=None,
                                max_steps=2), model=tiny_model(block_size=48), **QUIET)
    p = result["privacy"]
    assert p["accountant"] == "prv" and p["steps"] == 2
    # PRV is tighter than RDP for the same noise, and not absurdly so
    rdp = google_rdp_epsilon(2.0, p["sample_rate"], 2, p["delta"])
    assert 0.5 * rdp < p["epsilon"] < rdp


def test_delta_at_or_above_one_over_n_is_refused(records_dir):
    with pytest.raises(UserError, match="1/N"):
        finetune(small_cfg(records_dir, target_delta=0.1, max_steps=1), model=tiny_model(block_size=48), **QUIET)


@pytest.fixture
def bad_inputs(records_dir, tiny_ckpt, tmp_path):
    """name -> (extra argv, text the one-line error must contain)."""
    empty = tmp_path / "empty"
    make_record_dataset(empty, [], ["Context: x. Question: y? Answer: z"])
    no_offsets = tmp_path / "no_offsets"
    make_record_dataset(no_offsets, ["a record", "another one"])
    os.remove(no_offsets / "train_offsets.bin")
    other_vocab = tmp_path / "other" / "ckpt.pt"
    save_checkpoint(other_vocab, tiny_model(vocab_size=300))
    return {
        "unreachable": (["--target_epsilon=0.01"], "target_epsilon"),
        "empty": ([f"--data_dir={empty}"], "empty"),
        "no_offsets": ([f"--data_dir={no_offsets}"], "offsets"),
        "clip": (["--max_grad_norm=0"], "max_grad_norm"),
        "microbatch": (["--microbatch_size=8"], "microbatch_size"),
        "vocab": ([f"--base_ckpt={other_vocab}"], "vocabulary"),
        "delta": (["--target_delta=0.5"], "1/N"),
        "gdp": (["--accountant=gdp"], "underestimate"),
        "no_base": (["--base_ckpt=", "--init_from=/no/such/gpt2"], "GPT-2"),
    }


def test_bad_input_gives_one_line_and_exit_2(bad_inputs, records_dir, tiny_ckpt, tmp_path, capsys):
    out = tmp_path / "never"
    base = [f"--data_dir={records_dir}", f"--base_ckpt={tiny_ckpt}", f"--out_dir={out}", "--batch_size=4",
            "--microbatch_size=2", "--max_steps=3"]
    for name, (extra, needle) in bad_inputs.items():
        with pytest.raises(SystemExit) as exit_info:
            run_cli(main, base + extra)
        err = capsys.readouterr().err
        assert exit_info.value.code == 2, name
        assert err.startswith("error: ") and err.count("\n") == 1 and needle in err, (name, err)
        assert not out.exists(), name  # nothing half-written


def test_cli_refusal_has_no_traceback(records_dir, tiny_ckpt, tmp_path):
    r = subprocess.run([sys.executable, os.path.join(REPO, "finetune_dp.py"), f"--data_dir={records_dir}",
                        f"--base_ckpt={tiny_ckpt}", "--batch_size=4", "--microbatch_size=8"],
                       capture_output=True, text=True, cwd=tmp_path)
    assert r.returncode == 2
    assert r.stderr.startswith("error: microbatch_size") and r.stderr.count("\n") == 1 and "Traceback" not in r.stderr
