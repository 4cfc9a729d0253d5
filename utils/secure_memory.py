"""
Memory for secrets: plaintext deltas, decrypted payloads and the patched (fine-tuned) parameters.

SecureBuffer is anonymous private memory (never backed by a file), excluded from core dumps
(MADV_DONTDUMP), zero in a forked child (MADV_WIPEONFORK), mlock'ed where RLIMIT_MEMLOCK allows (the soft
limit is raised to the hard one first), zeroed before it is released and, for buffers still alive, at
interpreter exit. Fresh buffers are pre-faulted in one call (mlock, or MADV_POPULATE_WRITE on Linux
>= 5.14), not page by page on first use. They do NOT ask for transparent huge pages: on a VM whose
balloon driver reports free memory back to the host (virtio-balloon free page reporting, for free
blocks of 2 MiB and more), a huge-page fault takes exactly such a reported block and the host must back
it again: measured here, 500 MiB cost 0.9-1.1 CPU s with MADV_HUGEPAGE against 0.11 s with 4 KiB pages
(which come from unreported smaller free blocks) and 0.06 s with huge pages the host still backed
(BENCHMARKS.md, "Sealed patches"). memfd_secret would also hide the pages from
the kernel's own mappings, but it cannot be mapped by torch tensors we hand to other code, so it is not
used.

harden_process() is for every process that holds a key or plaintext: no core dumps, and not
ptrace-attachable (nor /proc/PID/mem-readable) by other processes of the same user.
"""
import atexit
import ctypes
import errno
import mmap
import resource
import weakref

import torch

MADV_WIPEONFORK, MADV_POPULATE_WRITE = 18, 23  # Linux values; absent from older mmap modules
PR_SET_DUMPABLE, PR_GET_DUMPABLE = 4, 3
ALIGN = 64  # byte alignment of tensor views laid out in one buffer

_libc = ctypes.CDLL(None, use_errno=True)
_libc.mlock.argtypes = _libc.munlock.argtypes = (ctypes.c_void_p, ctypes.c_size_t)
_live = weakref.WeakSet()  # buffers to zero at exit


def raise_memlock_limit():
    """Raise RLIMIT_MEMLOCK's soft limit to the hard one; return the soft limit in bytes (None = unlimited)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_MEMLOCK)
    if soft != hard:
        try:
            resource.setrlimit(resource.RLIMIT_MEMLOCK, (hard, hard))
            soft = hard
        except (ValueError, OSError):
            pass
    return None if soft == resource.RLIM_INFINITY else soft


def harden_process():
    """No core dumps (RLIMIT_CORE 0) and PR_SET_DUMPABLE 0. Idempotent; returns whether both hold."""
    try:
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    except (ValueError, OSError):
        pass
    try:
        _libc.prctl(PR_SET_DUMPABLE, 0, 0, 0, 0)
    except (AttributeError, OSError):
        pass
    return process_is_hardened()


def process_is_hardened():
    return resource.getrlimit(resource.RLIMIT_CORE)[0] == 0 and _libc.prctl(PR_GET_DUMPABLE, 0, 0, 0, 0) == 0


def aligned(nbytes):
    return -(-int(nbytes) // ALIGN) * ALIGN


class SecureBuffer:
    """`nbytes` of anonymous, dump-excluded memory; mlock'ed when `lock` and the limit allow (else
    `lock_error` says why), zeroed on close() when `wipe` (ciphertext need not be: wipe=False saves a
    pass over it). `reserve`: address space mapped behind it for grow(), not touched until then (an
    untouched page costs nothing)."""

    def __init__(self, nbytes, lock=True, wipe=True, reserve=0):
        self.nbytes, self.wipe, self._want_lock = int(nbytes), wipe, lock
        self._size = max(1, self.nbytes + int(reserve))
        self.mm = mmap.mmap(-1, self._size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS,
                            prot=mmap.PROT_READ | mmap.PROT_WRITE)
        self.dontdump = self._madvise(getattr(mmap, "MADV_DONTDUMP", 16))
        self.wipeonfork = self._madvise(MADV_WIPEONFORK)
        probe = (ctypes.c_char * self._size).from_buffer(self.mm)
        self.address = ctypes.addressof(probe)
        del probe  # a live export would keep the mmap from closing
        self.locked, self.lock_error = False, "not requested"
        self._make_resident(0, self._size - int(reserve))
        if wipe:
            _live.add(self)

    @property
    def capacity(self):
        """Mapped bytes: nbytes and the reserve grow() may still take."""
        return self._size

    def _make_resident(self, start, end):
        """Lock bytes [start, end) (when asked, the limit allows and all before them are locked: mlock
        faults the pages in itself), else pre-fault them in one call (MADV_POPULATE_WRITE; older kernels
        refuse it: pages then fault on first use)."""
        start -= start % mmap.PAGESIZE
        if end <= start:
            return
        if self._want_lock and (self.locked or start == 0):
            self._lock(start, end)
        if not self.locked:
            try:
                self.mm.madvise(MADV_POPULATE_WRITE, start, end - start)
            except (AttributeError, OSError, ValueError, TypeError):
                pass

    def grow(self, nbytes):
        """Extend the buffer to `nbytes` within its reserve, in place (views of it stay valid); the new
        pages are locked or pre-faulted like the first."""
        if nbytes > self._size:
            raise ValueError(f"cannot grow a buffer of {self._size:,} mapped bytes to {nbytes:,}")
        old, self.nbytes = self.nbytes, max(self.nbytes, int(nbytes))
        self._make_resident(old, self.nbytes)

    def _lock(self, start=0, end=None):
        end = max(1, self.nbytes) if end is None else end
        limit = raise_memlock_limit()
        if _libc.mlock(self.address + start, end - start) == 0:
            self.locked, self.lock_error = True, None
        else:
            err = ctypes.get_errno()
            self._unlock()  # all or nothing: pages locked before would hold budget other buffers need
            self.lock_error = (f"mlock refused ({errno.errorcode.get(err, err)}; RLIMIT_MEMLOCK "
                               f"{'unlimited' if limit is None else f'{limit:,} bytes'} for {end:,})")

    def make_secret(self):
        """Turn a buffer made for ciphertext (lock=False, wipe=False) into one for plaintext, before any
        plaintext is written into it: locked where the limit allows (its pages are resident, so this is
        cheap), zeroed on close() and at exit. It is dump-excluded already."""
        if not self.locked:
            self._lock()
        self.wipe = True
        _live.add(self)

    def mark_ciphertext(self):
        """Every byte that held plaintext holds ciphertext now (an in-place seal encrypted each where it
        lay): close() need not spend a pass zeroing it, and its pages are unlocked (RLIMIT_MEMLOCK is for
        plaintext; a later make_secret() locks them again, resident, cheaply)."""
        self.wipe = False
        _live.discard(self)
        self._unlock()

    def _unlock(self):
        if self.locked:
            _libc.munlock(self.address, self._size)
            self.locked = False

    def _madvise(self, option):
        try:
            self.mm.madvise(option)
            return True
        except (AttributeError, OSError, ValueError, TypeError):
            return False

    def view(self, offset=0, nbytes=None):
        nbytes = self.nbytes - offset if nbytes is None else nbytes
        return memoryview(self.mm)[offset:offset + nbytes]

    def tensor(self, dtype, offset, count, shape=None):
        """A torch view of `count` elements at byte `offset` (no copy), optionally reshaped. It holds a
        buffer export, so the mapping cannot be unmapped under it: close() then only zeroes it."""
        if count == 0:
            t = torch.empty(0, dtype=dtype)
        else:
            t = torch.frombuffer(memoryview(self.mm), dtype=dtype, count=count, offset=offset)
        return t if shape is None else t.view(shape)

    def zero(self, offset=0, nbytes=None):
        """Zero [offset, offset + nbytes), by default to the end of the buffer (not its untouched reserve)."""
        if self.mm is not None and not self.mm.closed:
            ctypes.memset(self.address + offset, 0, max(1, self.nbytes) - offset if nbytes is None else nbytes)

    def close(self):
        """Zero, unlock and unmap. Views still alive keep the mapping until they go, already zeroed."""
        if self.mm is None or self.mm.closed:
            return
        if self.wipe:
            self.zero()
        self._unlock()
        try:
            self.mm.close()
        except BufferError:
            pass
        _live.discard(self)

    def status(self):
        return {"bytes": self.nbytes, "anonymous": True, "dontdump": self.dontdump, "wipeonfork": self.wipeonfork,
                "mlocked": self.locked, "mlock_error": self.lock_error}

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass


def secure_empty(layout, lock=True):
    """(SecureBuffer, [empty CPU tensors of `layout` [(shape, dtype), ...], laid out in it])."""
    counts = [int(torch.Size(shape).numel()) for shape, _ in layout]
    sizes = [aligned(n * dtype.itemsize) for n, (_, dtype) in zip(counts, layout)]
    buf = SecureBuffer(sum(sizes), lock=lock)
    out, off = [], 0
    for n, (shape, dtype), size in zip(counts, layout, sizes):
        out.append(buf.tensor(dtype, off, n, tuple(shape)))
        off += size
    return buf, out


@atexit.register
def wipe_all():
    """Zero every SecureBuffer still alive (patched parameters of a model still in use, say)."""
    for buf in list(_live):
        buf.zero()
