"""
Input-space canaries for black-box audits: new-token canary records (Panda et al., ICLR 2025, "Privacy
auditing of large language models"): sequences of token ids that never occur in the dataset, so only the
canary itself moves those ids' embeddings and predictions and its signal stands out; how to add the
included ones to a dataset as ordinary records; and how to score them (mean token log-prob under a
model: the gain from training is the membership score). Used by test_pipeline/privacy_audit.py and
reproduce.py.
"""
import os

import numpy as np

from utils.model_under_test import sequence_logprobs
from utils.cli import UserError
from utils.data import answer_mask, load_meta, offsets, tokens, write_meta, write_split
from utils.tokenizer import get_tokenizer


def write_audit_dataset(src_dir, dst_dir, canary_records, included):
    """The source's train records + the included canaries (train) and its val records, same contract."""
    meta = load_meta(src_dir)
    has_mask = answer_mask(src_dir, "train") is not None
    splits = {}
    for split in ("train", "val"):
        if not os.path.isfile(os.path.join(src_dir, f"{split}_offsets.bin")):
            continue
        toks, off = tokens(src_dir, split, meta), offsets(src_dir, split)
        mask = answer_mask(src_dir, split) if has_mask else None
        recs = [np.asarray(toks[off[i]:off[i + 1]]).tolist() for i in range(len(off) - 1)]
        masks = [mask[off[i]:off[i + 1]].tolist() for i in range(len(off) - 1)] if has_mask else None
        if split == "train":
            recs += [ids for (ids, _), inc in zip(canary_records, included) if inc]
            if has_mask:
                masks += [msk for (_, msk), inc in zip(canary_records, included) if inc]
        n_tok, n_rec = write_split(dst_dir, split, recs, meta["vocab_size"], masks)
        splits[split] = {"tokens": n_tok, "records": n_rec}
    write_meta(dst_dir, {**meta, "splits": splits, "audit": {"source": os.path.abspath(src_dir),
                                                             "canaries_included": int(included.sum())}})


def canary_logprob(model, canary_records, batch_size):
    """Mean token log-prob of each canary record under the model (one batched pass)."""
    was_training = model.training
    model.eval()
    lps = sequence_logprobs(model, [ids[:1] for ids, _ in canary_records], [ids[1:] for ids, _ in canary_records],
                            batch_size)
    model.train(was_training)
    return np.array([lp.mean() for lp in lps])


def unused_tokens(data_dir):
    """Token ids of the tokenizer's vocabulary that occur in no split of the dataset (end of text
    excluded): the alphabet of new-token canaries."""
    meta = load_meta(data_dir)
    used = np.zeros(meta["vocab_size"], bool)
    for split in ("train", "val"):
        if os.path.isfile(os.path.join(data_dir, f"{split}_offsets.bin")):
            used[np.unique(np.asarray(tokens(data_dir, split, meta)))] = True
    used[get_tokenizer(meta).eot] = True
    return np.flatnonzero(~used)


def draw_new_token_canaries(alphabet, m, length, eot, rng):
    """m canary records of `length` random tokens from `alphabet` + end of text (answer mask: all but the
    first token and the end), and each one's inclusion coin."""
    if len(alphabet) < 2:
        raise UserError(f"new-token canaries need >= 2 token ids the dataset never uses; it leaves {len(alphabet)}")
    records = []
    for _ in range(m):
        ids = rng.choice(alphabet, length).tolist()
        records.append((ids + [eot], [0] + [1] * (length - 1) + [0]))
    return records, rng.random(m) < 0.5
