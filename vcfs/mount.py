"""Daemon lifecycle: open keys, mount, serve, and on the way out flush, unmount, close.

Readiness is reported through a pipe (``ready_fd``) that the backgrounding parent reads, so
``vcfs mount`` returns 0 only once the kernel mount exists, and any failure before that is
handed back as a one-line message instead of being lost in a log file.
"""

from __future__ import annotations

import logging
import os
import signal
from dataclasses import dataclass
from pathlib import Path

import pyfuse3
import trio

from vcfs.config import config_path, load_config
from vcfs.errors import MountError, VcfsError
from vcfs.fs import VcfsOperations
from vcfs.keys.pkcs11 import Pkcs11Provider
from vcfs.keys.setup import HostKeyOptions, open_provider, refresh_provider
from vcfs.namekeys import name_layer
from vcfs.names import check_layout
from vcfs.store import lock_store
from vcfs.storelayout import tree_path

log = logging.getLogger("vcfs.mount")


@dataclass(frozen=True, slots=True)
class MountOptions:
    backing: Path
    mountpoint: Path
    keys: HostKeyOptions
    allow_other: bool | None = None  # None: allow other users when running as root
    debug: bool = False


def mounted_vcfs(mountpoint: Path) -> bool:
    """True if ``mountpoint`` carries a vcfs FUSE mount (per /proc/self/mounts)."""
    target = os.fsencode(os.path.realpath(mountpoint))
    with open("/proc/self/mounts", "rb") as f:
        for line in f:
            fields = line.split()
            if len(fields) > 2 and fields[2] == b"fuse.vcfs":
                where = fields[1].replace(b"\\040", b" ").replace(b"\\011", b"\t").replace(b"\\134", b"\\")
                if where == target:
                    return True
    return False


def check_mountpoint(mountpoint: Path) -> None:
    if not mountpoint.is_dir():
        raise MountError(f"mount point {mountpoint} is not a directory", hint=f"mkdir -p {mountpoint}")
    if os.path.ismount(mountpoint):
        raise MountError(f"{mountpoint} is already a mount point", hint=f"vcfs umount {mountpoint}")


class ConfigWatcher:
    """Re-reads the store config when it changed (rotate, retire, destroy) and updates the keys.

    Called in the HSM worker before each new file is wrapped: one stat() when nothing changed.
    """

    def __init__(self, backing: Path, provider: Pkcs11Provider) -> None:
        self._path = config_path(backing)
        self._backing = backing
        self._provider = provider
        self._stamp = self._path.stat().st_mtime_ns

    def __call__(self) -> None:
        stamp = self._path.stat().st_mtime_ns
        if stamp == self._stamp:
            return
        cfg = load_config(self._backing)
        refresh_provider(self._provider, cfg)
        self._stamp = stamp
        log.info("store config changed: new files use KEK %s", self._provider.current(cfg.default_domain))


def _report(ready_fd: int | None, text: str) -> None:
    if ready_fd is None:
        return
    try:
        os.write(ready_fd, text.encode())
    finally:
        os.close(ready_fd)


def serve(opts: MountOptions, ready_fd: int | None = None) -> int:
    """Mount and serve until unmounted or signalled; returns the exit code."""
    provider = None
    mounted = False
    try:
        cfg = load_config(opts.backing)
        check_mountpoint(opts.mountpoint)
        provider = open_provider(cfg, opts.keys)
        provider.self_test(cfg.default_domain)
        names = name_layer(cfg, provider)  # unwraps the names keys: a wrong one fails here, not at first lookup
        check_layout(names, os.fsencode(tree_path(opts.backing)))
        names.dir_key(os.fsencode(tree_path(opts.backing)), b"/")  # a missing root directory id fails here
        lock_store(opts.backing)  # only now: a refused mount leaves the store untouched
        ops = VcfsOperations(
            os.fsencode(tree_path(opts.backing)),
            provider,
            cfg.default_domain,
            ConfigWatcher(opts.backing, provider),
            names,
        )
        options = set(pyfuse3.default_options)
        options |= {f"fsname={opts.backing}", "subtype=vcfs"}
        allow_other = os.geteuid() == 0 if opts.allow_other is None else opts.allow_other
        if allow_other:
            options.add("allow_other")
        if opts.debug:
            options.add("debug")
        os.umask(0)
        try:
            pyfuse3.init(ops, str(opts.mountpoint), options)
        except RuntimeError as exc:
            raise MountError(
                f"could not mount at {opts.mountpoint}: {exc}",
                hint="check that /dev/fuse exists and fuse3 is installed",
            ) from None
        mounted = True
    except VcfsError as exc:
        _report(ready_fd, f"error {exc.exit_code}\n{exc.message}\n{exc.hint or ''}\n")
        if provider is not None:
            provider.close()
        raise
    log.info("mounted %s at %s (KEK %s)", opts.backing, opts.mountpoint, provider.current(cfg.default_domain))
    _report(ready_fd, "ok\n")
    try:
        trio.run(_main, ops, str(opts.mountpoint))
    finally:
        if mounted:
            pyfuse3.close(unmount=True)
        provider.close()
        log.info("unmounted %s", opts.mountpoint)
    return 0


async def _main(ops: VcfsOperations, mountpoint: str) -> None:
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_on_signals, mountpoint)
            await pyfuse3.main()
            nursery.cancel_scope.cancel()
    finally:
        # Also after an error in the FUSE loop: whatever is still open gets sealed and synced.
        with trio.CancelScope(shield=True):
            await ops.close_all()


async def _on_signals(mountpoint: str) -> None:
    """SIGTERM/SIGINT: pull dirty pages out of the kernel, then stop serving."""
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as signals:
        async for signum in signals:
            if signum == signal.SIGHUP:
                continue
            log.info("signal %s: flushing and unmounting", signal.Signals(signum).name)
            try:
                await trio.to_thread.run_sync(pyfuse3.syncfs, mountpoint)
            except OSError as exc:
                log.error("syncfs before shutdown failed: %s", exc)
            pyfuse3.terminate()
            return
