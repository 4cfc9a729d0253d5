"""
What enters a sealed patch: DeltaTracker, the on_model_ready callback of utils.finetune.finetune.

Non-private runs: tensor hooks record which trainable parameters receive a gradient and, for embedding
tables, which rows; frozen parameters, parameters that never receive a gradient, untouched embedding rows
and exactly-zero deltas stay out (weight decay that moved a weight without a gradient is left out and
reported).

DP runs (dp=True): the selection must not depend on which records were sampled, since that would reveal
which tokens the sampled people had. It is made from data-independent structure only: every trainable
tensor is stored, and every row of every embedding (Gaussian noise reaches all of them anyway). The
gradient hooks are not even installed, so nothing record-dependent is recorded.
"""
import copy

import torch

from utils.patch_format import DEFAULT_CHUNK_BYTES, dtype_name
from utils.patch_payload import PayloadArena, bits, delta_tensor, payload_bound, whole_tensor


class DeltaTracker:
    """on_model_ready callback for utils.finetune.finetune. When called with the prepared model (untied,
    frozen or LoRA-wrapped, not yet trained) it snapshots the trainable parameters and, without DP, puts a
    gradient hook on each: embedding tables record which rows receive a nonzero gradient, other tensors
    whether any gradient arrives. build() then turns the trained model into patch payloads."""

    def __init__(self, base_model, dp=False):
        sd = base_model.state_dict()
        self.base_dtypes = {k: v.dtype for k, v in sd.items()}
        self.default_dtype = base_model.transformer.wte.weight.dtype
        self.base_tied = base_model.weights_tied
        self.dp = dp
        self.model = None

    def __call__(self, model):
        self.model = model
        self.structure = {"untie_weights": bool(self.base_tied and not model.weights_tied),
                          "lora": copy.deepcopy(model.lora_config)}
        embeddings = {id(m.weight) for m in model.modules() if isinstance(m, torch.nn.Embedding)}
        self.trainable, self.frozen, self.snapshot = [], [], {}
        self.touched, self.row_masks, self.handles = set(), {}, []
        for name, p in model.named_parameters():
            if not p.requires_grad:
                self.frozen.append(name)
                continue
            self.trainable.append(name)
            if name in self.base_dtypes:
                self.snapshot[name] = p.detach().clone()
            if id(p) in embeddings:
                self.row_masks[name] = torch.zeros(p.shape[0], dtype=torch.bool, device=p.device)
            if not self.dp:  # under DP nothing that depends on the sampled records is recorded
                self.handles.append(p.register_hook(self._hook(name)))

    def _hook(self, name):
        mask = self.row_masks.get(name)

        def record(grad):  # returns None: the gradient itself is left alone
            self.touched.add(name)
            if mask is not None:
                mask.logical_or_(grad.detach().ne(0).flatten(1).any(1))
        return record

    def remove_hooks(self):
        for h in self.handles:
            h.remove()
        self.handles = []

    @torch.no_grad()
    def build(self, trained, delta_dtype="exact", chunk_bytes=DEFAULT_CHUNK_BYTES):
        """(list of PlainTensor, report dict). The payloads lie in one PayloadArena, in this order, with
        room to be sealed in place (seal(..., consume=True)) in chunks of at least `chunk_bytes`. The
        snapshot is zeroed and dropped afterwards."""
        if self.model is None:
            raise RuntimeError("DeltaTracker was never called: pass it as on_model_ready")
        self.remove_hooks()
        stored = None if delta_dtype == "exact" else delta_dtype
        params = dict(trained.named_parameters())
        rep = dict(trainable=len(self.trainable), frozen=len(self.frozen), untouched=[], zero_delta=[], rows={},
                   changed_values=0, stored_values=0, drift_values=0, drift_max=0.0, exceptions=0, max_error=0.0,
                   new_tensors=0)
        plan = self._plan(params, rep)
        bound = 0
        for name, dtype, rows in plan:  # sizes the arena before anything is computed: the most each can take
            dt = dtype_name(dtype)
            bound += payload_bound(params[name].shape, dt, stored or dt, None if rows is None else rows.numel())
        arena, entries = PayloadArena(bound, len(plan), chunk_bytes), []
        try:
            for name, dtype, rows in plan:
                ft = params[name].detach().to(dtype)  # the parameter itself when the dtypes agree (no copy)
                if name not in self.snapshot:
                    entry = whole_tensor(name, ft, stored, arena=arena)
                else:
                    entry = delta_tensor(name, self.snapshot[name].to(dtype), ft, rows=rows, stored_dtype=stored,
                                         arena=arena)
                    if entry is None:
                        rep["zero_delta"].append(name)
                        continue
                    if name in self.row_masks:
                        rep["rows"][name] = (entry.rows if entry.kind == "rows" else ft.shape[0], ft.shape[0])
                entries.append(entry)
                rep["stored_values"] += _values(entry)
                rep["exceptions"] += entry.exceptions
                rep["max_error"] = max(rep["max_error"], entry.max_error)
        except BaseException:
            for entry in entries:
                entry.close()
            raise
        finally:
            if not entries:
                arena.release()
            for t in self.snapshot.values():
                t.zero_()
            self.snapshot = {}
        return entries, rep

    def _plan(self, params, rep):
        """[(name, dtype, candidate rows or None)] of the tensors to store, in order; counts what is left
        out (untouched, drift) in `rep`."""
        plan = []
        for name in self.trainable:
            p = params[name]
            dtype = self.base_dtypes.get(name, self.default_dtype)
            ft = p.detach().to(dtype)
            if name not in self.snapshot:  # not in the base (a LoRA adapter): stored whole, always
                rep["new_tensors"] += 1
                rep["changed_values"] += ft.numel()
                plan.append((name, dtype, None))
                continue
            base = self.snapshot[name].to(dtype)
            changed = bits(ft) != bits(base)
            rep["changed_values"] += int(changed.sum())
            if self.dp:  # noise moved everything: select from the released weights only
                keep = None
                rows = torch.arange(ft.shape[0]) if name in self.row_masks else None
            elif name in self.row_masks:
                keep = self.row_masks[name].view(-1, *([1] * (ft.dim() - 1))).expand_as(ft)
                rows = self.row_masks[name].nonzero().squeeze(1).cpu()
            else:
                keep = None if name in self.touched else torch.zeros_like(changed)
                rows = None
            if keep is not None:  # values that moved without a gradient (weight decay): left out
                drift = changed & ~keep
                if drift.any():
                    rep["drift_values"] += int(drift.sum())
                    rep["drift_max"] = max(rep["drift_max"], float((ft - base)[drift].abs().max()))
            if not self.dp and name not in self.touched:
                rep["untouched"].append(name)
                continue
            plan.append((name, dtype, rows))
        return plan


def _values(entry):
    n = 1
    for d in entry.shape[1:]:
        n *= d
    return entry.rows * n if entry.kind == "rows" else n * (entry.shape[0] if entry.shape else 1)
