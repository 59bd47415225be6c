"""A key provider wrapper that times and counts every wrap and unwrap (for status and metrics).

Kept outside the PKCS#11 provider so the provider stays about keys: the mount wraps the
provider it hands to the filesystem in ``MeteredProvider``, and offline tools use the bare
one. The numbers land in vcfs/counters.py. Anything else a provider offers is passed through
unchanged (``__getattr__``), so the wrapper does not have to follow the provider's API.
"""

from __future__ import annotations

import time
from typing import Any

from vcfs import counters
from vcfs.core.header import WRAP_XWING_KWP
from vcfs.errors import HeaderAuthError, VcfsError
from vcfs.keys.base import KeyProvider, KeyRef, Wrapped
from vcfs.keys.recipients import recipient_name


class MeteredProvider:
    def __init__(self, inner: KeyProvider) -> None:
        self.inner = inner

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    def current(self, domain: str) -> KeyRef:
        return self.inner.current(domain)

    def wrap(self, ref: KeyRef, dek: bytes | bytearray) -> Wrapped:
        counters.hsm_begin()
        start = time.monotonic()
        try:
            out = self.inner.wrap(ref, dek)
        except BaseException as exc:
            counters.hsm_end("wrap", str(ref), time.monotonic() - start, _hsm_error(exc))
            raise
        counters.hsm_end("wrap", str(ref), time.monotonic() - start)
        return out

    def unwrap(self, wrapped: Wrapped) -> bytes | bytearray:
        counters.hsm_begin()
        start = time.monotonic()
        # wrap algorithm 2: the "version" is a recipient's (one HSM unwrap of its seed, then X-Wing)
        name = recipient_name(wrapped.ref) if wrapped.wrap_alg == WRAP_XWING_KWP else str(wrapped.ref)
        try:
            out = self.inner.unwrap(wrapped)
        except BaseException as exc:
            counters.hsm_end("unwrap", name, time.monotonic() - start, _hsm_error(exc))
            raise
        counters.hsm_end("unwrap", name, time.monotonic() - start)
        return out

    def close(self) -> None:
        self.inner.close()


def _hsm_error(exc: BaseException) -> str | None:
    """The HSM's share of a failure: None when the file was at fault (a modified header)."""
    if isinstance(exc, HeaderAuthError):
        return None
    if isinstance(exc, VcfsError):
        return exc.message
    return type(exc).__name__
