"""utils/secure_memory.py and where the plaintext lives: buffers, the patched (fine-tuned) parameters, and
hardened processes. Pages are checked in /proc/self/smaps: `Locked:` (mlock) and the `dd` VmFlag
(MADV_DONTDUMP)."""
import copy
import ctypes
import mmap
import os
import resource
import subprocess
import sys

import pytest
import torch

from tests.conftest import REPO, tiny_model
from tests.sealed_fixtures import sealed_patch, tiny_pair
from utils import secure_memory as sm
from utils.checkpoint import save_checkpoint
from utils.delta_tracker import DeltaTracker
from utils.patch_apply import apply_sealed_patch
from utils.patch_keys import generate_key_file


def mapping(address):
    """(pathname, VmFlags, Locked kB) of the mapping holding `address`, from /proc/self/smaps."""
    with open("/proc/self/smaps") as f:
        lines = f.read().splitlines()
    for i, line in enumerate(lines):
        parts = line.split()
        if "-" in parts[0] and len(parts) >= 5 and ":" in parts[3]:
            lo, hi = (int(x, 16) for x in parts[0].split("-"))
            if lo <= address < hi:
                block = []
                for ln in lines[i + 1:]:
                    block.append(ln)
                    if ln.startswith("VmFlags:"):
                        break
                locked = next(int(ln.split()[1]) for ln in block if ln.startswith("Locked:"))
                return (parts[5] if len(parts) > 5 else ""), block[-1].split()[1:], locked
    raise AssertionError(f"address {address:#x} is in no mapping")


def lock_possible(nbytes):
    limit = sm.raise_memlock_limit()
    return limit is None or limit >= nbytes + (1 << 20)


def test_plaintext_buffers_are_anonymous_undumpable_and_wiped():
    buf = sm.SecureBuffer(1 << 16)
    buf.view()[:4] = b"abcd"
    path, flags, _ = mapping(buf.address)
    assert path == "" and "dd" in flags  # no file behind it; excluded from core dumps
    assert ("lo" in flags) == buf.locked and (buf.locked or "RLIMIT_MEMLOCK" in buf.lock_error)
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # a forked child (a DataLoader worker, say) must not see the plaintext
        os.write(write, bytes(buf.view()[:4]))
        os._exit(0)
    os.waitpid(pid, 0)
    assert os.read(read, 4) == b"\0\0\0\0" and "wf" in flags
    view = buf.tensor(torch.uint8, 0, 4)
    buf.close()  # zeroes even while a view is still alive
    assert view.tolist() == [0, 0, 0, 0]


def test_fresh_buffers_are_prefaulted_without_asking_for_huge_pages():
    """MADV_HUGEPAGE ('hg' in VmFlags) makes a fresh buffer take 2 MiB free blocks, which a VM's balloon
    driver has often handed back to the host: 10x the CPU time of 4 KiB pages (BENCHMARKS.md)."""
    buf = sm.SecureBuffer(4 << 20, lock=False)
    _, flags, _ = mapping(buf.address)
    assert "hg" not in flags and "dd" in flags
    resident = (ctypes.c_ubyte * ((4 << 20) // mmap.PAGESIZE))()  # populated at creation, before any write
    libc = ctypes.CDLL(None)
    libc.mincore.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p)
    assert libc.mincore(buf.address, 4 << 20, resident) == 0 and all(v & 1 for v in resident)
    buf.close()


def test_delta_tracker_payloads_share_one_locked_undumpable_arena_zeroed_when_released():
    """The payloads a patch will seal lie back to back in one arena (so seal(consume=True) can encrypt
    them there), locked and dump-excluded like any plaintext buffer; the room reserved behind them for
    sealing is left untouched; each payload is zeroed when closed, the arena with the last."""
    base = tiny_model().eval()
    tracker = DeltaTracker(base, dp=True)  # DP: every trainable tensor is stored, no gradient needed
    model = copy.deepcopy(base)
    tracker(model)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.01)
    plain, _ = tracker.build(model)
    arena = plain[0].buffer.arena
    buf = arena.buffer
    assert len(plain) > 3 and all(t.buffer.arena is arena for t in plain)
    assert [t.buffer.offset for t in plain] == sorted(t.buffer.offset for t in plain)  # in header order
    assert buf.nbytes < sum(t.nbytes for t in plain) + 64 * len(plain) < buf.capacity
    path, flags, locked_kb = mapping(buf.address)
    assert path == "" and "dd" in flags and "wf" in flags
    if lock_possible(buf.nbytes):
        assert buf.locked and "lo" in flags and locked_kb * 1024 >= buf.nbytes
    else:
        assert not buf.locked and "RLIMIT_MEMLOCK" in buf.lock_error
    resident = (ctypes.c_ubyte * (buf.capacity // mmap.PAGESIZE))()
    libc = ctypes.CDLL(None)
    libc.mincore.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p)
    assert libc.mincore(buf.address, len(resident) * mmap.PAGESIZE, resident) == 0
    assert sum(v & 1 for v in resident) * mmap.PAGESIZE < buf.nbytes + 2 * mmap.PAGESIZE  # the reserve: untouched
    view = buf.tensor(torch.uint8, 0, buf.nbytes)
    first = plain[0].buffer
    assert view[first.offset:first.offset + first.nbytes].count_nonzero() > 0
    plain[0].close()
    assert not view[first.offset:first.offset + first.nbytes].any() and arena.buffer is buf
    assert view.count_nonzero() > 0
    for t in plain[1:]:
        t.close()
    assert arena.buffer is None and not view.any()  # released, zeroed (the view kept the mapping to look)


def test_patched_parameters_live_in_locked_undumpable_memory_and_are_zeroed_on_revert():
    base, ft = tiny_pair()
    key = os.urandom(32)
    sealed = sealed_patch(base, ft, key)
    nbytes = sum(p.numel() * p.element_size() for p in base.parameters())
    if not lock_possible(nbytes):
        pytest.skip(f"RLIMIT_MEMLOCK (hard limit {resource.getrlimit(resource.RLIMIT_MEMLOCK)[1]}) cannot hold "
                    f"{nbytes:,} bytes: locking is impossible here, only dontdump could be checked")
    applied = apply_sealed_patch(base, sealed, key, "alice")
    assert applied.storage_status["mlocked"], applied.storage_status["mlock_error"]
    patched = {n: p.data for n, p in base.named_parameters()}
    for name, t in patched.items():
        path, flags, locked_kb = mapping(t.data_ptr())
        assert path == "" and "dd" in flags and "lo" in flags and locked_kb > 0, (name, flags, locked_kb)
        assert torch.equal(t, dict(ft.named_parameters())[name].data)  # it is the fine-tuned model
    applied.revert()
    assert all(int(t.count_nonzero()) == 0 for t in patched.values())  # the fine-tuned values are gone
    sealed.close()


def test_patched_parameters_are_zeroed_at_exit_even_when_never_reverted():
    base, ft = tiny_pair()
    key = os.urandom(32)
    apply_sealed_patch(base, sealed_patch(base, ft, key), key, "alice")  # the AppliedPatch is dropped
    weight = base.transformer.h[0].attn.c_attn.weight
    assert torch.equal(weight, ft.transformer.h[0].attn.c_attn.weight)  # still applied: the model holds it
    sm.wipe_all()  # what the atexit hook runs
    assert int(weight.count_nonzero()) == 0


@pytest.fixture
def on_disk(tmp_path):
    base, ft = tiny_pair()
    save_checkpoint(tmp_path / "base.pt", base, config={})
    key_file = generate_key_file(tmp_path / "key.hex", tenant="alice")
    from utils.patch_keys import load_key
    sealed_patch(base, ft, load_key(key_file=key_file)).export(tmp_path / "alice.patch")
    return tmp_path


HARDENED = ("from utils.secure_memory import process_is_hardened; "
            "print('hardened' if process_is_hardened() else 'NOT hardened')")


@pytest.mark.parametrize("entry", ["model_under_test", "registry"])
def test_every_entry_point_that_decrypts_hardens_the_process(on_disk, entry):
    d = on_disk
    load = {"model_under_test": f"from utils.model_under_test import load_model_under_test; "
                                f"load_model_under_test({str(d / 'base.pt')!r}, {str(d / 'alice.patch')!r}, "
                                f"{str(d / 'key.hex')!r})",
            "registry": f"from utils.checkpoint import load_model; from utils.tenant_registry import TenantRegistry; "
                        f"TenantRegistry(load_model({str(d / 'base.pt')!r})[0])"}[entry]
    r = subprocess.run([sys.executable, "-c", f"{load}; {HARDENED}"], capture_output=True, text=True, cwd=REPO,
                       env={**os.environ, "PYTHONPATH": REPO}, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip().endswith("hardened") and "NOT" not in r.stdout


def test_an_image_decrypted_in_place_is_locked_undumpable_and_wiped():
    """open_patch(consume=True) makes the sealed image (plain ciphertext memory until then) secret before
    any plaintext enters it."""
    from utils.patch_cipher import open_patch
    from utils.patch_format import SealedPatch
    base, ft = tiny_pair()
    key = os.urandom(32)
    raw = sealed_patch(base, ft, key).tobytes()
    if not lock_possible(len(raw)):
        pytest.skip(f"RLIMIT_MEMLOCK (hard limit {resource.getrlimit(resource.RLIMIT_MEMLOCK)[1]}) cannot hold "
                    f"{len(raw):,} bytes")
    sealed = SealedPatch.from_bytes(raw)
    assert not sealed.image.locked and "lo" not in mapping(sealed.image.address)[1]  # ciphertext: not locked
    opened = open_patch(sealed, key, "alice", consume=True)
    assert opened.plain is sealed.image and opened.plain.status()["mlocked"]
    path, flags, locked_kb = mapping(opened.plain.address)
    assert path == "" and "dd" in flags and "lo" in flags and locked_kb * 1024 >= len(raw) - mmap.PAGESIZE
    values = opened.segments(0)[1]
    assert int(values.count_nonzero()) > 0
    sm.wipe_all()  # what the atexit hook runs: the plaintext in the image is zeroed too
    assert int(values.count_nonzero()) == 0
    opened.plain.close()
