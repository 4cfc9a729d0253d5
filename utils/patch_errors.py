"""
Why a sealed patch was refused. These are library exceptions, not CLI errors: each carries the exit code
PATCH_FORMAT.md section 8 gives it (2 bad input, 3 authentication, 4 another base or tenant, 5 rollback),
and a command line turns one into utils.cli.UserError at its boundary (as_user_error), so a library
caller never depends on the CLI's classes and the CLI never learns crypto codes by inheritance.
"""


class PatchError(Exception):
    """Base class of every patch failure. `exit_code` is the one PATCH_FORMAT.md section 8 assigns."""
    exit_code = 2


class PatchFormatError(PatchError):
    """Not a sealed patch, an unsupported version, a file over the size limit, or an authenticated header
    or payload this reader cannot use."""


class KeyInputError(PatchError):
    """Key material given in the wrong form (the message never contains it)."""


class PatchAuthError(PatchError):
    """Authentication failed: nothing was applied."""
    exit_code = 3


class WrongKeyError(PatchAuthError):
    pass


class TamperedError(PatchAuthError):
    pass


class TruncatedError(PatchAuthError):
    pass


class SwappedBlobError(PatchAuthError):
    pass


class PatchMismatchError(PatchError):
    """An authentic patch, made for another base model or tenant."""
    exit_code = 4


class WrongBaseError(PatchMismatchError):
    pass


class WrongTenantError(PatchMismatchError):
    pass


class RollbackError(PatchError):
    """An authentic patch older (lower generation) than one this registry already accepted for the tenant."""
    exit_code = 5


def as_user_error(err, prefix=""):
    """The CLI form of a PatchError: a UserError with the same message and exit code."""
    from utils.cli import UserError
    return UserError(f"{prefix}{err}", exit_code=err.exit_code)
