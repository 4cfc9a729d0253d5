"""
Web text filtered by keywords (seed 004: OpenWebText documents about economics), streamed through
Hugging Face `datasets` and tokenized up to a token budget.

    python data/openwebtext/prepare.py --data_files my_docs.jsonl          # local files, offline
    python data/openwebtext/prepare.py --data_files "shards/*.parquet" --max_tokens 200000
    python data/openwebtext/prepare.py --dataset Skylion007/openwebtext     # needs the hub (or its cache)

Local files: .json/.jsonl (one object per document, text in `text_field`), .txt (documents separated
by blank lines) or .parquet. A document is kept when it contains at least min_keyword_hits of the
keywords (whole words, any case; no keywords = keep all). Kept documents are tokenized in stream order
until max_tokens (the last one is cut to fit), then split train/val by document. One document = one
record. source_sha256 is the sha256 of the kept documents' text (a stream has no file to hash).
When the hub cannot be reached and the dataset is not cached, it says so and stops.
"""
import glob
import hashlib
import os
import re
import socket
from urllib.parse import urlparse

from configurator import configure
from utils.cli import UserError, run_cli
from utils.prepare import describe, encode_record, split_train_val, take_tokens, write_encoded
from utils.tokenizer import get_tokenizer

ECONOMICS_KEYWORDS = ("economy", "economic", "economics", "economist", "inflation", "recession", "gdp",
                      "unemployment", "market", "markets", "stock", "stocks", "trade", "tariff", "tariffs",
                      "fiscal", "monetary", "interest rates", "central bank", "budget", "deficit", "tax",
                      "taxes", "investment", "investors", "wages", "finance", "financial")
BUILDERS = {".json": "json", ".jsonl": "json", ".txt": "text", ".parquet": "parquet"}

DEFAULTS = dict(
    out_dir=os.path.dirname(os.path.abspath(__file__)),  # where train.bin, val.bin and meta.json go (this folder)
    dataset="Skylion007/openwebtext",  # a Hugging Face dataset name (ignored when data_files is given)
    data_files=(),                     # local files or globs, comma-separated
    hf_split="train",                  # the dataset split to read
    text_field="text",                 # the field holding each document's text
    keywords=ECONOMICS_KEYWORDS,       # empty = keep every document
    min_keyword_hits=1,                # keep documents with at least this many keyword matches
    max_tokens=1_000_000,              # token budget over both splits (0 = no limit)
    max_scan=0,                        # stop after scanning this many documents (0 = no limit)
    tokenizer="gpt2",                  # 'gpt2' or 'byte'
    val_frac=0.05,                     # fraction of documents in val
    seed=1337,                         # seeds the train/val split
)


def local_files(patterns):
    files = []
    for pattern in patterns:
        matched = sorted(glob.glob(pattern))
        if not matched:
            raise UserError(f"--data_files: {pattern} matches no file")
        files += matched
    kinds = {BUILDERS.get(os.path.splitext(f[:-3] if f.endswith(".gz") else f)[1].lower()) for f in files}
    if None in kinds or len(kinds) != 1:
        raise UserError(f"--data_files must all be .json/.jsonl, all .txt or all .parquet (optionally .gz), "
                        f"got {files}")
    return kinds.pop(), files


def hub_reachable(timeout=3.0):
    url = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    try:
        socket.create_connection((url.hostname, url.port or 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def open_stream(cfg):
    """(iterable of examples, source name), streamed from local files or the hub (never downloaded whole)."""
    if cfg["data_files"]:
        builder, files = local_files(cfg["data_files"])
        path, source = builder, ", ".join(os.path.basename(f) for f in files)
        kwargs = {"data_files": files, **({"sample_by": "paragraph"} if builder == "text" else {})}
    else:
        path, source, kwargs = cfg["dataset"], cfg["dataset"], {}
        if os.environ.get("HF_HUB_OFFLINE") != "1" and not hub_reachable():
            # No network: use only the local cache instead of retrying for half a minute. These must be
            # set before `datasets` is imported.
            os.environ["HF_HUB_OFFLINE"] = os.environ["HF_DATASETS_OFFLINE"] = "1"
    import datasets
    datasets.logging.set_verbosity(datasets.logging.CRITICAL)  # its errors reach us as exceptions
    datasets.disable_progress_bars()
    try:
        return datasets.load_dataset(path, split=cfg["hf_split"], streaming=True, **kwargs), source
    except ConnectionError as e:
        raise UserError(f"cannot reach the Hugging Face hub to stream {source!r} and it is not in the local cache "
                        f"({first_line(e)}); pass --data_files with local json/jsonl/txt/parquet files") from None
    except (OSError, ValueError) as e:  # unknown dataset, unreadable file, bad split name
        raise UserError(f"cannot load {source}: {first_line(e)}") from None


def first_line(error):
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def main(argv=None):
    cfg = configure(DEFAULTS, argv or [])
    if cfg["tokenizer"] not in ("gpt2", "byte"):
        raise UserError(f"--tokenizer must be 'gpt2' or 'byte', got {cfg['tokenizer']!r}")
    if cfg["max_tokens"] < 0 or cfg["max_scan"] < 0 or cfg["min_keyword_hits"] < 1:
        raise UserError("--max_tokens and --max_scan must be >= 0, --min_keyword_hits >= 1")
    tokenizer = get_tokenizer(cfg["tokenizer"])
    keywords = [k.strip() for k in cfg["keywords"] if k.strip()]
    pattern = None  # whole words, any case
    if keywords:
        pattern = re.compile(r"\b(?:" + "|".join(map(re.escape, keywords)) + r")\b", re.IGNORECASE)
    stream, source = open_stream(cfg)
    counts = {"scanned": 0, "kept": 0}
    digest = hashlib.sha256()

    def kept_documents():
        for example in stream:
            if cfg["max_scan"] and counts["scanned"] >= cfg["max_scan"]:
                return
            counts["scanned"] += 1
            if cfg["text_field"] not in example:
                raise UserError(f"{source}: documents have no {cfg['text_field']!r} field (they have: "
                                f"{', '.join(example)}); set --text_field")
            text = (example[cfg["text_field"]] or "").strip()
            if text and (pattern is None or len(pattern.findall(text)) >= cfg["min_keyword_hits"]):
                counts["kept"] += 1
                digest.update(text.encode() + b"\x00")
                yield text

    try:
        encoded = take_tokens((encode_record(t, tokenizer) for t in kept_documents()), cfg["max_tokens"],
                              tokenizer.eot)
    except (OSError, ValueError) as e:  # a connection lost mid-stream, a malformed local file
        raise UserError(f"reading {source} failed: {first_line(e)}") from None
    if len(encoded) < 2:
        raise UserError(f"{source}: only {len(encoded)} of {counts['scanned']} documents match the keywords; "
                        "need at least 2 (train and val)")
    train, val = split_train_val(encoded, cfg["val_frac"], cfg["seed"])
    extra_meta = {"seed": cfg["seed"], "source": source, "source_sha256": digest.hexdigest(),
                  "keywords": keywords, "min_keyword_hits": cfg["min_keyword_hits"],
                  "documents_scanned": counts["scanned"], "documents_kept": counts["kept"],
                  "max_tokens": cfg["max_tokens"]}
    meta = write_encoded(cfg["out_dir"], {"train": train, "val": val}, tokenizer, extra_meta)
    print(describe(cfg["out_dir"], meta) + f"; kept {counts['kept']} of {counts['scanned']} documents scanned")
    return meta


if __name__ == "__main__":
    run_cli(main)
