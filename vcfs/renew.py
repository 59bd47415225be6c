"""DEK renewal: move an open file to a fresh DEK before its random-nonce budget runs out.

Why a copy: a file has one DEK, fixed by the key commitment in its preamble, so a new DEK
means a new file id and every block sealed again. The copy is written beside the tree in
``BACKING/renew/`` (same filesystem), synced, and swapped with the original by one
``renameat2(RENAME_EXCHANGE)``: before the swap the original is untouched, after it the
path holds the complete, synced copy. A crash at any moment leaves the file readable under
one of its two DEKs; what a crash leaves in ``renew/`` is removed at the next mount.

Not renewed (they keep writing until the hard limit, then EFBIG): files with several hard
links (the other names would keep the old inode), unlinked files, files with a torn tail.
The caller holds the file's lock; the FUSE adapter learns the new backing inode through
``on_swap`` so the kernel keeps seeing one file.
"""

from __future__ import annotations

import errno
import fcntl
import os
import stat
import uuid
from collections.abc import Callable
from pathlib import Path

from vcfs import events
from vcfs.cryptfile import SEAL_RESERVE_STEP, CryptFile, new_file_header, renew_threshold
from vcfs.keys.base import KeyRef, Wrapped
from vcfs.store import RENAME_EXCHANGE, fsync_dir, pwrite_all, renameat2
from vcfs.storelayout import renew_path


def _exchange(a: str, b: str) -> None:
    renameat2(a, b, RENAME_EXCHANGE)


def clean_leftovers(backing: Path) -> int:
    """Remove what a crash during renewal left behind (call with the store lock held)."""
    removed = 0
    for entry in renew_path(backing).glob("*.vcfs-renew"):
        entry.unlink(missing_ok=True)
        removed += 1
    return removed


class DekRenewer:
    """Renews files of one store; ``current`` names the KEK a domain's new DEKs are wrapped under."""

    def __init__(
        self,
        backing: Path,
        current: Callable[[str], KeyRef],
        wrap: Callable[[KeyRef, bytearray], Wrapped],
        on_swap: Callable[[int, int], None] | None = None,
        chown: bool = False,
    ) -> None:
        self._dir = renew_path(backing)
        self._current = current
        self._wrap = wrap
        self._on_swap = on_swap  # (old backing inode, new backing inode)
        self._chown = chown

    def renew(self, cf: CryptFile) -> bool:
        st = os.fstat(cf.fd)
        if cf.torn_tail or st.st_nlink != 1 or cf.disk_blocks * 2 > renew_threshold(cf.seal_budget):
            return False  # (a copy of a file that large would use up most of the new budget itself)
        path = os.readlink(f"/proc/self/fd/{cf.fd}")
        if path.endswith(" (deleted)") or not os.path.exists(path):
            return False
        self._dir.mkdir(exist_ok=True, mode=0o700)
        tmp = str(self._dir / f"{uuid.uuid4().hex}.vcfs-renew")
        ref = self._current(cf.key_ref.domain)
        header, keys = new_file_header(
            lambda dek: self._wrap(ref, dek), min(cf.disk_blocks + SEAL_RESERVE_STEP, cf.seal_budget)
        )
        fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, stat.S_IMODE(st.st_mode))
        try:
            pwrite_all(fd, header.encode(), 0)
            cf.write_copy(fd, keys, header.preamble.bound)
            if self._chown:
                os.fchown(fd, st.st_uid, st.st_gid)
            os.utime(fd, ns=(st.st_atime_ns, st.st_mtime_ns))
            os.fsync(fd)
            fcntl.flock(fd, fcntl.LOCK_SH)  # like any open file: rewrap must leave it alone
            _exchange(tmp, path)
            if os.lstat(tmp).st_ino != st.st_ino:  # the path was renamed meanwhile: undo
                _exchange(tmp, path)
                raise OSError(errno.EBUSY, "file was renamed during DEK renewal")
            fsync_dir(os.path.dirname(path))
            os.unlink(tmp)
            fsync_dir(str(self._dir))
        except BaseException:
            os.close(fd)
            if os.path.exists(tmp) and os.lstat(tmp).st_ino != st.st_ino:
                os.unlink(tmp)
            raise
        old_id = cf.file_id.hex()
        cf.adopt(fd, header, keys)
        if self._on_swap is not None:
            self._on_swap(st.st_ino, os.fstat(fd).st_ino)
        events.emit(
            events.KEY_RENEW,
            domain=ref.domain,
            version=ref.version,
            path=path,
            old_file_id=old_id,
            file_id=cf.file_id.hex(),
        )
        return True
