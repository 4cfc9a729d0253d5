"""
Sealed patches vs the seed-004 design (AES-CBC + HMAC-SHA256 with one key, full fp32 copies of every
trainable tensor), measured side by side in one run:

    python bench/patches.py [--steps=3] [--out=bench/results_patches.md]

1. encrypt / decrypt throughput on one core (AES-256-GCM here, AES-256-CBC + HMAC-SHA256 for the seed);
2. apply latency of a GPT-2-124M-sized delta (a 124M GPT built in memory, every weight changed): verify +
   decrypt + apply, cold and through a warm TenantRegistry, vs the seed's verify + decrypt + copy;
3. patch size per method on a ~33M-parameter GPT (GPT-2 vocabulary, 8 layers, d=384; like the seed's ~30M
   model) fine-tuned for a few steps through finetune_dp: full, full under DP, freeze 75% of the blocks,
   LoRA r=4/8/16, embedding rows only; against the parameters that actually changed;
4. resident memory (RSS) of 1, 10 and 100 tenants' patches held in memory, ours vs the seed's.
Nothing is downloaded; the data are random GPT-2 token ids written to a temporary folder.
"""
import copy
import ctypes
import gc
import mmap
import multiprocessing
import os
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor

import numpy as np
import torch
import cryptography
from cryptography.hazmat.primitives import hashes, hmac, padding
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from utils import finetune as ft_loop
from configurator import configure
from model import GPT, GPTConfig
from utils.delta_tracker import DeltaTracker
from utils.patch_apply import apply_sealed_patch, base_fingerprint
from utils.patch_cipher import open_patch, seal
from utils.patch_format import DEFAULT_CHUNK_BYTES, SealedPatch
from utils.patch_payload import PayloadArena, delta_tensor, whole_tensor
from utils.secure_memory import raise_memlock_limit
from utils.tenant_registry import TenantRegistry
from utils.atomic import write_bytes
from utils.cli import UserError, run_cli
from utils.data import write_meta, write_split
from utils.machine import describe_machine

DEFAULTS = dict(
    throughput_mib=256,  # buffer encrypted / decrypted in section 1
    repeats=2,  # best of
    steps=2,  # fine-tuning steps per method in section 3
    sections=(1, 2, 3, 4),  # which sections to run (1 throughput, 2 apply latency, 3 patch sizes, 4 RSS)
    rss_limit_gb=3.0,  # section 4 skips (and extrapolates) configurations that would hold more
    out="",  # also write the markdown report here
    seed=0,  # seeds the benchmark's random models and data (timings, not privacy)
    first_apply_pause_s=5.0,  # the fresh process waits this long before its first apply (see first_apply)
)
MB = 1e6


# ----------------------------------------------------------------------------- the seed-004 design (bench only)
class SeedPatch:
    """Seed 004: per tensor key = HMAC-SHA256(master, name), used for AES-256-CBC *and* HMAC-SHA256 over
    IV + ciphertext; every dirty tensor as a full fp32 copy; blobs in anonymous mmaps; metadata in a dict."""

    def __init__(self, master, tensors):
        self.meta, self.blobs = {}, []
        for name, t in tensors.items():
            key = _hmac(master, name.encode())
            plain = t.detach().float().contiguous().numpy().tobytes()
            padder = padding.PKCS7(128).padder()
            padded = padder.update(plain) + padder.finalize()
            iv = os.urandom(16)
            enc = Cipher(algorithms.AES(key), modes.CBC(iv)).encryptor()
            ct = iv + enc.update(padded) + enc.finalize()
            blob = mmap.mmap(-1, len(ct) + 32)
            blob[:len(ct)] = ct
            blob[len(ct):] = _hmac(key, ct)
            self.blobs.append(blob)
            self.meta[name] = (len(self.blobs) - 1, len(ct), tuple(t.shape))

    @property
    def nbytes(self):
        return sum(len(b) for b in self.blobs)

    def apply(self, model, master):
        params = dict(model.named_parameters())
        with torch.no_grad():
            for name, (i, n, shape) in self.meta.items():
                key = _hmac(master, name.encode())
                blob = self.blobs[i]
                h = hmac.HMAC(key, hashes.SHA256())
                h.update(blob[:n])
                h.verify(blob[n:n + 32])
                dec = Cipher(algorithms.AES(key), modes.CBC(blob[:16])).decryptor()
                padded = dec.update(blob[16:n]) + dec.finalize()
                unpadder = padding.PKCS7(128).unpadder()
                plain = unpadder.update(padded) + unpadder.finalize()
                params[name].copy_(torch.frombuffer(bytearray(plain), dtype=torch.float32).view(shape))

    def close(self):
        for b in self.blobs:
            b.close()


def _hmac(key, data):
    h = hmac.HMAC(key, hashes.SHA256())
    h.update(data)
    return h.finalize()


# ----------------------------------------------------------------------------- helpers
def machine():
    from cryptography.hazmat.backends.openssl.backend import backend
    return describe_machine(f"cryptography {cryptography.__version__} ({backend.openssl_version_text()})",
                            f"RLIMIT_MEMLOCK {raise_memlock_limit() or 'unlimited'} bytes")


def rss():
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmRSS:"))


def settle():
    """Collect garbage and hand free heap back to the OS, so that RSS moves only with what we allocate."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def log(msg):
    print(msg, file=sys.stderr, flush=True)


def best(fn, repeats):
    """Seconds of the fastest of `repeats` runs."""
    return best_cpu(fn, repeats)[0]


def best_cpu(fn, repeats):
    """(wall seconds, CPU seconds of this process) of the fastest run: CPU time is what the work costs
    when other jobs compete for the cores."""
    runs = []
    for _ in range(repeats):
        t0, c0 = time.perf_counter(), time.process_time()
        fn()
        runs.append((time.perf_counter() - t0, time.process_time() - c0))
    return min(runs)


def whole_plain(nbytes, seed):
    t = torch.empty(nbytes // 4).normal_(generator=torch.Generator().manual_seed(seed))
    return [whole_tensor("blob", t)]


# ----------------------------------------------------------------------------- 1. throughput
def throughput(cfg, out):
    """One core, in interleaved rounds (anchor, API, anchor, API, ...; best CPU time of each): the raw
    AES-256-GCM anchor (input and output pre-touched, so no page fault is counted), our API cold (seal()
    into a fresh image, open_patch() into a fresh plaintext buffer: what a real run pays), the seal in
    place (seal(consume=True) of payloads in a PayloadArena, filled untimed like computing the deltas),
    the one-shot open in place (open_patch(consume=True) of a fresh copy of the image, made untimed like
    reading the file), and seed 004's CBC + HMAC in the same harness."""
    n, chunk = cfg["throughput_mib"] << 20, DEFAULT_CHUNK_BYTES
    src = bytearray(os.urandom(1 << 20)) * (n >> 20)
    dst, back = bytearray(n + 16), bytearray(n + 16)  # (CBC's update_into wants a block of slack)
    key, ad = os.urandom(32), b"associated data"
    tags = []

    def gcm_enc():
        tags.clear()
        for off in range(0, n, chunk):
            e = Cipher(algorithms.AES(key), modes.GCM(bytes(12))).encryptor()
            e.authenticate_additional_data(ad)
            e.update_into(memoryview(src)[off:off + chunk], memoryview(dst)[off:off + chunk])
            e.finalize()
            tags.append(e.tag)

    def gcm_dec():
        out_ = memoryview(back)
        for i, off in enumerate(range(0, n, chunk)):
            d = Cipher(algorithms.AES(key), modes.GCM(bytes(12), tags[i])).decryptor()
            d.authenticate_additional_data(ad)
            d.update_into(memoryview(dst)[off:off + chunk], out_[off:off + chunk])
            d.finalize()

    plain = whole_plain(n, cfg["seed"])
    sealed, in_arena, sealed_in_place = [], [], []

    def api_seal():
        sealed.append(seal(plain, key, tenant="t", base_fingerprint="0" * 64))

    def fill_arena():  # not timed: stands for DeltaTracker.build computing the deltas into its arena
        in_arena.append(whole_tensor("blob", plain[0].buffer.tensor(torch.float32, 0, n // 4),
                                     arena=PayloadArena(n, 1)))

    def api_seal_in_place():  # what sealing DeltaTracker's output pays: encrypting, moving up, header
        sealed_in_place.append(seal([in_arena.pop()], key, tenant="t", base_fingerprint="0" * 64, consume=True))
        assert not sealed_in_place[-1].image.wipe  # it was sealed in the arena, not into a fresh image

    def api_open():
        opened.append(open_patch(sealed[-1], key, "t"))

    def read_copy():  # not timed: stands for reading the file (SealedPatch.from_file: resident pages)
        copies.append(SealedPatch.from_bytes(sealed[-1].image.view()))

    def api_open_in_place():  # what a one-shot open of a file pays: locking the image, decrypting, moving
        opened.append(open_patch(copies.pop(), key, "t", consume=True))
        assert opened[-1].plain.locked or opened[-1].plain.lock_error

    def release():  # not timed: unmapping (and zeroing the plaintext) comes after the step measured
        while len(sealed) > 1:
            sealed.pop(0).close()
        while sealed_in_place:
            sealed_in_place.pop().close()
        while opened:
            opened.pop().plain.close()
    opened, copies = [], []

    iv, mac = os.urandom(16), []

    def seed_enc():  # CBC (sequential by construction), then HMAC over IV + ciphertext
        e = Cipher(algorithms.AES(key), modes.CBC(iv)).encryptor()
        e.update_into(src, dst)
        h = hmac.HMAC(key, hashes.SHA256())
        h.update(iv)
        h.update(memoryview(dst)[:n])
        mac[:] = [h.finalize()]

    def seed_dec():
        h = hmac.HMAC(key, hashes.SHA256())
        h.update(iv)
        h.update(memoryview(dst)[:n])
        h.verify(mac[0])
        d = Cipher(algorithms.AES(key), modes.CBC(iv)).decryptor()
        d.update_into(memoryview(dst)[:n], back)
    fns = {"anchor enc": gcm_enc, "anchor dec": gcm_dec, "api seal": api_seal, "api seal in place": api_seal_in_place,
           "api open": api_open, "api open in place": api_open_in_place}
    untimed = {"api seal in place": fill_arena, "api open in place": read_copy}
    cpu = {k: [] for k in fns}
    for _ in range(cfg["repeats"]):
        for name, fn in fns.items():  # the order keeps each decrypt after its encrypt
            untimed.get(name, lambda: None)()
            cpu[name].append(best_cpu(fn, 1)[1])
            release()
    t = {k: min(v) for k, v in cpu.items()}
    t_seed_enc = best_cpu(seed_enc, cfg["repeats"])[1]
    t_seed_dec = best_cpu(seed_dec, cfg["repeats"])[1]
    for s_ in sealed:
        s_.close()
    for p_ in plain:
        p_.close()
    gb = n / 1e9
    out.append(f"| raw AES-256-GCM, 64 MiB chunks (anchor: cryptography calls only, buffers pre-touched) "
               f"| {gb / t['anchor enc']:.2f} | {gb / t['anchor dec']:.2f} | 1.00 |")
    out.append(f"| our API, cold: `seal()` / `open_patch()` (fresh buffers, keys, header, AD, payload checks) "
               f"| {gb / t['api seal']:.2f} | {gb / t['api open']:.2f} | "
               f"{t['anchor enc'] / t['api seal']:.2f} / {t['anchor dec'] / t['api open']:.2f} |")
    out.append(f"| our API, seal in place: `seal(consume=True)` of DeltaTracker-style payloads in one arena (filling "
               f"the arena stands for computing the deltas and is not timed; encrypting, moving, header are) "
               f"| {gb / t['api seal in place']:.2f} | | {t['anchor enc'] / t['api seal in place']:.2f} |")
    out.append(f"| our API, cold open in place: `open_patch(consume=True)` of an image just read (the copy that "
               f"stands for reading the file is not timed; locking the image, decrypting, moving, checks are) "
               f"| | {gb / t['api open in place']:.2f} | {t['anchor dec'] / t['api open in place']:.2f} |")
    out.append(f"| AES-256-CBC + HMAC-SHA256 (seed 004) | {gb / t_seed_enc:.2f} | {gb / t_seed_dec:.2f} | "
               f"{t['anchor enc'] / t_seed_enc:.2f} / {t['anchor dec'] / t_seed_dec:.2f} |")
    out.append("")
    out.append(f"{cfg['throughput_mib']} MiB, GB/s = 10^9 bytes per process CPU second, best of {cfg['repeats']} "
               f"interleaved rounds; load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores at the end.")


# ----------------------------------------------------------------------------- 2. apply latency, 124M
def gpt2_124m(seed):
    torch.manual_seed(seed)
    return GPT(GPTConfig(n_layer=12, n_head=12, n_embd=768, vocab_size=50257, block_size=1024)).eval()


def first_apply(patch_path, key, seed, pause_s):
    """In a fresh (spawned) process, like `finetune_encrypt_memmap.py apply`: build the same base, read the
    sealed file, wait `pause_s` (this VM's balloon driver hands memory freed for ~2 s back to the host, as
    it would have been for a process started later), then time the process's first apply_sealed_patch.
    Returns (wall s, CPU s, plaintext buffer bytes, patched storage bytes)."""
    torch.set_num_threads(1)
    base = gpt2_124m(seed)
    fp = base_fingerprint(base)
    sealed = SealedPatch.from_file(patch_path)
    time.sleep(pause_s)
    t0, c0 = time.perf_counter(), time.process_time()
    applied = apply_sealed_patch(base, sealed, key, "t", base_fp=fp)
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    return wall, cpu, applied.plain_status["bytes"], applied.storage.nbytes


def apply_latency(cfg, out):
    base = gpt2_124m(cfg["seed"])
    n_params = base.get_num_params(non_embedding=False)
    g = torch.Generator().manual_seed(cfg["seed"])
    ft = {n: p.detach() + 1e-4 * torch.randn(p.shape, generator=g) for n, p in base.named_parameters()}
    key, master = os.urandom(32), os.urandom(32)
    t0 = time.perf_counter()
    plain = [delta_tensor(n, p, ft[n]) for n, p in base.named_parameters()]
    t_delta = time.perf_counter() - t0
    seed_patch = SeedPatch(master, ft)
    for t in ft.values():
        t.zero_()
    del ft
    fp_s = best(lambda: base_fingerprint(base), 1)
    fp = base_fingerprint(base)
    t0 = time.perf_counter()
    sealed = seal(plain, key, tenant="t", base_fingerprint=fp)
    t_seal = time.perf_counter() - t0
    for t in plain:
        t.close()
    with tempfile.TemporaryDirectory() as tmp:  # the ciphertext only, for the fresh process to read
        path = os.path.join(tmp, "124m.patch")
        sealed.export(path)
        spawn = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(1, mp_context=spawn) as pool:  # the key travels through the pipe, not a file
            t_first = pool.submit(first_apply, path, key, cfg["seed"], cfg["first_apply_pause_s"]).result()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # per core, like the goal; other jobs share the cores, and OpenMP spin-waits
    applied = []
    best_cpu(lambda: applied.append(apply_sealed_patch(base, sealed, key, "t", base_fp=fp)), 1)
    t_revert = best_cpu(applied.pop().revert, 1)
    colds = []
    for _ in range(cfg["repeats"]):  # fresh plaintext buffer and fresh locked storage each time
        colds.append(best_cpu(lambda: applied.append(apply_sealed_patch(base, sealed, key, "t", base_fp=fp)), 1))
        applied.pop().revert()
    t_cold = min(colds, key=lambda r: r[1])
    reg = TenantRegistry(base)
    reg.add(sealed, "t")
    reg.switch("t", key)  # first switch allocates the scratch buffer and the patched tensors
    warm = []
    for _ in range(cfg["repeats"]):
        reg.revert()
        warm.append(best_cpu(lambda: reg.switch("t", key), 1))
    t_warm = min(warm, key=lambda r: r[1])
    reg.close()
    sealed.close()
    base_sd = {k: v.clone() for k, v in base.state_dict().items()}
    t_seed = best_cpu(lambda: seed_patch.apply(base, master), 1)
    torch.set_num_threads(threads)
    with torch.no_grad():
        base.load_state_dict(base_sd)
    out.append(f"124M GPT ({n_params / 1e6:.1f}M parameters, every weight changed: {sealed.nbytes / MB:.0f} MB sealed "
               f"here, {seed_patch.nbytes / MB:.0f} MB seed); deltas computed in {t_delta:.2f} s, sealed in {t_seal:.2f} s, "
               f"base fingerprint {fp_s:.2f} s (once per registry). The fresh process's first apply held "
               f"{t_first[2] / MB:.1f} MB of plaintext buffer beside {t_first[3] / MB:.0f} MB of patched storage.")
    out.append("")
    out.append("| apply a 124M delta (CPU, one thread) | wall s | CPU s |")
    out.append("|---|---|---|")
    out.append(f"| our API, the first apply of a fresh process (`apply_sealed_patch`: verify + decrypt into fresh "
               f"locked storage, sum with the base in place, swap in; after a {cfg['first_apply_pause_s']:.0f} s pause) "
               f"| {t_first[0]:.2f} | {t_first[1]:.2f} |")
    out.append(f"| our API, cold `apply_sealed_patch` again in this process (fresh locked storage each time), best of "
               f"{cfg['repeats']} | {t_cold[0]:.2f} | {t_cold[1]:.2f} |")
    out.append(f"| this design, warm `TenantRegistry.switch` (buffers reused) | {t_warm[0]:.2f} | {t_warm[1]:.2f} |")
    out.append(f"| this design, revert alone (swap the base back, zero the patched copy) | {t_revert[0]:.2f} | {t_revert[1]:.2f} |")
    out.append(f"| seed 004 (HMAC verify + CBC decrypt + copy, tensor by tensor) | {t_seed[0]:.2f} | {t_seed[1]:.2f} |")
    seed_patch.close()
    del base, base_sd


# ----------------------------------------------------------------------------- 3. patch size per method
def make_data(folder, seed):
    """64 records of 30-63 GPT-2 token ids drawn from a Zipf-like 4,000-token subset (no download)."""
    rng = np.random.default_rng(seed)
    vocab = rng.choice(50256, size=4000, replace=False)
    p = 1 / np.arange(1, 4001)
    p /= p.sum()
    meta = {"tokenizer": "gpt2", "vocab_size": 50257, "dtype": "uint16", "seed": seed, "source_sha256": None, "splits": {}}
    for split, n in (("train", 64), ("val", 8)):
        recs = [list(rng.choice(vocab, size=int(rng.integers(30, 63)), p=p)) + [50256] for _ in range(n)]
        n_tok, n_rec = write_split(folder, split, recs, 50257)
        meta["splits"][split] = {"tokens": n_tok, "records": n_rec}
    write_meta(folder, meta)
    return folder


def embeddings_only(tracker):
    """on_model_ready: train the token embedding only (rows), then track."""
    def ready(model):
        for name, p in model.named_parameters():
            p.requires_grad_(name == "transformer.wte.weight")
        tracker(model)
    return ready


def patch_sizes(cfg, out, data_dir):
    torch.manual_seed(cfg["seed"])
    base = GPT(GPTConfig(n_layer=8, n_head=6, n_embd=384, vocab_size=50304, block_size=64)).eval()
    fp = base_fingerprint(base)
    common = dict(data_dir=data_dir, save=False, dp=False, batch_size=4, microbatch_size=4, max_steps=cfg["steps"],
                  eval_interval=0, log_interval=10 ** 6, learning_rate=1e-3, seed=cfg["seed"])
    methods = [("full", {}), ("full, DP", dict(dp=True, noise_multiplier=1.0, target_epsilon=None)),
               ("freeze 75% (6 of 8 blocks)", dict(freeze_first_blocks=6)),
               ("LoRA r=4", dict(lora_rank=4)), ("LoRA r=8", dict(lora_rank=8)), ("LoRA r=16", dict(lora_rank=16)),
               ("embedding rows only", dict(untie_weights=True))]
    key, master = os.urandom(32), os.urandom(32)
    out.append(f"~{base.get_num_params(non_embedding=False) / 1e6:.0f}M-parameter GPT (vocab 50304, 8 layers, d=384), "
               f"{cfg['steps']} AdamW steps of 4 records per method (DP: noise 1.0, ghost clipping).")
    out.append("")
    out.append("| method | trainable | changed | sealed patch (this design) | patch / changed x 4 B | seed 004 patch | seed / ours |")
    out.append("|---|---|---|---|---|---|---|")
    held = {}
    for label, extra in methods:
        tracker = DeltaTracker(base, dp=extra.get("dp", False))
        ready = embeddings_only(tracker) if label == "embedding rows only" else tracker
        res = ft_loop.finetune({**common, **extra}, model=copy.deepcopy(base).train(), on_model_ready=ready,
                                   log=lambda *a: None)
        trained = res["model"]
        plain, rep = tracker.build(trained)
        sealed = seal(plain, key, tenant="t", base_fingerprint=fp, structure=tracker.structure)
        for t in plain:
            t.close()
        params = dict(trained.named_parameters())
        seed_patch = SeedPatch(master, {n: params[n] for n in tracker.trainable})  # every trainable tensor is dirty
        changed = rep["changed_values"] * 4
        out.append(f"| {label} | {sum(params[n].numel() for n in tracker.trainable) / 1e6:.2f}M "
                   f"| {rep['changed_values'] / 1e6:.3f}M | {sealed.nbytes / MB:.3f} MB | {sealed.nbytes / changed:.3f} "
                   f"| {seed_patch.nbytes / MB:.3f} MB | {seed_patch.nbytes / sealed.nbytes:.1f}x |")
        held[label] = (sealed.tobytes(), seed_patch)
        sealed.close()
        del trained, res
    out.append("")
    out.append("Seed 004's follow-up, ~30M model: full 189 MB, freeze 75% 85 MB, LoRA r=8 0.78 MB per tenant.")
    return base, held


# ----------------------------------------------------------------------------- 4. resident memory
def tenants_rss(cfg, out, base, held):
    limit = cfg["rss_limit_gb"] * 1e9
    out.append("| patches held (RSS growth) | 1 tenant | 10 tenants | 100 tenants |")
    out.append("|---|---|---|---|")
    for label in ("LoRA r=8", "embedding rows only", "freeze 75% (6 of 8 blocks)", "full"):
        raw, seed_patch = held[label]
        for design in ("this design", "seed 004"):
            cells = []
            for n in (1, 10, 100):
                size = len(raw) if design == "this design" else seed_patch.nbytes
                if n * size > limit:
                    cells.append(f"~{n * size / MB:,.0f} MB (not run: > {cfg['rss_limit_gb']:.0f} GB; linear)")
                    continue
                settle()
                before = rss()
                if design == "this design":
                    reg = TenantRegistry.__new__(TenantRegistry)  # the registry's storage, without a model
                    reg.patches = {}
                    for i in range(n):
                        reg.patches[f"t{i}"] = SealedPatch.from_bytes(raw)
                    grown = rss() - before
                    for p in reg.patches.values():
                        p.close()
                else:
                    copies = [SeedPatch.__new__(SeedPatch) for _ in range(n)]
                    for c in copies:  # byte copies of the seed's blobs in fresh anonymous mmaps
                        c.blobs = []
                        for b in seed_patch.blobs:
                            m = mmap.mmap(-1, len(b))
                            view = memoryview(b)
                            m[:] = view  # no temporary bytes copy
                            view.release()
                            c.blobs.append(m)
                    grown = rss() - before
                    for c in copies:
                        c.close()
                cells.append(f"{grown / MB:,.1f} MB")
            out.append(f"| {label}, {design} | " + " | ".join(cells) + " |")
    for raw, seed_patch in held.values():
        seed_patch.close()


def main(argv=None):
    cfg = configure(DEFAULTS, sys.argv[1:] if argv is None else argv)
    if cfg["first_apply_pause_s"] < 0 or cfg["repeats"] < 1:
        raise UserError("first_apply_pause_s must be >= 0 and repeats >= 1")
    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
    t_start = time.time()
    out = ["## Sealed patches (bench/patches.py)", "", f"Machine: {machine()}.", ""]

    out.append(f"Load before the run: {os.getloadavg()[0]:.1f} (uptime load average, 1 min).")
    out.append("")
    if 1 in cfg["sections"]:
        log("1/4 throughput")
        out.extend(["### Throughput, one core", "", "| GB/s per core (10^9 B per CPU s) | encrypt | decrypt + verify | this / anchor |",
                    "|---|---|---|---|"])
        throughput(cfg, out)
        out.append("")
    if 2 in cfg["sections"]:
        log(f"2/4 apply latency (124M) [{time.time() - t_start:.0f} s]")
        out.extend(["### Apply latency, GPT-2-124M-sized delta", ""])
        apply_latency(cfg, out)
        out.append("")
    if not {3, 4} & set(cfg["sections"]):
        return finish(cfg, out, t_start)
    with tempfile.TemporaryDirectory() as tmp:
        data_dir = make_data(os.path.join(tmp, "data"), cfg["seed"])
        log(f"3/4 patch sizes (fine-tuning per method) [{time.time() - t_start:.0f} s]")
        out.extend(["### Patch size per method", ""])
        base, held = patch_sizes(cfg, out, data_dir)
    log(f"4/4 resident memory [{time.time() - t_start:.0f} s]")
    settle()
    out.extend(["", "### Resident memory of many tenants", ""])
    tenants_rss(cfg, out, base, held)
    return finish(cfg, out, t_start)


def finish(cfg, out, t_start):
    out.extend(["", f"Total bench time {time.time() - t_start:.0f} s; load average at the end "
                f"{os.getloadavg()[0]:.1f} on {os.cpu_count()} cores (other jobs share this machine)."])
    text = "\n".join(out) + "\n"
    print(text)
    if cfg["out"]:
        write_bytes(cfg["out"], text.encode())


if __name__ == "__main__":
    run_cli(main)
