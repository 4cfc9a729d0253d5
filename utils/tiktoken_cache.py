"""Seed tiktoken's cache with GPT-2's BPE ranks, offline at run time.

tiktoken looks for a download under TIKTOKEN_CACHE_DIR/<sha1 of its URL>. The r50k_base ranks (identical
to gpt2's) ship in openai-whisper's source distribution as whisper/assets/gpt2.tiktoken; we fetch that
from the package index once at setup, verify its sha256, and place it under the name tiktoken expects.

    python -m utils.tiktoken_cache            # seed (needs the package index once)
    python -m utils.tiktoken_cache --check    # exit 0 only if the cache is seeded and verified
    python -m utils.tiktoken_cache --help     # the options; nothing is fetched
"""
import glob
import hashlib
import os
import subprocess
import sys
import tarfile
import tempfile

RANKS_URL = "https://openaipublic.blob.core.windows.net/encodings/r50k_base.tiktoken"
RANKS_SHA256 = "306cd27f03c1a714eca7108e03d66b7dc042abe8c258b44c199a7ed9838dd930"

DEFAULTS = dict(
    check=False,  # only say whether the cache is seeded and verified (exit 0) or not (exit 1); fetch nothing
)


def cache_dir():
    from utils.tokenizer import DEFAULT_TIKTOKEN_CACHE
    return os.environ.get("TIKTOKEN_CACHE_DIR", DEFAULT_TIKTOKEN_CACHE)


def cache_file():
    return os.path.join(cache_dir(), hashlib.sha1(RANKS_URL.encode()).hexdigest())


def sha256_of(path):
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def cached_ranks_ok():
    return os.path.exists(cache_file()) and sha256_of(cache_file()) == RANKS_SHA256


def seed():
    if cached_ranks_ok():
        print(f"tiktoken cache ok: {cache_file()}")
        return
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--no-binary", ":all:",
               "openai-whisper", "-d", tmp]
        r = subprocess.run(cmd, capture_output=True, text=True)
        sdists = glob.glob(os.path.join(tmp, "openai_whisper-*.tar.gz")) + glob.glob(os.path.join(tmp, "openai-whisper-*.tar.gz"))
        if r.returncode != 0 or not sdists:
            sys.exit("error: could not fetch openai-whisper's source distribution from the package index "
                     f"to seed GPT-2's BPE ranks ({(r.stderr or '').strip().splitlines()[-1:] or 'no file'})")
        with tarfile.open(sdists[0]) as tar:
            member = next((m for m in tar.getmembers() if m.name.endswith("whisper/assets/gpt2.tiktoken")), None)
            if member is None:
                sys.exit("error: whisper/assets/gpt2.tiktoken is missing from openai-whisper's sdist")
            data = tar.extractfile(member).read()
    digest = hashlib.sha256(data).hexdigest()
    if digest != RANKS_SHA256:
        sys.exit(f"error: GPT-2 BPE ranks have sha256 {digest}, expected {RANKS_SHA256}; refusing to use them")
    from utils.atomic import write_bytes
    write_bytes(cache_file(), data)
    print(f"tiktoken cache seeded and verified: {cache_file()}")


def main(argv):
    from configurator import configure
    cfg = configure(DEFAULTS, argv)
    if cfg["check"]:
        ok = cached_ranks_ok()
        print("tiktoken cache " + ("ok" if ok else f"missing or wrong hash at {cache_file()}"))
        sys.exit(0 if ok else 1)
    seed()


if __name__ == "__main__":
    from utils.cli import run_cli
    run_cli(main)
