"""
Failure test across processes: a patch exported by one process must work in another with its key, and be
refused there, for the right reason, in every other case. Exit 0 only when every case behaves, 1 otherwise.

    python test_pipeline/decrypt_failure_test.py [--work_dir=DIR] [--max_steps=3]

Process 1 runs `finetune_encrypt_memmap.py` (a tiny base, a tiny record dataset, both made here unless
--base_ckpt/--data_dir are given) and --export's the patch of tenant "alice". Then each case starts a
fresh `finetune_encrypt_memmap.py apply` process on a copy of the patch:
  right key                     exit 0, the patched generation differs from the base generation
  wrong key                     exit 3, "wrong key"
  header byte / header MAC      exit 3, "header was modified"
  nonce / ciphertext / tag      exit 3, "does not authenticate" (first, middle and last blob)
  truncated (header, blobs)     exit 3, "truncated"
  two blobs swapped             exit 3, "swapped"
  other base model              exit 4, "another base model"
  other tenant (--tenant bob)   exit 4, "tenant"
  damaged AND other tenant      exit 3 (integrity is checked before identity)
  no --tenant, unbound key      exit 4, "give --tenant" (apply never accepts whichever tenant a patch names)
  not a patch                   exit 2
and every refusal is one line on stderr, never a traceback.
"""
import json
import os
import shutil
import struct
import subprocess
import sys
import tempfile

import torch

from configurator import configure
from model import GPT, GPTConfig
from utils.checkpoint import save_checkpoint
from utils.cli import UserError, run_cli
from utils.data import write_meta, write_split
from utils.tokenizer import ByteTokenizer

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(REPO, "finetune_encrypt_memmap.py")
DEFAULTS = dict(
    work_dir="",  # '' = a temporary folder, removed afterwards
    base_ckpt="",  # '' = a tiny random base made here
    data_dir="",  # '' = a tiny byte-level record dataset made here
    max_steps=3,  # fine-tuning steps of the patch under test
    prompt="Context: Ana. Question: salary? Answer:",  # prompt generated from with the right key
)
NAMES = ["Ana", "Bo", "Cy", "Di", "Ed", "Flo", "Gus", "Hal", "Ivy", "Jo"]


def make_inputs(work, cfg):
    """(base checkpoint, other base checkpoint, data dir)."""
    def tiny(seed):
        torch.manual_seed(seed)
        return GPT(GPTConfig(block_size=64, vocab_size=257, n_layer=2, n_head=2, n_embd=32))
    base = cfg["base_ckpt"] or os.path.join(work, "base.pt")
    if not cfg["base_ckpt"]:
        save_checkpoint(base, tiny(0), config={})
    other = os.path.join(work, "other_base.pt")
    save_checkpoint(other, tiny(1), config={})
    data = cfg["data_dir"]
    if not data:
        data, tok = os.path.join(work, "data"), ByteTokenizer()
        meta = {"tokenizer": "byte", "vocab_size": tok.vocab_size, "dtype": "uint16", "seed": 0,
                "source_sha256": None, "splits": {}}
        for split, names in (("train", NAMES[:8]), ("val", NAMES[8:])):
            recs = [tok.encode(f"Context: {n}. Question: salary? Answer: {40000 + 1234 * i}") + [tok.eot]
                    for i, n in enumerate(names)]
            n_tok, n_rec = write_split(data, split, recs, tok.vocab_size)
            meta["splits"][split] = {"tokens": n_tok, "records": n_rec}
        write_meta(data, meta)
    return base, other, data


def layout(raw):
    """(header, blob start, [(name, offset, bytes, plain bytes of chunk 0)]) read straight from the file."""
    _, _, n = struct.unpack_from("<8sHI", raw, 0)
    header = json.loads(raw[14:14 + n])
    start = 14 + n + 32
    blobs = [(e["name"], start + e["offset"], e["plain_bytes"] + e["chunks"] * 28,
              min(e["plain_bytes"], header["chunk_bytes"])) for e in header["tensors"]]
    return header, start, blobs


def flip(raw, pos):
    b = bytearray(raw)
    b[pos] ^= 0x01
    return bytes(b)


def cases(raw):
    """{label: (patch bytes, extra apply args, expected exit code, words the error must contain)}."""
    header, start, blobs = layout(raw)
    tenant_at = raw.index(b'"tenant":"alice"') + len('"tenant":"')
    out = {"header byte": (flip(raw, tenant_at), [], 3, "header was modified"),
           "header MAC": (flip(raw, start - 7), [], 3, "header was modified")}
    for where, (name, pos, size, n) in (("first", blobs[0]), ("middle", blobs[len(blobs) // 2]), ("last", blobs[-1])):
        out[f"nonce ({where} blob)"] = (flip(raw, pos + 5), [], 3, "does not authenticate")
        out[f"ciphertext ({where} blob)"] = (flip(raw, pos + 12 + n // 2), [], 3, "does not authenticate")
        out[f"tag ({where} blob)"] = (flip(raw, pos + 12 + n + 3), [], 3, "does not authenticate")
    out["truncated in the header"] = (raw[:start - 40], [], 3, "truncated")
    out["truncated in the blobs"] = (raw[:len(raw) - blobs[-1][2] // 2], [], 3, "truncated")
    sizes = {}
    for name, pos, size, _ in blobs:
        sizes.setdefault(size, []).append(pos)
    size, (a, b) = next((s, p[:2]) for s, p in sizes.items() if len(p) > 1)
    swapped = bytearray(raw)
    swapped[a:a + size], swapped[b:b + size] = raw[b:b + size], raw[a:a + size]
    out["two blobs swapped"] = (bytes(swapped), [], 3, "swapped")
    out["other tenant"] = (raw, ["--tenant", "bob"], 4, "tenant")
    out["damaged and other tenant"] = (flip(raw, blobs[-1][1] + 5), ["--tenant", "bob"], 3, "does not authenticate")
    out["no tenant"] = (raw, ["--tenant", ""], 4, "give --tenant")
    out["not a patch"] = (b"\x89PNG\r\n\x1a\n" + raw[8:], [], 2, "not a sealed patch")
    return out


def run(args, env):
    return subprocess.run([sys.executable, SCRIPT, *args], capture_output=True, text=True, env=env, timeout=600)


def one_line_error(r):
    lines = r.stderr.strip().splitlines()
    return len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in r.stderr


def main(argv=None):
    cfg = configure(DEFAULTS, sys.argv[1:] if argv is None else argv)
    work = cfg["work_dir"] or tempfile.mkdtemp(prefix="decrypt_failure_")
    os.makedirs(work, exist_ok=True)
    env = {**os.environ, "PYTHONPATH": REPO + os.pathsep + os.environ.get("PYTHONPATH", "")}
    ok_all = []

    def report(label, ok, detail=""):
        ok_all.append(ok)
        print(f"{'PASS' if ok else 'FAIL'}  {label}" + (f"  [{detail}]" if detail else ""), flush=True)

    try:
        base, other, data = make_inputs(work, cfg)
        key, wrong = os.path.join(work, "key.hex"), os.path.join(work, "wrong.hex")
        for path in (key, wrong):
            if os.path.exists(path):
                os.remove(path)
            r = run(["keygen", "--out", path], env)
            if r.returncode:
                raise UserError(f"keygen failed: {r.stderr.strip()}")
        patch = os.path.join(work, "alice.patch")
        r = run(["--base_ckpt", base, "--data_dir", data, "--key_file", key, "--tenant", "alice", "--export", patch,
                 "--max_steps", str(cfg["max_steps"]), "--batch_size", "4", "--microbatch_size", "4",
                 "--eval_interval", "0", "--dp=False"], env)  # non-private: 3 DP steps may not move greedy text
        ok = r.returncode == 0 and os.path.isfile(patch)
        report("process 1: fine-tune and export", ok, "" if ok else r.stderr.strip()[-300:])
        if r.returncode:
            sys.exit(1)
        raw = open(patch, "rb").read()
        apply_args = ["apply", "--base_ckpt", base, "--key_file", key, "--tenant", "alice", "--prompt", cfg["prompt"],
                      "--max_new_tokens", "12"]

        r = run([*apply_args, "--patch", patch], env)
        lines = {ln.split("(")[0].strip(): ln.split(":", 1)[1] for ln in r.stdout.splitlines() if ln.startswith("  ")}
        ok = r.returncode == 0 and "tenant alice" in r.stdout and lines.get("base") != lines.get("patched")
        report("right key in another process: exit 0, patched generation differs from the base", ok,
               "" if ok else f"exit {r.returncode}: {r.stderr.strip()[-200:]}")
        r = run(["apply", "--base_ckpt", base, "--key_file", wrong, "--tenant", "alice", "--patch", patch], env)
        report("wrong key: exit 3", r.returncode == 3 and "wrong key" in r.stderr and one_line_error(r),
               f"exit {r.returncode}: {r.stderr.strip()}")
        r = run(["apply", "--base_ckpt", other, "--key_file", key, "--tenant", "alice", "--patch", patch], env)
        report("other base model: exit 4", r.returncode == 4 and "another base model" in r.stderr and one_line_error(r),
               f"exit {r.returncode}: {r.stderr.strip()}")
        for label, (data_bytes, extra, code, words) in cases(raw).items():
            path = os.path.join(work, "case.patch")
            with open(path, "wb") as f:
                f.write(data_bytes)
            r = run(["apply", "--base_ckpt", base, "--key_file", key, "--tenant", "alice", "--patch", path, *extra], env)
            report(f"{label}: exit {code}", r.returncode == code and words in r.stderr and one_line_error(r),
                   f"exit {r.returncode}: {r.stderr.strip()}")
    finally:
        if not cfg["work_dir"]:
            shutil.rmtree(work, ignore_errors=True)
    print(f"{sum(ok_all)}/{len(ok_all)} cases behaved")
    sys.exit(0 if all(ok_all) else 1)


if __name__ == "__main__":
    run_cli(main)
