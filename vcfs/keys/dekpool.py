"""A small pool of fresh DEKs already wrapped under their domain's current KEK, for new files.

Why: wrapping a new file's DEK is one HSM trip (SoftHSM2: C_CreateObject, C_WrapKey,
C_DestroyObject, about 0.3-1 ms, serialised in the one HSM worker), and creating many small
files waited on it one by one. The mount's key upkeep wraps DEKs ahead of time in the HSM
worker, a few per trip so that opens waiting for the HSM get in between, and a create takes
one ready pair without any HSM call (docs/KEYS.md, "DEK pool").

Bounds and lifetime: at most ``size`` pairs per KEK; a pair is served once (``take`` hands
the DEK buffer to the caller, who overwrites it after deriving the file's keys); an unused
pair is overwritten and dropped ``max_age`` seconds after it was made, when its KEK stops
being the domain's current one (``retain``: rotation, retirement, destruction), and when the
mount closes. Only the domains that created files are kept filled.

Thread-safe: filled from the HSM worker, taken from I/O workers, swept from the event loop.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from vcfs.core.aead import new_dek, wipe
from vcfs.keys.base import KeyRef, Wrapped

POOL_SIZE = 32  # ready pairs per KEK: about 30 ms of creates at 1000 files/s
POOL_MAX_AGE = 60.0  # seconds a pre-wrapped DEK may wait in memory for a file
FILL_BATCH = 8  # wraps per trip to the HSM worker (a few ms: opens waiting for the HSM get in between)


@dataclass(slots=True)
class _Ready:
    dek: bytearray
    wrapped: Wrapped
    made: float


class DekPool:
    def __init__(self, size: int = POOL_SIZE, max_age: float = POOL_MAX_AGE) -> None:
        self.size = size
        self.max_age = max_age
        self._lock = threading.Lock()
        self._ready: dict[KeyRef, deque[_Ready]] = {}
        self.wanted: set[KeyRef] = set()  # KEKs that new files asked for: the ones kept filled
        self.served = 0
        self.missed = 0

    def take(self, ref: KeyRef) -> tuple[bytearray, Wrapped] | None:
        """A fresh (DEK, wrapping under ``ref``), or None if none is ready. The caller owns the
        DEK buffer and overwrites it when done; the pair is never handed out again."""
        now = time.monotonic()
        with self._lock:
            self.wanted.add(ref)
            queue = self._ready.get(ref)
            while queue:
                ready = queue.popleft()
                if now - ready.made <= self.max_age:
                    self.served += 1
                    return ready.dek, ready.wrapped
                wipe(ready.dek)
            self.missed += 1
            return None

    def wanted_refs(self) -> list[KeyRef]:
        with self._lock:
            return sorted(self.wanted, key=str)

    def missing(self, ref: KeyRef) -> int:
        with self._lock:
            return self.size - len(self._ready.get(ref, ()))

    def fill(self, ref: KeyRef, wrap: Callable[[bytearray], Wrapped], count: int = FILL_BATCH) -> int:
        """Make up to ``count`` pairs for ``ref`` (in the HSM worker); returns how many were added.

        A wrap that fails raises; the pairs made before it stay.
        """
        made = 0
        for _ in range(min(count, self.missing(ref))):
            with self._lock:
                if ref not in self.wanted:
                    break  # no longer current (retain), or never asked for
            dek = new_dek()
            try:
                wrapped = wrap(dek)
            except BaseException:
                wipe(dek)
                raise
            with self._lock:
                queue = self._ready.setdefault(ref, deque())
                if len(queue) >= self.size or ref not in self.wanted:
                    wipe(dek)  # filled meanwhile, or the KEK stopped being wanted
                    break
                queue.append(_Ready(dek, wrapped, time.monotonic()))
            made += 1
        return made

    def retain(self, current: Iterable[KeyRef]) -> int:
        """Drop (and overwrite) every pair not wrapped under one of ``current``; returns how many."""
        keep = set(current)
        dropped = 0
        with self._lock:
            for ref in [r for r in self._ready if r not in keep]:
                dropped += self._wipe(self._ready.pop(ref))
            self.wanted &= keep
        return dropped

    def sweep(self) -> int:
        """Overwrite and drop pairs older than ``max_age``; returns how many."""
        cutoff = time.monotonic() - self.max_age
        dropped = 0
        with self._lock:
            for queue in self._ready.values():
                while queue and queue[0].made < cutoff:
                    wipe(queue.popleft().dek)
                    dropped += 1
        return dropped

    def clear(self) -> None:
        with self._lock:
            for queue in self._ready.values():
                self._wipe(queue)
            self._ready.clear()
            self.wanted.clear()

    @staticmethod
    def _wipe(queue: deque[_Ready]) -> int:
        n = len(queue)
        for ready in queue:
            wipe(ready.dek)
        queue.clear()
        return n

    def __len__(self) -> int:
        with self._lock:
            return sum(len(q) for q in self._ready.values())
