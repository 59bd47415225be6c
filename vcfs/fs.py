"""The pyfuse3 adapter: kernel requests in, calls on CryptFile and the backing tree out.

Kept thin on purpose: no format or key logic lives here. What it owns is FUSE state
(inodes, handles, open-file sharing), errno mapping and moving blocking work off the trio
loop: crypto and disk I/O run in worker threads, HSM calls in exactly one. Names go through
``self.inodes``, a vcfs/namespace.py ``Namespace``: plaintext names in, backing names (encrypted
or plain) out, and ``self.inodes.plain_path(inode)`` for the plaintext path of an inode.

Extended attributes are not implemented on purpose: pyfuse3's default answer (ENOSYS) makes
the kernel reply ENOTSUP to every xattr call and stop asking, so no xattr name or value ever
reaches the backing store (docs/FORMAT.md, "Names").

Between awaits: an inode's entry in ``_files`` (inode -> open CryptFile) is only created or
removed under that inode's lock (``_inode_lock``), so two concurrent opens of one inode share
one CryptFile, a release never closes a file that another open is just handing out, and a new
open waits until a closing CryptFile is closed. Taking one more reference on an entry that is
there needs no lock (it happens without an await), so requests on open files (setattr of the
times a writer flushes, opens of a file already open) never wait behind another file's open,
HSM unwrap or close. Writes that need a worker thread go through the file's ``_Open.order``
lock, FIFO: the kernel's writeback sends a file's pages in ascending order, several requests
at once, and letting worker threads take them in any order would seal zero-filled gaps
(an append past the end) and then rewrite them through the journal.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import stat
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any, TypeVar

import pyfuse3
import trio

from vcfs import counters, events
from vcfs.access import AccessGuard
from vcfs.core.layout import cipher_to_plain_size_or_floor
from vcfs.cryptfile import CryptFile, create_cryptfile, open_cryptfile
from vcfs.errors import IntegrityError, KeyProviderError, VcfsError
from vcfs.journal import Journal
from vcfs.mountkeys import MountKeys
from vcfs.names import NameLayer
from vcfs.namespace import Namespace
from vcfs.offload import Lane
from vcfs.privileges import can_chown
from vcfs.store import open_backing

log = logging.getLogger("vcfs.fs")
_T = TypeVar("_T")

ATTR_TIMEOUT = 5.0
IO_SLOTS = 16  # crypto and disk work at a time (threads; AES-GCM and the syscalls release the GIL)
SYNC_SLOTS = 64  # fsync and close at a time: mostly waiting on the disk, never holding an I/O slot


@dataclass(slots=True)
class _Open:
    cf: CryptFile
    refs: int
    order: trio.Lock = field(default_factory=trio.Lock)  # writes in arrival order (trio.Lock is FIFO)
    # Where a write landed past the end: the zeros from each start up to that write are not
    # what the application wrote, until the kernel sends the page it still holds for them.
    gaps: set[int] = field(default_factory=set)

    def note_write(self, off: int, length: int) -> None:
        """Before a write is applied (under ``order``): open or close gaps it makes or fills."""
        if self.gaps:
            self.gaps = {g for g in self.gaps if not off <= g < off + length}
        if off > self.cf.size:
            self.gaps.add(self.cf.size)


@dataclass(slots=True)
class _InodeLock:
    lock: trio.Lock = field(default_factory=trio.Lock)
    users: int = 0


@dataclass(slots=True)
class _OpenDir:
    inode: int
    entries: list[tuple[bytes, bytes, os.stat_result]] | None = None  # this pass's listing


class VcfsOperations(pyfuse3.Operations):
    enable_writeback_cache = True

    def __init__(
        self,
        tree: bytes,
        keys: MountKeys,
        guard: AccessGuard | None = None,
        journal: Journal | None = None,
        names: NameLayer | None = None,
    ) -> None:
        super().__init__()
        self.inodes = Namespace(tree, names)
        self.keys = keys  # domains per path, wraps, cached unwraps, renewal (vcfs/mountkeys.py)
        keys.on_swap = self.inodes.table.alias  # DEK renewal gives a file a new backing inode
        self.guard = guard or AccessGuard()  # access policy + audit trail; inert when neither is configured
        self.guard.attach(self.inodes)
        self.journal = journal  # crash safety of in-place rewrites (vcfs/journal.py)
        self._files: dict[int, _Open] = {}
        self._handles: dict[int, int] = {}  # fh -> inode
        self._dir_handles: dict[int, _OpenDir] = {}  # directory fh -> inode and listing
        self._next_fh = 1
        self._inode_locks: dict[int, _InodeLock] = {}  # only while someone holds or waits for one
        self._hsm = Lane(1)  # python-pkcs11: one call at a time
        self._io = Lane(IO_SLOTS)
        self._sync = Lane(SYNC_SLOTS)  # so that syncs of some files never hold up writes to others
        self._keep_cache: dict[int, tuple[int, int]] = {}  # inode -> backing (mtime_ns, size)
        self._pool_low = trio.Event()  # a create took a pre-wrapped DEK (keep_dek_pool refills)
        self._chown = can_chown()  # root, or the service user with CAP_CHOWN

    @property
    def open_files(self) -> int:
        """Files open in the mount now (each counted once, however many handles share it)."""
        return len(self._files)

    # ---- helpers -------------------------------------------------------------------------

    async def _run(
        self, fn: Callable[..., _T], *args: Any, label: str = "", hsm: bool = False, sync: bool = False
    ) -> _T:
        """Run blocking work in a thread and map every expected failure to an errno.

        ``hsm``: in the one HSM worker; ``sync``: in the lane for work that mostly waits on
        fdatasync (fsync, close), so that it never takes an I/O slot that a write needs.
        """
        lane = self._hsm if hsm else self._sync if sync else self._io
        try:
            return await lane.run(fn, *args)
        except IntegrityError as exc:
            counters.add(counters.AUTH_FAILURES)
            log.error("authentication failed: %s: %s", label, exc.message)
            plain, backing = self.inodes.split_label(label)
            block = getattr(exc, "block_no", None)
            events.emit(events.BLOCK_AUTH_FAILED, path=plain, backing=backing, block=block, error=exc.message)
            raise pyfuse3.FUSEError(errno.EIO) from None
        except KeyProviderError as exc:
            log.error("key error on %s: %s", label, exc.message)
            raise pyfuse3.FUSEError(exc.errno) from None
        except VcfsError as exc:
            log.error("%s: %s", label, exc.message)
            raise pyfuse3.FUSEError(exc.errno) from None
        except OSError as exc:
            raise pyfuse3.FUSEError(exc.errno or errno.EIO) from None

    async def keep_dek_pool(self) -> None:
        """Beside the FUSE loop: refill the pool of pre-wrapped DEKs after creates took from it,
        a few wraps per trip to the HSM worker (vcfs/keys/dekpool.py)."""
        while True:
            await self._pool_low.wait()
            self._pool_low = trio.Event()
            if not self.keys.pool_low():
                continue  # refilled when half empty, in batches: fewer trips, opens get in between
            try:
                while await self._hsm.run(self.keys.fill_pool):
                    pass
            except Exception as exc:  # the HSM went away: creates wrap one by one and report it
                log.warning("could not wrap DEKs ahead for new files: %s", getattr(exc, "message", exc))

    async def run_hsm(self, fn: Callable[[], _T]) -> _T:
        """Run ``fn`` in the one HSM worker (key upkeep from the daemon)."""
        return await self._hsm.run(fn)

    def _attrs(self, st: os.stat_result, inode: int, where: tuple[int, bytes] | None = None) -> pyfuse3.EntryAttributes:
        """Attributes of ``inode``; ``where`` = (parent inode, backing path) when it is not remembered yet."""
        attr = pyfuse3.EntryAttributes()
        attr.st_ino = inode
        attr.generation = 0
        attr.entry_timeout = ATTR_TIMEOUT
        attr.attr_timeout = ATTR_TIMEOUT
        attr.st_mode = st.st_mode
        attr.st_nlink = st.st_nlink
        attr.st_uid = st.st_uid
        attr.st_gid = st.st_gid
        attr.st_rdev = st.st_rdev
        attr.st_blksize = 65536
        attr.st_atime_ns = st.st_atime_ns
        attr.st_mtime_ns = st.st_mtime_ns
        attr.st_ctime_ns = st.st_ctime_ns
        if stat.S_ISREG(st.st_mode):
            opened = self._files.get(inode)
            size = opened.cf.size if opened else cipher_to_plain_size_or_floor(st.st_size)
        elif stat.S_ISLNK(st.st_mode):
            size = self.inodes.link_size(inode, st, where)  # the plaintext target's length
        else:
            size = st.st_size
        attr.st_size = size
        attr.st_blocks = -(-size // 512)
        return attr

    def _stat_inode(self, inode: int) -> os.stat_result:
        try:
            return os.lstat(self.inodes.path(inode))
        except FileNotFoundError:
            opened = self._files.get(inode)
            if opened is None:
                raise
            return os.fstat(opened.cf.fd)  # unlinked but still open

    def _entry(self, parent: int, name: bytes) -> pyfuse3.EntryAttributes:
        path = self.inodes.child_path(parent, name)
        st = os.lstat(path)
        inode = self.inodes.to_fuse(st.st_ino)
        self.inodes.remember(inode, parent, name)
        return self._attrs(st, inode, (parent, path))

    def _same_domain(self, old: bytes, new: bytes, old_backing: bytes | None = None) -> None:
        """Refuse (EXDEV) a rename or link that would put a file under another key domain.

        ``old`` and ``new`` are plaintext paths (domains are chosen by them); ``old_backing``
        is where the entry is now, to tell a directory from a file. Rewrapping instead would
        leave the old domain's wrapping in the header's other slot, and re-encrypting inside
        rename(2) is too slow; mv handles EXDEV by copy + delete, which writes a new file under
        the target domain's keys.
        """
        is_dir = old_backing is not None and stat.S_ISDIR(os.lstat(old_backing).st_mode)
        if not self.keys.domains.same_domain_move(os.fsdecode(old), os.fsdecode(new), is_dir):
            raise pyfuse3.FUSEError(errno.EXDEV)

    def _own(self, path: bytes, ctx: pyfuse3.RequestContext) -> None:
        if self._chown:
            os.lchown(path, ctx.uid, ctx.gid)

    @staticmethod
    def _oserror(fn: Callable[[], _T]) -> _T:
        try:
            return fn()
        except OSError as exc:
            raise pyfuse3.FUSEError(exc.errno or errno.EIO) from None
        except VcfsError as exc:  # a name or directory id that does not authenticate, a name too long
            (log.error if isinstance(exc, IntegrityError) else log.debug)("%s", exc.message)
            raise pyfuse3.FUSEError(exc.errno) from None

    # ---- lookups and attributes ----------------------------------------------------------

    async def lookup(self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        if name == b".":
            return self._oserror(lambda: self._attrs(self._stat_inode(parent_inode), parent_inode))
        return self._oserror(lambda: self._entry(parent_inode, name))

    async def getattr(self, inode: int, ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        return self._oserror(lambda: self._attrs(self._stat_inode(inode), inode))

    async def setattr(
        self,
        inode: int,
        attr: pyfuse3.EntryAttributes,
        fields: pyfuse3.SetattrFields,
        fh: int | None,
        ctx: pyfuse3.RequestContext,
    ) -> pyfuse3.EntryAttributes:
        op, changed, audited = self.guard.setattr_op(fields, fh)
        async with self.guard.op(
            ctx, op, "fs.setattr", lambda: self.guard.path_of(inode), record=audited, fields=changed
        ):
            return await self._setattr(inode, attr, fields)

    async def _setattr(
        self, inode: int, attr: pyfuse3.EntryAttributes, fields: pyfuse3.SetattrFields
    ) -> pyfuse3.EntryAttributes:
        async with self._held(inode, open_file=bool(fields.update_size)) as cf:
            if fields.update_size:
                assert cf is not None
                await self._run(cf.truncate, attr.st_size, label=cf.label)
            # Seal what the kernel wrote back before this request first, or sealing it at close
            # would bump the backing mtime past the one being set (cp -p, tar, rsync).
            flush_first = cf is not None and bool(fields.update_atime or fields.update_mtime)

            def apply() -> os.stat_result:  # one thread hop for the flush, the changes and the stat
                if flush_first:
                    assert cf is not None
                    cf.flush()  # may sync a journal copy: in the sync lane
                try:
                    target: bytes | int = self.inodes.path(inode)
                except FileNotFoundError:
                    if cf is None:
                        raise
                    target = cf.fd  # unlinked but still open: an fd takes no follow_symlinks
                follow = isinstance(target, int)
                if fields.update_mode:
                    os.chmod(target, stat.S_IMODE(attr.st_mode))
                if fields.update_uid or fields.update_gid:
                    uid = attr.st_uid if fields.update_uid else -1
                    gid = attr.st_gid if fields.update_gid else -1
                    os.chown(target, uid, gid, follow_symlinks=follow)
                if fields.update_atime or fields.update_mtime:
                    st = os.stat(target, follow_symlinks=follow)
                    atime = attr.st_atime_ns if fields.update_atime else st.st_atime_ns
                    mtime = attr.st_mtime_ns if fields.update_mtime else st.st_mtime_ns
                    os.utime(target, ns=(atime, mtime), follow_symlinks=follow)
                return self._stat_inode(inode)

            if any(
                (fields.update_mode, fields.update_uid, fields.update_gid, fields.update_atime, fields.update_mtime)
            ):
                label = cf.label if cf is not None else "setattr"
                st = await self._run(apply, label=label, sync=flush_first)
                return self._oserror(lambda: self._attrs(st, inode))
            return self._oserror(lambda: self._attrs(self._stat_inode(inode), inode))

    @asynccontextmanager
    async def _inode_lock(self, inode: int) -> AsyncIterator[None]:
        """Exclusive for one inode's entry in ``_files`` (see the module docstring)."""
        entry = self._inode_locks.get(inode)
        if entry is None:
            entry = self._inode_locks[inode] = _InodeLock()
        entry.users += 1
        try:
            async with entry.lock:
                yield
        finally:
            entry.users -= 1
            if not entry.users:
                del self._inode_locks[inode]

    def _share(self, inode: int) -> _Open | None:
        """One more reference on the inode's open CryptFile, if it has one (no await: no lock needed)."""
        opened = self._files.get(inode)
        if opened is not None:
            opened.refs += 1
        return opened

    @asynccontextmanager
    async def _held(self, inode: int, open_file: bool) -> AsyncIterator[CryptFile | None]:
        """The inode's CryptFile, held like an open handle holds it (None if not open and not asked to open).

        Truncating by path must not open a second CryptFile next to one a concurrent open(2)
        creates (two engines writing one backing file destroy it), nor use one that a concurrent
        release is closing: so it is registered in ``_files`` for the duration.
        """
        opened = self._share(inode)
        if opened is None:
            async with self._inode_lock(inode):  # waits for a close of this inode to finish
                opened = self._share(inode)
                if opened is None and open_file:
                    opened = self._files[inode] = _Open(await self._open_cryptfile(inode), 1)
        try:
            yield opened.cf if opened is not None else None
        finally:
            if opened is not None:
                await self._unref(inode, opened)

    async def readlink(self, inode: int, ctx: pyfuse3.RequestContext) -> bytes:
        return self._oserror(lambda: self.inodes.read_link(inode))

    async def statfs(self, ctx: pyfuse3.RequestContext) -> pyfuse3.StatvfsData:
        sv = self._oserror(lambda: os.statvfs(self.inodes.root_path))
        out = pyfuse3.StatvfsData()
        for name in ("f_bsize", "f_frsize", "f_blocks", "f_bfree", "f_bavail", "f_files", "f_ffree", "f_favail"):
            setattr(out, name, getattr(sv, name))
        out.f_namemax = sv.f_namemax
        return out

    async def forget(self, inode_list: Sequence[tuple[int, int]]) -> None:
        for inode, count in inode_list:
            self.inodes.forget(inode, count)

    # ---- directories ---------------------------------------------------------------------

    async def opendir(self, inode: int, ctx: pyfuse3.RequestContext) -> int:
        async with self.guard.op(ctx, "list", "fs.list", lambda: self.guard.path_of(inode), record=False):
            fh = self._next_fh
            self._next_fh += 1
            self._dir_handles[fh] = _OpenDir(inode)
            return fh

    def _open_dir(self, fh: int) -> _OpenDir:
        opened = self._dir_handles.get(fh)
        if opened is None:
            raise pyfuse3.FUSEError(errno.EBADF)
        return opened

    async def readdir(self, fh: int, start_id: int, token: pyfuse3.ReaddirToken) -> None:
        opened = self._open_dir(fh)
        parent = opened.inode
        if start_id == 0 or opened.entries is None:
            # Listed (and names decrypted) once per pass: the kernel asks for a large directory
            # in many small batches, and listing it again for each would cost O(n^2).
            opened.entries = await self._run(self.inodes.listing, parent, label="readdir")
        entries = opened.entries
        for i in range(start_id, len(entries)):
            name, entry, st = entries[i]
            inode = self.inodes.to_fuse(st.st_ino)
            where = (parent, os.path.join(self.inodes.path(parent), entry)) if stat.S_ISLNK(st.st_mode) else None
            if not pyfuse3.readdir_reply(token, name, self._attrs(st, inode, where), i + 1):
                break
            self.inodes.remember(inode, parent, name, entry)

    async def releasedir(self, fh: int) -> None:
        self._dir_handles.pop(fh, None)

    async def fsyncdir(self, fh: int, datasync: bool) -> None:
        inode = self._open_dir(fh).inode

        def sync() -> None:
            fd = os.open(self.inodes.path(inode), os.O_RDONLY | os.O_DIRECTORY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)

        await self._run(sync, label="fsyncdir")

    async def mkdir(
        self, parent_inode: int, name: bytes, mode: int, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes:
        def make() -> pyfuse3.EntryAttributes:
            path = self.inodes.mkdir(parent_inode, name, mode)
            self._own(path, ctx)
            return self._entry(parent_inode, name)

        async with self.guard.op(ctx, "create", "fs.mkdir", lambda: self.guard.child_of(parent_inode, name)):
            return await self._run(make, label="mkdir")

    async def rmdir(self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> None:
        async with self.guard.op(ctx, "delete", "fs.rmdir", lambda: self.guard.child_of(parent_inode, name)):
            await self._run(self.inodes.rmdir, parent_inode, name, label="rmdir")

    # ---- names ---------------------------------------------------------------------------

    async def unlink(self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> None:
        def remove() -> None:
            inode = self.inodes.unlink(parent_inode, name)
            if inode is not None:
                self._keep_cache.pop(inode, None)

        async with self.guard.op(ctx, "delete", "fs.unlink", lambda: self.guard.child_of(parent_inode, name)):
            await self._run(remove, label="unlink")

    async def symlink(
        self, parent_inode: int, name: bytes, target: bytes, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes:
        def make() -> pyfuse3.EntryAttributes:
            stored = self.inodes.store_target(parent_inode, target)
            with self.inodes.creating(parent_inode, name) as path:
                os.symlink(stored, path)
            self._own(path, ctx)
            return self._entry(parent_inode, name)

        async with self.guard.op(ctx, "create", "fs.symlink", lambda: self.guard.child_of(parent_inode, name)):
            return await self._run(make, label="symlink")

    async def link(
        self, inode: int, new_parent_inode: int, new_name: bytes, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes:
        def make() -> pyfuse3.EntryAttributes:
            self._same_domain(self.inodes.plain_path(inode), self.inodes.plain_child_path(new_parent_inode, new_name))
            with self.inodes.creating(new_parent_inode, new_name) as path:
                os.link(self.inodes.path(inode), path, follow_symlinks=False)
            return self._entry(new_parent_inode, new_name)

        async with self.guard.link(ctx, inode, new_parent_inode, new_name):
            return await self._run(make, label="link")

    async def rename(
        self,
        parent_inode_old: int,
        name_old: bytes,
        parent_inode_new: int,
        name_new: bytes,
        flags: int,
        ctx: pyfuse3.RequestContext,
    ) -> None:
        def move() -> None:
            old = self.inodes.plain_child_path(parent_inode_old, name_old)
            new = self.inodes.plain_child_path(parent_inode_new, name_new)
            self._same_domain(old, new, self.inodes.child_path(parent_inode_old, name_old))
            if flags & pyfuse3.RENAME_EXCHANGE:
                self._same_domain(new, old, self.inodes.child_path(parent_inode_new, name_new))
            self.inodes.rename(parent_inode_old, name_old, parent_inode_new, name_new, flags)

        exchange = bool(flags & pyfuse3.RENAME_EXCHANGE)
        async with self.guard.rename(ctx, parent_inode_old, name_old, parent_inode_new, name_new, exchange):
            await self._run(move, label="rename")

    async def mknod(
        self, parent_inode: int, name: bytes, mode: int, rdev: int, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes:
        if stat.S_ISREG(mode):
            fi, attr = await self.create(parent_inode, name, mode, os.O_WRONLY, ctx)
            await self.release(fi.fh)
            return attr
        if not (stat.S_ISFIFO(mode) or stat.S_ISSOCK(mode)):
            raise pyfuse3.FUSEError(errno.EPERM)  # device nodes have no place in a recording store

        def make() -> pyfuse3.EntryAttributes:
            with self.inodes.creating(parent_inode, name) as path:
                os.mknod(path, mode, rdev)
            self._own(path, ctx)
            return self._entry(parent_inode, name)

        async with self.guard.op(ctx, "create", "fs.mknod", lambda: self.guard.child_of(parent_inode, name)):
            return await self._run(make, label="mknod")

    # ---- files ---------------------------------------------------------------------------

    async def _open_cryptfile(self, inode: int) -> CryptFile:
        path = self._oserror(lambda: self.inodes.path(inode))
        label = self._oserror(lambda: self.inodes.describe(inode))
        fd = self._oserror(lambda: open_backing(path))
        keys = self.keys
        journal = self.journal

        def unlock() -> CryptFile:  # one trip to the HSM worker: pick up key changes, unwrap
            keys.refresh()
            return open_cryptfile(
                fd,
                label,
                keys.unwrap,
                journal=journal,
                seal_budget=keys.seal_budget,
                renewer=keys.renewer,
            )

        try:
            cf = await self._run(unlock, label=label, hsm=True)
        except BaseException:
            os.close(fd)
            raise
        keys.opened(cf)
        return cf

    def _new_handle(self, inode: int) -> int:
        fh = self._next_fh
        self._next_fh += 1
        self._handles[fh] = inode
        return fh

    def _cache_stamp(self, inode: int) -> tuple[int, int] | None:
        try:
            st = os.lstat(self.inodes.path(inode))
        except OSError:
            return None
        return (st.st_mtime_ns, st.st_size)

    async def open(self, inode: int, flags: int, ctx: pyfuse3.RequestContext) -> pyfuse3.FileInfo:
        grant = await self.guard.open(ctx, inode, flags)  # EACCES (audited) if the policy says no
        with grant:  # a failed open is audited with its errno
            return grant.bind(await self._open(inode, flags))

    async def _open(self, inode: int, flags: int) -> pyfuse3.FileInfo:
        opened = self._share(inode)
        if opened is None:
            async with self._inode_lock(inode):
                opened = self._share(inode)  # opened by someone else while this one waited
                if opened is None:
                    stamp = self._cache_stamp(inode)
                    keep = stamp is not None and self._keep_cache.get(inode) == stamp
                    cf = await self._open_cryptfile(inode)
                    if flags & os.O_TRUNC:  # libfuse asks for atomic O_TRUNC: the open truncates
                        try:
                            await self._run(cf.truncate, 0, label=cf.label)
                        except BaseException:
                            await self._run(cf.close, label=cf.label)
                            raise
                    self._files[inode] = _Open(cf, 1)
                    return pyfuse3.FileInfo(fh=self._new_handle(inode), keep_cache=keep)
        # The open CryptFile is the only writer: kernel pages are current.
        if flags & os.O_TRUNC:
            try:
                await self._run(opened.cf.truncate, 0, label=opened.cf.label)
            except BaseException:
                await self._unref(inode, opened)
                raise
        return pyfuse3.FileInfo(fh=self._new_handle(inode), keep_cache=True)

    async def create(
        self, parent_inode: int, name: bytes, mode: int, flags: int, ctx: pyfuse3.RequestContext
    ) -> tuple[pyfuse3.FileInfo, pyfuse3.EntryAttributes]:
        grant = await self.guard.create(ctx, parent_inode, name, flags)
        with grant:
            fi, attr = await self._create(parent_inode, name, mode, ctx)
            return grant.bind(fi, attr.st_ino), attr

    async def _create(
        self, parent_inode: int, name: bytes, mode: int, ctx: pyfuse3.RequestContext
    ) -> tuple[pyfuse3.FileInfo, pyfuse3.EntryAttributes]:
        if self._oserror(lambda: self.inodes.needs_sidecar(parent_inode, name)):  # writes and syncs a file
            path = await self._run(self.inodes.prepare_child, parent_inode, name, label="create")
        else:
            path = self._oserror(lambda: self.inodes.prepare_child(parent_inode, name))
        label = self.inodes.describe_child(parent_inode, name)
        plain = os.fsdecode(self.inodes.plain_child_path(parent_inode, name))
        fd = -1
        try:
            flags_ = os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC
            fd = self._oserror(lambda: os.open(path, flags_, stat.S_IMODE(mode)))
            self._own(path, ctx)

            keys = self.keys

            def make() -> CryptFile:  # one trip to the HSM worker: refresh keys, wrap, write header
                keys.refresh()
                wrap = keys.wrap_for(keys.domain_for(plain))
                return create_cryptfile(
                    fd, label, wrap, self.journal, seal_budget=keys.seal_budget, renewer=keys.renewer
                )

            def make_prewrapped() -> CryptFile | None:  # an I/O worker: a DEK wrapped ahead, no HSM
                if keys.stale():
                    return None  # keys changed: make() picks that up first
                ready = keys.prewrapped(keys.domain_for(plain))
                if ready is None:
                    return None
                return create_cryptfile(
                    fd, label, None, self.journal, seal_budget=keys.seal_budget, renewer=keys.renewer, prewrapped=ready
                )

            cf = await self._run(make_prewrapped, label=label)
            if cf is None:
                cf = await self._run(make, label=label, hsm=True)
            self._pool_low.set()  # top the pool up again
        except BaseException:
            if fd >= 0:
                os.close(fd)
                with contextlib.suppress(OSError):
                    os.unlink(path)
            self.inodes.abandon_child(parent_inode, name)
            raise
        # No await from here on: the new inode's entry appears at once (a new file cannot be
        # open already: its backing inode did not exist before this create).
        try:
            attr = self._oserror(lambda: self._entry(parent_inode, name))
        except BaseException:
            await self._run(cf.close, label=cf.label, sync=True)
            raise
        self._files[attr.st_ino] = _Open(cf, 1)
        attr.st_size = 0
        return pyfuse3.FileInfo(fh=self._new_handle(attr.st_ino)), attr

    def _opened(self, fh: int) -> _Open:
        inode = self._handles.get(fh)
        if inode is None:
            raise pyfuse3.FUSEError(errno.EBADF)
        return self._files[inode]

    def _cf(self, fh: int) -> CryptFile:
        return self._opened(fh).cf

    async def read(self, fh: int, off: int, size: int) -> bytes | memoryview:  # type: ignore[override]
        # pyfuse3 replies with any contiguous buffer; a view of the decrypted blocks saves a copy
        cf = self._cf(fh)
        try:
            data = await self._run(cf.read, off, size, label=cf.label)
        except pyfuse3.FUSEError as exc:
            self.guard.failed(fh, exc.errno)
            raise
        self.guard.read(fh, len(data))
        return data

    async def write(self, fh: int, off: int, buf: bytes) -> int:
        opened = self._opened(fh)
        cf = opened.cf
        # Copied on the loop if it lands in a block held in memory, unless earlier writes wait.
        if not opened.order.locked() and cf.try_write_buffered(off, buf):
            if opened.gaps:
                opened.note_write(off, len(buf))  # within the file: it can only fill a gap
            self.guard.wrote(fh, len(buf))
            return len(buf)
        try:
            async with opened.order:  # FIFO: in the order the kernel sent them
                opened.note_write(off, len(buf))
                if cf.try_write_buffered(off, buf):
                    n = len(buf)
                else:
                    n = await self._run(cf.write, off, buf, label=cf.label)
        except pyfuse3.FUSEError as exc:
            self.guard.failed(fh, exc.errno)
            raise
        self.guard.wrote(fh, n)
        return n

    async def flush(self, fh: int) -> None:
        cf = self._cf(fh)
        if cf.dirty:  # every close(2) flushes; readers and clean files skip the thread hop
            await self._run(cf.flush, label=cf.label, sync=True)  # may sync a journal copy

    async def fsync(self, fh: int, datasync: bool) -> None:
        cf = self._cf(fh)
        await self._run(cf.fsync, datasync, label=cf.label, sync=True)

    async def release(self, fh: int) -> None:
        try:
            await self._release(fh)
        finally:
            self.guard.release(fh)  # the session's audit record, with what it read and wrote

    async def _release(self, fh: int) -> None:
        inode = self._handles.pop(fh, None)
        if inode is None:
            return
        await self._unref(inode, self._files[inode])

    async def _unref(self, inode: int, opened: _Open) -> None:
        """Drop one reference; the last one closes the file, under the inode's lock."""
        opened.refs -= 1
        if opened.refs > 0:
            return
        async with self._inode_lock(inode):
            if opened.refs > 0 or self._files.get(inode) is not opened:
                return  # shared again while this waited for the lock (or closed by that sharer)
            del self._files[inode]
            try:
                await self._run(opened.cf.close, label=opened.cf.label, sync=True)
            finally:
                self.keys.closed(opened.cf.opened_with)
                stamp = self._cache_stamp(inode)
                if stamp is not None:
                    self._keep_cache[inode] = stamp

    def writeback_gaps(self) -> int:
        """Ranges of open files that a write past the end left zero-filled and no write has
        filled yet. The kernel can send a page rewritten while its first write was in flight
        after the pages that follow it, and a sync of the mount may return before it does."""
        return sum(len(opened.gaps) for opened in self._files.values())

    async def _cut_at_gap(self, opened: _Open) -> None:
        """At shutdown, nothing more comes from the kernel: a gap still open holds zeros the
        application never wrote, so the file ends where its first gap begins. What is cut was
        never synced (an fsync writes every page of the file back first), as after a crash."""
        cf = opened.cf
        cut = min((g for g in opened.gaps if g < cf.size), default=None)
        opened.gaps.clear()
        if cut is None:
            return
        log.warning(
            "%s: the kernel sent bytes past %d but never the page at %d before the stop; the file now ends there "
            "(%d unsynced bytes after it dropped, as a crash would)",
            cf.label,
            cut,
            cut,
            cf.size - cut,
        )
        await self._run(cf.truncate, cut, label=cf.label)

    async def close_all(self) -> None:
        """Flush and close every open file (unmount or shutdown)."""
        for inode, opened in list(self._files.items()):
            async with self._inode_lock(inode):
                if self._files.get(inode) is not opened:
                    continue
                try:
                    await self._cut_at_gap(opened)
                    await self._run(opened.cf.fsync, True, label=opened.cf.label, sync=True)
                    await self._run(opened.cf.close, label=opened.cf.label, sync=True)
                except pyfuse3.FUSEError as exc:
                    log.error("could not flush %s at shutdown: %s", opened.cf.label, os.strerror(exc.errno))
                del self._files[inode]
