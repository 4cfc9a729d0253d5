"""Shared fixtures: tiny byte-level models and record datasets built in a temp folder, in seconds."""
import os
import random
import sys

import pytest
import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)

from model import GPT, GPTConfig  # noqa: E402
from utils.checkpoint import save_checkpoint  # noqa: E402
from utils.data import write_meta, write_split  # noqa: E402
from utils.tokenizer import ByteTokenizer  # noqa: E402

torch.set_num_threads(1)  # tiny models: one thread is fastest, and CI has 2 cores

TINY = dict(block_size=64, vocab_size=257, n_layer=2, n_head=2, n_embd=32, dropout=0.0, bias=True)


def tiny_model(seed=0, **overrides):
    torch.manual_seed(seed)
    return GPT(GPTConfig(**{**TINY, **overrides}))


def make_record_dataset(folder, texts_train, texts_val=None, answer_prefix=None):
    """Byte-level record dataset: one record per text, ending in end-of-text. With answer_prefix
    (e.g. 'Answer:'), the answer mask covers the tokens after the prefix."""
    tok = ByteTokenizer()
    meta = {"tokenizer": "byte", "vocab_size": tok.vocab_size, "dtype": "uint16", "seed": 0,
            "source_sha256": None, "splits": {}}
    for split, texts in (("train", texts_train), ("val", texts_val or texts_train[:2])):
        recs, masks = [], []
        for t in texts:
            ids = tok.encode(t) + [tok.eot]
            recs.append(ids)
            if answer_prefix:
                cut = len(tok.encode(t.split(answer_prefix)[0] + answer_prefix))
                masks.append([0] * cut + [1] * (len(ids) - cut))
        n_tok, n_rec = write_split(folder, split, recs, tok.vocab_size, masks if answer_prefix else None)
        meta["splits"][split] = {"tokens": n_tok, "records": n_rec}
    write_meta(folder, meta)
    return str(folder)


@pytest.fixture
def records_dir(tmp_path):
    rng = random.Random(0)
    names = ["Ana", "Bo", "Cy", "Di", "Ed", "Flo", "Gus", "Hal", "Ivy", "Jo", "Kai", "Lu"]
    texts = [f"Context: {n}. Question: salary? Answer: {rng.randint(10000, 99999)}" for n in names]
    return make_record_dataset(tmp_path / "records", texts[:10], texts[10:], answer_prefix="Answer:")


@pytest.fixture
def tiny_ckpt(tmp_path):
    model = tiny_model()
    path = tmp_path / "base" / "ckpt.pt"
    save_checkpoint(path, model, iter_num=0, config={"dataset": "records"})
    return str(path)
