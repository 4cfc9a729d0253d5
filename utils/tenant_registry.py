"""
Sealed patches of many tenants over one base model, in one process: TenantRegistry.

At most one patch is applied at a time; apply(tenant, key) verifies the whole patch before the model
changes (a failure leaves the current state as it was), then swaps the previous tenant out. The plaintext
scratch buffer and the patched tensors' locked storage are reused from tenant to tenant (zeroed between).

Replay: every header carries the tenant's `generation` (authenticated). The registry remembers the
highest generation it accepted per tenant and refuses an older patch of that tenant (RollbackError, exit
5), at add() from the unauthenticated header and at apply() from the authenticated one. Its memory lasts
as long as the registry: pass `seen` (e.g. loaded from the operator's own store) to carry it further. A
single stateless `apply` process cannot detect a rollback; only a registry (or a caller that keeps the
last generation) can.
"""
from utils.patch_apply import PatchedStorage, apply_sealed_patch, base_fingerprint
from utils.patch_cipher import plaintext_bytes
from utils.patch_errors import PatchFormatError, RollbackError, WrongBaseError, WrongTenantError
from utils.patch_format import SealedPatch
from utils.patch_keys import expected_tenant
from utils.secure_memory import SecureBuffer, harden_process


class TenantRegistry:
    """The base fingerprint is computed once, when the registry is made: the model must not be modified
    behind the registry's back."""

    def __init__(self, model, seen=None):
        harden_process()
        self.model = model
        self.base_fp = base_fingerprint(model)
        self.patches = {}
        self.seen = dict(seen or {})  # tenant -> highest generation accepted
        self.applied = None
        self.storage = PatchedStorage()  # patched tensors, reused (zeroed when reverted)
        self.scratch = None  # locked plaintext buffer, reused (zeroed after every apply)

    def _check_generation(self, tenant, generation):
        if type(generation) is not int:
            raise PatchFormatError(f"patch of tenant {tenant!r}: its generation is not an integer")
        if generation < self.seen.get(tenant, -1):
            raise RollbackError(f"patch of tenant {tenant!r} has generation {generation}, older than generation "
                                f"{self.seen[tenant]} already accepted (replayed or rolled back)")

    def add(self, patch, tenant):
        """Hold a sealed patch (path, bytes or SealedPatch) of `tenant`. Tenant, base and generation are
        checked here against the unauthenticated header (an early refusal) and again, authenticated, at
        apply time."""
        tenant = expected_tenant(tenant)  # None or '' is refused like any missing tenant (exit 4)
        sealed, owned = SealedPatch.coerce(patch)
        if not owned:
            sealed = SealedPatch.from_bytes(sealed.image.view())
        try:
            if sealed.tenant != tenant:
                raise WrongTenantError(f"patch belongs to tenant {sealed.tenant!r}, not {tenant!r}")
            if sealed.header.get("base_fingerprint") != self.base_fp:
                raise WrongBaseError("patch was made for another base model")
            self._check_generation(tenant, sealed.header.get("generation", 0))  # absent: written before generations
        except BaseException:
            sealed.close()
            raise
        if tenant in self.patches:
            self.remove(tenant)
        self.patches[tenant] = sealed
        return tenant

    def remove(self, tenant):
        if self.active == tenant:
            self.revert()
        self.patches.pop(tenant).close()

    @property
    def active(self):
        return self.applied.tenant if self.applied is not None else None

    def apply(self, tenant, key):
        """Switch the model to `tenant`'s patch (reverting the current one once the new one verified)."""
        if tenant not in self.patches:
            raise PatchFormatError(f"no patch for tenant {tenant!r}; known: {', '.join(sorted(self.patches)) or 'none'}")
        sealed = self.patches[tenant]
        need = plaintext_bytes(sealed.header)
        if self.scratch is None or self.scratch.nbytes < need:
            if self.scratch is not None:
                self.scratch.close()
            self.scratch = SecureBuffer(need)

        def verified():  # the header is authentic now: its generation counts
            self._check_generation(tenant, sealed.header["generation"])
            self.revert()

        self.applied = apply_sealed_patch(self.model, sealed, key, tenant, base_fp=self.base_fp, scratch=self.scratch,
                                          storage=self.storage, before_swap=verified)
        self.seen[tenant] = max(self.seen.get(tenant, -1), sealed.header["generation"])
        return self.applied

    switch = apply

    def revert(self):
        if self.applied is not None:
            self.applied.revert()
            self.applied = None

    def memory_bytes(self):
        return {"sealed": sum(p.nbytes for p in self.patches.values()), "workspace": self.storage.nbytes,
                "scratch": self.scratch.nbytes if self.scratch is not None else 0}

    def close(self):
        self.revert()
        self.storage.close()
        for p in self.patches.values():
            p.close()
        self.patches = {}
        if self.scratch is not None:
            self.scratch.close()
