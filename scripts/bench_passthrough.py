"""A minimal no-crypto pyfuse3 passthrough: the ceiling of a Python FUSE daemon for scripts/bench.

Same stack as vcfs (pyfuse3 + trio, writeback cache, worker threads for I/O through the same
``vcfs.offload.Lane``, the same FUSE connection settings from ``vcfs.fusetune``) minus the
encryption, so the bench can tell the cost of crypto and of vcfs's bookkeeping from the cost of
FUSE round trips. Not part of vcfs; benchmark use only.
"""

from __future__ import annotations

import errno
import os
import sys

import pyfuse3
import trio

from vcfs import fusetune
from vcfs.offload import Lane

IO = Lane(16)


class Passthrough(pyfuse3.Operations):
    enable_writeback_cache = True

    def __init__(self, root: str) -> None:
        super().__init__()
        self.paths: dict[int, str] = {pyfuse3.ROOT_INODE: root}
        self.fds: dict[int, int] = {}

    def _attr(self, path: str) -> pyfuse3.EntryAttributes:
        st = os.lstat(path)
        a = pyfuse3.EntryAttributes()
        for name in ("st_mode", "st_nlink", "st_uid", "st_gid", "st_size", "st_atime_ns", "st_mtime_ns",
                     "st_ctime_ns"):
            setattr(a, name, getattr(st, name))
        a.st_ino = pyfuse3.ROOT_INODE if path == self.paths[pyfuse3.ROOT_INODE] else st.st_ino
        a.st_blksize, a.st_blocks = 65536, st.st_blocks
        a.attr_timeout = a.entry_timeout = 5.0
        if a.st_ino != pyfuse3.ROOT_INODE:
            self.paths[a.st_ino] = path
        return a

    def _child(self, parent: int, name: bytes) -> str:
        return os.path.join(self.paths[parent], os.fsdecode(name))

    async def lookup(self, parent_inode, name, ctx):  # type: ignore[no-untyped-def]
        try:
            return self._attr(self._child(parent_inode, name))
        except OSError as exc:
            raise pyfuse3.FUSEError(exc.errno) from None

    async def getattr(self, inode, ctx):  # type: ignore[no-untyped-def]
        return self._attr(self.paths[inode])

    async def setattr(self, inode, attr, fields, fh, ctx):  # type: ignore[no-untyped-def]
        target = fh if fh is not None else self.paths[inode]
        try:
            if fields.update_size:
                os.truncate(target, attr.st_size)
            if fields.update_mtime or fields.update_atime:
                os.utime(target, ns=(attr.st_atime_ns, attr.st_mtime_ns))
            if fh is not None:
                st = os.fstat(fh)
                a = self._attr(self.paths[pyfuse3.ROOT_INODE])
                a.st_ino, a.st_mode, a.st_size, a.st_mtime_ns = inode, st.st_mode, st.st_size, st.st_mtime_ns
                return a
            return self._attr(self.paths[inode])
        except OSError as exc:
            raise pyfuse3.FUSEError(exc.errno) from None

    async def opendir(self, inode, ctx):  # type: ignore[no-untyped-def]
        return inode

    async def readdir(self, fh, start_id, token):  # type: ignore[no-untyped-def]
        names = sorted(os.listdir(self.paths[fh]))
        for i in range(start_id, len(names)):
            attr = self._attr(os.path.join(self.paths[fh], names[i]))
            if not pyfuse3.readdir_reply(token, os.fsencode(names[i]), attr, i + 1):
                break

    async def open(self, inode, flags, ctx):  # type: ignore[no-untyped-def]
        fd = os.open(self.paths[inode], os.O_RDWR)
        self.fds[fd] = fd
        return pyfuse3.FileInfo(fh=fd, keep_cache=True)

    async def create(self, parent_inode, name, mode, flags, ctx):  # type: ignore[no-untyped-def]
        path = self._child(parent_inode, name)
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, mode)
        self.fds[fd] = fd
        return pyfuse3.FileInfo(fh=fd), self._attr(path)

    async def read(self, fh, off, size):  # type: ignore[no-untyped-def]
        return await IO.run(os.pread, fh, size, off)

    async def write(self, fh, off, buf):  # type: ignore[no-untyped-def]
        return await IO.run(os.pwrite, fh, buf, off)

    async def fsync(self, fh, datasync):  # type: ignore[no-untyped-def]
        await IO.run(os.fsync, fh)

    async def flush(self, fh):  # type: ignore[no-untyped-def]
        return None

    async def release(self, fh):  # type: ignore[no-untyped-def]
        os.close(self.fds.pop(fh))

    async def unlink(self, parent_inode, name, ctx):  # type: ignore[no-untyped-def]
        os.unlink(self._child(parent_inode, name))

    async def mkdir(self, parent_inode, name, mode, ctx):  # type: ignore[no-untyped-def]
        os.mkdir(self._child(parent_inode, name), mode)
        return self._attr(self._child(parent_inode, name))

    async def rmdir(self, parent_inode, name, ctx):  # type: ignore[no-untyped-def]
        os.rmdir(self._child(parent_inode, name))

    async def rename(self, p_old, n_old, p_new, n_new, flags, ctx):  # type: ignore[no-untyped-def]
        if flags:
            raise pyfuse3.FUSEError(errno.EINVAL)
        os.rename(self._child(p_old, n_old), self._child(p_new, n_new))

    async def statfs(self, ctx):  # type: ignore[no-untyped-def]
        sv = os.statvfs(self.paths[pyfuse3.ROOT_INODE])
        out = pyfuse3.StatvfsData()
        for name in ("f_bsize", "f_frsize", "f_blocks", "f_bfree", "f_bavail", "f_files", "f_ffree", "f_favail"):
            setattr(out, name, getattr(sv, name))
        return out


def main() -> None:
    root, mnt = sys.argv[1], sys.argv[2]
    opts = set(pyfuse3.default_options) | {"fsname=passthrough", "allow_other"}
    pyfuse3.init(Passthrough(root), mnt, opts)
    try:
        trio.run(serve, mnt)
    finally:
        pyfuse3.close(unmount=True)


async def serve(mnt: str) -> None:
    async def tune() -> None:  # as vcfs does: once the kernel's INIT handshake is done
        await trio.to_thread.run_sync(os.stat, mnt)
        await trio.to_thread.run_sync(fusetune.tune, mnt)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(tune)
        await pyfuse3.main(max_tasks=fusetune.MAX_TASKS)
        nursery.cancel_scope.cancel()


if __name__ == "__main__":
    main()
