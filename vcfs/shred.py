"""vcfs shred PATH: crypto-shred one file or a tree in the live store.

A file's blocks are only as secret as its DEK, and the DEK exists on disk only wrapped in the
header's two key slots. Shredding overwrites both slots with random bytes, syncs, and then
unlinks the file: from then on the live store holds no wrapping of that DEK, and its blocks
(wherever they linger: free space, the journal) cannot be decrypted by anyone, with or
without the HSM. No key is needed for this, so it works with the HSM away.

What it does NOT reach (docs/KEYS.md, "Shredding one file"): copies of the header made
before the shred — backups, snapshots, copy-on-write filesystems, an SSD's remapped
sectors — still hold the wrapped DEK and stay decryptable while their KEK version exists.
To shred those too, retire the file's KEK version from every other file (rotate, rewrap)
and destroy it: that makes every older backup of that domain unreadable as well.

PATH is a backing path (BACKING/files/...) or a path inside a vcfs mount; in a mount, the
unlink goes through the mount so the daemon and the kernel see it. A file open in the mount
is refused (busy): close it first.
"""

from __future__ import annotations

import errno
import fcntl
import os
import stat
from dataclasses import asdict, dataclass, field
from pathlib import Path

from vcfs import events
from vcfs.config import CONFIG_NAME, load_config
from vcfs.core.header import SLOT_COUNT, SLOT_LEN, parse_preamble, slot_offset
from vcfs.core.layout import HEADER_LEN
from vcfs.errors import FormatError, UsageError
from vcfs.keys.setup import HostKeyOptions
from vcfs.namepaths import walk
from vcfs.offline import find_store, open_store
from vcfs.store import pread_exact, pwrite_all
from vcfs.storelayout import TREE_DIR, tree_path


@dataclass
class ShredReport:
    shredded: list[str] = field(default_factory=list)
    removed: int = 0  # directories, symlinks and other entries removed along
    busy: list[str] = field(default_factory=list)
    failed: list[dict[str, str]] = field(default_factory=list)

    @property
    def exit_code(self) -> int:
        return 2 if self.failed else (1 if self.busy else 0)

    def to_json(self) -> dict[str, object]:
        return {**asdict(self), "exit_code": self.exit_code}


def _mount_source(path: Path) -> tuple[Path, Path] | None:
    """(backing dir, mount point) of the vcfs mount holding ``path``, if any."""
    best: tuple[Path, Path] | None = None
    with open("/proc/self/mounts") as f:
        for line in f:
            src, where, kind, *_ = line.split()
            if kind != "fuse.vcfs":
                continue
            mnt = Path(where.replace("\\040", " ").replace("\\011", "\t").replace("\\134", "\\"))
            if (mnt == path or mnt in path.parents) and (best is None or len(str(mnt)) > len(str(best[1]))):
                best = (Path(src.replace("\\040", " ")), mnt)
    return best


def resolve(path: Path, opts: HostKeyOptions) -> tuple[Path, Path, Path]:
    """(backing path, path to unlink through, the store's tree): unlink through the mount if in one.

    A path in a mount is a plaintext path: with encrypted names its backing path is found
    through the name layer, which needs the HSM (to read names, not to shred).
    """
    absolute = Path(os.path.abspath(path))
    mount = _mount_source(absolute)
    if mount is not None:
        backing, mnt = mount
        plain = "/" + str(absolute.relative_to(mnt))
        if not load_config(backing).encrypted_names:
            return tree_path(backing) / absolute.relative_to(mnt), absolute, tree_path(backing)
        store = open_store(backing, opts)
        try:
            try:
                return store.backing_of(plain), absolute, tree_path(backing)
            except UsageError:
                raise UsageError(f"{path} does not exist") from None
        finally:
            store.close()
    if absolute.name == TREE_DIR and (absolute.parent / CONFIG_NAME).exists():
        return absolute, absolute, absolute  # the tree itself (refused by the caller)
    backing, rel = find_store(absolute)
    return tree_path(backing) / rel, absolute, tree_path(backing)


def shred_file(backing_file: Path) -> str:
    """Overwrite both key slots of one backing file and sync; returns its file id (hex)."""
    fd = os.open(backing_file, os.O_RDWR | os.O_CLOEXEC | os.O_NOFOLLOW)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # BlockingIOError: open in a mount
        try:
            file_id = parse_preamble(pread_exact(fd, HEADER_LEN, 0)).file_id.hex()
        except FormatError:
            file_id = ""
        for i in range(SLOT_COUNT):
            pwrite_all(fd, os.urandom(SLOT_LEN), slot_offset(i))
        os.fdatasync(fd)
    finally:
        os.close(fd)
    return file_id


def shred(path: Path, opts: HostKeyOptions | None = None) -> ShredReport:
    """Shred the file at ``path``, or every file of the tree at ``path`` and remove the tree."""
    backing_path, visible, tree = resolve(path, opts or HostKeyOptions())
    try:
        st = os.lstat(backing_path)
    except FileNotFoundError:
        raise UsageError(f"{path} does not exist") from None
    if os.path.samefile(backing_path, tree):
        raise UsageError("refusing to shred the whole store", hint="shred its subdirectories, or destroy its KEKs")
    report = ShredReport()
    if not stat.S_ISDIR(st.st_mode):
        _one(backing_path, visible, st, report)
        return report
    if visible != backing_path and load_config(tree.parent).encrypted_names:
        return _shred_named_tree(backing_path, visible, opts or HostKeyOptions(), report)
    for dirpath, dirnames, filenames in os.walk(backing_path, topdown=False):
        rel = Path(dirpath).relative_to(backing_path)
        for name in sorted(filenames):
            b = Path(dirpath, name)
            _one(b, visible / rel / name, b.lstat(), report)
        for name in dirnames:
            d = visible / rel / name
            if os.path.islink(d):
                os.unlink(d)
                report.removed += 1
        _rmdir(visible / rel, report)
    return report


def _shred_named_tree(backing_dir: Path, visible: Path, opts: HostKeyOptions, report: ShredReport) -> ShredReport:
    """A tree in a mount whose names are encrypted: walk it by plaintext name, deepest first."""
    tree = backing_dir
    while tree.name != TREE_DIR:
        tree = tree.parent
    store = open_store(tree.parent, opts)
    try:
        start_plain = os.fsencode(store.plain_of(backing_dir))
        walked = list(walk(store.names, os.fsencode(backing_dir), start_plain))
    finally:
        store.close()
    for w in reversed(walked):  # children before their directories
        if w.plain is None or w.st is None:
            report.failed.append({"path": os.fsdecode(w.backing), "error": w.problem or "name does not decrypt"})
            continue
        where = visible / os.path.relpath(os.fsdecode(w.plain), os.fsdecode(start_plain))
        if stat.S_ISDIR(w.st.st_mode):
            _rmdir(where, report)
        else:
            _one(Path(os.fsdecode(w.backing)), where, w.st, report)
    _rmdir(visible, report)
    return report


def _rmdir(target: Path, report: ShredReport) -> None:
    try:
        os.rmdir(target)
        report.removed += 1
    except OSError as exc:
        if exc.errno not in (errno.ENOTEMPTY, errno.EEXIST):
            report.failed.append({"path": str(target), "error": exc.strerror or "rmdir failed"})


def _one(backing_file: Path, visible: Path, st: os.stat_result, report: ShredReport) -> None:
    if not stat.S_ISREG(st.st_mode):
        os.unlink(visible)
        report.removed += 1
        return
    try:
        file_id = shred_file(backing_file)
    except BlockingIOError:
        report.busy.append(str(visible))
        return
    except OSError as exc:
        report.failed.append({"path": str(visible), "error": exc.strerror or "shred failed"})
        return
    os.unlink(visible)
    report.shredded.append(str(visible))
    events.emit(events.KEY_SHRED, path=str(visible), file_id=file_id, links=st.st_nlink)
