"""
Unit test of sealed patches, runnable from the shell: exit 0 only when every property holds, 1 otherwise.

    python test_pipeline/decrypt_unit_test.py [--seed=0] [--chunk_bytes=1024]

A tiny base model and a "fine-tuned" copy are built in memory (no training, no download): some embedding
rows, some dense tensors, values that cross zero (the exception bitmap), an untied head, and, in a second
patch, LoRA adapters. Checked:
 1. round trip through a file: patched == fine-tuned bit for bit; revert == base bit for bit;
 2. an independent reader, written from PATCH_FORMAT.md with `cryptography` only (it imports nothing from
    this repository), authenticates the header, decrypts every chunk and rebuilds the same weights;
 3. key separation: one distinct subkey per tensor and purpose; no nonce repeats; sealing the same
    payload twice gives a new salt, patch id and ciphertext;
 4. the associated data binds every field: changing any one line of it makes the tag fail;
 5. a wrong key is refused as WrongKeyError, and the sealed file contains none of the plaintext;
 6. the test vectors in tests/vectors/ (small.patch, key.hex, expected.json): the independent reader reads
    the key file, authenticates the patch, reproduces every payload, the base fingerprint (from the base
    state_dict in expected.json, PATCH_FORMAT.md section 6) and every patched tensor.
"""
import hashlib
import json
import os
import struct
import sys
import tempfile

import torch
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes, hmac
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from configurator import configure
from model import GPT, GPTConfig
from utils.cli import run_cli
from utils.patch_apply import apply_sealed_patch, base_fingerprint
from utils.patch_cipher import seal
from utils.patch_errors import WrongKeyError
from utils.patch_keys import load_key
from utils.patch_payload import delta_tensor, whole_tensor

DEFAULTS = dict(
    seed=0,            # seeds the test tensors (the keys are random)
    chunk_bytes=1024,  # small, so tensors span several AES-GCM chunks
)

# ----------------------------------------------------------------------------- the independent reader
LABEL = "private-nanogpt sealed-patch v1"
ITEMSIZE = {"float32": 4, "float16": 2, "bfloat16": 2, "float64": 8}


def subkey(master, salt, purpose):
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=salt, info=f"{LABEL} {purpose}".encode()).derive(master)


def chunk_ad(h, header_sha256, e, i):
    fields = [LABEL, f"patch_id={h['patch_id']}", f"tenant={h['tenant']}", f"base={h['base_fingerprint']}",
              f"header_sha256={header_sha256}", f"tensor={e['name']}", f"kind={e['kind']}", f"dtype={e['dtype']}",
              f"stored_dtype={e['stored_dtype']}", f"shape={','.join(str(d) for d in e['shape'])}",
              f"rows={e['rows']}", f"exceptions={e['exceptions']}", f"plain_bytes={e['plain_bytes']}",
              f"chunk={i}/{e['chunks']}"]
    return fields


def read_sealed(data, master):
    """(header, {name: payload bytes}, [(name, chunk, nonce, ciphertext+tag, ad fields)]) per PATCH_FORMAT.md."""
    magic, version, n = struct.unpack_from("<8sHI", data, 0)
    assert magic == b"NGPTPTCH" and version == 1
    signed, header = data[:14 + n], json.loads(data[14:14 + n])
    salt = bytes.fromhex(header["salt"])
    assert subkey(master, salt, "key-check").hex() == header["key_check"], "wrong key"
    mac = hmac.HMAC(subkey(master, salt, "header-mac"), hashes.SHA256())
    mac.update(signed)
    mac.verify(data[14 + n:14 + n + 32])
    header_sha = hashlib.sha256(signed).hexdigest()
    pos, payloads, records = 14 + n + 32, {}, []
    for e in header["tensors"]:
        aes, parts, left = AESGCM(subkey(master, salt, "tensor " + e["name"])), [], e["plain_bytes"]
        assert pos == 14 + n + 32 + e["offset"]
        for i in range(e["chunks"]):
            size = min(header["chunk_bytes"], left)
            nonce, sealed = data[pos:pos + 12], data[pos + 12:pos + 12 + size + 16]
            ad = chunk_ad(header, header_sha, e, i)
            parts.append(aes.decrypt(nonce, sealed, ("\n".join(ad) + "\n").encode()))
            records.append((e["name"], i, nonce, sealed, ad))
            pos, left = pos + 12 + size + 16, left - size
        payloads[e["name"]] = b"".join(parts)
    assert pos == len(data), "trailing or missing bytes"
    return header, payloads, records


def rebuild(e, payload, base):
    """The patched tensor from a payload: rows | values | exception bitmap (PATCH_FORMAT.md, 'Payload')."""
    dt = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16, "float64": torch.float64}
    width = 1
    for d in e["shape"][1:]:
        width *= d
    n = e["rows"] * width if e["kind"] == "rows" else width * (e["shape"][0] if e["shape"] else 1)
    rows = torch.tensor(struct.unpack_from(f"<{e['rows']}q", payload, 0), dtype=torch.long)
    off = 8 * e["rows"]
    values = torch.frombuffer(bytearray(payload[off:off + n * ITEMSIZE[e["stored_dtype"]]]),
                              dtype=dt[e["stored_dtype"]]).to(dt[e["dtype"]])
    bitmap = payload[off + n * ITEMSIZE[e["stored_dtype"]]:]
    exc = torch.tensor([bool(bitmap[i // 8] >> (i % 8) & 1) for i in range(n)]) if e["exceptions"] else None
    if e["kind"] == "whole":
        return values.view(e["shape"])
    out = base.clone()
    block = out[rows] if e["kind"] == "rows" else out.view(-1, width)
    patched = block.reshape(-1) + values
    if exc is not None:
        patched[exc] = values[exc]
    if e["kind"] == "rows":
        out[rows] = patched.view(len(rows), width).view(-1, *e["shape"][1:])
        return out
    return patched.view(e["shape"])


def read_key_file(path):
    """(key, tenant or None) per PATCH_FORMAT.md section 3: 32 raw bytes, or a hex line and a tenant= line."""
    data = open(path, "rb").read()
    if len(data) == 32:
        return data, None
    lines = [ln.strip(b" \t") for ln in data.replace(b"\r\n", b"\n").split(b"\n")]
    if lines[-1] == b"":
        lines.pop()
    assert 1 <= len(lines) <= 2 and len(lines[0]) == 64, "not a key file"
    tenant = lines[1].decode()[len("tenant="):] if len(lines) == 2 else None
    assert tenant is None or lines[1].startswith(b"tenant="), "bad second line"
    return bytes.fromhex(lines[0].decode()), tenant


def fingerprint(state):
    """PATCH_FORMAT.md section 6, from a list of state_dict entries sorted by name: tensors with their
    little-endian bytes, and aliases (entries sharing memory with an earlier one)."""
    h = hashlib.sha256(f"{LABEL} base-fingerprint\n".encode())
    for e in sorted(state, key=lambda e: e["name"]):
        if "alias_of" in e:
            h.update(f"alias {e['name']} {e['alias_of']}\n".encode())
        else:
            h.update(f"tensor {e['name']} {e['dtype']} {','.join(map(str, e['shape']))}\n".encode())
            h.update(bytes.fromhex(e["hex"]))
    return h.hexdigest()


def check_vectors(results, folder):
    expected = json.load(open(os.path.join(folder, "expected.json")))
    key, tenant = read_key_file(os.path.join(folder, "key.hex"))
    header, payloads, _ = read_sealed(open(os.path.join(folder, "small.patch"), "rb").read(), key)
    check(results, "vectors: key file bound to the patch's tenant, generation as expected",
          tenant == header["tenant"] == expected["tenant"] and header["generation"] == expected["generation"])
    check(results, "vectors: every payload reproduced",
          {n: p.hex() for n, p in payloads.items()} == {n: t["payload_hex"] for n, t in expected["tensors"].items()})
    check(results, "vectors: base fingerprint reproduced from the base state_dict",
          fingerprint(expected["base_state_dict"]) == header["base_fingerprint"] == expected["base_fingerprint"])
    state = {e["name"]: e for e in expected["base_state_dict"]}
    ok = True
    for e in header["tensors"]:
        b = state[e["name"]]
        b = state[b["alias_of"]] if "alias_of" in b else b
        base = torch.frombuffer(bytearray.fromhex(b["hex"]), dtype=torch.float32).view(b["shape"])
        patched = rebuild(e, payloads[e["name"]], base).contiguous()
        ok &= patched.numpy().tobytes().hex() == expected["tensors"][e["name"]]["patched_hex"]
    check(results, "vectors: every patched tensor reproduced, bit for bit", ok)


# ----------------------------------------------------------------------------- the checks
def models(seed):
    torch.manual_seed(seed)
    base = GPT(GPTConfig(block_size=32, vocab_size=257, n_layer=2, n_head=2, n_embd=32)).eval()
    ft = GPT(GPTConfig(**base.config.to_dict()))
    ft.load_state_dict(base.state_dict())
    ft.untie_weights()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        ft.transformer.wte.weight[[3, 5, 200]] += 0.01 * torch.randn(3, 32, generator=g)
        w = ft.transformer.h[0].attn.c_attn.weight
        w += 0.002 * torch.randn(w.shape, generator=g)
        w[0, :4] = torch.tensor([1e-9, -3e-12, 0.0, 5e-10])  # |fine-tuned| << |base|: exceptions
        ft.transformer.h[1].mlp.c_fc.bias += 0.01
        ft.lm_head.weight += 1e-3 * torch.randn(ft.lm_head.weight.shape, generator=g)
    return base, ft


def seal_diff(base, ft, key, chunk_bytes, tenant="alice"):
    bp = dict(base.named_parameters())
    bp["lm_head.weight"] = base.transformer.wte.weight
    plain = []
    for name, p in ft.named_parameters():
        rows = torch.arange(p.shape[0]) if name == "transformer.wte.weight" else None
        t = delta_tensor(name, bp[name], p, rows=rows) if name in bp else whole_tensor(name, p)
        if t is not None:
            plain.append(t)
    structure = {"untie_weights": base.weights_tied and not ft.weights_tied, "lora": ft.lora_config}
    sealed = seal(plain, key, tenant=tenant, base_fingerprint=base_fingerprint(base), structure=structure,
                     chunk_bytes=chunk_bytes)
    payloads = {t.name: bytes(t.buffer.view()) for t in plain}
    for t in plain:
        t.close()
    return sealed, payloads


def check(results, name, ok, detail=""):
    results.append(bool(ok))
    print(f"{'PASS' if ok else 'FAIL'}  {name}" + (f": {detail}" if detail and not ok else ""))


def bitwise_equal(a, b):
    return a.shape == b.shape and torch.equal(a.detach().reshape(-1).view(torch.int32), b.detach().reshape(-1).view(torch.int32))


def main(argv=None):
    cfg = configure(DEFAULTS, sys.argv[1:] if argv is None else argv)
    results = []
    base, ft = models(cfg["seed"])
    base_sd = {k: v.clone() for k, v in base.state_dict().items()}
    key = os.urandom(32)
    sealed, payloads = seal_diff(base, ft, key, cfg["chunk_bytes"])
    data = sealed.tobytes()
    check(results, "some tensors span several chunks", any(e["chunks"] > 1 for e in sealed.header["tensors"]))
    check(results, "zero-crossing values use the exception bitmap",
          any(e["exceptions"] for e in sealed.header["tensors"]))

    # 1. round trip through a file
    with tempfile.TemporaryDirectory() as tmp:
        path = sealed.export(os.path.join(tmp, "p.sealed"))
        applied = apply_sealed_patch(base, path, load_key(key_hex=key.hex(), warn=lambda m: None), "alice")
    fp = dict(ft.named_parameters())
    check(results, "round trip: patched == fine-tuned, bit for bit",
          all(bitwise_equal(p, fp[n]) for n, p in base.named_parameters()) and not base.weights_tied)
    applied.revert()
    check(results, "revert: the base again, bit for bit, head tied again",
          base.weights_tied and all(bitwise_equal(v, base_sd[k]) for k, v in base.state_dict().items()))

    # 2. the independent reader
    header, indep, records = read_sealed(data, key)
    check(results, "independent reader: same payloads", indep == payloads)
    bp = dict(base.named_parameters())
    bp["lm_head.weight"] = base.transformer.wte.weight
    check(results, "independent reader: same patched weights",
          all(bitwise_equal(rebuild(e, indep[e["name"]], bp.get(e["name"])), fp[e["name"]]) for e in header["tensors"]))
    lora_base, lora_ft = models(cfg["seed"])[0], GPT(GPTConfig(**base.config.to_dict()))
    lora_ft.load_state_dict(base.state_dict())
    lora_ft.add_lora(2, 8.0, ("attn", "mlp"))
    with torch.no_grad():
        for n, p in lora_ft.named_parameters():
            if "lora_" in n:
                p.normal_(0, 0.05)
    lsealed, _ = seal_diff(lora_base, lora_ft, key, cfg["chunk_bytes"], tenant="bob")
    lheader, lindep, _ = read_sealed(lsealed.tobytes(), key)
    lf = dict(lora_ft.named_parameters())
    check(results, "independent reader: LoRA adapters stored whole",
          lheader["structure"]["lora"] == lora_ft.lora_config
          and all(bitwise_equal(rebuild(e, lindep[e["name"]], None), lf[e["name"]]) for e in lheader["tensors"]))
    apply_sealed_patch(lora_base, lsealed, key, "bob")
    check(results, "LoRA patch applied: adapters rebuilt", all(bitwise_equal(p, lf[n]) for n, p in lora_base.named_parameters()))

    # 3. key separation, nonces, fresh salt
    salt = bytes.fromhex(header["salt"])
    keys = [subkey(key, salt, p) for p in ["key-check", "header-mac"] + [f"tensor {e['name']}" for e in header["tensors"]]]
    check(results, f"{len(keys)} subkeys, all distinct, none equal to the master key", len(set(keys)) == len(keys) and key not in keys)
    nonces = [r[2] for r in records]
    check(results, f"{len(nonces)} nonces, none repeated", len(set(nonces)) == len(nonces))
    again, _ = seal_diff(*models(cfg["seed"]), key, cfg["chunk_bytes"])
    check(results, "sealing twice: new salt, patch id and ciphertext",
          again.header["salt"] != header["salt"] and again.header["patch_id"] != header["patch_id"]
          and again.tobytes()[again.blob_start:again.blob_start + 64] != data[sealed.blob_start:sealed.blob_start + 64])

    # 4. associated data binds every field
    name, i, nonce, ct, ad = records[-1]
    aes = AESGCM(subkey(key, salt, f"tensor {name}"))
    aes.decrypt(nonce, ct, ("\n".join(ad) + "\n").encode())  # control: the true AD verifies
    failed = []
    for line in range(len(ad)):
        changed = ad[:line] + [ad[line] + "0"] + ad[line + 1:]
        try:
            aes.decrypt(nonce, ct, ("\n".join(changed) + "\n").encode())
        except InvalidTag:
            failed.append(line)
    check(results, f"associated data: each of its {len(ad)} fields is bound", failed == list(range(len(ad))),
          f"fields not bound: {[ad[j] for j in range(len(ad)) if j not in failed]}")

    # 5. wrong key; no plaintext in the file
    try:
        apply_sealed_patch(base, data, os.urandom(32), "alice")
        check(results, "wrong key refused", False, "it was applied")
    except WrongKeyError as e:
        check(results, "wrong key refused (WrongKeyError, exit code 3)", e.exit_code == 3)
    windows = [p[k:k + 16] for p in payloads.values() for k in range(0, len(p) - 16, 256) if any(p[k:k + 16])]
    check(results, f"none of {len(windows)} plaintext windows in the sealed file", not any(w in data for w in windows))

    # 6. the shipped test vectors
    check_vectors(results, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests", "vectors"))

    print(f"{sum(results)}/{len(results)} checks passed")
    sys.exit(0 if all(results) else 1)


if __name__ == "__main__":
    run_cli(main)
