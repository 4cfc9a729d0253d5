"""bench/utility.py (issue 17's harness): a tiny end-to-end matrix and sweep, the task's scoring, the
majority-class floor, the epsilon against dp-accounting, resuming, and bad input."""
import json
import os
from collections import Counter

import pytest
from dp_accounting import dp_event
from dp_accounting.rdp import rdp_privacy_accountant

from bench import utility
from utils.cli import UserError
from utils.data import offsets, tokens
from utils.tokenizer import ByteTokenizer

TINY = ["--n_persons=(40,)", "--n_heldout=20", "--methods=('full',)", "--epsilons=(8.0,)", "--n_layer=1",
        "--n_embd=32", "--n_head=2", "--steps=3", "--dp_steps=3", "--n_candidates=50", "--mia_records=10",
        "--resamples=100", "--canaries_per_rep=1", "--n_control_canaries=2", "--pretrain_n=30",
        "--pretrain_epochs=1.0"]


def tiny_args(tmp):
    return [f"--out_dir={tmp}/out", f"--results_dir={tmp}/results", *TINY]


@pytest.fixture(scope="module")
def matrix(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("utility")
    rows = utility.main(tiny_args(tmp))
    return tmp, rows


def people(data_dir, split):
    with open(os.path.join(data_dir, f"{split}_people.jsonl")) as f:
        return [json.loads(line) for line in f]


def test_matrix_writes_table_plots_and_sane_rows(matrix):
    tmp, rows = matrix
    assert [(r["method"], r["target_epsilon"]) for r in rows] == [("full", None), ("full", 8.0)]
    table = (tmp / "results" / "RESULTS.md").read_text()
    assert sum(line.startswith("| 40 | full |") for line in table.splitlines()) == 2
    assert "Machine (at report time):" in table and "wall time of the runs" in table
    for png in ("utility_vs_epsilon.png", "exposure_vs_epsilon.png"):
        assert (tmp / "results" / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    for r in rows:
        assert 0.0 <= r["accuracy_interval"][0] <= r["accuracy"] <= r["accuracy_interval"][1] <= 1.0
        assert r["n_scored"] == 20 and r["steps"] > 0 and r["val_loss"] > 0
        assert 0.0 <= r["mia_auc"] <= 1.0 and 0.0 <= r["mia_blind_auc"] <= 1.0 and r["exposure_gap_reps"] == 16


def test_base_is_pretrained_on_public_persons_without_the_department(matrix):
    tmp, _ = matrix
    with open(tmp / "out" / "data_n30_seed2027_public_base" / "meta.json") as f:
        meta = json.load(f)
    assert meta["fields"] == ["Job Titles", "Salary or Hourly"] and meta["seed"] == 2027
    assert meta["canaries"]["inserted_records"] == 0
    assert len(list((tmp / "out").glob("base_public30_block*/ckpt.pt"))) == 1


def test_dp_epsilon_within_target_and_matches_dp_accounting(matrix):
    _, rows = matrix
    (dp,) = [r for r in rows if r["target_epsilon"]]
    acc = rdp_privacy_accountant.RdpAccountant()
    acc.compose(dp_event.SelfComposedDpEvent(
        dp_event.PoissonSampledDpEvent(dp["sample_rate"], dp_event.GaussianDpEvent(dp["noise_multiplier"])), dp["steps"]))
    google = acc.get_epsilon(dp["delta"])
    assert dp["epsilon"] <= dp["target_epsilon"] + 1e-9
    assert abs(dp["epsilon"] - google) <= 0.05 * google


def test_majority_rate_is_the_train_majority_on_heldout_persons(matrix):
    tmp, _ = matrix
    data_dir = str(tmp / "out" / "data_n40_seed1337_schema")
    train = [p for p in people(data_dir, "train") if p.get("Department")]  # canaries have no Department
    held = people(data_dir, "val")
    top = Counter(p["Department"] for p in train).most_common(1)[0][0]
    assert utility.majority_rate(data_dir) == (top, sum(p["Department"] == top for p in held) / len(held))


def test_majority_rate_takes_the_class_from_train_and_skips_canaries(tmp_path):
    def write(split, rows):
        (tmp_path / f"{split}_people.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    canaries = [{"Name": f"C{i}", "Phone": f"555-000{i}"} for i in range(5)]  # more canaries than any department
    write("train", [{"Name": f"T{i}", "Department": d} for i, d in enumerate(["POLICE"] * 3 + ["FIRE"])] + canaries)
    write("val", [{"Name": f"V{i}", "Department": d} for i, d in enumerate(["POLICE"] + ["FIRE"] * 3)])
    assert utility.majority_rate(str(tmp_path)) == ("POLICE", 0.25)  # the held-out majority would be FIRE, 0.75


def test_task_prompts_end_at_the_department_question_after_the_title(matrix):
    tmp, _ = matrix
    data_dir = str(tmp / "out" / "data_n40_seed1337_schema")
    tok = ByteTokenizer()
    items = utility.task_prompts(data_dir, tok)
    held = people(data_dir, "val")
    assert [want for _, want in items] == [p["Department"] for p in held]
    for (ids, _), p in zip(items, held):
        text = tok.decode(ids)
        assert p["Job Titles"] + "\n" in text and text.endswith("department does " + p["Name"] + " work in? Answer:")
    # every trained record shows the task: its department line (the end of a task prompt) follows its title line
    ids, off = tokens(data_dir, "train"), offsets(data_dir, "train")
    records = [tok.decode([int(t) for t in ids[a:b - 1]]) for a, b in zip(off[:-1], off[1:])]
    with_both = [r for r in records if "job title?" in r and "department does" in r]
    assert len(with_both) >= 30 and all(r.index("job title?") < r.index("department does") for r in with_both)


def test_task_accuracy_counts_exact_first_lines(monkeypatch):
    tok = ByteTokenizer()
    items = [(tok.encode("q1"), "POLICE"), (tok.encode("q2"), "FIRE"), (tok.encode("q3"), "LAW")]
    answers = [" POLICE\nContext: x", " FIRE DEPT\n", " LAW"]  # right, wrong (longer), right (no newline)
    monkeypatch.setattr(utility, "complete", lambda model, prompts, *a, **k: [tok.encode(s) for s in answers])
    out = utility.task_accuracy(None, items, tok, 8)
    assert out["accuracy"] == pytest.approx(2 / 3) and out["n_scored"] == 3


def test_rerun_resumes_from_finished_runs(matrix, monkeypatch):
    tmp, rows = matrix

    def no_training(*a, **k):
        raise AssertionError("a finished run was trained again")
    monkeypatch.setattr(utility, "finetune", no_training)
    again = utility.main(tiny_args(tmp))
    assert [r["accuracy"] for r in again] == [r["accuracy"] for r in rows]


def test_a_changed_recipe_runs_again_and_keeps_the_earlier_run(tmp_path):
    first = utility.main(tiny_args(tmp_path))
    second = utility.main(tiny_args(tmp_path) + ["--dp_learning_rate=0.001"])
    dp = [r for r in second if r["target_epsilon"]]
    assert dp and all(r["learning_rate"] == 0.001 for r in dp)
    (kept,) = os.listdir(tmp_path / "out" / "runs" / "superseded")
    earlier = json.load(open(tmp_path / "out" / "runs" / "superseded" / kept))
    assert kept.startswith("n40_full_eps8.") and earlier["learning_rate"] == 3e-3
    assert earlier["accuracy"] == next(r for r in first if r["target_epsilon"])["accuracy"]


def test_repeated_cells_run_again_with_fresh_noise_and_report_the_spread(matrix):
    """repeat_cells: the cell's matrix run is run 1 (reused, not retrained), the others get their own tags
    and JSON; the spread table lists every run's accuracy and gap with the mean and sd."""
    tmp, rows = matrix
    again = utility.main(tiny_args(tmp) + ["--repeat_cells=((40, 'full', 8.0),)", "--repeats=2"])
    assert [r["accuracy"] for r in again] == [r["accuracy"] for r in rows]  # the matrix itself is reused
    done = json.load(open(tmp / "results" / "results.json"))
    (second,) = done["repeats"]
    assert second["tag"] == "n40_full_eps8_r2" and second["repeat"] == 2 and second["epsilon"] <= 8.0
    assert os.path.isfile(tmp / "out" / "runs" / "n40_full_eps8_r2.json")
    first = next(r for r in rows if r["target_epsilon"] == 8.0)
    table = (tmp / "results" / "RESULTS.md").read_text()
    accs = [first["accuracy"], second["accuracy"]]
    mean, sd = sum(accs) / 2, abs(accs[0] - accs[1]) / 2 ** 0.5
    assert "## Run-to-run spread (2 runs planned per cell; each row lists those finished)" in table
    assert f"| 40 | full | 8 | {accs[0]:.3f}, {accs[1]:.3f} | {mean:.3f} ± {sd:.3f} |" in table


def test_sweep_ranks_settings_on_public_seed_data(tmp_path):
    rows = utility.main(tiny_args(tmp_path) + ["--sweep=True", "--sweep_n=40", "--sweep_methods=('lora',)",
                                               "--sweep_batch_sizes=(8,)", "--sweep_steps=(2,)", "--sweep_clip=(0.1, 1.0)",
                                               "--sweep_learning_rates=(0.004,)"])
    table = (tmp_path / "results" / "sweep.md").read_text()
    assert "public_seed=2027" in table and table.count("| schema | answer | lora | 8 | 2 |") == 2
    assert (tmp_path / "results" / "sweep_frontier.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert all(isinstance(r["exposure_gap_bits"], float) for r in rows)  # the privacy side is ranked beside
    assert os.path.isdir(tmp_path / "out" / "data_n40_seed2027_schema")
    assert not os.path.exists(tmp_path / "out" / "data_n40_seed1337_schema")


@pytest.mark.parametrize("bad", ["--public_seed=1337", "--methods=('everything',)", "--nodp_methods=('fulll',)",
                                 "--epsilons=(0.0,)",
                                 "--n_persons=(3,)",
                                 "--pretrain_fields=('Job Titles', 'Department')", "--field_order=sorted",
                                 "--repeat_cells=((40, 'lora', 8.0),)", "--repeats=0",
                                 "--dp_lr_schedule=linear", "--dp_decay_fraction=0.0",
                                 "--dp_method_recipes={'freeze': {'lr_schedule': 'step'}}",
                                 "--dp_method_recipes={'freeze': {'lr': 0.1}}", "--dp_method_recipes={'all': {}}",
                                 "--dp_accountant=gdp", "--dp_method_recipes={'lora': {'accountant': 'prv'}}",
                                 "--dp_ema_decay=1.0", "--dp_method_recipes={'freeze': {'ema_decay': -0.1}}",
                                 "--sweep_ema_decays=(0.0,)", "--sweep_ema_decays=(1.0,)", "--loss_on=last"])
def test_bad_input_is_refused_before_work(tmp_path, bad):
    with pytest.raises(UserError):
        utility.main(tiny_args(tmp_path) + [bad])
    assert not os.path.exists(tmp_path / "out")


def test_report_only_trains_nothing_and_names_the_runs_not_finished(matrix, monkeypatch):
    tmp, rows = matrix

    def no_training(*a, **k):
        raise AssertionError("report_only trained a model")
    monkeypatch.setattr(utility, "finetune", no_training)
    again = utility.main(tiny_args(tmp) + ["--report_only=True", "--epsilons=(3.0, 8.0)"])
    assert [r["tag"] for r in again] == [r["tag"] for r in rows]
    table = (tmp / "results" / "RESULTS.md").read_text()
    assert "Not run yet (1 of 3 planned runs): N=40 full ε=3." in table
    utility.main(tiny_args(tmp) + ["--report_only=True", "--repeat_cells=((40, 'full', 8.0),)", "--repeats=4"])
    table = (tmp / "results" / "RESULTS.md").read_text()  # runs 3 and 4 of the repeated cell never ran
    assert "planned runs): " in table and "N=40 full ε=8 run 3, N=40 full ε=8 run 4." in table


def test_report_only_marks_an_earlier_recipes_run_and_keeps_it_out_of_the_spread(tmp_path, monkeypatch):
    """A recipe changed mid-matrix: the report shows the earlier recipe's run, marked (its own columns name its
    recipe), and never mixes its repeats into the new recipe's spread: they count as not run yet."""
    args = tiny_args(tmp_path) + ["--repeat_cells=((40, 'full', 8.0),)", "--repeats=2"]
    utility.main(args)
    monkeypatch.setattr(utility, "finetune", lambda *a, **k: pytest.fail("report_only trained a model"))
    rows = utility.main(args + ["--report_only=True", "--dp_learning_rate=0.001"])
    dp = next(r for r in rows if r["target_epsilon"])
    assert dp["earlier_recipe"] and dp["learning_rate"] == 3e-3
    assert not any(r.get("earlier_recipe") for r in rows if r["target_epsilon"] is None)
    table = (tmp_path / "results" / "RESULTS.md").read_text()
    assert "| constant † |" in table and "† 1 run(s) of an earlier recipe" in table and "N=40 full ε=8." in table
    assert "Run-to-run spread" not in table and "Not run yet (1 of 3 planned runs): N=40 full ε=8 run 2." in table
    assert json.load(open(tmp_path / "results" / "results.json"))["repeats"] == []
    assert not json.load(open(tmp_path / "out" / "runs" / "n40_full_eps8.json")).get("earlier_recipe")
    utility.main(args + ["--report_only=True", "--loss_on=last_answer"])  # another loss: no column, so the note names it
    table = (tmp_path / "results" / "RESULTS.md").read_text()
    assert "N=40 full no DP (loss on answer), N=40 full ε=8 (loss on answer)." in table


def test_a_finished_run_with_another_recipe_is_trained_again(matrix, monkeypatch):
    tmp, _ = matrix

    class Trained(Exception):
        pass

    def trained(cfg, model=None):
        raise Trained(cfg["learning_rate"])
    monkeypatch.setattr(utility, "finetune", trained)
    with pytest.raises(Trained) as e:
        utility.main(tiny_args(tmp) + ["--nodp_methods=()", "--dp_learning_rate=0.0123"])
    assert e.value.args == (0.0123,)


def test_a_method_recipe_replaces_the_dp_settings_of_that_methods_dp_runs_only(tmp_path, monkeypatch):
    """dp_method_recipes: freeze's DP runs (the matrix's and the repeats) get the wsd schedule and its decay
    share, full keeps the dp_* recipe, and no non-private run takes it; the table names each row's schedule."""
    seen = []

    def planned(cfg, base, d, n, m, e, *a, recipe=None, tag=None, **k):
        run = utility.run_config(cfg, d, n, m, e, recipe)
        seen.append((m, e, run.get("accountant"), run.get("lr_schedule"), run.get("decay_fraction"), tag))
    monkeypatch.setattr(utility, "run_one", planned)
    monkeypatch.setattr(utility, "base_model", lambda cfg, block: None)
    utility.run_matrix(utility.configure(utility.DEFAULTS, tiny_args(tmp_path) + [
        "--methods=('full', 'freeze')", "--nodp_methods=('full', 'freeze')", "--epsilons=(8.0,)",
        "--dp_method_recipes={'freeze': {'lr_schedule': 'wsd', 'decay_fraction': 0.3, 'accountant': 'pld'}}",
        "--repeat_cells=((40, 'freeze', 8.0),)", "--repeats=2"]))
    assert seen == [("full", None, None, None, None, None), ("full", 8.0, "rdp", "constant", None, None),
                    ("freeze", None, None, None, None, None), ("freeze", 8.0, "pld", "wsd", 0.3, None),
                    ("freeze", 8.0, "pld", "wsd", 0.3, "n40_freeze_eps8_r2")]
    assert utility.schedule_name({"lr_schedule": "wsd", "recipe": {"decay_fraction": 0.3}}) == "wsd (last 30%)"
    assert utility.schedule_name({"lr_schedule": "constant", "recipe": {}}) == "constant"


def test_the_table_names_each_dp_rows_schedule(matrix):
    tmp, rows = matrix
    table = (tmp / "results" / "RESULTS.md").read_text()
    dp = next(r for r in rows if r["target_epsilon"] == 8.0)
    assert (f"| 40 | full | 8 | {dp['epsilon']:.2f} | rdp | {dp['sample_rate']:.3f} | {dp['noise_multiplier']:.2f} | 3 "
            "| constant |") in table
    assert "| 40 | full | none | - | - | - | - | 3 | - |" in table


def test_only_nodp_methods_run_without_dp(tmp_path, monkeypatch):
    seen = []
    monkeypatch.setattr(utility, "run_one", lambda cfg, base, d, n, m, e, *a, **k: seen.append((m, e)))
    monkeypatch.setattr(utility, "base_model", lambda cfg, block: None)
    utility.run_matrix(utility.configure(utility.DEFAULTS, tiny_args(tmp_path) + [
        "--methods=('full', 'lora')", "--epsilons=(1.0, 8.0)"]))
    assert seen == [("full", None), ("full", 1.0), ("full", 8.0), ("lora", 1.0), ("lora", 8.0)]


def test_sweep_report_only_ranks_the_runs_of_every_grid(tmp_path, monkeypatch):
    args = tiny_args(tmp_path) + ["--sweep=True", "--sweep_n=40", "--sweep_methods=('full',)", "--sweep_batch_sizes=(8,)",
                                  "--sweep_clip=(0.1,)"]
    utility.main(args + ["--sweep_steps=(2,)", "--sweep_learning_rates=(0.004,)"])
    utility.main(args + ["--sweep_steps=(3,)", "--sweep_learning_rates=(0.001,)"])
    monkeypatch.setattr(utility, "finetune", lambda *a, **k: pytest.fail("report_only trained a model"))
    rows = utility.main(args + ["--report_only=True"])
    assert sorted((r["steps"], r["learning_rate"]) for r in rows) == [(2, 0.004), (3, 0.001)]
    assert (tmp_path / "results" / "sweep.md").read_text().count("| full | 8 |") == 2


def test_sweep_under_another_accountant_is_its_own_run(tmp_path, monkeypatch):
    """A PLD sweep run gets its own tag and row: it must not overwrite (or be mistaken for) the RDP run of
    the same grid point."""
    args = tiny_args(tmp_path) + ["--sweep=True", "--sweep_n=40", "--sweep_methods=('full',)", "--sweep_batch_sizes=(8,)",
                                  "--sweep_clip=(0.1,)", "--sweep_steps=(2,)", "--sweep_learning_rates=(0.004,)"]
    rdp = utility.main(args)[0]
    pld = utility.main(args + ["--dp_accountant=pld"])[0]
    assert pld["tag"] == rdp["tag"] + "_pld" and pld["recipe"]["accountant"] == "pld"
    assert os.path.isfile(tmp_path / "out" / "runs" / f"{rdp['tag']}.json")
    monkeypatch.setattr(utility, "finetune", lambda *a, **k: pytest.fail("report_only trained a model"))
    utility.main(args + ["--report_only=True"])
    table = (tmp_path / "results" / "sweep.md").read_text()
    assert table.count("| full | 8 | 2 |") == 2 and "| rdp |" in table and "| pld |" in table


def test_an_ema_recipe_reaches_the_dp_runs_of_its_method_and_names_itself(tmp_path, monkeypatch):
    """ema_decay in a method's recipe: that method's DP runs return the average of their iterates, the
    recipe (and so resuming) tells them from last-iterate runs, the table says so; a sweep run gets its own tag."""
    cfg = utility.configure(utility.DEFAULTS, tiny_args(tmp_path) + ["--dp_method_recipes={'freeze': {'ema_decay': 0.9}}"])
    data = utility.prepare_data(cfg, 40, cfg["seed"])
    recipe = cfg["dp_method_recipes"]["freeze"]
    freeze = utility.run_config(cfg, data, 40, "freeze", 8.0, recipe)
    assert freeze["ema_decay"] == 0.9 and utility.recipe_of(freeze)["ema_decay"] == 0.9
    for other in (utility.run_config(cfg, data, 40, "full", 8.0), utility.run_config(cfg, data, 40, "freeze", None)):
        assert "ema_decay" not in other and "ema_decay" not in utility.recipe_of(other)  # earlier runs still match
    assert utility.schedule_name({"lr_schedule": "constant", "recipe": utility.recipe_of(freeze)}) == "constant, EMA 0.9"
    args = tiny_args(tmp_path) + ["--sweep=True", "--sweep_n=40", "--sweep_methods=('full',)", "--sweep_batch_sizes=(8,)",
                                  "--sweep_clip=(0.1,)", "--sweep_steps=(2,)", "--sweep_learning_rates=(0.004,)",
                                  "--dp_ema_decay=0.5"]
    row = utility.main(args)[0]
    assert row["tag"].endswith("_ema0.5") and row["recipe"]["ema_decay"] == 0.5
    assert "| constant, EMA 0.5 |" in (tmp_path / "results" / "sweep.md").read_text()


def test_sweep_scores_averages_of_each_runs_iterates_as_their_own_rows(tmp_path, monkeypatch):
    """sweep_ema_decays: one DP run, a row per EMA of its iterates (the same epsilon) beside its own. A decay
    near 1 leaves the average at the base model and one near 0 at the last iterate: their scores are those
    models' scores, and the run's own row is untouched by the swap. A rerun reuses all rows."""
    args = tiny_args(tmp_path) + ["--sweep=True", "--sweep_n=40", "--sweep_methods=('full',)", "--sweep_batch_sizes=(8,)",
                                  "--sweep_clip=(0.1,)", "--sweep_steps=(3,)", "--sweep_learning_rates=(0.01,)",
                                  "--loss_on=last_answer", "--sweep_ema_decays=(1e-12, 0.999999999)"]
    run, last, frozen = utility.main(args)
    assert run["tag"].endswith("_last_answer") and run["recipe"]["loss_on"] == "last_answer"
    assert last["tag"] == run["tag"] + "_ema1e-12" and frozen["tag"] == run["tag"] + "_ema1"
    assert frozen["recipe"] == dict(run["recipe"], ema_decay=0.999999999) and frozen["averaged_from"] == run["tag"]
    assert frozen["epsilon"] == run["epsilon"] and frozen["val_loss"] is None
    keys = ("accuracy", "exposure_gap_bits", "mia_auc")
    assert [last[k] for k in keys] == pytest.approx([run[k] for k in keys])
    cfg = utility.configure(utility.DEFAULTS, args)
    data = utility.prepare_data(cfg, 40, cfg["public_seed"])
    base = utility.base_model(cfg, utility.longest_record(data))
    meta = utility.load_meta(data)
    tok = utility.get_tokenizer(meta)
    canaries = utility.prepare_canaries(os.path.join(data, "canaries.json"), tok, cfg["n_candidates"], cfg["seed"])
    at_base = utility.score(cfg, base.eval(), utility.task_prompts(data, tok), canaries, data, meta, tok)
    assert [frozen[k] for k in keys] == pytest.approx([at_base[k] for k in keys])
    assert (run["exposure_gap_bits"], run["accuracy"]) != (frozen["exposure_gap_bits"], frozen["accuracy"])  # it trained
    assert "| last_answer | full | 8 | 3 |" in (tmp_path / "results" / "sweep.md").read_text()
    monkeypatch.setattr(utility, "finetune", lambda *a, **k: pytest.fail("a finished sweep run trained again"))
    assert [r["tag"] for r in utility.main(args)] == [run["tag"], last["tag"], frozen["tag"]]
    with pytest.raises(UserError, match="set dp_ema_decay=0 with it"):
        utility.main(args + ["--dp_ema_decay=0.9"])
