"""Reading prepared datasets: data/<name>/ holds, per split,

    {split}.bin               every record's tokens, concatenated (uint16, or uint32 if vocab > 65535);
                              each record ends with the tokenizer's end-of-text token
    {split}_offsets.bin       int64, n_records + 1 entries: record i is tokens[off[i]:off[i+1]]
    {split}_answer_mask.bin   uint8 per token, 1 on answer tokens (Q/A datasets only)
    meta.json                 tokenizer, vocab_size, dtype, counts, seed, source sha256, ...

A record is the privacy unit (one person). Pretraining reads random windows of the token stream
(nanoGPT); fine-tuning reads whole records (RecordDataset), never windows."""
import json
import os

import numpy as np
import torch

from utils.atomic import write_bytes, write_json
from utils.cli import UserError

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def prepare_hint(data_dir):
    name = os.path.basename(os.path.normpath(data_dir))
    script = os.path.join("data", name, "prepare.py")
    return f"python {script}" if os.path.exists(os.path.join(REPO, script)) else "the dataset's prepare.py"


def load_meta(data_dir):
    path = os.path.join(data_dir, "meta.json")
    if not os.path.isdir(data_dir) or not os.path.isfile(path):
        raise UserError(f"no prepared data in {data_dir}: run `{prepare_hint(data_dir)}` first")
    try:
        with open(path) as f:
            meta = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise UserError(f"{path} is unreadable ({e}); rerun `{prepare_hint(data_dir)}`") from None
    for key in ("tokenizer", "vocab_size", "dtype"):
        if key not in meta:
            raise UserError(f"{path} lacks '{key}'; rerun `{prepare_hint(data_dir)}`")
    return meta


def token_dtype(vocab_size):
    return "uint16" if vocab_size <= 65536 else "uint32"


def tokens(data_dir, split, meta=None):
    """The split's token stream as a read-only memmap."""
    meta = meta or load_meta(data_dir)
    path = os.path.join(data_dir, f"{split}.bin")
    if not os.path.isfile(path) or os.path.getsize(path) == 0:
        raise UserError(f"{path} is missing or empty: run `{prepare_hint(data_dir)}`")
    return np.memmap(path, dtype=np.dtype(meta["dtype"]), mode="r")


def offsets(data_dir, split):
    path = os.path.join(data_dir, f"{split}_offsets.bin")
    if not os.path.isfile(path):
        raise UserError(f"{path} is missing: this dataset has no record offsets, so it cannot be "
                        f"fine-tuned per record (privacy unit); rerun `{prepare_hint(data_dir)}`")
    off = np.fromfile(path, dtype=np.int64)
    if off.size < 1 or off[0] != 0 or np.any(np.diff(off) <= 0):
        raise UserError(f"{path} is corrupt (offsets must start at 0 and increase)")
    return off


LOSS_ON = ("all", "answer", "last_answer")


def last_run(keep):
    """The mask with only its last run of True kept (a record's last answer)."""
    out = np.zeros_like(keep)
    ends = np.flatnonzero(keep)
    if ends.size:
        end = ends[-1]
        gaps = np.flatnonzero(~keep[:end])
        out[(gaps[-1] + 1 if gaps.size else 0):end + 1] = True
    return out


def answer_mask(data_dir, split):
    path = os.path.join(data_dir, f"{split}_answer_mask.bin")
    return np.fromfile(path, dtype=np.uint8) if os.path.isfile(path) else None


def write_split(data_dir, split, records, vocab_size, answer_masks=None):
    """Write one split from a list of token lists (each already ending in end-of-text) atomically.
    answer_masks: matching list of 0/1 lists, or None. Returns (n_tokens, n_records)."""
    dtype = np.dtype(token_dtype(vocab_size))
    flat = np.fromiter((t for r in records for t in r), dtype=np.int64)
    if flat.size and (flat.min() < 0 or flat.max() >= vocab_size):
        raise ValueError("token id outside the vocabulary")
    off = np.zeros(len(records) + 1, dtype=np.int64)
    off[1:] = np.cumsum([len(r) for r in records])
    write_bytes(os.path.join(data_dir, f"{split}.bin"), flat.astype(dtype).tobytes())
    write_bytes(os.path.join(data_dir, f"{split}_offsets.bin"), off.tobytes())
    if answer_masks is not None:
        m = np.fromiter((t for r in answer_masks for t in r), dtype=np.uint8)
        assert m.size == flat.size
        write_bytes(os.path.join(data_dir, f"{split}_answer_mask.bin"), m.tobytes())
    return int(flat.size), len(records)


def write_meta(data_dir, meta):
    write_json(os.path.join(data_dir, "meta.json"), meta)


def get_batch(data, batch_size, block_size, device="cpu", generator=None):
    """nanoGPT's random windows of a token stream, for pretraining only (not a DP privacy unit)."""
    if len(data) <= block_size:
        raise UserError(f"block_size {block_size} is larger than the data ({len(data)} tokens)")
    ix = torch.randint(len(data) - block_size, (batch_size,), generator=generator)
    x = torch.stack([torch.from_numpy(data[i:i + block_size].astype(np.int64)) for i in ix])
    y = torch.stack([torch.from_numpy(data[i + 1:i + 1 + block_size].astype(np.int64)) for i in ix])
    if device != "cpu":
        x, y = x.pin_memory().to(device, non_blocking=True), y.pin_memory().to(device, non_blocking=True)
    return x, y


class RecordDataset(torch.utils.data.Dataset):
    """One item per record: (x, y), each of length block_size. Padding is token 0 in x and -1 (ignored)
    in y; with loss_on='answer', y is also -1 outside answer tokens, and with 'last_answer' outside the
    record's last answer (the completion-only loss of supervised fine-tuning: the last field is predicted
    from the others the record shows; a canary whose record is its secret line alone, as bench/utility.py
    writes them, trains as before, while one with lines after its secret, as prepare.py's default order
    gives, would not be trained on its secret at all). Records longer than
    block_size + 1 tokens are counted in `n_truncated` and cut by __getitem__; training refuses them
    unless truncation is asked for (check_fit): a cut record trains its person on their first lines
    only, and the leakage tests would then probe fields the model never saw."""

    def __init__(self, data_dir, split, block_size, loss_on="all", meta=None):
        if loss_on not in LOSS_ON:
            raise UserError(f"loss_on must be one of {', '.join(LOSS_ON)}, got {loss_on!r}")
        self.meta = meta or load_meta(data_dir)
        self.tokens = tokens(data_dir, split, self.meta)
        self.offsets = offsets(data_dir, split)
        if self.offsets[-1] != len(self.tokens):
            raise UserError(f"{data_dir}: {split}_offsets.bin does not match {split}.bin; rerun `{prepare_hint(data_dir)}`")
        self.mask = answer_mask(data_dir, split) if loss_on != "all" else None
        self.last_answer_only = loss_on == "last_answer"
        if loss_on != "all" and self.mask is None:
            raise UserError(f"loss_on={loss_on!r} needs {split}_answer_mask.bin, which {data_dir} lacks")
        self.block_size = block_size
        lengths = np.diff(self.offsets)
        self.n_truncated = int(np.sum(lengths > block_size + 1))
        self.longest = int(lengths.max()) if lengths.size else 0
        self.data_dir, self.split = data_dir, split
        if len(self) == 0:
            raise UserError(f"{data_dir} has no {split} records: rerun `{prepare_hint(data_dir)}`")

    def __len__(self):
        return len(self.offsets) - 1

    def check_fit(self, truncate=False):
        """The number of records that will be cut; a UserError, before any training, when some would be
        and `truncate` is False."""
        if self.n_truncated and not truncate:
            raise UserError(
                f"{self.n_truncated} of {len(self)} {self.split} records in {self.data_dir} are longer than "
                f"block_size {self.block_size} + 1 (longest: {self.longest} tokens); fixes: fewer fields per record "
                f"(prepare --fields), a larger block_size, or a BPE tokenizer (prepare --tokenizer gpt2); or "
                f"--truncate_records=True to train on each record's first {self.block_size + 1} tokens only")
        return self.n_truncated

    def record(self, i):
        a, b = int(self.offsets[i]), int(self.offsets[i + 1])
        return np.asarray(self.tokens[a:b], dtype=np.int64)

    def __getitem__(self, i):
        a, b = int(self.offsets[i]), min(int(self.offsets[i + 1]), int(self.offsets[i]) + self.block_size + 1)
        t = torch.from_numpy(np.asarray(self.tokens[a:b], dtype=np.int64))
        n = t.numel() - 1
        x = torch.zeros(self.block_size, dtype=torch.long)
        y = torch.full((self.block_size,), -1, dtype=torch.long)
        x[:n], y[:n] = t[:-1], t[1:]
        if self.mask is not None:
            keep = self.mask[a + 1:b].astype(bool)
            if self.last_answer_only:
                keep = last_run(keep)
            y[:n][~torch.from_numpy(keep)] = -1
        return x, y
