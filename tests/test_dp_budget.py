"""finetune_dp's privacy budget against Google's dp-accounting, stopping at the budget, its outputs,
and its one-line refusals of bad input."""
import json
import math
import os
import subprocess
import sys
from types import SimpleNamespace

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


# ----------------------------------------------------------------------------- issue 11: secrets, adjacency,
# groups, composition and resume
def google_pld_epsilon(triples, delta, relation, discretization=1e-4):
    from dp_accounting.pld import pld_privacy_accountant
    acc = pld_privacy_accountant.PLDAccountant(relation, value_discretization_interval=discretization)
    acc.compose(dp_event.ComposedDpEvent([dp_event.SelfComposedDpEvent(
        dp_event.PoissonSampledDpEvent(q, dp_event.GaussianDpEvent(s)), n) for s, q, n in triples]))
    return acc.get_epsilon(delta)


def all_bytes(folder):
    return b"".join(p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file())


def test_no_secret_reaches_disk_and_the_randomness_is_stated(records_dir, tiny_ckpt, tmp_path, monkeypatch):
    import utils.secure_rng as secure_rng
    from utils.secure_rng import RunSecret
    known = bytes(range(100, 132))
    calls = []
    monkeypatch.setattr(secure_rng, "secrets", SimpleNamespace(token_bytes=lambda n: calls.append(n) or known))
    out = tmp_path / "run"
    lines = []
    finetune(small_cfg(records_dir, base_ckpt=tiny_ckpt, noise_multiplier=1.0, target_epsilon=None, max_steps=4,
                       save=True, out_dir=str(out), checkpoint_interval=2, log_interval=1), log=lines.append)
    assert calls == [32]  # the run's secret came from the OS CSPRNG, once
    secret = RunSecret(known)
    derived = [secret.stream(p, r)._key for p in ("sampling", "noise", "rounding") for r in (None, 0)]
    written = all_bytes(out) + "\n".join(lines).encode()
    for material in [known] + derived:
        for form in (material, material.hex().encode(), material.hex().upper().encode(), bytes(material[::-1])):
            assert form not in written
    privacy = json.loads((out / "privacy.json").read_text())
    assert privacy["guarantee_holds"] and "fresh 256-bit OS secret" in privacy["randomness"]
    assert not any("NOT private" in line for line in lines)

    lines = []
    finetune(small_cfg(records_dir, base_ckpt=tiny_ckpt, noise_multiplier=1.0, target_epsilon=None, max_steps=2,
                       save=True, out_dir=str(out), reproducible_noise_seed=11, log_interval=1), log=lines.append)
    privacy = json.loads((out / "privacy.json").read_text())
    assert not privacy["guarantee_holds"] and "does NOT hold against anyone who knows the seed" in privacy["randomness"]
    assert all("NOT private against anyone who knows the seed" in line for line in lines if line.startswith("step "))


def test_replace_one_adjacency_is_accounted_and_the_other_relation_reported(records_dir):
    from dp_accounting.privacy_accountant import NeighboringRelation as R
    sigma, q = 1.0, 0.4
    e3, e4 = (google_pld_epsilon([(sigma, q, s)], 1e-5, R.REPLACE_ONE) for s in (3, 4))
    target = (e3 + e4) / 2  # replace-one allows 3 steps; add/remove would allow more
    assert google_pld_epsilon([(sigma, q, 4)], 1e-5, R.ADD_OR_REMOVE_ONE) < target
    p = finetune(small_cfg(records_dir, noise_multiplier=sigma, target_epsilon=target, target_delta=1e-5, max_steps=6,
                           adjacency="replace_one", accountant="pld"), model=tiny_model(block_size=48), **QUIET)["privacy"]
    assert p["adjacency"] == "replace_one" and p["steps"] == 3 and p["epsilon"] <= target
    assert p["epsilon"] == pytest.approx(e3, rel=1e-6)
    other = p["epsilon_other_adjacency"]
    assert other["adjacency"] == "add_remove"
    assert other["epsilon"] == pytest.approx(google_pld_epsilon([(sigma, q, 3)], 1e-5, R.ADD_OR_REMOVE_ONE, 1e-3), rel=1e-6)
    assert "N (dataset_size) is public" in p["treated_as_public"]
    with pytest.raises(UserError, match="pld"):
        finetune(small_cfg(records_dir, adjacency="replace_one", max_steps=1), model=tiny_model(block_size=48), **QUIET)


def test_default_add_remove_reports_replace_one_and_the_person_unit(records_dir):
    from dp_accounting.privacy_accountant import NeighboringRelation as R
    p = finetune(small_cfg(records_dir, noise_multiplier=1.0, target_epsilon=None, max_steps=3),
                 model=tiny_model(block_size=48), **QUIET)["privacy"]
    assert p["adjacency"] == "add_remove" and "treated as public" in p["treated_as_public"]
    assert p["epsilon_other_adjacency"]["epsilon"] == pytest.approx(
        google_pld_epsilon([(1.0, 0.4, 3)], p["delta"], R.REPLACE_ONE, 1e-3), rel=1e-6)
    assert p["privacy_unit"].startswith("person") and p["dataset_size_counts"].startswith("persons")


def test_group_privacy_for_each_planted_repetition_count(records_dir):
    from dp_accounting.pld import pld_privacy_accountant
    with open(os.path.join(records_dir, "canaries.json"), "w") as f:
        json.dump({"canaries": [{"repetitions": k} for k in (0, 1, 3, 2, 3)]}, f)
    p = finetune(small_cfg(records_dir, noise_multiplier=1.5, target_epsilon=None, max_steps=3),
                 model=tiny_model(block_size=48), **QUIET)["privacy"]
    groups = {g["k"]: g for g in p["group_privacy"]}
    assert sorted(groups) == [2, 3]
    for k, g in groups.items():
        probs = [math.comb(k, j) * 0.4 ** j * 0.6 ** (k - j) for j in range(k + 1)]
        acc = pld_privacy_accountant.PLDAccountant(value_discretization_interval=1e-3)
        acc.compose(dp_event.SelfComposedDpEvent(dp_event.MixtureOfGaussiansDpEvent(1.5, list(range(k + 1)), probs), 3))
        reference = acc.get_epsilon(p["delta"])
        assert reference <= g["epsilon"] <= reference * 1.05 and g["delta"] == p["delta"]  # coarse grid: upper bound
    assert p["epsilon"] < groups[2]["epsilon"] < groups[3]["epsilon"]


def test_budgets_compose_across_runs_on_the_same_data(records_dir, tiny_ckpt, tmp_path):
    first = tmp_path / "first"
    finetune(small_cfg(records_dir, base_ckpt=tiny_ckpt, noise_multiplier=1.2, target_epsilon=None, max_steps=4,
                       save=True, out_dir=str(first)), **QUIET)
    again = small_cfg(records_dir, base_ckpt=str(first / "ckpt.pt"), noise_multiplier=1.2, target_epsilon=None,
                      max_steps=4, save=True, out_dir=str(tmp_path / "second"))
    p = finetune(again, **QUIET)["privacy"]
    assert p["epsilon"] == pytest.approx(google_rdp_epsilon(1.2, 0.4, 8, p["delta"]), rel=0.01)  # 4 + 4 steps
    assert p["epsilon_this_run"] == pytest.approx(google_rdp_epsilon(1.2, 0.4, 4, p["delta"]), rel=0.01)
    assert [s["steps"] for s in p["history"]] == [4, 4]
    # a target covers the whole history: what is left of it stops the next run early, or refuses it
    e8, e9 = google_rdp_epsilon(1.2, 0.4, 8, p["delta"]), google_rdp_epsilon(1.2, 0.4, 9, p["delta"])
    capped = finetune({**again, "target_epsilon": (e8 + e9) / 2, "save": False}, **QUIET)["privacy"]
    assert capped["steps"] == 4 and capped["epsilon"] <= (e8 + e9) / 2
    with pytest.raises(UserError, match="already spent"):
        finetune({**again, "base_ckpt": str(tmp_path / "second" / "ckpt.pt"), "target_epsilon": p["epsilon"],
                  "save": False},
                 **QUIET)


def test_other_data_reports_its_own_epsilon_and_the_base_elsewhere(records_dir, tiny_ckpt, tmp_path):
    first = tmp_path / "first"
    finetune(small_cfg(records_dir, base_ckpt=tiny_ckpt, noise_multiplier=1.2, target_epsilon=None, max_steps=4,
                       save=True, out_dir=str(first)), **QUIET)
    other = make_record_dataset(tmp_path / "other", [f"Context: P{i}. Answer: {i * 7}" for i in range(10)])
    p = finetune(small_cfg(other, base_ckpt=str(first / "ckpt.pt"), noise_multiplier=1.2, target_epsilon=None,
                           max_steps=4), **QUIET)["privacy"]
    assert p["epsilon"] == pytest.approx(google_rdp_epsilon(1.2, 0.4, 4, p["delta"]), rel=0.01)
    elsewhere = p["base_trained_elsewhere"]
    assert "other data" in elsewhere["note"]
    assert elsewhere["epsilon_if_same_people"] == pytest.approx(google_rdp_epsilon(1.2, 0.4, 8, p["delta"]), rel=0.01)


def test_resume_continues_from_the_last_periodic_checkpoint(records_dir, tiny_ckpt, tmp_path):
    out = tmp_path / "run"
    cfg = small_cfg(records_dir, base_ckpt=tiny_ckpt, noise_multiplier=1.2, target_epsilon=None, max_steps=6,
                    save=True, out_dir=str(out), checkpoint_interval=2, log_interval=1)

    def crash_at_step_5(line):
        if line.startswith("step 5/"):
            raise KeyboardInterrupt("simulated crash")
    with pytest.raises(KeyboardInterrupt):
        finetune(cfg, log=crash_at_step_5)
    ckpt = torch.load(out / "ckpt.pt", weights_only=True)
    assert ckpt["iter_num"] == 4 and "optimizer" in ckpt and [s["steps"] for s in ckpt["privacy_history"]] == [4]
    events = [json.loads(line)["event"] for line in (out / "log.jsonl").read_text().splitlines()]
    assert events[0] == "config" and events.count("step") == 4  # written as the run went

    lines = []
    result = finetune({**cfg, "init_from": "resume", "base_ckpt": ""}, log=lines.append)
    p = result["privacy"]
    assert p["steps"] == 2 and [s["steps"] for s in p["history"]] == [4, 2]
    assert p["epsilon"] == pytest.approx(google_rdp_epsilon(1.2, 0.4, 6, p["delta"]), rel=0.01)
    assert any(line.startswith("resuming") for line in lines)
    events = [json.loads(line)["event"] for line in (out / "log.jsonl").read_text().splitlines()]
    assert "resume" in events and events[-1] == "done"
    assert torch.load(out / "ckpt.pt", weights_only=True)["iter_num"] == 6
    with pytest.raises(UserError, match="already finished"):
        finetune({**cfg, "init_from": "resume", "base_ckpt": ""}, **QUIET)
