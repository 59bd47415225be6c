"""Daemon lifecycle: open keys, mount, serve, and on the way out flush, unmount, close.

Readiness is reported through a pipe (``ready_fd``) that the backgrounding parent reads, so
``vcfs mount`` returns 0 only once the mount answers, and any failure before that is handed
back as a one-line message instead of being lost in a log file. What runs beside the FUSE
loop (systemd notify, watchdog, signals, control socket, metrics) is in vcfs/service.py.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import cast

import pyfuse3
import trio

from vcfs import service
from vcfs.access import AccessGuard
from vcfs.config import StoreConfig, load_config
from vcfs.errors import MountError, VcfsError
from vcfs.fs import VcfsOperations
from vcfs.guardsetup import load_access, open_guard
from vcfs.ingest import IngestKeys, open_ingest, report_torn
from vcfs.journal import Journal
from vcfs.keys.dekcache import DEFAULT_TTL
from vcfs.keys.metered import MeteredProvider
from vcfs.keys.provider import Pkcs11Provider
from vcfs.keys.recipient import IngestProvider
from vcfs.keys.recipients import recipient_name
from vcfs.keys.setup import HostKeyOptions, open_provider
from vcfs.mountconfig import ControlSection, MetricsSection
from vcfs.mountkeys import MountKeys
from vcfs.mountstate import MountState
from vcfs.namekeys import name_layer
from vcfs.namepaths import unresolve
from vcfs.names import NameLayer, check_layout
from vcfs.namespace import label
from vcfs.privileges import can_chown
from vcfs.renew import clean_leftovers
from vcfs.store import lock_store
from vcfs.storelayout import tree_path
from vcfs.sweep import recover_store

log = logging.getLogger("vcfs.mount")


@dataclass(frozen=True, slots=True)
class MountOptions:
    backing: Path
    mountpoint: Path
    keys: HostKeyOptions
    allow_other: bool | None = None  # None: allow other users when running as root
    debug: bool = False
    policy_file: Path | None = None  # [policy]/[audit]/[alerts] TOML, re-read on SIGHUP
    audit_dir: Path | None = None  # overrides [audit].dir
    fuse_options: frozenset[str] = frozenset()  # kernel mount flags (mountconfig.FUSE_FLAGS)
    metrics: MetricsSection = field(default_factory=MetricsSection)
    control: ControlSection = field(default_factory=ControlSection)
    dek_cache_seconds: float = DEFAULT_TTL  # how long an unwrapped DEK outlives its last close
    ingest: tuple[Path, ...] = ()  # recipient public files: an ingest (write-only) mount, no HSM (vcfs/ingest.py)
    ingest_names: Path | None = None  # the names-key file of an ingest mount (stores with encrypted names)


def _unescape(raw: bytes) -> bytes:
    return raw.replace(b"\\040", b" ").replace(b"\\011", b"\t").replace(b"\\012", b"\n").replace(b"\\134", b"\\")


def mount_source(mountpoint: Path) -> str | None:
    """The backing directory of the vcfs mount at ``mountpoint`` (per /proc/self/mounts), or None."""
    target = os.fsencode(os.path.realpath(mountpoint))
    with open("/proc/self/mounts", "rb") as f:
        for line in f:
            fields = line.split()
            if len(fields) > 2 and fields[2] == b"fuse.vcfs" and _unescape(fields[1]) == target:
                return os.fsdecode(_unescape(fields[0]))
    return None


def mounted_vcfs(mountpoint: Path) -> bool:
    """True if ``mountpoint`` carries a vcfs FUSE mount (per /proc/self/mounts)."""
    return mount_source(mountpoint) is not None


def check_mountpoint(mountpoint: Path) -> None:
    if not mountpoint.is_dir():
        raise MountError(f"mount point {mountpoint} is not a directory", hint=f"mkdir -p {mountpoint}")
    if os.path.ismount(mountpoint):
        raise MountError(f"{mountpoint} is already a mount point", hint=f"vcfs umount {mountpoint}")


def _report(ready_fd: int | None, text: str) -> None:
    if ready_fd is None:
        return
    try:
        os.write(ready_fd, text.encode())
    finally:
        os.close(ready_fd)


def serve(opts: MountOptions, ready_fd: int | None = None) -> int:
    """Mount and serve until unmounted or signalled; returns the exit code."""
    provider: Pkcs11Provider | None = None
    ingest: IngestProvider | None = None
    guard: AccessGuard | None = None
    extras = None
    mounted = False
    tree = os.fsencode(tree_path(opts.backing))
    try:
        cfg = load_config(opts.backing)
        check_mountpoint(opts.mountpoint)
        access = load_access(opts.policy_file)
        if opts.ingest:  # no HSM: recipients and a names-key file instead
            ingest, names = open_ingest(cfg, opts.ingest, opts.ingest_names, tree)
        else:
            provider = open_provider(cfg, opts.keys, probe=True, keep_recipient_keys=False)
            for domain in cfg.domains:
                if not provider.is_down(domain):  # a down domain was logged; it recovers by itself
                    provider.self_test(domain)
            names = name_layer(cfg, provider, skip=provider.is_down)  # a wrong names key fails here
        check_layout(names, tree)
        names.dir_key(tree, b"/")  # a missing root directory id fails here
        lock_store(opts.backing)  # only now: a refused mount leaves the store untouched
        clean_leftovers(opts.backing)
        journal = Journal(opts.backing)
        if provider is not None:  # blocks a crash tore, before anything is served
            recover_store(journal, provider.unwrap, lambda p: _describe(names, tree, p))
        else:
            report_torn(len(list(journal.entries())))
        guard, reload = open_guard(
            access, opts.policy_file, opts.audit_dir, cfg, provider, opts.backing, opts.mountpoint
        )
        keys: MountKeys
        if ingest is not None:
            keys = IngestKeys(opts.backing, ingest, chown=can_chown())
        else:
            assert provider is not None
            metered = cast(Pkcs11Provider, MeteredProvider(provider))  # HSM call counts and latency
            keys = MountKeys(opts.backing, metered, opts.keys, opts.dek_cache_seconds, chown=can_chown())
        ops = VcfsOperations(tree, keys, guard, journal, names)
        state = MountState(opts.backing, opts.mountpoint, lambda: ops.open_files)
        state.ingest = [recipient_name(r.ref) for r in ingest.recipients()] if ingest is not None else []
        extras = service.open_extras(opts.mountpoint, opts.control, opts.metrics, state)  # may refuse: port taken
        options = set(pyfuse3.default_options) | set(opts.fuse_options)
        options |= {f"fsname={opts.backing}", "subtype=vcfs"}
        allow_other = os.geteuid() == 0 if opts.allow_other is None else opts.allow_other
        if allow_other:
            options.add("allow_other")
        if opts.debug:
            options.add("debug")
        os.umask(0)
        service.block_stop_signals()
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
        if extras is not None:
            extras.close()
        if guard is not None:
            guard.close(result="mount failed")
        if provider is not None:
            provider.close()
        raise
    log.info("mounted %s at %s (%s)", opts.backing, opts.mountpoint, _keys_in_use(cfg, provider, ingest))
    guard.start(backing=str(opts.backing), mountpoint=str(opts.mountpoint), policy=access.digest or None)
    daemon = extras.daemon(ops, opts.backing, lambda: _report(ready_fd, "ok\n"))
    daemon.on_hup = reload  # a bad policy file is refused and audited; the policy in force stays
    daemon.tasks.append(lambda: _key_upkeep(ops))
    daemon.tasks.append(ops.keep_dek_pool)  # DEKs wrapped ahead for new files
    try:
        trio.run(service.run, daemon)
    finally:
        service.block_stop_signals()  # a second SIGTERM must not cut the unmount short
        if mounted:
            pyfuse3.close(unmount=True)
        guard.close(result="ok")  # after the kernel let go: the last sessions are recorded
        keys.close()
        extras.close()
        if provider is not None:
            provider.close()
        log.info("unmounted %s", opts.mountpoint)
    return 0


def _describe(names: NameLayer, tree: bytes, backing: bytes) -> str:
    """A backing path as log lines show it: with its plaintext path where names are encrypted."""
    try:
        plain = unresolve(names, tree, backing) if names.encrypted else backing
    except VcfsError:
        return os.fsdecode(backing)
    return label(names.encrypted, backing, plain)


def _keys_in_use(cfg: StoreConfig, provider: Pkcs11Provider | None, ingest: IngestProvider | None) -> str:
    if ingest is not None:
        return "ingest only, no HSM: new files to recipient " + ", ".join(
            recipient_name(r.ref) for r in ingest.recipients()
        )
    assert provider is not None
    return "KEK " + ", ".join(str(provider.current(d)) for d in cfg.domains)


async def _key_upkeep(ops: VcfsOperations) -> None:
    """Once a second: drop expired DEKs; now and then, try to reach a token that went away."""
    while True:
        await trio.sleep(1)
        ops.keys.sweep()
        if ops.keys.recover_due():
            await ops.run_hsm(ops.keys.recover)
