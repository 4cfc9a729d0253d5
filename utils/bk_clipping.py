"""
Book-keeping (BK) DP clipping: every record's gradient norm and the clipped, summed gradient from ONE
backward pass, tied embedding/head weight included.

Algorithm (Bu, Wang, Zha & Karypis, "Differentially Private Optimization on Large Model at Small Cost",
ICML 2023 -- "book-keeping"; the mixed ghost-norm choice is their MixOpt, after Bu et al. 2022, "Scalable
and Efficient Training of Large Convolutional Neural Networks with Differential Privacy"):

1. One forward and one backward of sum_i loss_i (loss_i = record i's mean over its target tokens, so
   each record's output gradients are its own per-record gradients). Each trainable Linear, Embedding
   and LayerNorm runs through a custom autograd Function that returns only the input gradient and
   *books* what its weight gradient is made of: the input A (B,T,d_in), already kept by the forward,
   and the output gradient G (B,T,d_out). Autograd never forms a weight gradient, so nothing is
   computed and thrown away (Opacus's ghost mode computes them in its first backward, then runs a
   second backward).
2. Per-record squared norms, per layer, whichever is cheaper for its shape: the ghost norm
   sum_{s,t} (A_s.A_t)(G_s.G_t) (cost ~T^2 (d_in+d_out)), or the materialised per-record gradient
   G_i^T A_i (cost ~T d_in d_out). Embeddings: sum_{s,t} [id_s = id_t] (G_s.G_t), or a per-record
   scatter when the table is small (positions). LayerNorm and biases: materialised (B, d), cheap.
3. A weight used twice (GPT-2's token embedding tied to the head) gets one per-record gradient
   E_i + H_i, so its squared norm has the cross term 2 <E_i, H_i>,
   <E_i, H_i> = sum_{t,s} G_head[i,s,id_t] (A_head[i,s] . G_emb[i,t]): a (T x T) contraction,
   never a (V x d) per-record tensor. Opacus's ghost clipping refuses tied weights for want of it.
4. c_i = min(1, C / (||g_i|| + 1e-6)) (Opacus's factor, so the modes agree), and the clipped sum
   sum_i c_i G_i^T A_i is one matmul per layer -- the weight-gradient matmul a non-private backward
   does anyway -- written to p.grad.

It plugs into Opacus's optimizer protocol rather than forking it: p.grad holds the clipped sum of the
physical batch, and DPOptimizerFastGradientClipping (or its Distributed twin; opacus.optimizers.
get_optimizer_class(..., grad_sample_mode="ghost")) accumulates microbatches into p.summed_grad, adds
the noise once per logical batch, divides by the expected batch size and calls the accountant hook.
Any override of that optimizer's noise draw therefore applies to this mode unchanged.

Use: wrapped = BookKeeping(model, max_grad_norm); logits = wrapped(x); per_record_losses.sum()
.backward(); wrapped.clip_and_sum() (sets p.grad, books the norms in wrapped.last_norms); close()
restores the modules' own forward. norm_method 'auto' | 'ghost' | 'materialize' forces the per-layer
choice (tests check both paths).
"""
import types

import torch
import torch.nn as nn
import torch.nn.functional as F

NORM_METHODS = ("auto", "ghost", "materialize")


def _wide(t):
    """Norms and sums in at least fp32: bf16/fp16 output gradients would lose the clipping's precision."""
    return t.float() if t.dtype in (torch.bfloat16, torch.float16) else t


class _LinearUse:
    """One use of a Linear weight: its per-record gradient is G_i^T A_i (weight shape (d_out, d_in))."""
    kind = "linear"

    def __init__(self, a, g):
        self.a = _wide(a.reshape(a.size(0), -1, a.size(-1)))
        self.g = _wide(g.reshape(g.size(0), -1, g.size(-1)))
        self.per_record = None

    def ghost_is_cheaper(self):
        t, d_in, d_out = self.a.size(1), self.a.size(2), self.g.size(2)
        return t * (d_in + d_out) < d_in * d_out

    def materialize(self):
        if self.per_record is None:
            self.per_record = torch.bmm(self.g.transpose(1, 2), self.a)
        return self.per_record

    def clipped_sum(self, c):
        if self.per_record is not None:
            return torch.tensordot(c.to(self.per_record.dtype), self.per_record, dims=1)
        c = c.to(self.g.dtype)[:, None, None]
        if self.a.size(2) <= self.g.size(2):  # scale the narrower side (the head: A, not its V-wide G)
            return self.g.flatten(0, 1).t() @ (self.a * c).flatten(0, 1)
        return (self.g * c).flatten(0, 1).t() @ self.a.flatten(0, 1)


class _EmbeddingUse:
    """One use of an Embedding table: per record, row id_t receives G_t (a scatter over T tokens)."""
    kind = "embedding"

    def __init__(self, ids, g, num_embeddings):
        self.ids = ids.reshape(ids.size(0), -1)
        self.g = _wide(g.reshape(g.size(0), -1, g.size(-1)))
        self.num_embeddings = num_embeddings
        self.per_record = None

    def ghost_is_cheaper(self):
        t = self.ids.size(1)
        return t * t < self.num_embeddings + t

    def materialize(self):
        if self.per_record is None:
            b, t, d = self.g.shape
            flat = (self.ids + torch.arange(b, device=self.ids.device)[:, None] * self.num_embeddings).flatten()
            rows = self.g.new_zeros(b * self.num_embeddings, d).index_add_(0, flat, self.g.flatten(0, 1))
            self.per_record = rows.view(b, self.num_embeddings, d)
        return self.per_record

    def clipped_sum(self, c):
        if self.per_record is not None:
            return torch.tensordot(c.to(self.per_record.dtype), self.per_record, dims=1)
        gc = (self.g * c.to(self.g.dtype)[:, None, None]).flatten(0, 1)
        return gc.new_zeros(self.num_embeddings, gc.size(1)).index_add_(0, self.ids.flatten(), gc)


class _PerRecordUse:
    """A per-record gradient formed in backward (biases, LayerNorm): (B, *param shape)."""
    kind = "per_record"

    def __init__(self, per_record):
        self.per_record = _wide(per_record)

    def materialize(self):
        return self.per_record

    def clipped_sum(self, c):
        return torch.tensordot(c.to(self.per_record.dtype), self.per_record, dims=1)


def _flat_dot(x, y):
    return (x.flatten(1) * y.flatten(1)).sum(1)


def _inner(u, v, method):
    """(B,) per-record <grad_u, grad_v> for two uses of one parameter (u is v: the squared norm)."""
    ghost = {"ghost": True, "materialize": False}.get(method)
    if u.kind == "embedding" and v.kind == "linear":
        u, v = v, u
    if u.kind == "linear" and v.kind == "linear" and u.per_record is None and v.per_record is None:
        if ghost if ghost is not None else (u.ghost_is_cheaper() and v.ghost_is_cheaper()):
            return (torch.bmm(u.a, v.a.transpose(1, 2)) * torch.bmm(u.g, v.g.transpose(1, 2))).sum((1, 2))
    if u.kind == "embedding" and v.kind == "embedding" and u.per_record is None and v.per_record is None:
        if ghost if ghost is not None else (u.ghost_is_cheaper() and v.ghost_is_cheaper()):
            same = (u.ids[:, :, None] == v.ids[:, None, :]).to(u.g.dtype)
            return (same * torch.bmm(u.g, v.g.transpose(1, 2))).sum((1, 2))
    if u.kind == "linear" and v.kind == "embedding" and u.per_record is None and v.per_record is None:
        if ghost if ghost is not None else (u.ghost_is_cheaper() and v.ghost_is_cheaper()):
            # the tied head (u) and embedding (v): sum_{s,t} G_head[s, id_t] (A_head[s] . G_emb[t])
            picked = torch.gather(u.g, 2, v.ids[:, None, :].expand(-1, u.g.size(1), -1))  # (B, T_head, T_emb)
            return (picked * torch.bmm(u.a, v.g.transpose(1, 2))).sum((1, 2))
    return _flat_dot(u.materialize(), v.materialize())


def _summed_over_tokens(g):
    return g.reshape(g.size(0), -1, g.size(-1)).sum(1)


class _BookedLinear(torch.autograd.Function):
    """F.linear whose backward returns the input gradient only and books (A, G) for the weight."""

    @staticmethod
    def forward(ctx, x, weight, bias, book):
        ctx.save_for_backward(x, weight)
        ctx.book, ctx.weight, ctx.bias = book, weight, bias
        return F.linear(x, weight, bias)

    @staticmethod
    def backward(ctx, g):
        x, weight = ctx.saved_tensors
        need = ctx.needs_input_grad
        if need[1]:
            ctx.book.add(ctx.weight, _LinearUse(x, g))
        if need[2]:
            ctx.book.add(ctx.bias, _PerRecordUse(_summed_over_tokens(g)))
        grad_x = g.matmul(weight.to(g.dtype)) if need[0] else None
        return grad_x, None, None, None


class _BookedEmbedding(torch.autograd.Function):
    @staticmethod
    def forward(ctx, ids, weight, book):
        ctx.save_for_backward(ids)
        ctx.book, ctx.num_embeddings = book, weight.size(0)
        ctx.weight = weight
        return F.embedding(ids, weight)

    @staticmethod
    def backward(ctx, g):
        (ids,) = ctx.saved_tensors
        ctx.book.add(ctx.weight, _EmbeddingUse(ids, g, ctx.num_embeddings))
        return None, None, None


class _BookedAffine(torch.autograd.Function):
    """LayerNorm's elementwise affine y = xhat * weight + bias; per-record grads are (B, d) sums over T."""

    @staticmethod
    def forward(ctx, xhat, weight, bias, book):
        ctx.save_for_backward(xhat, weight)
        ctx.book, ctx.weight, ctx.bias = book, weight, bias
        y = xhat * weight
        return y + bias if bias is not None else y

    @staticmethod
    def backward(ctx, g):
        xhat, weight = ctx.saved_tensors
        need = ctx.needs_input_grad
        if need[1]:
            ctx.book.add(ctx.weight, _PerRecordUse(_summed_over_tokens(g * xhat)))
        if need[2]:
            ctx.book.add(ctx.bias, _PerRecordUse(_summed_over_tokens(g)))
        return (g * weight if need[0] else None), None, None, None


class BookKeeping(nn.Module):
    """Wraps a model so that one backward books every trainable layer's A and G; clip_and_sum() then
    writes the clipped per-record sum into p.grad. Every trainable parameter must belong to an
    nn.Linear, nn.Embedding or nn.LayerNorm (the layers model.py uses); anything else is refused."""

    def __init__(self, module, max_grad_norm, norm_method="auto"):
        super().__init__()
        if norm_method not in NORM_METHODS:
            raise ValueError(f"norm_method must be one of {NORM_METHODS}; got {norm_method!r}")
        self._module = module
        self.max_grad_norm = float(max_grad_norm)
        self.norm_method = norm_method
        self.trainable = [p for p in module.parameters() if p.requires_grad]  # a tied weight once
        self.uses, self.last_norms, self._patched = {}, None, []
        covered = set()
        for m in module.modules():
            own = [p for p in m.parameters(recurse=False) if p.requires_grad]
            if not own:
                continue
            book = self
            if isinstance(m, nn.Linear):
                def forward(mod, x):
                    return _BookedLinear.apply(x, mod.weight, mod.bias, book)
            elif isinstance(m, nn.Embedding):
                if m.padding_idx is not None or m.max_norm is not None or m.sparse:
                    raise ValueError("book-keeping clipping supports plain embeddings only (no padding_idx, "
                                     "max_norm or sparse)")

                def forward(mod, ids):
                    return _BookedEmbedding.apply(ids, mod.weight, book)
            elif isinstance(m, nn.LayerNorm) and m.elementwise_affine:
                def forward(mod, x):  # normalisation by autograd, the affine part booked
                    xhat = F.layer_norm(x, mod.normalized_shape, None, None, mod.eps)
                    return _BookedAffine.apply(xhat, mod.weight, mod.bias, book)
            else:
                raise ValueError(f"book-keeping clipping has no rule for trainable {type(m).__name__}")
            m.forward = types.MethodType(forward, m)  # an instance attribute: close() deletes it
            self._patched.append(m)
            covered.update(id(p) for p in own)
        missing = [p for p in self.trainable if id(p) not in covered]
        if missing:
            raise ValueError(f"{len(missing)} trainable parameters are outside Linear/Embedding/LayerNorm")

    def forward(self, *args, **kwargs):
        return self._module(*args, **kwargs)

    # --------------------------------------------------------------- filled during backward
    def add(self, param, use):
        self.uses.setdefault(param, []).append(use)

    # --------------------------------------------------------------- after backward
    @torch.no_grad()
    def clip_and_sum(self):
        """Per-record norms over every trainable parameter, Opacus's clip factor, clipped sum -> p.grad."""
        if not self.uses:
            raise RuntimeError("clip_and_sum() before any backward through the wrapped model")
        sq = None
        for uses in self.uses.values():
            for j, u in enumerate(uses):
                for v in uses[j:]:
                    term = _inner(u, v, self.norm_method)
                    term = term if v is u else 2 * term
                    sq = term if sq is None else sq + term
        norms = sq.clamp(min=0).sqrt()
        c = (self.max_grad_norm / (norms + 1e-6)).clamp(max=1.0)
        for p, uses in self.uses.items():
            total = uses[0].clipped_sum(c)
            for u in uses[1:]:
                total = total + u.clipped_sum(c)
            p.grad = total.to(p.dtype).view_as(p)
        for p in self.trainable:  # a layer this forward never used: every record's gradient there is 0
            if p not in self.uses:
                p.grad = torch.zeros_like(p)
        self.last_norms = norms
        self.uses = {}

    def close(self):
        """Give the modules their own forward back; returns the wrapped model."""
        for m in self._patched:
            del m.forward
        self._patched, self.uses = [], {}
        return self._module
