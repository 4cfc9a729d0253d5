"""
The GPT model: nanoGPT's decoder, made ready for Opacus, LoRA and KV-cached batched decoding.

- Pre-LN blocks, GELU MLP (tanh approximation, as GPT-2), causal attention through
  scaled_dot_product_attention.
- Positions are looked up with ids shaped (B, T) and contiguous, so that Opacus sees a batch
  dimension on the position embedding (nanoGPT's arange(T) gives it T instead).
- Only modules Opacus has per-sample gradient rules for: nn.Linear, nn.Embedding, nn.LayerNorm.
- generate() decodes a left-padded batch of prompts with a KV cache; use_kv_cache=False
  recomputes the whole context each token (nanoGPT) and gives the same tokens.
"""
import math
import pickle
from dataclasses import dataclass, asdict, fields

import torch
import torch.nn as nn
from torch.nn import functional as F


class UnsafeWeightsError(ValueError):
    """Pretrained weights that cannot be loaded as plain tensors (a pickle carrying code)."""


@dataclass
class GPTConfig:
    block_size: int = 256
    vocab_size: int = 50304  # GPT-2's 50257 padded up to a multiple of 64
    n_layer: int = 4
    n_head: int = 4
    n_embd: int = 256
    dropout: float = 0.0
    bias: bool = True
    pos_encoding: str = "learned"  # 'learned' | 'sinusoidal'
    tie_weights: bool = True

    def __post_init__(self):
        if self.pos_encoding not in ("learned", "sinusoidal"):
            raise ValueError(f"pos_encoding must be 'learned' or 'sinusoidal', got {self.pos_encoding!r}")
        if self.n_embd % self.n_head:
            raise ValueError(f"n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head})")

    @classmethod
    def from_dict(cls, d):
        """Build from a checkpoint's model_args, refusing keys this version does not know."""
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown model args {sorted(unknown)}; known: {sorted(known)}")
        return cls(**d)

    def to_dict(self):
        return asdict(self)


def sinusoidal_table(n_positions, n_embd):
    """Vaswani et al.'s fixed encoding: PE[p, 2i] = sin(p / 10000^(2i/d)), PE[p, 2i+1] = cos(...)."""
    pos = torch.arange(n_positions, dtype=torch.float32).unsqueeze(1)
    div = torch.exp(torch.arange(0, n_embd, 2, dtype=torch.float32) * (-math.log(10000.0) / n_embd))
    table = torch.zeros(n_positions, n_embd)
    table[:, 0::2] = torch.sin(pos * div)
    table[:, 1::2] = torch.cos(pos * div)[:, : n_embd // 2]
    return table


class KVCache:
    """Preallocated keys and values for every layer, plus which key positions are real tokens."""

    def __init__(self, n_layer, batch_size, n_head, max_len, head_dim, device, dtype):
        shape = (n_layer, batch_size, n_head, max_len, head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.key_valid = torch.zeros(batch_size, max_len, dtype=torch.bool, device=device)
        self.length = 0
        self.max_len = max_len

    def truncate(self, length):
        """Forget everything after `length` positions (e.g. reset to the prompt)."""
        self.length = length

    def expand_rows(self, rows):
        """Replicate cache rows, e.g. one prefilled prompt into many sequences: rows = index tensor."""
        self.k, self.v = self.k[:, rows].contiguous(), self.v[:, rows].contiguous()
        self.key_valid = self.key_valid[rows].contiguous()


class CausalSelfAttention(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.resid_dropout = nn.Dropout(config.dropout)
        self.n_head = config.n_head
        self.n_embd = config.n_embd
        self.dropout = config.dropout
        self.need_weights = False  # set by utils/plot.py to keep attention maps
        self.last_attn = None

    def forward(self, x, attn_mask=None, cache=None, layer=0):
        B, T, C = x.size()
        q, k, v = self.c_attn(x).split(self.n_embd, dim=2)
        hd = C // self.n_head
        q = q.view(B, T, self.n_head, hd).transpose(1, 2)
        k = k.view(B, T, self.n_head, hd).transpose(1, 2)
        v = v.view(B, T, self.n_head, hd).transpose(1, 2)
        if cache is not None:
            start = cache.length
            cache.k[layer, :, :, start:start + T] = k
            cache.v[layer, :, :, start:start + T] = v
            k = cache.k[layer, :, :, : start + T]
            v = cache.v[layer, :, :, : start + T]
        dropout_p = self.dropout if self.training else 0.0
        if self.need_weights:
            scores = (q @ k.transpose(-2, -1)) / math.sqrt(hd)
            if attn_mask is None and T > 1:
                attn_mask = torch.ones(T, k.size(2), dtype=torch.bool, device=x.device).tril(k.size(2) - T)
            if attn_mask is not None:
                scores = scores.masked_fill(~attn_mask, float("-inf"))
            self.last_attn = scores.softmax(-1).detach()
            y = self.last_attn @ v
        else:
            # attn_mask None: plain causal over T queries and T keys, or one new query that sees every
            # cached key (decoding); GPT._attention_mask returns None only in those two cases.
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=dropout_p,
                                               is_causal=attn_mask is None and T > 1)
        y = y.transpose(1, 2).contiguous().view(B, T, C)
        return self.resid_dropout(self.c_proj(y))


class MLP(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=config.bias)
        self.gelu = nn.GELU(approximate="tanh")
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x):
        return self.dropout(self.c_proj(self.gelu(self.c_fc(x))))


class Block(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.mlp = MLP(config)

    def forward(self, x, attn_mask=None, cache=None, layer=0):
        x = x + self.attn(self.ln_1(x), attn_mask, cache, layer)
        return x + self.mlp(self.ln_2(x))


class LoRALinear(nn.Module):
    """y = base(x) + (alpha / r) * B(A(x)). A and B are plain nn.Linear, so Opacus (hooks and ghost)
    computes their per-sample gradients; B starts at zero so the wrapped layer starts unchanged."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float):
        super().__init__()
        self.base = base
        self.lora_A = nn.Linear(base.in_features, rank, bias=False)
        self.lora_B = nn.Linear(rank, base.out_features, bias=False)
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B.weight)
        self.scaling = alpha / rank
        base.weight.requires_grad_(False)
        if base.bias is not None:
            base.bias.requires_grad_(False)

    def forward(self, x):
        return self.base(x) + self.lora_B(self.lora_A(x)) * self.scaling


LORA_TARGETS = {"attn": ("attn.c_attn", "attn.c_proj"), "mlp": ("mlp.c_fc", "mlp.c_proj")}
# the hub names GPT.from_pretrained takes besides a save_pretrained directory
GPT2_NAMES = ("gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl")


class GPT(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        assert config.vocab_size is not None and config.block_size is not None
        self.config = config
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(config.vocab_size, config.n_embd),
            drop=nn.Dropout(config.dropout),
            h=nn.ModuleList([Block(config) for _ in range(config.n_layer)]),
            ln_f=nn.LayerNorm(config.n_embd, bias=config.bias),
        ))
        if config.pos_encoding == "learned":
            self.transformer["wpe"] = nn.Embedding(config.block_size, config.n_embd)
        else:
            self.register_buffer("pe_table", sinusoidal_table(config.block_size, config.n_embd), persistent=False)
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        if config.tie_weights:
            self.lm_head.weight = self.transformer.wte.weight
        self.lora_config = None  # {"rank", "alpha", "targets"} once add_lora() ran
        self.apply(self._init_weights)
        for pn, p in self.named_parameters():  # GPT-2's scaled init of the residual projections
            if pn.endswith("c_proj.weight"):
                torch.nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))

    def _init_weights(self, module):
        if isinstance(module, nn.Linear):
            torch.nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                torch.nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            torch.nn.init.normal_(module.weight, mean=0.0, std=0.02)

    # ---------------------------------------------------------------- sizes
    def get_num_params(self, non_embedding=True, trainable_only=False):
        seen, n = set(), 0
        for p in self.parameters():  # parameters() already yields a tied weight once
            if trainable_only and not p.requires_grad:
                continue
            if id(p) not in seen:
                seen.add(id(p))
                n += p.numel()
        if non_embedding and "wpe" in self.transformer:
            n -= self.transformer.wpe.weight.numel()
        return n

    @property
    def weights_tied(self):
        return self.lm_head.weight is self.transformer.wte.weight

    # ---------------------------------------------------------------- forward
    def positions(self, idx, attention_mask=None, start=0):
        """(B, T) contiguous position ids. With left padding, each row's first real token gets 0."""
        B, T = idx.shape
        if attention_mask is None:
            pos = torch.arange(start, start + T, device=idx.device).unsqueeze(0).expand(B, T)
        else:  # attention_mask covers everything so far (B, start + T); take the last T columns
            pos = (attention_mask.long().cumsum(1) - 1).clamp(min=0)[:, -T:]
        return pos.contiguous()

    def forward(self, idx, targets=None, attention_mask=None, cache=None, last_only=False):
        """
        idx: (B, T) token ids. targets: (B, T) with -1 for positions to ignore; returns mean loss.
        attention_mask: (B, L) bool/0-1, 1 = real token, L = cached length + T (left padding).
        cache: a KVCache to read and extend. last_only: logits of the last position only.
        """
        B, T = idx.shape
        start = cache.length if cache is not None else 0
        if start + T > self.config.block_size:
            raise ValueError(f"sequence length {start + T} exceeds block_size {self.config.block_size}")
        pos = self.positions(idx, attention_mask, start)
        tok = self.transformer.wte(idx)
        if "wpe" in self.transformer:
            x = tok + self.transformer.wpe(pos)
        else:
            x = tok + self.pe_table[pos]
        x = self.transformer.drop(x)
        attn_mask = self._attention_mask(B, T, start, attention_mask, cache, idx.device)
        for i, block in enumerate(self.transformer.h):
            x = block(x, attn_mask, cache, i)
        if cache is not None:
            cache.length = start + T
        x = self.transformer.ln_f(x)
        if last_only:
            return self.lm_head(x[:, [-1], :]), None
        logits = self.lm_head(x)
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.view(-1, logits.size(-1)), targets.reshape(-1), ignore_index=-1)
        return logits, loss

    @staticmethod
    def _attention_mask(B, T, start, attention_mask, cache, device):
        """None where plain causal attention is exact (the fast path): no padding, and either no cache,
        a prefill from position 0, or one new token. Otherwise a (B, 1, T, start+T) bool mask: causal,
        minus padded keys, plus each query's own key so padded rows never see an empty row."""
        L = start + T
        if cache is not None:
            new_valid = attention_mask[:, -T:].bool() if attention_mask is not None else True
            cache.key_valid[:, start:L] = new_valid
        if attention_mask is None and (cache is None or start == 0 or T == 1):
            return None
        key_valid = cache.key_valid[:, :L] if cache is not None else attention_mask.bool()
        if T == 1:  # one new (real) token: it may see every valid key
            return key_valid[:, None, None, :]
        q_abs = torch.arange(start, L, device=device).unsqueeze(1)
        keys = torch.arange(L, device=device).unsqueeze(0)
        mask = (keys <= q_abs).unsqueeze(0) & key_valid.unsqueeze(1)  # (B, T, L)
        mask = mask | (keys == q_abs).unsqueeze(0)
        return mask.unsqueeze(1)

    # ---------------------------------------------------------------- decoding
    def new_cache(self, batch_size, max_len=None, dtype=None):
        c = self.config
        p = self.lm_head.weight
        return KVCache(c.n_layer, batch_size, c.n_head, max_len or c.block_size, c.n_embd // c.n_head,
                       p.device, dtype or p.dtype)

    @torch.no_grad()
    def generate(self, idx, max_new_tokens, temperature=1.0, top_k=None, top_p=None, greedy=False,
                 use_kv_cache=True, generator=None, attention_mask=None, return_logits=False):
        """
        Extend idx (B, T), left-padded where attention_mask (B, T) is 0, by max_new_tokens tokens.
        Past block_size the context is cropped to its last block_size tokens in both modes (the cache is
        then rebuilt from the cropped window each step), so cached and uncached decoding agree everywhere.
        Returns idx (B, T + max_new_tokens), and the per-step logits (B, max_new_tokens, V) if asked.
        """
        if max_new_tokens <= 0:
            return (idx, idx.new_zeros(idx.size(0), 0, self.config.vocab_size).float()) if return_logits else idx
        bs = self.config.block_size
        B = idx.size(0)
        mask = attention_mask.bool() if attention_mask is not None else None
        cache, step_logits = None, []
        for _ in range(max_new_tokens):
            window = idx[:, -bs:]
            window_mask = mask[:, -bs:] if mask is not None else None
            if not use_kv_cache:
                logits, _ = self(window, attention_mask=window_mask, last_only=True)
            elif cache is None or idx.size(1) > bs:  # (re)prefill the whole window
                cache = self.new_cache(B)
                logits, _ = self(window, attention_mask=window_mask, cache=cache, last_only=True)
            else:  # feed only the newest token
                logits, _ = self(idx[:, -1:], attention_mask=window_mask, cache=cache, last_only=True)
            logits = logits[:, -1, :].float()
            if return_logits:
                step_logits.append(logits)
            nxt = sample_next(logits, temperature, top_k, top_p, greedy, generator)
            idx = torch.cat((idx, nxt), dim=1)
            if mask is not None:
                mask = torch.cat((mask, mask.new_ones(B, 1)), dim=1)
        return (idx, torch.stack(step_logits, 1)) if return_logits else idx

    # ---------------------------------------------------------------- what is trained
    def untie_weights(self):
        """Give lm_head its own copy of the embedding (ghost clipping refuses tied parameters)."""
        if self.weights_tied:
            self.lm_head.weight = nn.Parameter(self.transformer.wte.weight.detach().clone())
            self.config.tie_weights = False

    def freeze(self, embeddings=False, first_blocks=0, head=False, final_ln=False):
        """Selective freezing: token/position embeddings, the first K blocks, the head, the final LN."""
        if first_blocks < 0 or first_blocks > self.config.n_layer:
            raise ValueError(f"first_blocks must be in [0, {self.config.n_layer}], got {first_blocks}")
        frozen = []
        if embeddings:
            frozen += [self.transformer.wte] + ([self.transformer.wpe] if "wpe" in self.transformer else [])
        frozen += list(self.transformer.h[:first_blocks])
        if head:
            frozen.append(self.lm_head)
        if final_ln:
            frozen.append(self.transformer.ln_f)
        for m in frozen:
            for p in m.parameters():
                p.requires_grad_(False)

    def add_lora(self, rank, alpha=16.0, targets=("attn",)):
        """Freeze every weight and wrap the chosen linears with trainable rank-r adapters."""
        if rank <= 0:
            raise ValueError(f"lora_rank must be positive, got {rank}")
        bad = set(targets) - set(LORA_TARGETS)
        if bad:
            raise ValueError(f"unknown LoRA targets {sorted(bad)}; choose from {sorted(LORA_TARGETS)}")
        for p in self.parameters():
            p.requires_grad_(False)
        for block in self.transformer.h:
            for t in targets:
                for path in LORA_TARGETS[t]:
                    parent_name, child = path.split(".")
                    parent = getattr(block, parent_name)
                    setattr(parent, child, LoRALinear(getattr(parent, child), rank, alpha))
        self.lora_config = {"rank": rank, "alpha": alpha, "targets": list(targets)}

    @torch.no_grad()
    def merge_lora(self):
        """Fold every adapter into its linear (W += (alpha / r) * B @ A) and drop the adapters: a plain
        GPT with the same outputs, e.g. for export. A no-op without LoRA."""
        for block in self.transformer.h:
            for parent in (block.attn, block.mlp):
                for child, module in list(parent.named_children()):
                    if isinstance(module, LoRALinear):
                        base = module.base
                        base.weight += module.scaling * (module.lora_B.weight @ module.lora_A.weight)
                        setattr(parent, child, base)
        self.lora_config = None

    # ---------------------------------------------------------------- training helpers
    def configure_optimizers(self, weight_decay, learning_rate, betas, device_type):
        """AdamW; decay only >=2-D weights (matmuls, embeddings), never biases or LayerNorm gains."""
        params = [p for p in self.parameters() if p.requires_grad]
        decay = [p for p in params if p.dim() >= 2]
        no_decay = [p for p in params if p.dim() < 2]
        groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
        extra = {"fused": True} if device_type == "cuda" else {}
        return torch.optim.AdamW(groups, lr=learning_rate, betas=betas, **extra)

    def estimate_mfu(self, fwdbwd_per_iter, dt, peak_flops=312e12, block_size=None):
        """Model FLOPs utilisation: achieved (6N + 12 L H Q T) flops per token over peak_flops;
        T is the trained sequence length (block_size, or the model's own)."""
        N = self.get_num_params()
        cfg = self.config
        L, H, Q, T = cfg.n_layer, cfg.n_head, cfg.n_embd // cfg.n_head, block_size or cfg.block_size
        flops_per_iter = (6 * N + 12 * L * H * Q * T) * T * fwdbwd_per_iter
        return flops_per_iter / dt / peak_flops

    # ---------------------------------------------------------------- GPT-2 weights
    @classmethod
    def from_pretrained(cls, name_or_dir, override_args=None):
        """Load Hugging Face GPT-2 weights from a save_pretrained directory (or a hub name when online)."""
        try:
            from transformers import GPT2LMHeadModel
        except ImportError as e:
            raise RuntimeError("loading GPT-2 weights needs `transformers` (pip install -e .[test])") from e
        try:
            hf = GPT2LMHeadModel.from_pretrained(name_or_dir)
        except pickle.UnpicklingError as e:  # torch.load(weights_only=True) met code in a .bin pickle
            refused = next((ln.strip() for ln in str(e).splitlines() if "GLOBAL" in ln), "not plain tensors")
            raise UnsafeWeightsError(f"the weights in {name_or_dir} are a pickle that would run code ({refused}); "
                                     "refused: only plain tensors are loaded (use a model.safetensors you trust)") from None
        hc = hf.config
        if getattr(hc, "activation_function", "gelu_new") not in ("gelu_new", "gelu_pytorch_tanh"):
            raise ValueError(f"unsupported activation {hc.activation_function!r}: this GPT uses GPT-2's tanh GELU")
        args = dict(n_layer=hc.n_layer, n_head=hc.n_head, n_embd=hc.n_embd, block_size=hc.n_positions,
                    vocab_size=hc.vocab_size, bias=True, dropout=0.0, tie_weights=True)
        args.update(override_args or {})
        model = cls(GPTConfig(**args))
        sd = model.state_dict()
        sd_hf = hf.state_dict()
        transposed = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
        with torch.no_grad():
            for k, v in sd_hf.items():
                if k.endswith(".attn.masked_bias") or k.endswith(".attn.bias"):
                    continue  # causal-mask buffers, not weights
                if k not in sd:
                    raise ValueError(f"unexpected GPT-2 weight {k}")
                sd[k].copy_(v.t() if k.endswith(transposed) else v)
        return model


def sample_next(logits, temperature=1.0, top_k=None, top_p=None, greedy=False, generator=None):
    """One token per row from (B, V) logits: greedy, or temperature + optional top-k / nucleus."""
    if greedy or temperature == 0:
        return logits.argmax(-1, keepdim=True)
    logits = logits / temperature
    if top_k is not None:
        v, _ = torch.topk(logits, min(top_k, logits.size(-1)))
        logits = logits.masked_fill(logits < v[:, [-1]], float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        drop = cum - sorted_logits.softmax(-1) > top_p  # keep the smallest prefix reaching top_p
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(1, order, sorted_logits)
    probs = F.softmax(logits, dim=-1)
    return torch.multinomial(probs, num_samples=1, generator=generator)
