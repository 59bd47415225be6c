"""Which backing path, and which plaintext path, an inode number stands for.

Inode numbers are the backing files' own st_ino (the backing root becomes FUSE inode 1).
Each inode remembers the links it was looked up under: (parent inode, plaintext name), each
with the backing name that link has in the parent's backing directory (the same bytes in a
store with plain names; the encrypted name otherwise). Renaming a directory therefore moves
its whole subtree at once: children keep their parent inode, and both paths are rebuilt on
demand by walking up to the root. Hard links give an inode several links.

Deep trees: a plain filesystem allows any depth (PATH_MAX, 4096 bytes, limits one system
call's path, not the tree), but the backing path of a deep file is longer than the path the
user gave, relative to some directory of theirs. So a backing path that would pass
``PATH_LIMIT`` is named relative to an O_PATH descriptor of one of its directories, as
``/proc/self/fd/N/rest``: every path-based call in the adapter works on it unchanged. An
anchor follows its directory through renames (it is the inode, not the name) and is closed
when the kernel forgets that directory, so no request can still be using its number.

No cryptography here: vcfs/namespace.py computes backing names and hands them in.
"""

from __future__ import annotations

import errno
import os
import threading
from dataclasses import dataclass, field

import pyfuse3

ROOT = pyfuse3.ROOT_INODE
PATH_LIMIT = 3800  # bytes; below PATH_MAX (4096) with room for one more name
_DISPLACED_BIT = 1 << 62  # above any inode number ext4, xfs or btrfs hand out in practice
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
        self._anchors: dict[int, int] = {}  # directory inode -> O_PATH fd, for deep paths only
        self._anchor_lock = threading.Lock()
        self._alias: dict[int, int] = {}  # new backing inode -> the FUSE inode the kernel knows
        self._displaced: set[int] = set()  # backing inodes whose number a renewed file keeps

    def alias(self, old_backing_ino: int, new_backing_ino: int) -> None:
        """A file got a new backing inode (DEK renewal swaps in a re-encrypted copy): keep its
        FUSE inode, so open handles, the page cache and later lookups agree on one file. A
        later file that the backing filesystem gives the freed number gets another FUSE inode."""
        fuse = self._alias.pop(old_backing_ino) if old_backing_ino in self._alias else self.to_fuse(old_backing_ino)
        self._alias[new_backing_ino] = fuse
        self._displaced.add(old_backing_ino)

    def to_fuse(self, backing_ino: int) -> int:
        alias = self._alias.get(backing_ino)
        if alias is not None:
            return alias
        if backing_ino in self._displaced:
            return backing_ino | _DISPLACED_BIT
        if backing_ino == self._root_backing_ino:
            return ROOT
        if backing_ino == ROOT:
            return self._root_backing_ino  # swap, so the two never collide
        return backing_ino

    def _walk(self, inode: int) -> list[tuple[int, bytes, bytes]]:
        """(inode, plaintext name, backing name) of each component from ``inode`` up to the root."""
        parts: list[tuple[int, bytes, bytes]] = []
        while inode != ROOT:
            entry = self._entries.get(inode)
            if entry is None or not entry.links:
                raise FileNotFoundError(errno.ENOENT, f"inode {inode} has no path")
            link = min(entry.links)
            parts.append((inode, link[1], entry.links[link]))
            inode = link[0]
            if len(parts) > 1 << 16:
                raise OSError("inode path loop")
        return parts

    def path(self, inode: int) -> bytes:
        """A current backing path of ``inode``; FileNotFoundError if it has none (unlinked)."""
        chain = self._walk(inode)
        if not chain:
            return self.root_path
        chain.reverse()
        full = os.path.join(self.root_path, *(b for _, _, b in chain))
        return full if len(full) < PATH_LIMIT else self._anchored(chain)

    def _anchored(self, chain: list[tuple[int, bytes, bytes]]) -> bytes:
        """The path of ``chain[-1]`` with its long prefix replaced by /proc/self/fd/N anchors."""
        base, size = self.root_path, len(self.root_path)
        rel: list[bytes] = []
        for i, (_inode, _plain, name) in enumerate(chain):
            if i and size + 1 + len(name) >= PATH_LIMIT:
                fd = self._anchor(chain[i - 1][0], os.path.join(base, *rel))
                base, rel = b"/proc/self/fd/%d" % fd, []
                size = len(base)
            rel.append(name)
            size += 1 + len(name)
        return os.path.join(base, *rel)

    def _anchor(self, inode: int, path: bytes) -> int:
        with self._anchor_lock:
            fd = self._anchors.get(inode)
            if fd is not None:
                return fd
            fd = os.open(path, os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
            if self.to_fuse(os.fstat(fd).st_ino) != inode:  # renamed away under us
                os.close(fd)
                raise FileNotFoundError(errno.ENOENT, f"inode {inode} moved")
            self._anchors[inode] = fd
            return fd

    def plain_path(self, inode: int) -> bytes:
        """The plaintext path of ``inode`` as the mount shows it (``b"/rec/a.mp4"``, the root is ``b"/"``)."""
        return b"/" + b"/".join(n for _, n, _ in reversed(self._walk(inode)))

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
            with self._anchor_lock:
                fd = self._anchors.pop(inode, None)
            if fd is not None:
                os.close(fd)
            return True
        return False
