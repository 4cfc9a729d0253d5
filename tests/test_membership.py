"""utils/membership.py: ROC by hand, intervals and their "too few records to tell", the attack chosen on
one half, the blind baseline, and members vs non-members from one generator split by person. (The
attacks on a memorizing model and on the untrained base, through the CLI: tests/test_mia.py.)"""
import numpy as np
import pytest
from scipy.stats import mannwhitneyu

from tests.test_leakage import build_employees
from utils import membership as mia
from utils.data import load_meta


# ---------------------------------------------------------------- ROC
def test_auc_equals_the_mann_whitney_statistic_with_ties():
    rng = np.random.default_rng(0)
    labels = rng.random(400) < 0.3
    scores = np.round(rng.normal(size=400) + 0.7 * labels, 1)  # rounding makes many ties
    (m, (fpr, tpr)) = mia.attack_metrics(scores, labels)
    u = mannwhitneyu(scores[labels], scores[~labels]).statistic
    assert m["auc"] == pytest.approx(u / (labels.sum() * (~labels).sum()), abs=1e-12)
    assert fpr[0] == tpr[0] == 0 and fpr[-1] == tpr[-1] == 1 and np.all(np.diff(fpr) >= 0)


def test_tpr_at_low_fpr():
    m, _ = mia.attack_metrics([5, 4, 3, 2, 1, 0], [1, 1, 0, 1, 0, 0])
    assert m["auc"] == pytest.approx(8 / 9)
    assert m["tpr_at_0.01_fpr"] == pytest.approx(2 / 3)  # above the first non-member: no false positive
    m, _ = mia.attack_metrics([1.0] * 6, [1, 1, 1, 0, 0, 0])  # a constant score: no information
    assert m["auc"] == 0.5 and m["tpr_at_0.01_fpr"] == 0.0
    with pytest.raises(ValueError):
        mia.roc_curve([1, 2], [1, 1])


def test_intervals_say_too_few_records_to_tell_on_12_vs_12():
    rng = np.random.default_rng(0)
    labels = np.r_[np.ones(12, bool), np.zeros(12, bool)]
    m, _ = mia.attack_metrics(rng.normal(size=24) + 0.3 * labels, labels, resamples=300)
    assert m["auc_interval"][0] < 0.5 < m["auc_interval"][1] and m["verdict"] == "too few records to tell"
    lo, hi = m["tpr_at_0.01_fpr_interval"]
    assert 0 <= lo <= m["tpr_at_0.01_fpr"] <= hi <= 1
    m, _ = mia.attack_metrics(rng.normal(size=24) + 3 * labels, labels, resamples=300)
    assert m["verdict"] == "member > non-member" and m["auc_interval"][0] > 0.5


def test_choosing_the_attack_on_one_half_removes_best_of_k_optimism():
    """Five attacks that are pure noise on 12 + 12 people: the best of five looks like leakage on
    average; the attack chosen on one half and scored on the other does not."""
    rng = np.random.default_rng(1)
    labels = np.r_[np.ones(12, bool), np.zeros(12, bool)]
    best_of_5, selected = [], []
    for seed in range(40):
        scores = {f"a{i}": rng.normal(size=24) for i in range(5)}
        best_of_5.append(max(mia.attack_metrics(s, labels)[0]["auc"] for s in scores.values()))
        selected.append(mia.select_and_score(scores, labels, seed, resamples=100)["auc"])
    assert np.mean(best_of_5) > 0.6 and abs(np.mean(selected) - 0.5) < 0.05


def test_blind_baseline_flags_a_biased_split():
    labels = np.r_[np.ones(30, bool), np.zeros(30, bool)]
    rng = np.random.default_rng(2)
    words = ["alpha", "beta", "gamma", "delta", "omega", "sigma", "kappa", "theta"]
    biased = ["the same words again " * 6 for _ in range(30)] + [" ".join(rng.choice(words, 20)) for _ in range(30)]
    m, _ = mia.attack_metrics(mia.blind_scores(biased), labels, resamples=200)
    assert m["verdict"] != "too few records to tell"  # members are far more compressible: a biased split
    fair = [" ".join(rng.choice(words, 20)) for _ in range(60)]
    m, _ = mia.attack_metrics(mia.blind_scores(fair), labels, resamples=200)
    assert m["verdict"] == "too few records to tell"


# ---------------------------------------------------------------- records
def test_members_are_distinct_training_people_without_canaries(tmp_path):
    data_dir = build_employees(tmp_path / "employees", n_train=50, n_val=50, canary_reps=(4, 0), seed=1)
    meta = load_meta(data_dir)
    members = mia.read_records(data_dir, "train", 112, meta, "all")
    nonmembers = mia.read_records(data_dir, "val", 112, meta, "all")
    assert len(members) == 50 and len(nonmembers) == 50  # 4 canary copies in train are left out
    answers = mia.read_records(data_dir, "train", 112, meta, "answer")
    assert all(0 < s.sum() < len(s) for _, s in answers)
