"""utils/synthetic_utility.py: the distances, the DP histogram baseline (its epsilon checked against
dp-accounting) and the downstream scorer."""
import random

import numpy as np
import pytest

import utils.synthetic_utility as U
from tests.conftest import tiny_model
from utils.records import Schema
from utils.tokenizer import ByteTokenizer


def test_distances():
    assert U.tv(["a", "b", "a"], ["a", "a", "b"]) == 0
    assert U.tv(["a"], ["b"]) == 1
    assert U.tv([("a", 1), ("a", 2)], [("a", 1), ("a", 1)]) == pytest.approx(0.5)
    assert U.ks([1, 2, 3], [1, 2, 3]) == 0 and U.ks([1, 2], [10, 20]) == 1


@pytest.mark.parametrize("epsilon,delta", [(1.0, 1e-6), (8.0, 1e-6), (3.0, 1e-5)])
def test_dp_histogram_noise_gives_the_claimed_epsilon(epsilon, delta):
    from dp_accounting import dp_event, rdp
    sigma = U.gaussian_sigma(epsilon, delta)
    acc = rdp.RdpAccountant(list(np.linspace(1.01, 200, 2000)))
    acc.compose(dp_event.GaussianDpEvent(sigma))  # sensitivity 1: one person moves one count by 1
    theirs = acc.get_epsilon(delta)
    assert theirs <= epsilon * 1.001 and theirs >= 0.97 * epsilon


def test_histogram_baseline_is_accurate_at_large_epsilon_and_noisy_at_small():
    rng = np.random.default_rng(0)
    people = [{"D": random.Random(i).choice("AAAB"), "F": "x", "S": float(i % 50) * 1000} for i in range(400)]
    domains = {"D": ["A", "B", "C"], "F": ["x", "y"]}
    bins = {"S": (0.0, 50000.0, 10)}
    sharp = U.histogram_baseline(people, ["D", "F"], domains, ["S"], bins, 50.0, 1e-6, 400, rng)
    blunt = U.histogram_baseline(people, ["D", "F"], domains, ["S"], bins, 0.01, 1e-6, 400, rng)
    assert sharp["D"][0] < 0.01 and sharp["D x F"][0] < 0.01 and sharp["S"][0] < 0.15
    assert blunt["D"][0] > 0.05  # sigma ~ 500 on counts of ~100
    assert set(sharp) == {"D", "F", "S", "D x F"}


def test_field_accuracy_picks_the_most_likely_public_value():
    schema = Schema("Name", ["F"], {"F": ["What is {name}'s F?"]}, categorical=["F"])
    people = [{"Name": f"P{i}", "F": "yes" if i % 3 else "no"} for i in range(9)]
    model = tiny_model(block_size=64)
    acc = U.field_accuracy(model, ByteTokenizer(), schema, people, ["F"], {"F": ["yes", "no"]})
    # a model that always prefers one value scores that value's share: 6/9 or 3/9
    assert acc["F"] in (pytest.approx(6 / 9), pytest.approx(3 / 9)) and acc["mean"] == acc["F"]
