"""Typed errors shared by every layer.

A leaf module: everything may import it, it imports nothing of vcfs. Each error carries a
one-line message, an optional hint and a process exit code, so the CLI can print
``vcfs: error: ...`` / ``vcfs: hint: ...`` without a traceback. Messages never contain key
material: callers pass names, paths and block numbers only.
"""

from __future__ import annotations

import errno


class VcfsError(Exception):
    """Base of every expected failure."""

    exit_code = 1
    errno = errno.EIO

    def __init__(self, message: str, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint


class UsageError(VcfsError):
    """Bad arguments or a state the user must change first (exit 2)."""

    exit_code = 2
    errno = errno.EINVAL


class ConfigError(VcfsError):
    """The store config is missing, unreadable or invalid (exit 3)."""

    exit_code = 3


class PolicyError(ConfigError):
    """The access policy or audit config is invalid; ``problems`` lists every mistake with its line."""

    def __init__(self, message: str, problems: list[str], hint: str | None = None) -> None:
        super().__init__(message, hint)
        self.problems = problems


class AuditError(VcfsError):
    """The audit trail cannot be started or read: log directory, audit key or anchor (exit 8)."""

    exit_code = 8


class KeyProviderError(VcfsError):
    """The HSM, token, PIN or KEK is missing, wrong or unsafe (exit 4)."""

    exit_code = 4
    errno = errno.EACCES


class KeyDestroyedError(KeyProviderError):
    """The KEK a file is wrapped under was destroyed on purpose: the file is crypto-shredded."""

    errno = errno.EKEYREVOKED  # "Key has been revoked": what cat or ffmpeg then print


class HsmUnavailableError(KeyProviderError):
    """The token cannot be reached right now (removed, powered off, network): retry later.

    Files already open keep working on the keys they hold; new opens fail with EIO until the
    token is back, which the daemon notices by itself.
    """

    errno = errno.EIO


class MountError(VcfsError):
    """Mounting or unmounting failed (exit 5)."""

    exit_code = 5


class BusyError(MountError):
    """The store is in use by another vcfs daemon."""


class FormatError(VcfsError):
    """A backing file is not in a format this vcfs can read (exit 6)."""

    exit_code = 6


class UnsupportedFormat(FormatError):
    """A known magic with an unknown version or algorithm id: refuse, never guess."""


class IntegrityError(FormatError):
    """Authentication failed: the ciphertext was modified, damaged or moved (exit 7).

    Raised instead of returning data; the mount maps it to EIO for the affected range.
    """

    exit_code = 7


class HeaderAuthError(IntegrityError):
    """No header slot could be unwrapped and authenticated."""


class BlockAuthError(IntegrityError):
    """One block failed authentication (tampered, moved, reordered or torn)."""

    def __init__(self, message: str, block_no: int, hint: str | None = None) -> None:
        super().__init__(message, hint)
        self.block_no = block_no


class TruncatedError(IntegrityError):
    """The file does not end with a block sealed as final: it was cut short."""


class UnterminatedError(TruncatedError):
    """The last block is authentic but sealed as an inner block: the file's end is missing."""


class SealLimitError(VcfsError):
    """The file's DEK is near its safe number of random-nonce seals."""

    errno = errno.EFBIG


class NameAuthError(IntegrityError):
    """An encrypted name, directory id or symlink target does not authenticate where it is.

    Raised for a name moved or copied from another directory, a replaced directory-id file,
    a long name whose sidecar does not match, or any damaged name: never a guessed name.
    """


class NameTooLongError(VcfsError):
    """A name or symlink target is too long to be stored encrypted (exit 2)."""

    exit_code = 2
    errno = errno.ENAMETOOLONG
