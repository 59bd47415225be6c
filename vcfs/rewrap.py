"""Rewrap: every file header under its domain's current KEK, data blocks untouched.

Which domain: the one the file's plaintext path maps to now (vcfs/domainmap.py). Usually
that is the domain already named in the header, and rewrap moves the file to that domain's
current KEK version. A file whose path belongs to another domain (the store got a new domain
or prefix after the file was written) is moved there: its new slot is synced, then the old
domain's slot is erased, so no wrapping under the old domain's keys stays in the header.

Crash safety: each new slot goes into the header's inactive slot while the active one stays
valid, so a kill or power loss at any moment leaves every file readable (under the old or the
new KEK). New slots are made durable with one syncfs() at the end instead of one fdatasync per file
(a lost slot only means a rerun redoes that file): a rewrap that returns has synced all it did.
Resumable: a rerun authenticates each header and skips files already under the target.

Concurrency with a mount: files open in the daemon hold a shared flock; rewrap needs the
exclusive one, skips them and reports them busy (run it again later).

Adoption (``vcfs keys adopt``) is the same walk over files an ingest host wrapped to a
recipient (wrap algorithm 2): each DEK is unwrapped through the recipient key (whose seed the
HSM unwraps once per run) and wrapped under the domain's current KEK into the inactive slot;
once that is synced, the recipient's slot is erased, so the file from then on opens only under
the KEK and every KEK lifecycle operation applies to it. A plain rewrap leaves such files alone
and counts them (``ingest``).

Speed: the HSM's work per header is the floor: one unwrap and one wrap. vcfs makes them in
one trip (the unwrapped DEK object is wrapped under the new KEK directly, four token calls
instead of six) and keeps the rest to one header read, one HMAC check, one HMAC and one
write. A pipeline over threads was measured and dropped: on a loaded 2-core host the GIL
hand-offs cost more than the overlap gained.
"""

from __future__ import annotations

import ctypes
import multiprocessing
import os
import signal
import stat
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

from vcfs.config import StoreConfig, load_config
from vcfs.core.header import WRAP_PKCS11_AES_KWP, WRAP_XWING_KWP, Header, slot_offset
from vcfs.cryptfile import erase_other_slot, lock_header, rewrap_header, seal_rewrapped_slot
from vcfs.errors import HeaderAuthError, UsageError, VcfsError
from vcfs.keyops import domain_of
from vcfs.keys.base import KeyRef, Wrapped
from vcfs.keys.provider import Pkcs11Provider
from vcfs.keys.setup import HostKeyOptions, open_provider
from vcfs.namekeys import name_layer, rewrap_names_key
from vcfs.namepaths import walk
from vcfs.recipientkeys import rewrap_seeds
from vcfs.store import pwrite_all, sync_filesystem
from vcfs.storelayout import tree_path

CHUNK = 256  # files per progress update (and per task for worker processes)


@dataclass
class RewrapReport:
    rewrapped: int = 0
    moved: int = 0  # of those, files moved to another key domain
    already: int = 0
    skipped: int = 0  # not in the requested domain or version
    ingest: int = 0  # rewrap: files wrapped to a recipient, left for vcfs keys adopt
    busy: list[str] = field(default_factory=list)
    failed: list[dict[str, str]] = field(default_factory=list)
    seconds: float = 0.0
    names_key_rewrapped: list[str] = field(default_factory=list)  # domains whose names key moved to the current KEK
    recipient_keys_rewrapped: list[str] = field(default_factory=list)  # recipients whose seed moved ("default/r1")

    @property
    def exit_code(self) -> int:
        return 2 if self.failed else (1 if self.busy else 0)

    @property
    def total(self) -> int:
        return self.rewrapped + self.already + self.skipped + self.ingest + len(self.busy) + len(self.failed)

    def add(self, rel: str, outcome: _Outcome) -> None:
        if outcome.status == "busy":
            self.busy.append(rel)
        elif outcome.status == "failed":
            self.failed.append({"path": rel, "error": outcome.error})
        elif outcome.status == "skipped":
            self.skipped += 1
        elif outcome.status == "ingest":
            self.ingest += 1
        elif outcome.status == "already":
            self.already += 1
        else:
            self.rewrapped += 1
            self.moved += outcome.status == "moved"

    def merge(self, part: RewrapReport) -> None:
        for name in ("rewrapped", "moved", "already", "skipped", "ingest"):
            setattr(self, name, getattr(self, name) + getattr(part, name))
        self.busy += part.busy
        self.failed += part.failed

    def to_json(self) -> dict[str, object]:
        return {**asdict(self), "exit_code": self.exit_code}


def rewrap(
    backing: Path,
    domain_name: str | None,
    from_version: int | None,
    opts: HostKeyOptions,
    progress: Callable[[int, int], None] | None = None,
    jobs: int = 1,
    adopt: bool = False,
    subpath: str | None = None,
) -> RewrapReport:
    """Rewrap every header (of ``domain_name``, or of every domain) under the current KEK.

    ``jobs`` > 1 spreads the files over that many worker processes, each with its own PKCS#11
    session (one thread per process still talks to the token): the way to keep a slow or
    remote HSM busy, which a single session leaves idle between calls. With ``adopt``, only the
    files wrapped to a recipient (under ``subpath``, a plaintext path, if given) are moved.
    """
    cfg = load_config(backing)
    if domain_name is not None:
        domain_of(cfg, domain_name)
    elif from_version is not None:
        raise UsageError("--from needs a DOMAIN", hint=f"vcfs keys rewrap {backing} DOMAIN --from {from_version}")
    if jobs < 1:
        raise UsageError("--jobs must be at least 1")
    tree = tree_path(backing)
    report = RewrapReport()
    if not adopt:
        report.names_key_rewrapped, report.recipient_keys_rewrapped = _rewrap_store_keys(
            backing, cfg, opts, domain_name
        )
    files = _under(_data_files(backing, cfg, opts), subpath)
    started = time.monotonic()
    tree_fd = os.open(tree, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        job = _Job(backing, opts, domain_name, from_version, adopt)
        if jobs == 1:
            job.start()
            try:
                _run_serial(job, files, report, progress)
            finally:
                job.close()
        else:
            _run_parallel(job, files, report, progress, jobs)
        sync_filesystem(tree_fd)  # every new slot durable before rewrap reports it done
    finally:
        os.close(tree_fd)
    report.seconds = round(time.monotonic() - started, 3)
    return report


class _Job:
    """One process's share of a rewrap: its own provider (session) and the store's domain map."""

    def __init__(
        self, backing: Path, opts: HostKeyOptions, domain: str | None, from_version: int | None, adopt: bool = False
    ) -> None:
        self.backing, self.opts, self.domain, self.from_version = backing, opts, domain, from_version
        self.adopt = adopt
        self.root = str(tree_path(backing))
        self.provider: Pkcs11Provider | None = None

    def start(self) -> None:
        cfg = load_config(self.backing)
        self.dmap = cfg.domain_map()
        self.provider = open_provider(cfg, self.opts)

    def close(self) -> None:
        if self.provider is not None:
            self.provider.close()

    def run(self, paths: list[tuple[str, str]]) -> RewrapReport:
        """Rewrap each (backing path, plaintext path); reports name files by their plaintext path."""
        assert self.provider is not None
        part = RewrapReport()
        for path, plain in paths:
            outcome = _one(self.provider, path, self.dmap.domain_of(plain), self.domain, self.from_version, self.adopt)
            part.add(plain.lstrip("/"), outcome)
        return part


def _run_serial(
    job: _Job, files: list[tuple[str, str]], report: RewrapReport, progress: Callable[[int, int], None] | None
) -> None:
    for i in range(0, len(files), CHUNK):
        report.merge(job.run(files[i : i + CHUNK]))
        if progress:
            progress(min(i + CHUNK, len(files)), len(files))


_WORKER: _Job | None = None


def _worker_start(job: _Job) -> None:
    global _WORKER
    _die_with_parent()
    job.start()
    _WORKER = job


def _worker_run(paths: list[tuple[str, str]]) -> RewrapReport:
    assert _WORKER is not None
    return _WORKER.run(paths)


def _die_with_parent() -> None:
    """A worker must not outlive a rewrap that was killed (kill -9 included): PR_SET_PDEATHSIG."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(1, signal.SIGKILL, 0, 0, 0)  # PR_SET_PDEATHSIG = 1
    if os.getppid() == 1:
        os._exit(1)  # the parent died before prctl took effect


def _run_parallel(
    job: _Job,
    files: list[tuple[str, str]],
    report: RewrapReport,
    progress: Callable[[int, int], None] | None,
    jobs: int,
) -> None:
    ctx = multiprocessing.get_context("spawn")  # never fork a process that has a PKCS#11 library loaded
    chunks = [files[i : i + CHUNK] for i in range(0, len(files), CHUNK)]
    done = 0
    with ctx.Pool(jobs, initializer=_worker_start, initargs=(job,)) as pool:
        for part in pool.imap_unordered(_worker_run, chunks):
            report.merge(part)
            done += part.total
            if progress:
                progress(done, len(files))


@dataclass(frozen=True, slots=True)
class _Outcome:
    status: str  # rewrapped | moved | already | skipped | busy | failed
    error: str = ""


def _one(
    provider: Pkcs11Provider,
    path: str,
    path_domain: str,
    domain: str | None,
    from_version: int | None,
    adopt: bool = False,
) -> _Outcome:
    try:
        fd = os.open(path, os.O_RDWR | os.O_CLOEXEC | os.O_NOFOLLOW)
    except OSError as exc:
        return _Outcome("failed", exc.strerror or "open failed")
    try:
        header = lock_header(fd)
        ingest = header.candidates()[0][1].wrap_alg == WRAP_XWING_KWP
        if ingest != adopt:  # rewrap leaves recipient-wrapped files to adopt, adopt leaves the others
            return _Outcome("ingest" if ingest else "already")
        if not _wanted(header, domain, path_domain, from_version):
            return _Outcome("skipped")
        target = provider.current(path_domain)
        old, active, other = _rewrap_fd(provider, fd, path, header, target)
        if other not in (None, target.domain) or ingest:
            # the new slot is durable before the old domain's, or the recipient's, wrapping goes
            os.fdatasync(fd)
            erase_other_slot(fd, active)
        if old == target and not ingest:
            return _Outcome("already")
        return _Outcome("moved" if old.domain != target.domain else "rewrapped")
    except BlockingIOError:
        return _Outcome("busy")  # open in the mounted daemon: rerun once it is closed
    except VcfsError as exc:
        return _Outcome("failed", exc.message)
    finally:
        os.close(fd)


def _rewrap_store_keys(
    backing: Path, cfg: StoreConfig, opts: HostKeyOptions, domain: str | None
) -> tuple[list[str], list[str]]:
    """Move the names keys and recipient seeds of ``domain`` (or of every domain) to its current KEK,
    like a header: (domains whose names key moved, recipients whose seed moved)."""
    provider = open_provider(cfg, opts)
    try:
        wanted = [domain] if domain is not None else list(cfg.domains)
        names = []
        if cfg.encrypted_names:
            names = [d for d in wanted if not provider.is_down(d) and rewrap_names_key(backing, provider, d)]
        return names, rewrap_seeds(cfg, provider, opts, domain)
    finally:
        provider.close()


def _under(files: list[tuple[str, str]], subpath: str | None) -> list[tuple[str, str]]:
    """The files at or below plaintext path ``subpath`` (all without one)."""
    if not subpath or subpath.strip("/") == "":
        return files
    prefix = "/" + "/".join(p for p in subpath.split("/") if p and p != ".")
    found = [(b, p) for b, p in files if p == prefix or p.startswith(prefix + "/")]
    if not found:
        raise UsageError(f"no file at or below {prefix} in this store")
    return found


def _data_files(backing: Path, cfg: StoreConfig, opts: HostKeyOptions) -> list[tuple[str, str]]:
    """(backing path, plaintext path) of every file holding data, in a stable order.

    The plaintext path decides the key domain a file belongs in. With encrypted names the
    tree is walked through the name layer (one HSM unwrap per names key); vcfs's own files
    (directory ids, long-name sidecars) are skipped, and so are entries whose name does not
    decrypt (fsck reports those).
    """
    tree = os.fsencode(tree_path(backing))
    if not cfg.encrypted_names:
        root = str(tree_path(backing))
        return [(p, "/" + p[len(root) + 1 :]) for p in _regular_files(root)]
    provider = open_provider(cfg, opts)
    try:
        names = name_layer(cfg, provider, skip=provider.is_down)
        return [
            (os.fsdecode(w.backing), os.fsdecode(w.plain))
            for w in walk(names, tree, b"/")
            if w.plain is not None and w.st is not None and stat.S_ISREG(w.st.st_mode)
        ]
    finally:
        provider.close()


def _regular_files(root: str) -> list[str]:
    """Every regular file under ``root``, in a stable order (plain strings: 10k Path objects cost)."""
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for name in sorted(filenames):
            path = os.path.join(dirpath, name)
            try:
                if stat.S_ISREG(os.lstat(path).st_mode):
                    out.append(path)
            except FileNotFoundError:
                continue
    return out


def _wanted(header: Header, domain: str | None, path_domain: str, from_version: int | None) -> bool:
    """Whether a file belongs to this run (by its header's domain or its path's domain)."""
    if domain is None:
        return True
    slot = header.candidates()[0][1]
    if from_version is not None:
        return (slot.domain, slot.kek_version) == (domain, from_version)
    return domain in (slot.domain, path_domain)


def _rewrap_fd(
    provider: Pkcs11Provider, fd: int, path: str, header: Header, target: KeyRef
) -> tuple[KeyRef, int, str | None]:
    """(KEK the file was under, slot now holding the target, domain of the other slot)."""
    index, slot = header.candidates()[0]
    old = KeyRef(slot.domain, slot.kek_version)
    other = header.slots[1 - index]
    wrapped = Wrapped(old, slot.wrap_alg, slot.wrapped)
    try:
        if old == target and slot.wrap_alg == WRAP_PKCS11_AES_KWP:  # under 2, the "version" is a recipient's
            if seal_rewrapped_slot(header, index, provider.unwrap(wrapped), None) is None:
                return old, index, other.domain if other is not None else None
        else:
            dek, new = provider.rewrap(wrapped, target)
            encoded = seal_rewrapped_slot(header, index, dek, new)
            assert encoded is not None
            pwrite_all(fd, encoded, slot_offset(1 - index))
            return old, 1 - index, old.domain
    except HeaderAuthError:
        pass
    # The newest slot is damaged (or a crash trace): the one-file path tries both slots.
    done = rewrap_header(fd, path, provider.unwrap, target, lambda dek: provider.wrap(target, dek), sync=False)
    return done.old, done.active, done.other_domain
