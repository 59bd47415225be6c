"""Blocking work off the trio loop, at a lower cost per call than ``trio.to_thread.run_sync``.

The FUSE adapter sends nearly every request to a worker thread (crypto, disk I/O, PKCS#11),
so the cost of one hop is paid per request. ``trio.to_thread.run_sync`` copies the context,
builds several closures and, since trio 0.23, names the worker thread through ctypes before
and after every call: two foreign calls that each release and re-take the GIL, which on a
busy 2-core host can cost a switch interval (5 ms) each. py-spy put that naming at 15 % of the
daemon's samples during a sequential write (docs/PERFORMANCE.md, "Where time goes").

A ``Lane`` uses trio's own thread cache (``trio.lowlevel.start_thread_soon``, without a
thread name) and hands the outcome back with ``run_sync_soon``. Semantics are those of
``to_thread.run_sync(abandon_on_cancel=False)``: once started, a call runs to its end and its
result (or exception) is delivered; a cancellation that arrives meanwhile takes effect at the
caller's next checkpoint. At most ``slots`` calls of one lane run at a time, the rest wait in
FIFO order (a ``trio.CapacityLimiter``), so a lane of one slot serialises its work (the HSM).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, TypeVar

import outcome
import trio

_T = TypeVar("_T")


def _cannot_abort(_raise_cancel: Any) -> trio.lowlevel.Abort:
    return trio.lowlevel.Abort.FAILED  # the thread cannot be stopped: wait for its outcome


class Lane:
    """A bounded set of worker threads for one kind of blocking work."""

    def __init__(self, slots: int) -> None:
        self.slots = slots
        self._limiter = trio.CapacityLimiter(slots)

    @property
    def busy(self) -> int:
        """Calls running now."""
        return int(self._limiter.borrowed_tokens)

    async def run(self, fn: Callable[..., _T], *args: Any) -> _T:
        """``fn(*args)`` in a worker thread; its return value, or its exception raised here."""
        async with self._limiter:
            task = trio.lowlevel.current_task()
            token = trio.lowlevel.current_trio_token()

            def deliver(result: outcome.Outcome[_T]) -> None:  # in the worker thread
                token.run_sync_soon(trio.lowlevel.reschedule, task, result)

            trio.lowlevel.start_thread_soon(functools.partial(fn, *args) if args else fn, deliver)
            value: _T = await trio.lowlevel.wait_task_rescheduled(_cannot_abort)
            return value
