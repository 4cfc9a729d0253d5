"""The DP randomness: one fresh 256-bit secret per run, ChaCha20 keystreams per purpose, and Gaussian noise
from them, hardened against floating-point attacks. Replaces seeded torch generators, which anyone who
knows the seed (it is in the config) can replay, and Opacus's secure_mode, which needs torchcsprng (no
build for torch 2.x).

Threat model (README "DP fine-tuning"): the adversary knows the code, the config, the base model and every
record but one. Only this secret is private; it lives in memory, is never pickled, written, logged or
printed, and a resumed run draws a new one (fresh noise is as good as the old stream's continuation).

- RunSecret.fresh(): 32 bytes from the OS CSPRNG (`secrets`). RunSecret.reproducible(seed): the same
  machinery keyed by SHA-256 of a public seed, for experiments only: NO guarantee against anyone who
  knows the seed. Under torchrun rank 0 draws the secret and broadcasts it over the process group.
- Keys per purpose (and rank) by HKDF-SHA256 (RFC 5869) with the purpose in `info`, so sampling, noise
  and rounding streams are independent; a stream is ChaCha20 (RFC 8439, `cryptography`) over zeros,
  with a fresh 96-bit nonce per draw (a draw may use up to 2^32 blocks = 256 GiB).
- Uniforms: |w| / 2^63 for a signed 64-bit word w, rounded to the nearest float64 (a uniform real on
  [0, 1] rounded to the float grid, finer than 2^-53 near 0); 32-bit words for float32 angles.
- Gaussian noise: Box-Muller, with the radius sqrt(-2 ln u1) always from a 64-bit word in float64 and
  the angle in the output dtype. Why this and not Opacus's secure mode (sum of 4 normals / 2,
  Holohan & Braghin 2021, "Secure random sampling in differential privacy", ESORICS), at a quarter of
  the cost:
  (1) Tails. With 24-bit uniforms (as torch.randn in float32 draws them) Box-Muller never exceeds
      sqrt(2 * 24 ln 2) = 5.77 sigma: a record that shifts a coordinate by the clip norm is then exposed
      whenever the noise lands within that shift of the edge (~1e-5 per coordinate-step at sigma 0.7,
      above any delta we use). A 64-bit radius reaches sqrt(2 * 64 ln 2) = 9.42 sigma (mass beyond: ~5e-21).
  (2) Holes. Mironov (2012, "On significance of the least significant bits for differential privacy",
      CCS) and Jin et al. (2021, "Are we there yet? Timing and floating-point attacks on differential
      privacy systems", S&P) exploit float64 samplers whose image is sparse among float64 values, so
      x + noise reveals x. Here every output float is the image of many (radius, angle) pairs (2^77
      input pairs for ~2^32 float32 outputs; 2^106 for ~2^64 float64), the density condition that
      Holohan & Braghin's sum of 2n normals buys with n = 2 extra draws.
  bench/secure_noise.py measures it against torch.randn (BENCHMARKS.md).
"""
import hashlib
import math
import secrets

import torch
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

SECRET_BYTES = 32
CHUNK = 1 << 18  # elements per keystream chunk: reused buffers of 1-2 MiB (cache-sized)
_INFO = b"private-nanogpt/dp-randomness/v1/"


class RunSecret:
    """A run's master secret. Not printable, not picklable: it must never leave the process."""

    def __init__(self, key, reproducible_seed=None):
        if len(key) != SECRET_BYTES:
            raise ValueError("the run secret must be 32 bytes")
        self._key = bytes(key)
        self.reproducible_seed = reproducible_seed

    @classmethod
    def fresh(cls):
        return cls(secrets.token_bytes(SECRET_BYTES))

    @classmethod
    def reproducible(cls, seed):
        return cls(hashlib.sha256(f"private-nanogpt reproducible seed {int(seed)}".encode()).digest(), int(seed))

    @classmethod
    def shared(cls, reproducible_seed=None, rank=0, world_size=1, device="cpu"):
        """The same secret on every rank: drawn on rank 0, sent over the process group (never written)."""
        secret = cls.fresh() if reproducible_seed is None else cls.reproducible(reproducible_seed)
        if world_size > 1 and reproducible_seed is None:
            import torch.distributed as dist
            buf = torch.tensor(list(secret._key), dtype=torch.uint8, device=device)
            dist.broadcast(buf, src=0)
            secret = cls(bytes(buf.cpu().tolist()))
            buf.zero_()
        return secret

    def stream(self, purpose, rank=None):
        """A ChaCha20 stream for one purpose ('sampling', 'noise', 'rounding'); rank=None: shared by ranks."""
        info = _INFO + purpose.encode() + (b"" if rank is None else f"/rank{rank}".encode())
        return KeyStream(HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=info).derive(self._key))

    def __repr__(self):
        return "RunSecret(<hidden>)" if self.reproducible_seed is None else \
            f"RunSecret(reproducible_seed={self.reproducible_seed})"

    def __reduce__(self):
        raise TypeError("a RunSecret is never pickled (it must not reach disk)")


class KeyStream:
    """Uniforms and normals from ChaCha20 under one key; each draw uses the next nonce."""

    def __init__(self, key):
        self._key = key
        self._draws = 0
        self._zeros, self._buf = b"", bytearray()
        self._buffers = {}

    def __repr__(self):
        return "KeyStream(<hidden>)"

    def __reduce__(self):
        raise TypeError("a KeyStream is never pickled (it must not reach disk)")

    def _encryptor(self):
        nonce = b"\0\0\0\0" + self._draws.to_bytes(12, "little")  # 32-bit block counter, then the nonce
        self._draws += 1
        return Cipher(algorithms.ChaCha20(self._key, nonce), mode=None).encryptor()

    def _words(self, enc, n, dtype):
        """n random int64 or int32 words from the encryptor, in a reused CPU buffer."""
        size = n * (8 if dtype == torch.int64 else 4)
        if len(self._zeros) < size:
            self._zeros, self._buf = bytes(size), bytearray(size)
        view = memoryview(self._buf)[:size]
        enc.update_into(memoryview(self._zeros)[:size], view)
        return torch.frombuffer(view, dtype=dtype)

    def uniform(self, n, device="cpu"):
        """n float64 uniforms in (0, 1): |w| / 2^63 for signed 64-bit words w, rounded to the nearest
        float64 (a uniform real rounded to the float grid: finer than 2^-53 near 0)."""
        enc, out = self._encryptor(), torch.empty(n, dtype=torch.float64, device=device)
        for start in range(0, n, CHUNK):
            m = min(CHUNK, n - start)
            out[start:start + m].copy_(self._words(enc, m, torch.int64)).abs_().mul_(2.0 ** -63)
        return out.clamp_(2.0 ** -64, 1 - 2.0 ** -53)

    def _workspace(self, name, n, dtype, device):
        """A reused buffer: fresh large temporaries per chunk would each be mmap'ed and page-faulted."""
        buf = self._buffers.get(name)
        if buf is None or buf.numel() < n or buf.dtype != dtype or buf.device != torch.device(device):
            buf = self._buffers[name] = torch.empty(n, dtype=dtype, device=device)
        return buf[:n]

    def normal(self, shape, std, dtype=torch.float32, device="cpu"):
        """N(0, std^2) of the given shape, hardened as the module docstring explains: the radius from a
        64-bit word in float64, the angle from a 32-bit word (64-bit for float64 output). In place on
        reused chunk buffers; on a GPU only the keystream is made on the CPU."""
        n = math.prod(shape)
        out = torch.empty(n, dtype=dtype, device=device)
        wide = dtype == torch.float64
        angle_words = torch.int64 if wide else torch.int32
        enc = self._encryptor()
        for start in range(0, n, 2 * CHUNK):
            m = min(2 * CHUNK, n - start)
            pairs, tail = (m + 1) // 2, m // 2
            u1 = self._workspace("u1", pairs, torch.float64, device)
            u1.copy_(self._words(enc, pairs, torch.int64))  # int64 -> float64 (and to the device)
            u1.abs_().mul_(2.0 ** -63).clamp_min_(2.0 ** -64).log_().mul_(-2.0 * std * std).sqrt_()
            radius = u1 if wide else self._workspace("radius", pairs, dtype, device).copy_(u1)
            theta = self._workspace("theta", pairs, dtype, device)
            theta.copy_(self._words(enc, pairs, angle_words))
            theta.abs_().mul_((2.0 ** -63 if wide else 2.0 ** -31) * 2 * math.pi)  # [0, 2 pi]
            chunk = out[start:start + m]
            torch.cos(theta, out=chunk[:pairs]).mul_(radius)
            chunk[pairs:].copy_(theta[:tail].sin_().mul_(radius[:tail]))
        return out.view(shape)

    def poisson_mask(self, n, rate):
        """n independent Bernoulli(rate) draws (53-bit uniforms: P[included] = rate within 2^-53)."""
        return self.uniform(n) < rate


def install_noise(optimizer, stream):
    """THE noise hook: make an Opacus optimizer (DPOptimizer, DPOptimizerFastGradientClipping and their
    Distributed* twins: every class the fine-tuning loop uses) draw its Gaussian noise from `stream`
    instead of torch's generator. It replaces the instance's add_noise with the same semantics: noise of
    std noise_multiplier * max_grad_norm (or the adaptive-clipping `_adjusted_noise_multiplier`) on the
    clipped sum p.summed_grad, into p.grad; the Distributed* classes add it once, on rank 0, before the
    all-reduce."""
    from opacus.optimizers.optimizer import _check_processed_flag, _mark_as_processed

    def add_noise():
        sigma = getattr(optimizer, "_adjusted_noise_multiplier", optimizer.noise_multiplier)
        std = sigma * optimizer.max_grad_norm
        adds_noise = getattr(optimizer, "rank", 0) == 0 and std > 0
        for p in optimizer.params:
            _check_processed_flag(p.summed_grad)
            grad = p.summed_grad
            if adds_noise:
                grad = grad + stream.normal(grad.shape, std, grad.dtype, grad.device)
            p.grad = grad.view_as(p)
            _mark_as_processed(p.summed_grad)

    optimizer.add_noise = add_noise
    return optimizer
