"""
A general English corpus built offline from the Python documentation that ships with CPython
(pydoc_data.topics: the language reference topics behind help()), optionally plus stdlib docstrings.
The built-in default for base pretraining.

    python data/pydocs/prepare.py                       # GPT-2 BPE
    python data/pydocs/prepare.py --tokenizer byte --max_tokens 200000
    python data/pydocs/prepare.py --docstrings          # + docstrings of the modules in `modules`

Topics are cut at paragraph breaks into documents of at most max_doc_chars (a longer paragraph stays
whole); documents are shuffled with the seed, optionally cut to a token budget, and split train/val by
document. One document = one record. source_sha256 hashes every document before shuffling and budget;
the text depends on the Python version, which meta.json records.
"""
import importlib
import inspect
import os
import platform
import random

from configurator import configure
from utils.cli import UserError, run_cli
from utils.prepare import describe, encode_record, sha256_hex, split_train_val, take_tokens, write_encoded
from utils.tokenizer import get_tokenizer

DEFAULTS = dict(
    out_dir=os.path.dirname(os.path.abspath(__file__)),  # where train.bin, val.bin and meta.json go (this folder)
    tokenizer="gpt2",       # 'gpt2' or 'byte'
    val_frac=0.1,           # fraction of documents in val
    seed=1337,              # seeds the train/val split
    max_doc_chars=2000,     # documents are cut at paragraph breaks to about this size
    max_tokens=0,           # token budget over both splits (0 = everything)
    docstrings=False,       # add docstrings of `modules`
    modules=("builtins", "collections", "itertools", "functools", "json", "re", "string", "textwrap",  # docstrings=True
             "pathlib", "random", "statistics", "datetime", "csv", "argparse", "logging", "heapq",
             "bisect", "fractions", "decimal", "dataclasses", "enum", "contextlib", "shutil", "difflib"),
)


def chunk_paragraphs(text, max_chars):
    """Cut text at blank lines into pieces of at most max_chars (a longer paragraph is its own piece)."""
    chunks, current = [], ""
    for para in text.strip().split("\n\n"):
        if current and len(current) + 2 + len(para) > max_chars:
            chunks.append(current)
            current = para
        else:
            current = f"{current}\n\n{para}" if current else para
    return chunks + [current] if current else chunks


def topic_texts():
    from pydoc_data.topics import topics
    return [topics[name] for name in sorted(topics)]


def docstring_texts(module_names):
    """'module.name' + docstring for the module and each public class/function it defines."""
    texts = []
    for module_name in module_names:
        try:
            module = importlib.import_module(module_name)
        except ImportError:
            raise UserError(f"--modules: cannot import {module_name!r}") from None
        items = [(module_name, module)] + [
            (f"{module_name}.{name}", obj) for name, obj in sorted(vars(module).items())
            if not name.startswith("_") and (inspect.isclass(obj) or inspect.isroutine(obj))
            and getattr(obj, "__module__", None) == module_name]
        for title, obj in items:
            doc = inspect.getdoc(obj)
            if doc and len(doc) >= 80:
                texts.append(f"{title}\n\n{doc}")
    return texts


def main(argv=None):
    cfg = configure(DEFAULTS, argv or [])
    if cfg["tokenizer"] not in ("gpt2", "byte"):
        raise UserError(f"--tokenizer must be 'gpt2' or 'byte', got {cfg['tokenizer']!r}")
    if cfg["max_doc_chars"] < 1 or cfg["max_tokens"] < 0:
        raise UserError("--max_doc_chars must be >= 1 and --max_tokens >= 0")
    tokenizer = get_tokenizer(cfg["tokenizer"])
    sources = topic_texts() + (docstring_texts(cfg["modules"]) if cfg["docstrings"] else [])
    docs = [chunk for text in sources for chunk in chunk_paragraphs(text, cfg["max_doc_chars"])]
    source_sha256 = sha256_hex("\x00".join(docs))
    random.Random(f"docs:{cfg['seed']}").shuffle(docs)
    encoded = take_tokens((encode_record(d, tokenizer) for d in docs), cfg["max_tokens"], tokenizer.eot)
    train, val = split_train_val(encoded, cfg["val_frac"], cfg["seed"])
    extra_meta = {"seed": cfg["seed"], "source": "pydoc_data.topics" + (" + docstrings" if cfg["docstrings"] else ""),
                  "python_version": platform.python_version(), "source_sha256": source_sha256,
                  "documents": len(encoded), "max_tokens": cfg["max_tokens"], "max_doc_chars": cfg["max_doc_chars"]}
    if cfg["docstrings"]:
        extra_meta["modules"] = list(cfg["modules"])
    meta = write_encoded(cfg["out_dir"], {"train": train, "val": val}, tokenizer, extra_meta)
    print(describe(cfg["out_dir"], meta))
    return meta


if __name__ == "__main__":
    run_cli(main)
