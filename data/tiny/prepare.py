"""
The five-sentence travel corpus of seed 000 with a word-level vocabulary, for instant demos.

    python data/tiny/prepare.py

One sentence = one record. The vocabulary is every lowercase word of the corpus (sorted; meta.json
"words"; id 0 = end of text), so val words are always known. With five sentences val is a single one.
"""
import os

from configurator import configure
from utils.cli import run_cli
from utils.prepare import describe, sha256_hex, split_train_val, write_records
from utils.tokenizer import get_tokenizer

TINY_CORPUS = [
    "I love Paris in the spring",
    "New York is a vibrant city",
    "Tokyo has amazing food",
    "London is very rainy",
    "Traveling expands your mind",
]

DEFAULTS = dict(
    out_dir=os.path.dirname(os.path.abspath(__file__)),  # where train.bin, val.bin and meta.json go (this folder)
    val_frac=0.2,   # of the sentences
    seed=1337,                                           # seeds which sentence goes to val
)


def main(argv=None):
    cfg = configure(DEFAULTS, argv or [])
    words = sorted({w for sentence in TINY_CORPUS for w in sentence.lower().split()})
    tokenizer = get_tokenizer({"tokenizer": "word", "words": words})
    train, val = split_train_val(TINY_CORPUS, cfg["val_frac"], cfg["seed"])
    meta = write_records(cfg["out_dir"], {"train": train, "val": val}, tokenizer,
                         {"seed": cfg["seed"], "source": "seed 000 tiny_corpus",
                          "source_sha256": sha256_hex("\n".join(TINY_CORPUS))})
    print(describe(cfg["out_dir"], meta))
    return meta


if __name__ == "__main__":
    run_cli(main)
