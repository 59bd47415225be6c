"""The small interface between file encryption and whatever holds the KEKs.

Two operations are all the file layer needs: wrap a fresh DEK under a domain's current KEK,
and unwrap a DEK given the reference stored in a header slot. Anything else a provider does
(log in, check attributes, rotate) stays behind this line, so a KMS or a public-key
recipient (ingest mode) can be added without touching cryptfile or the FUSE adapter.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

# Lifecycle of a KEK version: active (wraps and unwraps), retired (unwraps only, an archive),
# destroyed (deleted from the HSM: whatever is still wrapped under it is crypto-shredded).
STATE_ACTIVE, STATE_RETIRED, STATE_DESTROYED = "active", "retired", "destroyed"
KEK_STATES = (STATE_ACTIVE, STATE_RETIRED, STATE_DESTROYED)


@dataclass(frozen=True, slots=True)
class KeyRef:
    """Names one KEK: its key domain and version. Stored, authenticated, in every header."""

    domain: str
    version: int

    def __str__(self) -> str:
        return f"{self.domain}/v{self.version}"


@dataclass(frozen=True, slots=True)
class Wrapped:
    ref: KeyRef
    wrap_alg: int
    blob: bytes


class KeyProvider(Protocol):
    def current(self, domain: str) -> KeyRef:
        """The KEK new files of ``domain`` are wrapped under."""
        ...

    def wrap(self, ref: KeyRef, dek: bytes | bytearray) -> Wrapped: ...

    def unwrap(self, wrapped: Wrapped) -> bytearray:
        """Return the DEK or raise KeyProviderError/HeaderAuthError naming the KEK, never the key.

        The DEK comes in a fresh mutable buffer that the caller owns and overwrites when done.
        """
        ...

    def close(self) -> None: ...
