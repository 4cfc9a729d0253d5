"""What every data/<name>/prepare.py shares: split documents (privacy units) into train/val, tokenize
them into records, keep a token budget, and write the splits + meta.json in the shared data contract
(utils/data.py), with meta.json written last so a half-finished run never looks prepared."""
import hashlib
import os
import random

from utils.atomic import write_bytes
from utils.cli import UserError
from utils.data import token_dtype, write_meta, write_split


def sha256_hex(data):
    return hashlib.sha256(data.encode() if isinstance(data, str) else data).hexdigest()


def split_train_val(units, val_frac, seed):
    """Shuffle units (people, documents) with `seed` and cut off the first val_frac of them as val.
    Each unit lands in exactly one split. Both splits must be non-empty."""
    if not 0.0 < val_frac < 1.0:
        raise UserError(f"val_frac must be between 0 and 1 (exclusive), got {val_frac}")
    units = list(units)
    random.Random(f"split:{seed}").shuffle(units)
    n_val = max(1, round(len(units) * val_frac))
    if n_val >= len(units):
        raise UserError(f"{len(units)} documents/people are too few to split with val_frac={val_frac}")
    return units[n_val:], units[:n_val]


def encode_record(text, tokenizer, answer_spans=None):
    """(token ids ending in end-of-text, answer mask or None). With answer_spans [(start, end), ...]
    (character offsets), the text is cut at every span edge and each piece is encoded on its own, so no
    token straddles a prompt/answer boundary: the answer tokens are exactly those a model produces when
    it completes the prompt text alone."""
    if answer_spans is None:
        return tokenizer.encode(text) + [tokenizer.eot], None
    ids, mask, pos = [], [], 0
    for start, end in answer_spans:
        for piece, flag in ((text[pos:start], 0), (text[start:end], 1)):
            piece_ids = tokenizer.encode(piece)
            ids += piece_ids
            mask += [flag] * len(piece_ids)
        pos = end
    tail = tokenizer.encode(text[pos:])
    return ids + tail + [tokenizer.eot], mask + [0] * (len(tail) + 1)


def take_tokens(encoded_records, max_tokens, eot):
    """Records from an iterable of (ids, mask) until max_tokens (0 = no limit); the last record is cut
    (keeping its end-of-text token) so the total is at most max_tokens. Consumes the iterable lazily."""
    out, total = [], 0
    for ids, mask in encoded_records:
        if max_tokens and total + len(ids) > max_tokens:
            room = max_tokens - total
            if room >= 2:
                out.append((ids[:room - 1] + [eot], None if mask is None else mask[:room - 1] + [0]))
                total += room
            break
        out.append((ids, mask))
        total += len(ids)
        if max_tokens and total == max_tokens:
            break
    return out


def write_encoded(out_dir, splits, tokenizer, extra_meta, extra_files=None):
    """Write {split}.bin / _offsets.bin (/ _answer_mask.bin when records carry masks) for each split of
    encoded records [(ids, mask or None), ...], then extra_files {filename: bytes}, then meta.json.
    Returns the meta dict."""
    for split, records in splits.items():
        if not records:
            raise UserError(f"the {split} split would be empty: use more data or another val_frac")
    meta = {"tokenizer": tokenizer.name, "vocab_size": tokenizer.vocab_size,
            "dtype": token_dtype(tokenizer.vocab_size)}
    if tokenizer.name == "word":
        meta["words"] = tokenizer.itos[1:]
    meta.update(extra_meta)
    meta["splits"] = {}
    os.makedirs(out_dir, exist_ok=True)
    for split, records in splits.items():
        masks = [m for _, m in records]
        has_mask = all(m is not None for m in masks)
        n_tokens, n_records = write_split(out_dir, split, [ids for ids, _ in records], tokenizer.vocab_size,
                                          masks if has_mask else None)
        meta["splits"][split] = {"tokens": n_tokens, "records": n_records,
                                 "max_record_tokens": max(len(ids) for ids, _ in records)}
    for name, data in (extra_files or {}).items():
        write_bytes(os.path.join(out_dir, name), data)
    write_meta(out_dir, meta)
    return meta


def write_records(out_dir, splits, tokenizer, extra_meta, answer_spans=None, extra_files=None):
    """Tokenize {split: [text, ...]} (one text = one record) and write them with write_encoded.
    answer_spans: {split: [[(start, end), ...] per record]} marks answer characters for the answer mask."""
    encoded = {split: [encode_record(text, tokenizer, answer_spans[split][i] if answer_spans else None)
                       for i, text in enumerate(texts)]
               for split, texts in splits.items()}
    return write_encoded(out_dir, encoded, tokenizer, extra_meta, extra_files)


def describe(out_dir, meta):
    """The one-line summary each prepare script prints."""
    parts = ", ".join(f"{s}: {v['records']} records / {v['tokens']:,} tokens" for s, v in meta["splits"].items())
    return f"wrote {out_dir} ({meta['tokenizer']}, vocab {meta['vocab_size']}): {parts}"
