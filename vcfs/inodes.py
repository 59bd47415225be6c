"""Which backing path, and which plaintext path, an inode number stands for.

Inode numbers are the backing files' own st_ino (the backing root becomes FUSE inode 1).
Each inode remembers the links it was looked up under: (parent inode, plaintext name), each
with the backing name that link has in the parent's backing directory (the same bytes in a
store with plain names; the encrypted name otherwise). Renaming a directory therefore moves
its whole subtree at once: children keep their parent inode, and both paths are rebuilt on
demand by walking up to the root. Hard links give an inode several links.

No I/O and no cryptography here: vcfs/namespace.py computes backing names and hands them in.
"""

from __future__ import annotations

import errno
import os
from dataclasses import dataclass, field

import pyfuse3

ROOT = pyfuse3.ROOT_INODE
Link = tuple[int, bytes]  # (parent inode, plaintext name)


@dataclass(slots=True)
class _Entry:
    links: dict[Link, bytes] = field(default_factory=dict)  # link -> backing name in the parent
    lookups: int = 0


class InodeTable:
    def __init__(self, root_path: bytes) -> None:
        self.root_path = root_path
        self._root_backing_ino = os.lstat(root_path).st_ino
        self._entries: dict[int, _Entry] = {ROOT: _Entry(lookups=1)}

    def to_fuse(self, backing_ino: int) -> int:
        if backing_ino == self._root_backing_ino:
            return ROOT
        if backing_ino == ROOT:
            return self._root_backing_ino  # swap, so the two never collide
        return backing_ino

    def _walk(self, inode: int) -> list[tuple[bytes, bytes]]:
        """(plaintext name, backing name) of each component from ``inode`` up to the root."""
        parts: list[tuple[bytes, bytes]] = []
        while inode != ROOT:
            entry = self._entries.get(inode)
            if entry is None or not entry.links:
                raise FileNotFoundError(errno.ENOENT, f"inode {inode} has no path")
            link = min(entry.links)
            parts.append((link[1], entry.links[link]))
            inode = link[0]
            if len(parts) > 4096:
                raise OSError("inode path loop")
        return parts

    def path(self, inode: int) -> bytes:
        """A current backing path of ``inode``; FileNotFoundError if it has none (unlinked)."""
        parts = self._walk(inode)
        return os.path.join(self.root_path, *(b for _, b in reversed(parts))) if parts else self.root_path

    def plain_path(self, inode: int) -> bytes:
        """The plaintext path of ``inode`` as the mount shows it (``b"/rec/a.mp4"``, the root is ``b"/"``)."""
        return b"/" + b"/".join(n for n, _ in reversed(self._walk(inode)))

    def parent_of(self, inode: int) -> int:
        """The parent inode of the link ``path`` uses."""
        entry = self._entries.get(inode)
        if entry is None or not entry.links:
            raise FileNotFoundError(errno.ENOENT, f"inode {inode} has no path")
        return min(entry.links)[0]

    def remember(self, inode: int, parent: int, name: bytes, backing: bytes, lookups: int = 1) -> None:
        entry = self._entries.setdefault(inode, _Entry())
        entry.links[(parent, name)] = backing
        entry.lookups += lookups

    def drop_link(self, inode: int, parent: int, name: bytes) -> bool:
        """Forget one link; True if the inode has no link left (deleted, or only open)."""
        entry = self._entries.get(inode)
        if entry is None:
            return True
        entry.links.pop((parent, name), None)
        return not entry.links

    def move(self, inode: int, old: Link, new: Link, new_backing: bytes) -> None:
        entry = self._entries.get(inode)
        if entry is None:
            return
        entry.links.pop(old, None)
        entry.links[new] = new_backing

    def forget(self, inode: int, count: int) -> bool:
        """Drop ``count`` kernel lookups; True if the inode was forgotten entirely."""
        entry = self._entries.get(inode)
        if entry is None or inode == ROOT:
            return False
        entry.lookups -= count
        if entry.lookups <= 0:
            del self._entries[inode]
            return True
        return False
