"""A short-lived cache of unwrapped DEKs, so reopening a file just closed needs no HSM call.

Lifetime: an entry is pinned while any open file uses it (``hold`` / ``release``), and kept
``ttl`` seconds after the last release; then its buffer is overwritten and dropped, by the
next sweep (the mount sweeps once a second, and a release sweeps if the last sweep is older
than ``SWEEP_EVERY``: a scan per release would cost O(entries) each, O(n^2) for a tool
that opens thousands of files). With ``ttl == 0`` nothing is kept: a DEK lives only as long
as the open file's derived keys.

Keyed by the exact wrapping (KEK reference, algorithm, wrapped bytes): the same bytes always
unwrap to the same DEK, a rewrapped header is a new key, and the header MAC is still checked
by the caller on every open. A destroyed KEK's entries are dropped at once (``drop_kek``), and
nothing is served for a KEK the provider reports destroyed.

Thread-safe: the daemon's HSM worker fills it, the event loop holds, releases and sweeps.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from vcfs.core.aead import wipe
from vcfs.keys.base import KeyRef, Wrapped

DEFAULT_TTL = 10.0  # seconds after the last close
SWEEP_EVERY = 0.25  # seconds: how late after its ttl an entry may be overwritten, at most

_Key = tuple[KeyRef, int, bytes]


@dataclass(slots=True)
class _Entry:
    dek: bytearray
    holders: int = 0
    expires: float = 0.0


class DekCache:
    def __init__(self, unwrap: Callable[[Wrapped], bytearray], ttl: float = DEFAULT_TTL) -> None:
        self._unwrap = unwrap
        self.ttl = ttl
        self._lock = threading.Lock()
        self._entries: dict[_Key, _Entry] = {}
        self.hits = 0
        self.misses = 0
        self._swept = 0.0

    @staticmethod
    def key_of(wrapped: Wrapped) -> _Key:
        return (wrapped.ref, wrapped.wrap_alg, wrapped.blob)

    def unwrap(self, wrapped: Wrapped) -> bytearray:
        """The DEK as a fresh buffer the caller owns: from the cache, or from the provider."""
        key = self.key_of(wrapped)
        with self._lock:
            entry = self._entries.get(key)
            if entry is not None:
                self.hits += 1
                entry.expires = max(entry.expires, time.monotonic() + self.ttl)
                return bytearray(entry.dek)
        dek = self._unwrap(wrapped)
        self.misses += 1
        if self.ttl > 0:
            with self._lock:
                if key not in self._entries:
                    self._entries[key] = _Entry(bytearray(dek), 0, time.monotonic() + self.ttl)
        return dek

    def hold(self, wrapped: Wrapped) -> None:
        with self._lock:
            entry = self._entries.get(self.key_of(wrapped))
            if entry is not None:
                entry.holders += 1

    def release(self, wrapped: Wrapped) -> None:
        with self._lock:
            entry = self._entries.get(self.key_of(wrapped))
            if entry is not None:
                entry.holders = max(entry.holders - 1, 0)
                entry.expires = time.monotonic() + self.ttl
        if self.ttl <= 0 or time.monotonic() - self._swept >= SWEEP_EVERY:
            self.sweep()

    def sweep(self) -> int:
        """Overwrite and drop every expired entry that no open file holds; returns how many."""
        now = self._swept = time.monotonic()
        with self._lock:
            gone = [k for k, e in self._entries.items() if e.holders == 0 and e.expires <= now]
            for k in gone:
                wipe(self._entries.pop(k).dek)
        return len(gone)

    def drop_kek(self, ref: KeyRef, wrap_alg: int = 1) -> None:
        """Forget every DEK wrapped under KEK ``ref`` (or, with wrap algorithm 2, to recipient ``ref``)."""
        with self._lock:
            for k in [k for k in self._entries if k[0] == ref and k[1] == wrap_alg]:
                wipe(self._entries.pop(k).dek)

    def clear(self) -> None:
        with self._lock:
            for e in self._entries.values():
                wipe(e.dek)
            self._entries.clear()

    def __len__(self) -> int:
        return len(self._entries)
