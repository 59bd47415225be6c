"""The mount's view of names: inode table plus name layer, behind the calls fs.py makes.

fs.py speaks plaintext names (what the kernel sends); the backing tree holds backing names
(encrypted, or the same bytes in a plain-names store). This object turns one into the other,
remembers both for every inode (vcfs/inodes.py), keeps each directory's id and names key
(``DirKey``) for as long as the kernel knows the directory, and runs the namespace operations
through the name layer (vcfs/names.py) so sidecars and directory ids stay consistent.

``plain_path(inode)`` is the one way to learn the plaintext path of an inode (for the audit
trail and the key-domain mapping). Names that do not decrypt are left out of listings and
logged with their backing path (and emitted as ``name.auth_failed`` events); a directory whose
id file is missing or malformed answers EIO.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager

from vcfs import events
from vcfs.core.names import EntryName
from vcfs.errors import VcfsError
from vcfs.inodes import InodeTable
from vcfs.names import RENAME_EXCHANGE, DirKey, NameLayer, PlainNames

log = logging.getLogger("vcfs.names")
LINK_SIZES_MAX = 4096  # symlink sizes remembered (see Namespace.link_size)
_BACKING_MARK = " (backing "  # describe(): "PLAIN (backing BACKING)"


def label(encrypted: bool, backing: bytes, plain: bytes) -> str:
    """How log lines name a file: plaintext path, and the backing path where the two differ."""
    if not encrypted:
        return os.fsdecode(backing)
    return f"{os.fsdecode(plain)}{_BACKING_MARK}{os.fsdecode(backing)})"


class Namespace:
    def __init__(self, tree: bytes, names: NameLayer | None = None) -> None:
        self.table = InodeTable(tree)
        self.names = names if names is not None else PlainNames()
        self.root_path = tree
        self._dirs: dict[int, DirKey] = {}  # directory inode -> its DirKey, while the kernel knows it
        self._link_sizes: dict[tuple[int, int, int], int] = {}  # see link_size
        self.bad_names = 0

    # ---- paths -----------------------------------------------------------------------------

    def to_fuse(self, backing_ino: int) -> int:
        return self.table.to_fuse(backing_ino)

    def path(self, inode: int) -> bytes:
        """A current backing path of ``inode``; FileNotFoundError if it has none (unlinked)."""
        return self.table.path(inode)

    def plain_path(self, inode: int) -> bytes:
        """The plaintext path of ``inode`` in the mount (``b"/"`` for the root); FileNotFoundError if unlinked."""
        return self.table.plain_path(inode)

    def plain_child_path(self, parent: int, name: bytes) -> bytes:
        return os.path.join(self.plain_path(parent), name)

    def describe(self, inode: int) -> str:
        """How log lines name a file: plaintext path, and the backing path where they differ."""
        return self._label(self.path(inode), self.plain_path(inode))

    def describe_child(self, parent: int, name: bytes) -> str:
        return self._label(self.child_path(parent, name), self.plain_child_path(parent, name))

    def _label(self, backing: bytes, plain: bytes) -> str:
        return label(self.names.encrypted, backing, plain)

    def split_label(self, label: str) -> tuple[str, str]:
        """(plaintext path in the mount, backing path) of a label made by ``describe``."""
        plain, mark, backing = label.partition(_BACKING_MARK)
        if mark:
            return plain, backing[:-1]
        rel = os.path.relpath(label, os.fsdecode(self.root_path))
        return ("/" + rel if not rel.startswith("..") else label), label

    def _dir(self, inode: int) -> DirKey:
        dk = self._dirs.get(inode)
        if dk is None:
            dk = self._dirs[inode] = self.names.dir_key(self.path(inode), self.plain_path(inode))
        return dk

    def _en(self, parent: int, name: bytes) -> EntryName:
        return self.names.entry(self._dir(parent), name)

    def child_path(self, parent: int, name: bytes) -> bytes:
        """The backing path plaintext ``name`` has (or would have) in directory ``parent``."""
        return os.path.join(self.path(parent), self._en(parent, name).entry)

    # ---- the inode table ------------------------------------------------------------------

    def remember(self, inode: int, parent: int, name: bytes, entry: bytes | None = None) -> None:
        self.table.remember(inode, parent, name, entry if entry is not None else self._en(parent, name).entry)

    def inode_at(self, parent: int, name: bytes) -> int | None:
        """The inode linked as ``name`` in ``parent``, if any."""
        try:
            st = os.lstat(self.child_path(parent, name))
        except OSError:
            return None
        return self.to_fuse(st.st_ino)

    def drop_link(self, inode: int, parent: int, name: bytes) -> None:
        if self.table.drop_link(inode, parent, name):
            self._dirs.pop(inode, None)  # a deleted directory's inode number may come back as a new one

    def forget(self, inode: int, count: int) -> None:
        if self.table.forget(inode, count):
            self._dirs.pop(inode, None)

    # ---- listing ---------------------------------------------------------------------------

    def listing(self, inode: int) -> list[tuple[bytes, bytes, os.stat_result]]:
        """(plaintext name, backing name, lstat) of each entry, in a stable (backing-name) order."""
        path = self.path(inode)
        good, bad = self.names.list_dir(path, self._dir(inode))
        for b in bad:
            self.bad_names += 1
            where = os.fsdecode(os.path.join(path, b.entry))
            plain = os.fsdecode(self.plain_path(inode))
            log.error("name left out of the listing of %s: %s: %s", plain, where, b.reason)
            events.emit(events.NAME_AUTH_FAILED, path=where, reason=b.reason)
        stats = {}
        for item in sorted(good, key=lambda g: g.ino):  # inode order: far fewer seeks on a cold cache
            try:
                stats[item.entry] = os.lstat(os.path.join(path, item.entry))
            except FileNotFoundError:
                continue
        return [(item.name, item.entry, stats[item.entry]) for item in good if item.entry in stats]

    # ---- namespace operations --------------------------------------------------------------

    def needs_sidecar(self, parent: int, name: bytes) -> bool:
        """True if creating ``name`` in ``parent`` first writes a long-name sidecar (disk I/O)."""
        return self._en(parent, name).sidecar is not None

    def prepare_child(self, parent: int, name: bytes) -> bytes:
        """The backing path to create ``name`` at, with a long name's sidecar already written.

        Pair with ``abandon_child`` if the entry then is not created.
        """
        dir_path, en = self.path(parent), self._en(parent, name)
        self.names.prepare(dir_path, en)
        return os.path.join(dir_path, en.entry)

    def abandon_child(self, parent: int, name: bytes) -> None:
        """After a failed create: remove a sidecar that ``prepare_child`` wrote and nothing uses. Never raises."""
        with contextlib.suppress(OSError, VcfsError):
            self.names.unprepare(self.path(parent), self._en(parent, name))

    @contextmanager
    def creating(self, parent: int, name: bytes) -> Iterator[bytes]:
        """``prepare_child`` and, if the block fails, ``abandon_child``."""
        path = self.prepare_child(parent, name)
        try:
            yield path
        except BaseException:
            self.abandon_child(parent, name)
            raise

    def mkdir(self, parent: int, name: bytes, mode: int) -> bytes:
        return self.names.mkdir(self.path(parent), self._en(parent, name), mode)

    def rmdir(self, parent: int, name: bytes) -> None:
        inode = self.inode_at(parent, name)
        self.names.rmdir(self.path(parent), self._en(parent, name))
        if inode is not None:
            self.drop_link(inode, parent, name)

    def unlink(self, parent: int, name: bytes) -> int | None:
        """Remove one link; returns the inode it pointed to, if known."""
        inode = self.inode_at(parent, name)
        self.names.unlink(self.path(parent), self._en(parent, name))
        if inode is not None:
            self.drop_link(inode, parent, name)
        return inode

    def rename(self, parent_old: int, name_old: bytes, parent_new: int, name_new: bytes, flags: int) -> None:
        old_dir, new_dir = self.path(parent_old), self.path(parent_new)
        old, new = self._en(parent_old, name_old), self._en(parent_new, name_new)
        moved = self.inode_at(parent_old, name_old)
        replaced = self.inode_at(parent_new, name_new)
        self.names.rename(old_dir, old, new_dir, new, flags)
        if flags & RENAME_EXCHANGE:
            if replaced is not None:
                self.table.move(replaced, (parent_new, name_new), (parent_old, name_old), old.entry)
        elif replaced is not None and replaced != moved:
            self.drop_link(replaced, parent_new, name_new)
        if moved is not None:
            self.table.move(moved, (parent_old, name_old), (parent_new, name_new), new.entry)

    def store_target(self, parent: int, target: bytes) -> bytes:
        """What to store as the backing symlink target of a new symlink in ``parent``."""
        return self.names.store_target(self._dir(parent), target)

    def link_size(self, inode: int, st: os.stat_result, where: tuple[int, bytes] | None = None) -> int:
        """The st_size a symlink shows: its plaintext target's length (``where``: parent, backing path).

        Remembered per backing symlink (inode, mtime, stored length: a symlink never changes):
        readlink(2) moves the backing symlink's atime, and a stat through the mount must not
        (lchown, for one, leaves a symlink's atime alone on a plain filesystem).
        """
        if not self.names.encrypted:
            return st.st_size
        key = (st.st_ino, st.st_mtime_ns, st.st_size)
        known = self._link_sizes.get(key)
        if known is not None:
            return known
        try:
            parent, path = where if where is not None else (self.table.parent_of(inode), self.path(inode))
            size = len(self.names.load_target(self._dir(parent), os.readlink(path)))
        except (OSError, VcfsError):
            return st.st_size  # readlink will report the problem
        if len(self._link_sizes) >= LINK_SIZES_MAX:
            self._link_sizes.pop(next(iter(self._link_sizes)))  # oldest first: a bounded memory
        self._link_sizes[key] = size
        return size

    def read_link(self, inode: int) -> bytes:
        stored = os.readlink(self.path(inode))
        if not self.names.encrypted:
            return stored
        return self.names.load_target(self._dir(self.table.parent_of(inode)), stored)
