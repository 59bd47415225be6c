"""Structured events that other parts of vcfs (the audit trail, metrics, logs) subscribe to.

Why a tiny bus instead of direct calls: the key layer, the mount and the offline tools must
report what they did (a KEK generated, a DEK unwrapped, a block that failed authentication)
without importing the audit trail or the metrics exporter, which sit further out. Producers
call ``emit``; consumers ``subscribe``. A leaf module like errors.py: it imports nothing of vcfs.

Contract for producers: field values are plain scalars (str, int, float, bool, None) and
never key material: name keys by reference (``"default/v2"``), files by path or file id hex.
Contract for sinks: they may be called from any thread, must be quick (queue work, do not do
I/O inline where avoidable) and must not raise; an exception in a sink is logged and dropped
so that a broken consumer never fails a wrap, an unwrap or a read.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

log = logging.getLogger("vcfs.events")

Scalar = str | int | float | bool | None

# Kinds in use. Key lifecycle: every generate, wrap, unwrap, rotate, retire and destroy.
KEY_GENERATE = "key.generate"
KEY_WRAP = "key.wrap"
KEY_UNWRAP = "key.unwrap"
KEY_ROTATE = "key.rotate"
KEY_RETIRE = "key.retire"
KEY_DESTROY = "key.destroy"
KEY_LOAD = "key.load"  # a keystore KEK unwrapped under its master key into the HSM
KEY_SHRED = "key.shred"  # one file's wrapped DEKs overwritten (vcfs shred)
KEY_RENEW = "key.renew"  # a file moved to a fresh DEK before its nonce budget ran out
HSM_UNAVAILABLE = "hsm.unavailable"
HSM_AVAILABLE = "hsm.available"
BLOCK_AUTH_FAILED = "block.auth_failed"
# Audit trail (vcfs/audit): an anomaly rule fired; the log could not be written / works again.
AUDIT_ALERT = "audit.alert"
AUDIT_DEGRADED = "audit.degraded"
AUDIT_RECOVERED = "audit.recovered"
BLOCK_RESTORED = "block.restored"  # a block a crash tore, restored from the journal (path, block)
NAME_AUTH_FAILED = "name.auth_failed"  # an encrypted name that does not decrypt where it is (path=backing)


@dataclass(frozen=True, slots=True)
class Event:
    kind: str
    fields: dict[str, Scalar] = field(default_factory=dict)
    time: float = field(default_factory=time.time)  # seconds since the epoch, UTC


Sink = Callable[[Event], None]

_lock = threading.Lock()
_sinks: tuple[Sink, ...] = ()


def subscribe(sink: Sink) -> Callable[[], None]:
    """Register ``sink`` for every later event; returns a function that unregisters it."""
    global _sinks
    with _lock:
        _sinks = (*_sinks, sink)

    def unsubscribe() -> None:
        global _sinks
        with _lock:
            _sinks = tuple(s for s in _sinks if s is not sink)

    return unsubscribe


def emit(kind: str, **fields: Scalar) -> None:
    """Hand one event to every sink. Never raises."""
    if not _sinks:  # the common case in tools: costs nothing on hot paths (rewrap: 2 per file)
        return
    event = Event(kind, dict(fields))
    for sink in _sinks:  # a snapshot: subscribe/unsubscribe replace the tuple
        try:
            sink(event)
        except Exception:
            log.exception("event sink %r failed on %s", sink, kind)
