"""The privacy_audit CLI: a planted bug (10x less noise than claimed) certifies more than the claim,
prints FAIL and exits 1, with the JSON report and the plot written; bad settings are one-line errors.
What the audit measures is tested in test_dp_audit.py."""
import json

import pytest

from tests.test_leakage import build_employees, save_base
from test_pipeline import privacy_audit as pa
from utils.cli import run_cli

COMMON = ["--eval_interval=0", "--log_interval=1000", "--microbatch_size=64", "--learning_rate=1e-3",
          "--max_steps=20", "--m_input=0"]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("audit")
    data_dir = build_employees(root / "employees", n_train=20, n_val=10, canary_reps=())
    return dict(root=root, common=[f"--base_ckpt={save_base(root / 'base' / 'ckpt.pt')}", f"--data_dir={data_dir}"])


def test_power_check_ten_times_less_noise_exits_1_with_report_and_plot(setup, capsys):
    out, plot = setup["root"] / "broken.json", setup["root"] / "broken.png"
    with pytest.raises(SystemExit) as e:
        run_cli(pa.main, [*setup["common"], *COMMON, "--target_epsilon=8", "--m=4000", "--noise_bug_factor=0.1",
                          f"--out={out}", f"--plot={plot}"])
    captured = capsys.readouterr()
    assert e.value.code == 1 and "FAIL: the audit's lower bound" in captured.err and "PLANTED BUG" in captured.out
    assert "eps lower (f-DP)" in captured.out and "max certifiable" in captured.out
    rep = json.loads(out.read_text())
    assert rep["white_box"]["epsilon_lower"] > rep["claimed_epsilon"] > 7.5 and not rep["passed"]
    assert rep["config"]["noise_bug_factor"] == 0.1 and plot.read_bytes()[:4] == b"\x89PNG"


def test_bad_audit_settings_are_one_line_errors(setup, capsys):
    for argv, words in ((["--m=1"], "m must be"), (["--dp=False", "--m_input=0"], "nothing to audit"),
                        (["--noise_bug_factor=2.0"], "noise_bug_factor"), (["--k_fractions=(0.9,)"], "k_fractions"),
                        (["--confidence=1.5"], "confidence"), (["--mm=3"], "unknown config key")):
        with pytest.raises(SystemExit) as e:
            run_cli(pa.main, setup["common"] + argv)
        err = capsys.readouterr().err
        assert e.value.code == 2 and err.startswith("error:") and words in err and err.count("\n") == 1
