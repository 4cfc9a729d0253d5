"""test_pipeline/eval.py: the command line end to end on a tiny model and its exit codes. (The metrics
themselves: tests/test_quality_metrics.py.)"""
import importlib.util
import json
import os
import subprocess
import sys

import pytest

from tests.conftest import REPO, tiny_model
from utils.checkpoint import save_checkpoint
from test_pipeline import eval as ev

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def cli_env():
    return {**os.environ, "OMP_NUM_THREADS": "1"}


def prepare_employees(out_dir, n_people=24, fields="Department,Full or Part-Time"):
    """A tiny byte-level employees dataset through the real prepare script (short records: 2 fields)."""
    spec = importlib.util.spec_from_file_location("employees_prepare", os.path.join(REPO, "data", "employees", "prepare.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    mod.main(["--tokenizer=byte", f"--out_dir={out_dir}", f"--n_people={n_people}", "--val_frac=0.25",
              f"--fields={fields}", "--canary_reps=4,", "--canaries_per_rep=1", "--n_control_canaries=1"])
    return str(out_dir)


@pytest.fixture(scope="module")
def employees_dir(tmp_path_factory):
    return prepare_employees(tmp_path_factory.mktemp("emp") / "employees")


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    d = tmp_path_factory.mktemp("ckpts")
    save_checkpoint(d / "base" / "ckpt.pt", tiny_model(block_size=128), iter_num=0)
    save_checkpoint(d / "ft" / "ckpt.pt", tiny_model(seed=1, block_size=128), iter_num=0)
    return str(d / "base" / "ckpt.pt"), str(d / "ft" / "ckpt.pt")


# ---------------------------------------------------------------- the CLI end to end
def test_eval_runs_end_to_end(employees_dir, ckpts, tmp_path, capsys):
    base, ft = ckpts
    out = tmp_path / "eval.json"
    code = ev.main([f"--ckpt={ft}", f"--data_dir={employees_dir}", f"--base_ckpt={base}",
                    f"--base_data_dir={employees_dir}", "--max_people=3", "--bias_people=2", "--rep_prompts=2",
                    "--rep_new_tokens=12", "--max_new_tokens=8", "--stride=32", f"--out={out}",
                    f"--plot_dir={tmp_path / 'plots'}"])
    assert code == 0
    text = capsys.readouterr().out
    assert "sacrebleu signature" in text and "Forgetting" in text
    r = json.loads(out.read_text())
    assert r["perplexity"]["ppl"] > 1 and r["perplexity"]["stride"] == 32
    assert set(r["repetition"]) == {"greedy", "top_k=40", "top_p=0.9"}
    assert r["forgetting"]["ppl_before"] != r["forgetting"]["ppl_after"]  # two different models
    assert "version:" in r["qa"]["bleu_signature"]
    for path in r["plots"]:
        with open(path, "rb") as f:
            assert f.read(8) == PNG_MAGIC


def test_eval_cli_exit_codes(employees_dir, ckpts):
    _, ft = ckpts
    cmd = [sys.executable, os.path.join(REPO, "test_pipeline", "eval.py"), f"--ckpt={ft}",
           f"--data_dir={employees_dir}", "--metrics=perplexity", "--max_ppl=1.5"]
    p = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, env=cli_env())
    assert p.returncode == 1, p.stderr  # an untrained model's perplexity is far above 1.5
    assert "FAILED" in p.stdout and "Perplexity" in p.stdout
    p = subprocess.run(cmd[:-1] + ["--metrics=perplexity,colour"], capture_output=True, text=True, cwd=REPO,
                       env=cli_env())
    assert p.returncode == 2 and p.stderr.startswith("error: unknown metrics") and "Traceback" not in p.stderr
