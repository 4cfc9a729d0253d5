"""
Writes the sealed-patch test vectors in this folder (run once; the files are committed):

    python tests/vectors/make_vectors.py

- small.patch: a version-1 sealed patch over a ~350-parameter GPT (vocab 8, d=4, one block, tied head);
  tenant "vector-tenant", generation 1, chunk_bytes 64 (tensors span several chunks); kinds `rows`
  (embedding rows 1 and 5), `delta` with exception bitmap (values that cross zero), `delta` stored as
  bfloat16 (lossy), and the untied head; structure untie_weights = true.
- key.hex: its key, bound to the tenant (PATCH_FORMAT.md section 3).
- expected.json: the base model's state_dict (hex of each tensor's little-endian bytes, and aliases),
  its base fingerprint, and per tensor the decrypted payload (hex), the values and row indices as
  numbers, the exception indices, and the patched tensor (hex). A reader passes when it authenticates
  the file, reproduces every payload, the fingerprint and every patched tensor.
Nonces and salts are random: running this again gives other (equally valid) vectors.
"""
import copy
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
from model import GPT, GPTConfig  # noqa: E402
from utils.patch_apply import apply_sealed_patch, base_fingerprint, tensor_bytes  # noqa: E402
from utils.patch_cipher import open_patch, seal  # noqa: E402
from utils.patch_keys import generate_key_file, load_key  # noqa: E402
from utils.patch_payload import delta_tensor  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
TENANT = "vector-tenant"


def base_model():
    torch.manual_seed(0)
    return GPT(GPTConfig(block_size=4, vocab_size=8, n_layer=1, n_head=1, n_embd=4, dropout=0.0, bias=True)).eval()


def main():
    base = base_model()
    ft = copy.deepcopy(base)
    ft.untie_weights()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        ft.transformer.wte.weight[[1, 5]] += 0.01 * torch.randn(2, 4, generator=g)
        w = ft.transformer.h[0].attn.c_attn.weight
        w += 0.002 * torch.randn(w.shape, generator=g)
        w[0, :3] = torch.tensor([1e-9, -3e-12, 0.0])  # |fine-tuned| << |base|: exceptions
        ft.transformer.h[0].mlp.c_fc.bias += 0.01
        ft.lm_head.weight += 1e-3 * torch.randn(ft.lm_head.weight.shape, generator=g)
    bp = dict(base.named_parameters())
    bp["lm_head.weight"] = base.transformer.wte.weight
    plain = [delta_tensor("transformer.wte.weight", bp["transformer.wte.weight"], ft.transformer.wte.weight, rows=range(8)),
             delta_tensor("transformer.h.0.attn.c_attn.weight", bp["transformer.h.0.attn.c_attn.weight"],
                          ft.transformer.h[0].attn.c_attn.weight),
             delta_tensor("transformer.h.0.mlp.c_fc.bias", bp["transformer.h.0.mlp.c_fc.bias"],
                          ft.transformer.h[0].mlp.c_fc.bias, stored_dtype="bfloat16"),
             delta_tensor("lm_head.weight", bp["lm_head.weight"], ft.lm_head.weight)]
    key_file = generate_key_file(os.path.join(HERE, "key.hex"), tenant=TENANT)
    key = load_key(key_file=key_file)
    sealed = seal(plain, key, tenant=TENANT, base_fingerprint=base_fingerprint(base), generation=1, chunk_bytes=64,
                  structure={"untie_weights": True, "lora": None}, meta={"dp": False, "epsilon": None, "note": "test vector"})
    for t in plain:
        t.close()
    sealed.export(os.path.join(HERE, "small.patch"))
    state, seen = [], {}
    for name, t in sorted(base.state_dict().items()):
        ident = (t.data_ptr(), t.dtype, tuple(t.shape), t.stride())
        if ident in seen:
            state.append({"name": name, "alias_of": seen[ident]})
            continue
        seen[ident] = name
        state.append({"name": name, "dtype": str(t.dtype)[6:], "shape": list(t.shape), "hex": tensor_bytes(t).tobytes().hex()})
    opened = open_patch(sealed, key, TENANT)
    tensors = {}
    for i, e in enumerate(opened.header["tensors"]):
        rows, values, bitmap = opened.segments(i)
        off = opened.offsets[i]
        exc = [k for k in range(values.numel()) if bitmap.numel() and bitmap[k // 8] >> (k % 8) & 1]
        tensors[e["name"]] = {"kind": e["kind"], "payload_hex": bytes(opened.plain.view(off, e["plain_bytes"])).hex(),
                              "rows": rows.tolist(), "values": values.float().tolist(), "exceptions": exc}
    opened.plain.close()
    apply_sealed_patch(base, sealed, key, TENANT)
    for name, p in base.named_parameters():
        if name in tensors:
            tensors[name]["patched_hex"] = tensor_bytes(p).tobytes().hex()
    expected = {"tenant": TENANT, "generation": 1, "base_fingerprint": sealed.header["base_fingerprint"],
                "base_state_dict": state, "tensors": tensors}
    with open(os.path.join(HERE, "expected.json"), "w") as f:
        json.dump(expected, f, indent=1)
        f.write("\n")
    print(f"wrote small.patch ({sealed.nbytes} bytes), key.hex, expected.json")


if __name__ == "__main__":
    main()
