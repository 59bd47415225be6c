"""Check every header and block of a store; with repair, cut torn or unterminated tails.

What can be repaired without losing authentic data: a block a crash tore while it was being
rewritten in place, if the journal holds its last synced version (restored, as the mount
does at start); and a file whose damage is only at its end (a torn last write, or a crash
before the final block was written). fsck cuts such a file after its last authentic block,
seals that block final, and keeps the removed bytes in BACKING/quarantine/. Damage inside a
file (a bad block followed by good ones) or in its header is reported, never "repaired" by
dropping data: reads of that range keep failing with EIO and the rest of the file stays
readable.

In a store with encrypted names, every name, directory id and symlink target is checked too
(kind "name", reported with its backing path); repair removes only what an interrupted
operation left behind (``vcfs.tmp.*`` leftovers and sidecars whose long entry is gone).
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import stat
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

from vcfs.core.layout import BLOCK_SIZE, CIPHER_BLOCK_SIZE, block_no_to_cipher_off
from vcfs.cryptfile import CryptFile
from vcfs.errors import FormatError, IntegrityError, KeyProviderError, UnterminatedError, VcfsError
from vcfs.namepaths import leftovers
from vcfs.namepaths import walk as walk_names
from vcfs.names import remove_leftover
from vcfs.offline import OfflineStore
from vcfs.store import lock_store, pread_exact
from vcfs.storelayout import QUARANTINE_DIR

CHUNK_BLOCKS = 64  # 4 MiB per read
EXIT_CLEAN, EXIT_REPAIRED, EXIT_PROBLEMS = 0, 1, 2
LIVE_RETRIES, LIVE_RETRY_WAIT = 3, 0.2  # a file open in a mount is checked again before a problem counts
QUARANTINE_NAME_MAX = 200  # bytes of the flattened path in a quarantine file name


@dataclass
class Problem:
    path: str  # plaintext path relative to the root (the backing path where the name does not decrypt)
    kind: str  # header | block | tail | journal | name | io
    detail: str
    block: int | None = None
    repaired: bool = False
    quarantined: str | None = None
    backing: str | None = None  # relative to the backing tree (BACKING/files)


@dataclass
class FsckReport:
    files: int = 0
    blocks: int = 0
    bytes: int = 0
    problems: list[Problem] = field(default_factory=list)
    orphan_journals: int = 0  # journals of deleted files (harmless; --repair removes them)

    @property
    def exit_code(self) -> int:
        if any(not p.repaired for p in self.problems):
            return EXIT_PROBLEMS
        return EXIT_REPAIRED if self.problems else EXIT_CLEAN

    def to_json(self) -> dict[str, object]:
        return {
            "files": self.files,
            "blocks": self.blocks,
            "bytes": self.bytes,
            "orphan_journals": self.orphan_journals,
            "exit_code": self.exit_code,
            "problems": [asdict(p) for p in self.problems],
        }


def _bad_blocks(cf: CryptFile) -> list[tuple[int, IntegrityError]]:
    """Every block that fails authentication (in chunks; block by block only where one fails).

    Reads at disk speed: while one chunk is decrypted (AES-GCM runs at several GB/s, so the
    disk is the limit), the kernel is already reading the next one (POSIX_FADV_WILLNEED).
    """
    bad = []
    for first in range(0, cf.disk_blocks, CHUNK_BLOCKS):
        count = min(CHUNK_BLOCKS, cf.disk_blocks - first)
        ahead = first + CHUNK_BLOCKS
        if ahead < cf.disk_blocks:
            os.posix_fadvise(
                cf.fd, block_no_to_cipher_off(ahead), CHUNK_BLOCKS * CIPHER_BLOCK_SIZE, os.POSIX_FADV_WILLNEED
            )
        try:
            cf.read(first * BLOCK_SIZE, count * BLOCK_SIZE)
            continue
        except IntegrityError:
            pass
        for b in range(first, first + count):
            try:
                cf.read(b * BLOCK_SIZE, BLOCK_SIZE)
            except IntegrityError as exc:
                bad.append((b, exc))
    return bad


def _quarantine(store: OfflineStore, rel: str, cf: CryptFile, from_block: int) -> str:
    qdir = store.backing / QUARANTINE_DIR
    qdir.mkdir(exist_ok=True, mode=0o700)
    flat = os.fsencode(rel).replace(b"/", b"%2F")
    if len(flat) > QUARANTINE_NAME_MAX:  # keep the name legal (255 bytes), still traceable to the file
        flat = flat[: QUARANTINE_NAME_MAX - 17] + b"~" + hashlib.sha256(flat).hexdigest()[:16].encode()
    name = os.fsdecode(flat) + time.strftime(".%Y%m%dT%H%M%SZ", time.gmtime()) + ".tail"
    start = block_no_to_cipher_off(from_block)
    with open(qdir / name, "wb") as out:
        out.write(pread_exact(cf.fd, os.fstat(cf.fd).st_size - start, start))
        out.flush()
        os.fsync(out.fileno())
    return f"{QUARANTINE_DIR}/{name}"


@dataclass
class _FileResult:
    blocks: int = 0
    plain_bytes: int = 0
    problems: list[Problem] = field(default_factory=list)
    file_id: bytes | None = None


def _check_file(store: OfflineStore, path: Path, rel: str, repair: bool) -> _FileResult:
    res = _FileResult()
    try:
        cf = store.open_file(path, writable=repair, allow_damaged=True)
    except (FormatError, KeyProviderError) as exc:
        res.problems.append(Problem(rel, "header", exc.message))
        return res
    try:
        res.file_id = cf.file_id
        for r in cf.restored:  # blocks a crash tore, found in the journal (vcfs/recovery.py)
            detail = (
                "torn by a crash; restored from the journal"
                if repair
                else "torn by a crash; its last synced version is in the journal (mount or fsck --repair restores it)"
            )
            res.problems.append(Problem(rel, "journal", detail, block=r.block_no, repaired=repair))
        res.blocks, res.plain_bytes = cf.disk_blocks, cf.size
        bad = _bad_blocks(cf)
        tail_only = all(b == cf.disk_blocks - 1 for b, _ in bad)
        if not bad and not cf.torn_tail and cf.disk_blocks > 0:
            return res
        for b, err in bad:
            if not (tail_only and b == cf.disk_blocks - 1):
                res.problems.append(Problem(rel, "block", err.message, block=b))
        if not tail_only:
            return res
        # A last block that is authentic but sealed inner only lacks the end mark: keep it.
        keep = cf.disk_blocks - (1 if bad and not isinstance(bad[0][1], UnterminatedError) else 0)
        detail = "file ends in a torn or unterminated block" if bad or cf.torn_tail else "no complete block"
        problem = Problem(rel, "tail", f"{detail}; {keep} authentic blocks before it", block=keep)
        if repair:
            problem.quarantined = _quarantine(store, str(path.relative_to(store.tree)), cf, keep)
            cf.repair_tail(keep)
            problem.repaired = True
        res.problems.append(problem)
        return res
    finally:
        cf.close()


def _in_use(path: Path) -> bool:
    """True if a mount has the file open (it holds a shared flock on it), so it may be mid-write."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)  # also drops the probe lock at once
    return False


def _check_path(store: OfflineStore, path: Path, rel: str, repair: bool) -> _FileResult:
    try:
        res = _check_file(store, path, rel, repair)
        # Live store: a file open in the mount may be read in the middle of a write of its tail.
        # Look again before reporting; a problem that stays is reported (with a note).
        for _ in range(LIVE_RETRIES if res.problems and not repair else 0):
            if not _in_use(path):
                break
            time.sleep(LIVE_RETRY_WAIT)
            res = _check_file(store, path, rel, repair)
            if not res.problems:
                break
            for p in res.problems:
                p.detail += " (the file is open in a mount; its end may be mid-write)"
        return res
    except VcfsError as exc:
        return _FileResult(problems=[Problem(rel, "header", exc.message)])
    except OSError as exc:
        return _FileResult(problems=[Problem(rel, "io", f"{exc.strerror}")])


def fsck(store: OfflineStore, repair: bool, progress: Callable[[int, int], None] | None = None) -> FsckReport:
    lock_fd = lock_store(store.backing) if repair else None  # repair only on an unmounted store
    try:
        report = FsckReport()
        seen: set[bytes] = set()
        entries = _check_names(store, repair, report)
        for i, (path, rel) in enumerate(entries):
            report.files += 1
            res = _check_path(store, path, rel, repair)
            report.blocks += res.blocks
            report.bytes += res.plain_bytes
            for p in res.problems:
                p.backing = str(path.relative_to(store.tree))
            report.problems += res.problems
            if res.file_id is not None:
                seen.add(res.file_id)
            if progress:
                progress(i + 1, len(entries))
        # Journals of files that are gone (deleted before a crash) protect nothing. Only with the
        # store lock is it certain no mount is creating a file (and its journal) right now.
        journal = store.journal
        orphans = [f for f in journal.entries() if f not in seen]
        report.orphan_journals = len(orphans)
        if repair:
            for file_id in orphans:
                journal.remove(file_id)
        return report
    finally:
        if lock_fd is not None:
            os.close(lock_fd)


def _check_names(store: OfflineStore, repair: bool, report: FsckReport) -> list[tuple[Path, str]]:
    """Walk the tree by plaintext name: report every name, directory id and symlink target that
    does not authenticate; returns the regular files to check, with their plaintext paths."""
    files: list[tuple[Path, str]] = []
    tree = os.fsencode(store.tree)

    def name_problem(backing: bytes, detail: str) -> Problem:
        rel = os.fsdecode(os.path.relpath(backing, tree))
        problem = Problem(rel, "name", detail, backing=rel)
        report.problems.append(problem)
        return problem

    dirs = [tree]
    for w in walk_names(store.names, tree, b"/"):
        if w.problem is not None or w.st is None or w.plain is None:
            name_problem(w.backing, w.problem or "unreadable")
        elif stat.S_ISREG(w.st.st_mode):
            files.append((Path(os.fsdecode(w.backing)), os.fsdecode(w.plain).lstrip("/")))
        elif stat.S_ISLNK(w.st.st_mode) and store.names.encrypted:
            try:
                store.names.load_target(w.parent, os.readlink(w.backing))
            except VcfsError as exc:
                name_problem(w.backing, f"symlink target: {exc.message}")
        elif stat.S_ISDIR(w.st.st_mode):
            dirs.append(w.backing)
    for d in dirs:
        for path in leftovers(store.names, d):
            problem = name_problem(path, "left over from an interrupted operation")
            if repair:
                remove_leftover(path)
                problem.repaired = True
    return files
