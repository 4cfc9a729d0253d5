"""test_pipeline/mia.py: the attacks on a memorizing model (AUC well above 0.5) and on the untrained base
(AUC near 0.5), its threshold and bad input. (The scores and statistics: tests/test_membership.py.)"""
import json
import os
import subprocess
import sys

import pytest

from tests.conftest import REPO
from utils.cli import run_cli
from tests.test_leakage import build_employees, fine_tune, save_base
from test_pipeline import mia

PY = sys.executable


def mia_cli(*args):
    cmd = [PY, os.path.join(REPO, "test_pipeline", "mia.py"), *map(str, args)]
    return subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=600)


# ---------------------------------------------------------------- on real models
@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("mia")
    data_dir = build_employees(root / "employees", n_train=50, n_val=50, canary_reps=(4, 0), seed=1)
    base = save_base(root / "base" / "ckpt.pt", seed=1)
    fine_tune(base, data_dir, root / "ft", max_steps=100)
    return dict(data_dir=data_dir, base=base, ft=str(root / "ft" / "ckpt.pt"), root=root)


def test_memorizing_model_is_attackable_and_the_base_is_not(models, tmp_path):
    m = models
    r = mia_cli(f"--ckpt={m['ft']}", f"--ref_ckpt={m['base']}", f"--data_dir={m['data_dir']}",
                f"--out={tmp_path / 'ft.json'}", f"--plot={tmp_path / 'roc.png'}")
    assert r.returncode == 0, r.stderr
    assert "TPR@1%FPR" in r.stdout and "min_k_pp" in r.stdout
    ft = json.loads((tmp_path / "ft.json").read_text())["metrics"]
    assert set(ft) == {"loss", "zlib", "min_k", "min_k_pp", "reference"}
    assert ft["loss"]["auc"] > 0.8 and ft["reference"]["auc"] > 0.8 and ft["min_k_pp"]["auc"] > 0.7
    assert (tmp_path / "roc.png").read_bytes()[:4] == b"\x89PNG"

    r = mia_cli(f"--ckpt={m['base']}", f"--ref_ckpt={m['base']}", f"--data_dir={m['data_dir']}",
                f"--out={tmp_path / 'base.json'}")
    assert r.returncode == 0, r.stderr
    base = json.loads((tmp_path / "base.json").read_text())["metrics"]
    for attack in ("loss", "zlib", "min_k", "min_k_pp"):
        assert abs(base[attack]["auc"] - 0.5) < 0.2, (attack, base[attack]["auc"])
    assert base["reference"]["auc"] == 0.5  # the model is its own reference: every score is 0
    ft_rep, base_rep = (json.loads((tmp_path / f).read_text()) for f in ("ft.json", "base.json"))
    assert ft_rep["selected"]["verdict"] == "member > non-member" and ft_rep["selected"]["n_members"] == 25
    assert base_rep["selected"]["auc_interval"][0] < 0.5 and not base_rep["blind"]["biased_split"]
    assert ft_rep["resamples"] == 1000 and len(ft_rep["metrics"]["loss"]["auc_interval"]) == 2


def test_auc_threshold_and_bad_input(models, tmp_path, capsys):
    m = models
    r = mia_cli(f"--ckpt={m['ft']}", f"--data_dir={m['data_dir']}", "--max_auc=0.6", "--score_tokens=answer")
    assert r.returncode == 1 and "FAIL: loss: AUC" in r.stderr
    for argv, words in (([f"--ckpt={m['ft']}", f"--data_dir={tmp_path}"], "no prepared data"),
                        ([f"--data_dir={m['data_dir']}"], "--ckpt"),
                        ([f"--ckpt={m['ft']}", f"--data_dir={m['data_dir']}", "--score_tokens=some"], "score_tokens"),
                        ([f"--ckpt={m['ft']}", f"--data_dir={m['data_dir']}", "--n_records=-5"], "--n_records")):
        with pytest.raises(SystemExit) as e:
            run_cli(mia.main, argv)
        err = capsys.readouterr().err
        assert e.value.code == 2 and err.startswith("error:") and words in err and err.count("\n") == 1
