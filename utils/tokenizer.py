"""Tokenizers the datasets can name in meta.json: GPT-2 BPE (tiktoken, offline), bytes, or words.

GPT-2's BPE is tiktoken's r50k_base (the same ranks and special token as 'gpt2'). tiktoken fetches the
ranks on first use; we never let it: utils/tiktoken_cache.py seeds TIKTOKEN_CACHE_DIR at setup."""
import os

from utils.cli import UserError

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_TIKTOKEN_CACHE = os.path.join(REPO, ".cache", "tiktoken")


class ByteTokenizer:
    """UTF-8 bytes 0..255, plus 256 = end of text. Tiny vocabulary: fast CPU models and tests."""
    name = "byte"
    vocab_size = 257
    eot = 256

    def encode(self, text):
        return list(text.encode("utf-8"))

    def decode(self, ids):
        return bytes(i for i in ids if 0 <= i < 256).decode("utf-8", errors="replace")


class WordTokenizer:
    """Whitespace words of a fixed vocabulary (seed 000's tiny corpus); id 0 is end of text."""
    name = "word"

    def __init__(self, words):
        self.itos = ["<eot>"] + list(words)
        self.stoi = {w: i for i, w in enumerate(self.itos)}
        self.vocab_size = len(self.itos)
        self.eot = 0

    def encode(self, text):
        try:
            return [self.stoi[w] for w in text.lower().split()]
        except KeyError as e:
            raise UserError(f"word {e.args[0]!r} is not in the vocabulary") from None

    def decode(self, ids):
        return " ".join(self.itos[i] for i in ids if 0 < i < self.vocab_size)


class GPT2Tokenizer:
    name = "gpt2"
    vocab_size = 50257
    eot = 50256

    def __init__(self):
        os.environ.setdefault("TIKTOKEN_CACHE_DIR", DEFAULT_TIKTOKEN_CACHE)
        from utils.tiktoken_cache import cached_ranks_ok
        if not cached_ranks_ok():
            raise UserError("GPT-2 BPE ranks are not in the tiktoken cache; run `make setup` "
                            "(or `python -m utils.tiktoken_cache`) once with access to the package index")
        import tiktoken
        self.enc = tiktoken.get_encoding("r50k_base")

    def encode(self, text):
        return self.enc.encode_ordinary(text)

    def decode(self, ids):
        return self.enc.decode([i for i in ids if 0 <= i < self.eot])


def get_tokenizer(meta_or_name):
    """A tokenizer from a dataset's meta.json dict, or from a name ('gpt2', 'byte')."""
    meta = meta_or_name if isinstance(meta_or_name, dict) else {"tokenizer": meta_or_name}
    name = meta.get("tokenizer")
    if name == "gpt2":
        return GPT2Tokenizer()
    if name == "byte":
        return ByteTokenizer()
    if name == "word":
        return WordTokenizer(meta["words"])
    raise UserError(f"unknown tokenizer {name!r}; expected 'gpt2', 'byte' or 'word'")
