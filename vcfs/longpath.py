"""Paths longer than one system call takes (PATH_MAX, 4096 bytes), for the offline tools.

A plain filesystem allows trees of any depth: PATH_MAX limits the path given to one call, not
the tree. A deep backing file (or its export target) can have a longer absolute path than
that. ``shorten`` names such a path relative to an O_PATH descriptor of one of its
directories, as ``/proc/self/fd/N/rest``, which every path-based call accepts. Descriptors are
cached by directory path for the life of the process: the offline tools are short-lived and
work on a store that is not being reorganised under them (a rename during a live fsck at worst
makes it check a moved file under its old name). The mount keeps its own anchors per inode
(vcfs/inodes.py), which follow renames.

``LongPath`` is a ``Path`` whose ``os.fspath`` is shortened, so code that handles Paths (and
shows them with ``str``) needs no change beyond creating its paths as LongPath.
"""

from __future__ import annotations

import os
import threading
from pathlib import PosixPath

LIMIT = 3800  # bytes; below PATH_MAX with room for one more name

_anchors: dict[bytes, int] = {}
_lock = threading.Lock()


def _anchor(directory: bytes) -> int:
    with _lock:
        fd = _anchors.get(directory)
        if fd is None:
            fd = os.open(directory, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
            _anchors[directory] = fd
        return fd


def shorten(path: str | bytes) -> bytes:
    """``path`` as bytes the kernel accepts in one call, however deep it is."""
    raw = os.fsencode(path)
    while len(raw) >= LIMIT:
        cut = raw.rfind(b"/", 0, LIMIT)
        if cut <= 0:
            raise OSError(36, "File name too long", os.fsdecode(path))  # one name longer than LIMIT
        raw = b"/proc/self/fd/%d%s" % (_anchor(raw[:cut]), raw[cut:])
    return raw


class LongPath(PosixPath):
    """A Path usable at any depth: shown as itself, handed to the kernel shortened."""

    def __fspath__(self) -> str:
        text = str(self)
        return text if len(text) < LIMIT // 4 else os.fsdecode(shorten(text))
