"""Rewrap: every file header under its domain's current KEK, data blocks untouched.

Which domain: the one the file's plaintext path maps to now (vcfs/domainmap.py). Usually
that is the domain already named in the header, and rewrap moves the file to that domain's
current KEK version. A file whose path belongs to another domain (the store got a new domain
or prefix after the file was written) is moved there: its new slot is synced, then the old
domain's slot is erased, so no wrapping under the old domain's keys stays in the header.

Crash safety: each new slot goes into the header's inactive slot while the active one stays
valid, so a kill or power loss at any moment leaves every file readable (under the old or the
new KEK). New slots are made durable in batches with one syncfs() per batch and once at the
end, instead of one fdatasync per file: a rewrap that returns has synced everything it did.
Resumable: a rerun authenticates each header and skips files already under the target.

Concurrency with a mount: files open in the daemon hold a shared flock; rewrap needs the
exclusive one, skips them and reports them busy (run it again later).
"""

from __future__ import annotations

import os
import stat
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

from vcfs.config import load_config
from vcfs.core.header import parse_header
from vcfs.core.layout import HEADER_LEN
from vcfs.cryptfile import erase_other_slot, rewrap_header
from vcfs.errors import UsageError, VcfsError
from vcfs.keyops import domain_of
from vcfs.keys.base import KeyRef, Wrapped
from vcfs.keys.provider import Pkcs11Provider
from vcfs.keys.setup import HostKeyOptions, open_provider
from vcfs.offline import walk
from vcfs.store import pread_exact, sync_filesystem
from vcfs.storelayout import tree_path

SYNC_EVERY = 1024  # new slots per syncfs()


@dataclass
class RewrapReport:
    rewrapped: int = 0
    moved: int = 0  # of those, files moved to another key domain
    already: int = 0
    skipped: int = 0  # not in the requested domain or version
    busy: list[str] = field(default_factory=list)
    failed: list[dict[str, str]] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def exit_code(self) -> int:
        return 2 if self.failed else (1 if self.busy else 0)

    def to_json(self) -> dict[str, object]:
        return {**asdict(self), "exit_code": self.exit_code}


def rewrap(
    backing: Path,
    domain_name: str | None,
    from_version: int | None,
    opts: HostKeyOptions,
    progress: Callable[[int, int], None] | None = None,
) -> RewrapReport:
    """Rewrap every header (of ``domain_name``, or of every domain) under the current KEK."""
    cfg = load_config(backing)
    if domain_name is not None:
        domain_of(cfg, domain_name)
    elif from_version is not None:
        raise UsageError("--from needs a DOMAIN", hint=f"vcfs keys rewrap {backing} DOMAIN --from {from_version}")
    dmap = cfg.domain_map()
    tree = tree_path(backing)
    files = [p for p, st in walk(tree) if stat.S_ISREG(st.st_mode)]
    report = RewrapReport()
    started = time.monotonic()
    provider = open_provider(cfg, opts)
    tree_fd = os.open(tree, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    unsynced = 0
    try:
        for i, path in enumerate(files):
            rel = str(path.relative_to(tree))
            target = provider.current(dmap.domain_of("/" + rel))
            try:
                fd = os.open(path, os.O_RDWR | os.O_CLOEXEC | os.O_NOFOLLOW)
            except OSError as exc:
                report.failed.append({"path": rel, "error": exc.strerror or "open failed"})
                continue
            try:
                if domain_name is not None and not _wanted(fd, domain_name, target.domain, from_version):
                    report.skipped += 1
                    continue
                wrap = _wrap_under(provider, target)
                old, active = rewrap_header(fd, str(path), provider.unwrap, target, wrap, sync=False)
                if old.domain != target.domain or _foreign_slot(fd, active, target.domain):
                    os.fdatasync(fd)  # the new slot is durable before the old domain's goes
                    erase_other_slot(fd, active)
                if old == target:
                    report.already += 1
                else:
                    report.rewrapped += 1
                    report.moved += old.domain != target.domain
                    unsynced += 1
            except BlockingIOError:
                report.busy.append(rel)  # open in the mounted daemon: rerun once it is closed
            except VcfsError as exc:
                report.failed.append({"path": rel, "error": exc.message})
            finally:
                os.close(fd)
            if unsynced >= SYNC_EVERY:
                sync_filesystem(tree_fd)
                unsynced = 0
            if progress:
                progress(i + 1, len(files))
        sync_filesystem(tree_fd)
    finally:
        os.close(tree_fd)
        provider.close()
    report.seconds = round(time.monotonic() - started, 3)
    return report


def _wrap_under(provider: Pkcs11Provider, target: KeyRef) -> Callable[[bytearray], Wrapped]:
    return lambda dek: provider.wrap(target, dek)


def _newest(fd: int) -> tuple[str, int]:
    slot = parse_header(pread_exact(fd, HEADER_LEN, 0)).candidates()[0][1]
    return slot.domain, slot.kek_version


def _wanted(fd: int, domain: str, path_domain: str, from_version: int | None) -> bool:
    """Whether a file belongs to this run (by its header's domain or its path's domain)."""
    try:
        header_domain, version = _newest(fd)
    except VcfsError:
        return True  # let rewrap_header report it
    if from_version is not None:
        return (header_domain, version) == (domain, from_version)
    return domain in (header_domain, path_domain)


def _foreign_slot(fd: int, active: int, domain: str) -> bool:
    """Whether the header's other slot names another domain (unauthenticated; only erased)."""
    header = parse_header(pread_exact(fd, HEADER_LEN, 0))
    other = header.slots[1 - active]
    return other is not None and other.domain != domain
