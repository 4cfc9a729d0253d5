"""utils.privacy_ledger against Google's dp-accounting: both neighbouring relations, composition of
segments, calibration that never exceeds the target, group privacy, and a salted dataset fingerprint."""
import hashlib
import math

import pytest
from dp_accounting import dp_event
from dp_accounting.pld import pld_privacy_accountant
from dp_accounting.privacy_accountant import NeighboringRelation
from dp_accounting.rdp import rdp_privacy_accountant

from utils import privacy_ledger as L


def google(triples, delta, relation=None):
    event = dp_event.ComposedDpEvent([dp_event.SelfComposedDpEvent(
        dp_event.PoissonSampledDpEvent(q, dp_event.GaussianDpEvent(s)), n) for s, q, n in triples])
    acc = (rdp_privacy_accountant.RdpAccountant() if relation is None
           else pld_privacy_accountant.PLDAccountant(relation))
    acc.compose(event)
    return acc.get_epsilon(delta)


def test_both_relations_and_composition_match_dp_accounting():
    shipped = [(0.7239, 64 / 962, 45)]
    replace = L.epsilon(shipped, 1e-5, "replace_one", "pld")
    assert replace == pytest.approx(google(shipped, 1e-5, NeighboringRelation.REPLACE_ONE), rel=1e-9)
    assert replace > 8.0  # the figure: the shipped config is over its target under replace-one
    history = [(1.1, 0.05, 30), (0.9, 0.08, 20)]
    assert L.epsilon(history, 1e-5) == pytest.approx(google(history, 1e-5), rel=1e-3)
    assert L.epsilon(history, 1e-5) > L.epsilon(history[:1], 1e-5)
    with pytest.raises(ValueError, match="pld"):
        L.epsilon(shipped, 1e-5, "replace_one", "rdp")


def test_calibration_stays_within_the_target_over_the_whole_history():
    before = [(1.0, 0.1, 20)]
    sigma = L.calibrate_noise(6.0, before, 0.1, 20, 1e-5, "add_remove", "rdp")
    eps = L.epsilon(before + [(sigma, 0.1, 20)], 1e-5)
    assert 5.9 < eps <= 6.0
    assert L.epsilon(before + [(sigma * 0.99, 0.1, 20)], 1e-5) > 6.0  # the smallest such sigma, to 1%
    assert L.calibrate_noise(0.5, before, 0.1, 20, 1e-5, "add_remove", "rdp") is None  # already spent
    assert L.steps_within(6.0, before, sigma, 0.1, 40, 1e-5, "add_remove", "rdp") == 20


def test_group_privacy_of_k_copies():
    seg = [dict(noise_multiplier=1.0, sample_rate=0.1, steps=10)]
    one = L.group_epsilon(seg, 1, 1e-5)
    assert one == pytest.approx(google([(1.0, 0.1, 10)], 1e-5, NeighboringRelation.ADD_OR_REMOVE_ONE), rel=1e-2)
    two, four = L.group_epsilon(seg, 2, 1e-5), L.group_epsilon(seg, 4, 1e-5)
    assert one < two < four
    # tighter than the generic conversion: (2 eps, 2 e^eps delta) for a group of 2
    assert L.group_epsilon(seg, 2, 2 * math.exp(one) * 1e-5) < 2 * one


def test_fingerprint_is_salted_and_tracks_the_data(records_dir, tmp_path):
    fp = L.dataset_fingerprint(records_dir)
    assert fp == L.dataset_fingerprint(records_dir) and fp.startswith("hmac-sha256:")
    with open(f"{records_dir}/train.bin", "rb") as f:
        plain = hashlib.sha256(f.read()).hexdigest()
    assert plain not in fp
    with open(f"{records_dir}/train.bin", "r+b") as f:
        f.write(b"\x01")
    assert L.dataset_fingerprint(records_dir) != fp
