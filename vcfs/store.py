"""Backing-directory I/O: exact positional reads and writes, syncs. Knows no cryptography.

Short reads and writes are looped here once so no caller has to; ENOSPC and EIO surface
as OSError for the adapter to turn into errno replies.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import os
from pathlib import Path

from vcfs.errors import BusyError
from vcfs.storelayout import lock_path


def pread_exact(fd: int, length: int, offset: int) -> bytes:
    """Read up to ``length`` bytes at ``offset``; shorter only at end of file."""
    data = os.pread(fd, length, offset)
    if len(data) == length or not data:
        return data
    parts = [data]
    got = len(data)
    while got < length:
        more = os.pread(fd, length - got, offset + got)
        if not more:
            break
        parts.append(more)
        got += len(more)
    return b"".join(parts)


def pwrite_all(fd: int, data: bytes | bytearray | memoryview, offset: int) -> None:
    view = memoryview(data)
    while view:
        written = os.pwrite(fd, view, offset)
        view = view[written:]
        offset += written


def pwritev_all(fd: int, buffers: list[bytes], offset: int) -> None:
    """Write several buffers contiguously with as few syscalls as possible."""
    total = sum(len(b) for b in buffers)
    written = os.pwritev(fd, buffers, offset)
    if written < total:
        pwrite_all(fd, b"".join(buffers)[written:], offset + written)


_libc = ctypes.CDLL(None, use_errno=True)
_libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
_FALLOC_FL_KEEP_SIZE = 1


def reserve_space(fd: int, offset: int, length: int) -> None:
    """Allocate disk space for ``offset..offset+length`` without changing the file size.

    So a write that would run out of space fails (ENOSPC) before it overwrites anything, instead
    of halfway through a block. Filesystems without fallocate(2) get no reservation.
    """
    if length <= 0 or _libc.fallocate(fd, _FALLOC_FL_KEEP_SIZE, offset, length) == 0:
        return
    err = ctypes.get_errno()
    if err in (errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
        return
    raise OSError(err, os.strerror(err))


def fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def syncfs(path: str | Path) -> None:
    """syncfs(2) on the filesystem holding ``path``, with the GIL released.

    Not ``pyfuse3.syncfs``: that one keeps the GIL through the call, so syncing the vcfs mount
    from a worker thread deadlocks the daemon (the kernel waits for write requests that the
    trio thread can no longer answer). ctypes drops the GIL around foreign calls.
    """
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        if _libc.syncfs(fd) != 0:
            err = ctypes.get_errno()
            raise OSError(err, os.strerror(err), str(path))
    finally:
        os.close(fd)


def open_noatime(path: str | bytes | os.PathLike[str], flags: int) -> int:
    """os.open with O_NOATIME where allowed (the file's owner, or root).

    vcfs reads a backing file's header whenever the file is opened or truncated; without this
    the backing atime, which the mount shows as the file's atime, would move on every open,
    unlike on a plain filesystem where open(2) and truncate(2) leave atime alone.
    """
    try:
        return os.open(path, flags | os.O_NOATIME)
    except PermissionError as exc:
        if exc.errno != errno.EPERM:
            raise
        return os.open(path, flags)


def open_backing(path: str | bytes) -> int:
    """Open a backing file for reading and, where permitted, writing."""
    try:
        return open_noatime(path, os.O_RDWR | os.O_CLOEXEC | os.O_NOFOLLOW)
    except PermissionError:
        return open_noatime(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)


def lock_store(backing: Path) -> int:
    """Take the store's writer lock for the daemon's lifetime (released when it exits).

    Two daemons over one backing directory would each keep their own open-block buffers
    and seal counts for the same files; the second is refused instead.
    """
    path = lock_path(backing)
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    except OSError as exc:
        raise BusyError(f"cannot create lock file {path}: {exc.strerror}") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
        os.close(fd)
        raise BusyError(
            f"store {backing} is already mounted by another vcfs daemon (pid {holder})",
            hint="unmount it there first; one daemon serves a store at a time",
        ) from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return fd


def replace_file(path: Path, data: bytes, mode: int = 0o644) -> None:
    """Replace ``path`` atomically with ``data``: temp file, fsync, rename, fsync of the directory.

    Readers see the old or the new content, never a mix; after a crash, one of the two.
    """
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, mode)
    try:
        pwrite_all(fd, data, 0)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
    fsync_dir(str(path.parent))


_AT_FDCWD = -100
RENAME_EXCHANGE = 2


def renameat2(old: bytes | str, new: bytes | str, flags: int) -> None:
    """renameat(2) with flags (RENAME_NOREPLACE, RENAME_EXCHANGE), which os.rename cannot pass."""
    if _libc.renameat2(_AT_FDCWD, os.fsencode(old), _AT_FDCWD, os.fsencode(new), ctypes.c_uint(flags)) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


_libc.syncfs.argtypes = [ctypes.c_int]


def sync_filesystem(fd: int) -> None:
    """syncfs(2): make everything written to the filesystem holding ``fd`` durable, in one flush.

    For batch updates of many files (rewrap), where one fdatasync per file would cost a disk
    flush each.
    """
    if _libc.syncfs(fd) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))
