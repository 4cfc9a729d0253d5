"""utils/model_leakage.py: extraction bookkeeping on a stub decoder. (The whole leakage report on a
memorizing model, a patch and a wrong key: tests/test_leakage.py.)"""
from tests.conftest import tiny_model
from utils import model_leakage as ml


def test_extraction_rates_count_exact_first_lines(monkeypatch):
    """The bookkeeping on a stub decoder: training people's answers come back exactly, held-out ones don't."""
    from utils.tokenizer import ByteTokenizer
    tok = ByteTokenizer()
    items = [("train", "Annual Salary", tok.encode("Context: A. Question: pay? Answer:"), "100.00"),
             ("train", "Hourly Rate", tok.encode("Context: B. Question: rate? Answer:"), "12.50"),
             ("val", "Annual Salary", tok.encode("Context: C. Question: pay? Answer:"), "300.00")]
    replies = {tuple(items[0][2]): " 100.00\nContext: more", tuple(items[1][2]): " 12.5\n",
               tuple(items[2][2]): " 999.00\n"}
    monkeypatch.setattr(ml, "complete", lambda model, prompts, *a, **k: [tok.encode(replies[tuple(p)]) for p in prompts])
    cfg = dict(gen_batch_size=64, n_samples=3, temperature=1.0, top_k=0, seed=1337)
    e = ml.extraction_rates(tiny_model(), tok, items, cfg)
    assert e["train"]["greedy"] == 0.5 and e["val"]["greedy"] == 0.0 and e["greedy_gap"] == 0.5
    assert e["train"]["by_field"]["Annual Salary"]["sampled"] == 1.0 and e["train"]["by_field"]["Hourly Rate"]["sampled_any"] == 0.0
