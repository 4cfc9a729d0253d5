"""utils/quality_metrics.py: BLEU and ROUGE-L against the libraries and by hand, the sliding-window
perplexity against direct computation, repetition by hand, Q/A scoring and the bias probe with stub and
tiny models. (eval.py's command line end to end: tests/test_eval.py.)"""
import math

import pytest
import torch
import torch.nn.functional as F

from tests.conftest import tiny_model
from utils import quality_metrics as ev
from utils.tokenizer import ByteTokenizer


# ---------------------------------------------------------------- BLEU / ROUGE-L
HYPS = ["the cat sat on the mat", "POLICE OFFICER", "a quick brown fox jumps", "95028.00"]
REFS = ["the cat is on the mat", "POLICE OFFICER", "the quick brown fox jumped over", "95028.00"]


def test_bleu_and_rouge_equal_the_libraries():
    import sacrebleu
    from rouge_score import rouge_scorer
    ours = ev.bleu(HYPS, REFS)
    direct = sacrebleu.metrics.BLEU(effective_order=True).corpus_score(HYPS, [REFS])
    assert ours["score"] == pytest.approx(direct.score, abs=1e-9)
    assert 0 < ours["score"] < 100
    assert "eff:yes" in ours["signature"] and "tok:13a" in ours["signature"] and f"version:{sacrebleu.__version__}" in ours["signature"]
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    expected = sum(scorer.score(r, h)["rougeL"].fmeasure for h, r in zip(HYPS, REFS)) / len(HYPS)
    assert ev.rouge_l(HYPS, REFS) == pytest.approx(expected, abs=1e-12)
    # the argument order matters for ROUGE-L precision vs recall but not F; check a hand case
    assert ev.rouge_l(["the cat"], ["the cat sat"]) == pytest.approx(2 * 1.0 * (2 / 3) / (1 + 2 / 3))


def test_bleu_rouge_hand_cases():
    same = ["the cat sat on the mat today"]
    assert ev.bleu(same, same)["score"] == pytest.approx(100.0)
    assert ev.rouge_l(same, same) == pytest.approx(1.0)
    assert ev.bleu(["dog runs fast away now"], ["the cat sat on mat"])["score"] == pytest.approx(0.0)
    assert ev.rouge_l(["dog runs"], ["the cat"]) == 0.0


# ---------------------------------------------------------------- perplexity
def direct_nll(model, ids):
    """Exact NLL of a sequence that fits one forward."""
    x = torch.tensor(ids[:-1])[None]
    logits, _ = model(x)
    return F.cross_entropy(logits[0], torch.tensor(ids[1:]), reduction="sum").item()


@torch.no_grad()
def test_sliding_window_equals_exact_perplexity_when_text_fits():
    m = tiny_model(block_size=64).eval()
    ids = torch.randint(0, 257, (50,), generator=torch.Generator().manual_seed(0)).tolist()
    exact = direct_nll(m, ids)
    for stride in (1, 7, 32, 64):
        nll, n = ev.sliding_window_nll(m, [ids], stride, batch_size=4)
        assert n == len(ids) - 1
        assert nll == pytest.approx(exact, rel=1e-5)
    ppl = ev.perplexity(m, [ids], 16)
    assert ppl["ppl"] == pytest.approx(math.exp(exact / 49), rel=1e-5)


@torch.no_grad()
def test_sliding_window_on_long_text_scores_every_token_once_with_the_stated_context():
    bs = 16
    m = tiny_model(block_size=bs).eval()
    ids = torch.randint(0, 257, (70,), generator=torch.Generator().manual_seed(1)).tolist()
    # stride == block_size: disjoint chunks, each token sees only its chunk
    chunks = sum(direct_nll(m, ids[b:min(b + bs + 1, len(ids))]) for b in range(0, len(ids) - 1, bs))
    nll, n = ev.sliding_window_nll(m, [ids], bs, batch_size=3)
    assert n == len(ids) - 1 and nll == pytest.approx(chunks, rel=1e-5)
    # stride 1: every token sees the full block_size tokens before it (or all of them near the start)
    full = 0.0
    for t in range(1, len(ids)):
        ctx = ids[max(0, t - bs):t]
        logits, _ = m(torch.tensor(ctx)[None], last_only=True)
        full -= F.log_softmax(logits[0, -1], -1)[ids[t]].item()
    nll1, n1 = ev.sliding_window_nll(m, [ids], 1, batch_size=8)
    assert n1 == len(ids) - 1 and nll1 == pytest.approx(full, rel=1e-5)
    assert abs(nll1 - nll) > 1e-3  # more context changes the score: the two strides really differ
    # intermediate strides score every token once too, whatever the batch size
    for stride in (3, 5, 11):
        windows = list(ev.sliding_windows(ids, bs, stride))
        assert sum(int((y >= 0).sum()) for _, y in windows) == len(ids) - 1
        assert all(len(x) <= bs for x, _ in windows)
        a, _ = ev.sliding_window_nll(m, [ids], stride, batch_size=1)
        b, _ = ev.sliding_window_nll(m, [ids, ids[:9]], stride, batch_size=64)
        assert b - a == pytest.approx(direct_nll(m, ids[:9]), rel=1e-4)
    with pytest.raises(ValueError):
        list(ev.sliding_windows(ids, bs, bs + 1))


# ---------------------------------------------------------------- repetition
def test_repetition_stats_by_hand():
    s = ev.repetition_stats(["a a a a"])
    assert s["distinct_1"] == pytest.approx(1 / 4)
    assert s["distinct_2"] == pytest.approx(1 / 3)
    assert s["rep_2"] == pytest.approx(2 / 3) and s["rep_3"] == pytest.approx(1 / 2)
    s = ev.repetition_stats(["a b c d", "a b e f"])
    assert s["distinct_1"] == pytest.approx(6 / 8)  # corpus-level: a and b repeat across texts
    assert s["rep_2"] == 0.0 and s["rep_3"] == 0.0  # ... but not within a text
    assert math.isnan(ev.repetition_stats(["one"])["rep_2"])


# ---------------------------------------------------------------- Q/A scoring and bias with stubs
PEOPLE = [
    {"Name": "Ana Diaz", "Job Titles": "LIBRARIAN I", "Department": "PUBLIC LIBRARY", "Full or Part-Time": "F",
     "Salary or Hourly": "Salary", "Typical Hours": None, "Annual Salary": 70008.0, "Hourly Rate": None},
    {"Name": "Bo Chen", "Job Titles": "CROSSING GUARD", "Department": "POLICE", "Full or Part-Time": "P",
     "Salary or Hourly": "Hourly", "Typical Hours": 20, "Annual Salary": 19760.0, "Hourly Rate": 19.0},
]


def oracle(fields_right):
    """A stub model: the record's answer for the given fields, a wrong answer for every other field."""
    from utils import employees

    def complete_fn(prompts, sample=None):
        out = []
        for pr in prompts:
            p = next(p for p in PEOPLE if p["Name"] in pr)
            f = next(f for f in employees.FIELDS if any(employees.qa_prompt(p, f, t) == pr for t in range(employees.N_TEMPLATES)))
            out.append(" " + employees.answer(p, f) if f in fields_right else " WRONG")
        return out
    return complete_fn


def test_qa_accuracy_scores_against_the_record():
    r = ev.qa_accuracy(oracle({"Department"}), PEOPLE)
    assert r["per_field"]["Department"]["exact_match"] == 1.0
    assert r["per_field"]["Annual Salary"]["exact_match"] == 0.0
    assert r["per_field"]["Hourly Rate"]["n"] == 1  # Ana has no hourly rate: not asked
    n = sum(v["n"] for v in r["per_field"].values())
    assert r["n"] == n and r["exact_match"] == pytest.approx(2 / n)
    from utils.employees import FIELDS
    perfect = ev.qa_accuracy(oracle(set(FIELDS)), PEOPLE)
    assert perfect["exact_match"] == 1.0 and perfect["rouge_l"] == pytest.approx(1.0)
    assert perfect["bleu"] == pytest.approx(100.0)


def test_swap_pronouns():
    assert ev.swap_pronouns("He gave her his book. She thanked him.") == "She gave his her book. He thanked her."
    assert ev.swap_pronouns("The theme is other") == "The theme is other"  # whole words only


def test_bias_probe_identical_names_give_no_gap_and_different_names_are_scored():
    m = tiny_model(block_size=128).eval()
    tok = ByteTokenizer()
    same = ev.bias_probe(m, tok, PEOPLE, ["Mary Johnson"], ["Mary Johnson"], max_new_tokens=4)
    assert same["n_pairs"] == 5 + 7  # Ana has no typical hours or hourly rate; no prompt has a pronoun
    o = same["overall"]
    assert o["flip_rate"] == 0.0 and o["mean_abs_logprob_gap"] < 1e-4 and o["tv_distance"] < 1e-5
    diff = ev.bias_probe(m, tok, PEOPLE, ["Mary Johnson"], ["James Johnson"], max_new_tokens=4)
    assert diff["overall"]["mean_abs_logprob_gap"] > 1e-6
    assert 0.0 <= diff["overall"]["tv_distance"] <= 1.0
    assert "Department (name)" in diff["per_field"]
