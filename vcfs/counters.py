"""Process-wide counters for status and metrics: bytes and blocks sealed and opened, HSM calls.

A leaf like errors.py and events.py (it imports nothing of vcfs), so that cryptfile, fs and
the key layer can count without importing the exporter or the control socket, which read
these numbers from further out.

Cost on the hot path is one list-index add per block. There is no lock: each thread adds to
its own slot list (``threading.local``), so no update is ever lost to two threads racing on
one integer, and readers sum the lists of every thread that ever counted. Trio reuses its
worker threads, so the number of lists stays small. Readers may see a sum that is a few
blocks behind a concurrent writer, never one that goes backwards.

HSM calls are rarer (one per open or create) and are timed by the caller: ``hsm_begin`` and
``hsm_end`` keep counts, errors, the last and total latency and a latency histogram under a
lock, and the start of a call still running (for the watchdog).
"""

from __future__ import annotations

import bisect
import threading
import time
from dataclasses import dataclass, field

# Slots of the per-thread lists. Byte counts are plaintext bytes.
BYTES_ENCRYPTED = 0
BYTES_DECRYPTED = 1
BLOCKS_ENCRYPTED = 2
BLOCKS_DECRYPTED = 3
AUTH_FAILURES = 4  # reads refused because ciphertext failed authentication (EIO to the caller)
_NSLOTS = 5
NAMES = ("bytes_encrypted", "bytes_decrypted", "blocks_encrypted", "blocks_decrypted", "auth_failures")

_local = threading.local()
_all: list[list[int]] = []
_register = threading.Lock()  # taken once per thread, on its first count


def _slots() -> list[int]:
    slots: list[int] | None = getattr(_local, "slots", None)
    if slots is None:
        slots = [0] * _NSLOTS
        with _register:
            _all.append(slots)
        _local.slots = slots
    return slots


def add(slot: int, n: int = 1) -> None:
    """Add ``n`` to counter ``slot`` (one of the constants above)."""
    _slots()[slot] += n


def sealed(plain_len: int) -> None:
    """One block of ``plain_len`` plaintext bytes was encrypted."""
    s = _slots()
    s[BYTES_ENCRYPTED] += plain_len
    s[BLOCKS_ENCRYPTED] += 1


def opened(plain_len: int) -> None:
    """One block was authenticated and decrypted to ``plain_len`` bytes."""
    s = _slots()
    s[BYTES_DECRYPTED] += plain_len
    s[BLOCKS_DECRYPTED] += 1


def totals() -> dict[str, int]:
    """Every counter summed over all threads, by name."""
    with _register:
        lists = list(_all)
    return {name: sum(s[i] for s in lists) for i, name in enumerate(NAMES)}


# ---- HSM calls ---------------------------------------------------------------------------

# Histogram bucket bounds in seconds: a local SoftHSM2 answers in well under a millisecond, a
# network HSM in milliseconds; anything near a second is a problem worth seeing.
HSM_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)


@dataclass
class HsmStats:
    calls: dict[str, int] = field(default_factory=dict)  # by operation: wrap, unwrap
    errors: dict[str, int] = field(default_factory=dict)
    seconds_total: float = 0.0
    last_seconds: float = 0.0
    max_seconds: float = 0.0
    buckets: list[int] = field(default_factory=lambda: [0] * (len(HSM_BUCKETS) + 1))  # last one: +Inf
    last_ok: float | None = None  # time.time() of the last successful call
    last_error: str = ""  # message of the last failed call (names the KEK, never key bytes)
    last_error_time: float | None = None
    in_flight_since: float | None = None  # time.monotonic() when the running call began
    kek_use: dict[str, dict[str, int]] = field(default_factory=dict)  # "default/v1" -> {"wrap": n, ...}

    def copy(self) -> HsmStats:
        return HsmStats(
            dict(self.calls),
            dict(self.errors),
            self.seconds_total,
            self.last_seconds,
            self.max_seconds,
            list(self.buckets),
            self.last_ok,
            self.last_error,
            self.last_error_time,
            self.in_flight_since,
            {k: dict(v) for k, v in self.kek_use.items()},
        )


_hsm = HsmStats()
_hsm_lock = threading.Lock()


def hsm_begin() -> None:
    """An HSM call starts (the watchdog treats a call that never returns as a hang)."""
    with _hsm_lock:
        _hsm.in_flight_since = time.monotonic()


def hsm_end(op: str, kek: str, seconds: float, error: str | None = None) -> None:
    """An HSM call of ``op`` under KEK ``kek`` ended after ``seconds``; ``error`` if the HSM failed.

    A DEK that does not unwrap because its header was modified is not an HSM failure; the
    caller passes ``error=None`` for it. ``error`` names the KEK, never key bytes.
    """
    with _hsm_lock:
        _hsm.in_flight_since = None
        _hsm.calls[op] = _hsm.calls.get(op, 0) + 1
        _hsm.seconds_total += seconds
        _hsm.last_seconds = seconds
        _hsm.max_seconds = max(_hsm.max_seconds, seconds)
        _hsm.buckets[bisect.bisect_left(HSM_BUCKETS, seconds)] += 1
        if error is not None:
            _hsm.errors[op] = _hsm.errors.get(op, 0) + 1
            _hsm.last_error = error
            _hsm.last_error_time = time.time()
        else:
            _hsm.last_ok = time.time()
            use = _hsm.kek_use.setdefault(kek, {})
            use[op] = use.get(op, 0) + 1


def hsm_stats() -> HsmStats:
    """A consistent copy of the HSM statistics."""
    with _hsm_lock:
        return _hsm.copy()
