"""Everything the daemon runs next to the FUSE loop: readiness, watchdog, signals, control, metrics.

Readiness: the mount counts as live only once a request made through it has been answered
by our own FUSE loop (a stat of the mount point from a worker thread, after ``pyfuse3.main``
started). Only then does ``vcfs mount`` return, and only then is systemd told ``READY=1``.

Stop (SIGTERM or SIGINT, or an unmount from outside), in this order:
1. ``STOPPING=1``;
2. syncfs(2) on the mount, so the kernel writes back every page that a writer handed it
   before the signal (the writeback cache holds them; the FUSE loop keeps serving);
3. the FUSE loop stops (``pyfuse3.terminate``); requests already being handled finish;
4. every open file is sealed, written and fsynced (``close_all``), then the backing
   filesystem is synced so that new names are durable too;
5. the caller unmounts (``pyfuse3.close``: a lazy unmount, so files a recorder still holds
   open do not block it) and exits 0.
While steps 2 and 4 make progress (blocks are still being sealed), systemd is asked for more
time with ``EXTEND_TIMEOUT_USEC``; a stop that stalls runs into TimeoutStopSec= instead.

Watchdog (``WatchdogSec=``): a keep-alive every half interval, sent only after a statfs(2)
through the mount came back (the kernel, the FUSE loop and a worker all answer) and while no
HSM call has been stuck for longer than the interval. A hung daemon is then restarted.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import socket
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

import pyfuse3
import trio

from vcfs import control, counters, fusetune, runpaths, sdnotify
from vcfs.exporter import Exporter, start_exporter
from vcfs.fs import VcfsOperations
from vcfs.mountconfig import ControlSection, MetricsSection
from vcfs.mountstate import MountState
from vcfs.store import syncfs

log = logging.getLogger("vcfs.service")

WRITEBACK_PASSES = 5  # syncfs passes at a stop while writes fill gaps (see _write_back)
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)
EXTEND_EVERY = 10.0  # seconds between EXTEND_TIMEOUT_USEC messages while a stop makes progress
EXTEND_BY = 60.0


@dataclass
class Daemon:
    ops: VcfsOperations
    backing: Path
    mountpoint: Path
    state: MountState
    on_ready: Callable[[], None] = lambda: None  # tells the parent of a backgrounded mount
    control: socket.socket | None = None
    control_path: Path | None = None
    exporter: Exporter | None = None
    on_hup: Callable[[], Awaitable[None]] | None = None  # e.g. re-read a policy
    tasks: list[Callable[[], Awaitable[None]]] = field(default_factory=list)  # run beside the FUSE loop
    stopping: trio.Event = field(default_factory=trio.Event)


def block_stop_signals() -> None:
    """Hold SIGTERM/SIGINT from here until the signal task listens (a stop during mount setup
    then still flushes and unmounts instead of killing the process with the mount in place)."""
    signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)


def _unblock_stop_signals() -> None:
    signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)


async def run(d: Daemon) -> None:
    """Serve until the FUSE loop ends, then flush and close everything (the caller unmounts)."""
    async with trio.open_nursery() as outer:
        outer.start_soon(_extend_while_stopping, d)
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(_on_signals, d)
                nursery.start_soon(_announce_ready, d)
                if d.control is not None and d.control_path is not None:
                    nursery.start_soon(control.serve, d.control, d.control_path, _control_handler(d))
                if d.exporter is not None:
                    nursery.start_soon(d.exporter.run)
                for task in d.tasks:
                    nursery.start_soon(task)
                await pyfuse3.main(max_tasks=fusetune.MAX_TASKS)
                nursery.cancel_scope.cancel()
        finally:
            _begin_stop(d, "unmounting")  # no-op if a signal began it
            # Also after an error in the FUSE loop: whatever is still open gets sealed and synced.
            with trio.CancelScope(shield=True):
                await d.ops.close_all()
                try:
                    await trio.to_thread.run_sync(syncfs, d.backing)
                except OSError as exc:
                    log.error("sync of the backing store %s failed: %s", d.backing, exc.strerror)
            outer.cancel_scope.cancel()


def _begin_stop(d: Daemon, why: str) -> None:
    if d.stopping.is_set():
        return
    d.stopping.set()
    sdnotify.notify(sdnotify.STOPPING, sdnotify.status(f"{why}: flushing open files"))


async def _on_signals(d: Daemon) -> None:
    with trio.open_signal_receiver(*STOP_SIGNALS, signal.SIGHUP) as signals:
        _unblock_stop_signals()
        async for signum in signals:
            if signum == signal.SIGHUP:
                if d.on_hup is not None:
                    await d.on_hup()
                else:
                    log.info("SIGHUP: nothing to reload")
                continue
            if d.stopping.is_set():
                log.info("signal %s: already stopping", signal.Signals(signum).name)
                continue
            log.info("signal %s: flushing and unmounting", signal.Signals(signum).name)
            _begin_stop(d, f"signal {signal.Signals(signum).name}")
            await _write_back(d)
            pyfuse3.terminate()


async def _write_back(d: Daemon) -> None:
    """Have the kernel write its dirty pages to us while the FUSE loop still serves.

    One syncfs can return while a file still has a gap: a page rewritten while its first write
    was in flight is sent again only after the pages that follow it (docs/OPERATIONS.md,
    "Stopping"). Each pass sends it; after WRITEBACK_PASSES, close_all cuts such a file at its gap.
    """
    for _ in range(WRITEBACK_PASSES):
        try:
            await trio.to_thread.run_sync(syncfs, d.mountpoint)  # GIL released
        except OSError as exc:
            log.error("syncfs before shutdown failed: %s", exc.strerror)
            return
        if not d.ops.writeback_gaps():
            return
    log.info(
        "%d gaps in open files after %d syncs: those files end at their first gap",
        d.ops.writeback_gaps(),
        WRITEBACK_PASSES,
    )


async def _announce_ready(d: Daemon) -> None:
    """READY once a stat through the mount was answered; then the watchdog keep-alives."""
    try:
        await trio.to_thread.run_sync(os.stat, d.mountpoint, abandon_on_cancel=True)
    except OSError as exc:
        log.error("the new mount at %s does not answer: %s", d.mountpoint, exc.strerror)
        pyfuse3.terminate()
        return
    # After the kernel's INIT handshake (which the stat proves done), or INIT resets readahead.
    await trio.to_thread.run_sync(fusetune.tune, d.mountpoint)
    d.state.mounted_since = time.time()
    d.on_ready()
    sdnotify.notify(sdnotify.READY, sdnotify.status(f"serving {d.backing} at {d.mountpoint}"))
    log.info("mount at %s is live", d.mountpoint)
    interval = sdnotify.watchdog_interval()
    if interval is None:
        return
    while not d.stopping.is_set():
        await trio.sleep(interval)
        if await _alive(d, 2 * interval):
            sdnotify.notify(sdnotify.WATCHDOG)


async def _alive(d: Daemon, limit: float) -> bool:
    """statfs(2) through the mount is answered, and no HSM call has hung for ``limit`` seconds."""
    since = counters.hsm_stats().in_flight_since
    if since is not None and time.monotonic() - since > limit:
        log.error("watchdog: an HSM call has not returned for %.0f s; no keep-alive", time.monotonic() - since)
        return False
    try:
        await trio.to_thread.run_sync(os.statvfs, d.mountpoint, abandon_on_cancel=True)
    except OSError as exc:
        log.error("watchdog: statfs through the mount failed: %s; no keep-alive", exc.strerror)
        return False
    return True


async def _extend_while_stopping(d: Daemon) -> None:
    """During a stop, ask systemd for more time as long as blocks are still being sealed."""
    await d.stopping.wait()
    last = -1
    while True:
        done = counters.totals()["blocks_encrypted"]
        if done != last:
            sdnotify.notify(sdnotify.extend_timeout(EXTEND_BY))
            last = done
        await trio.sleep(EXTEND_EVERY)


def _control_handler(d: Daemon) -> control.Handler:
    async def handle(msg: dict[str, object]) -> object:
        if msg.get("op") == "status":
            return await trio.to_thread.run_sync(d.state.snapshot)  # reads the store config: off the loop
        return {"error": f"unknown op {msg.get('op')!r} (known: status)"}

    return handle


@dataclass
class Extras:
    """The control socket and the metrics exporter of one mount, opened before it mounts."""

    mountpoint: Path
    state: MountState
    control: socket.socket | None = None
    control_path: Path | None = None
    exporter: Exporter | None = None

    def daemon(self, ops: VcfsOperations, backing: Path, on_ready: Callable[[], None]) -> Daemon:
        return Daemon(
            ops, backing, self.mountpoint, self.state, on_ready, self.control, self.control_path, self.exporter
        )

    def close(self) -> None:
        if self.exporter is not None:
            self.exporter.close()
            self.exporter = None
        if self.control is not None:
            self.control.close()
            self.control = None
            if self.control_path is not None:
                with contextlib.suppress(OSError):
                    self.control_path.unlink()
        self.state.close()


def open_extras(mountpoint: Path, ctl: ControlSection, metrics: MetricsSection, state: MountState) -> Extras:
    """Bind the control socket and start the exporter; MountError (nothing left open) if either fails."""
    extras = Extras(mountpoint, state)
    try:
        if ctl.enabled:
            extras.control_path = ctl.socket or runpaths.default_socket(mountpoint)
            extras.control = control.bind_socket(extras.control_path)
        if metrics.enabled:
            extras.exporter = start_exporter(metrics, state)
    except BaseException:
        extras.close()
        raise
    return extras
