"""Keep recorders from writing plaintext into the bare mount point while vcfs is not mounted.

When the mount is down, the mount point is an ordinary directory on the host's disk: a
recorder that keeps going would write *unencrypted* files there, and they would then hide
under the next mount. ``vcfs guard MOUNTPOINT`` makes the empty directory immutable
(``chattr +i``, FS_IMMUTABLE_FL): nothing can be created in it, not even by root, while
mounting over it still works. Run it once by hand, from ``scripts/install``, or (as the
shipped unit does) as ``ExecStartPre=+`` before every mount. Needs CAP_LINUX_IMMUTABLE.

A mount point that is not empty is refused: those files were written while vcfs was down,
are plaintext, and an operator has to move them into the store (and then shred them).
"""

from __future__ import annotations

import array
import errno
import fcntl
import os
from pathlib import Path

from vcfs.errors import MountError

FS_IOC_GETFLAGS = 0x80086601  # _IOR('f', 1, long)
FS_IOC_SETFLAGS = 0x40086602  # _IOW('f', 2, long)
FS_IMMUTABLE_FL = 0x00000010


def _flags(fd: int) -> int:
    buf = array.array("l", [0])
    fcntl.ioctl(fd, FS_IOC_GETFLAGS, buf, True)
    return buf[0]


def is_immutable(path: Path) -> bool:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        return bool(_flags(fd) & FS_IMMUTABLE_FL)
    finally:
        os.close(fd)


def set_immutable(path: Path, on: bool = True) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        flags = _flags(fd)
        wanted = flags | FS_IMMUTABLE_FL if on else flags & ~FS_IMMUTABLE_FL
        if wanted != flags:
            fcntl.ioctl(fd, FS_IOC_SETFLAGS, array.array("l", [wanted]), True)
    finally:
        os.close(fd)


def guard_mountpoint(path: Path) -> str:
    """Create (if missing) and make immutable the empty mount point; returns what was done.

    Raises MountError if the directory holds files, is not a directory, or its filesystem
    cannot mark it immutable.
    """
    if os.path.ismount(path):
        return f"{path} is mounted; guard it while it is not (the unit does so before every start)"
    if not path.exists():
        path.mkdir(parents=True, mode=0o755)
    if not path.is_dir():
        raise MountError(f"mount point {path} is not a directory")
    leftovers = sorted(os.listdir(path))
    if leftovers:
        shown = ", ".join(leftovers[:5]) + (", ..." if len(leftovers) > 5 else "")
        raise MountError(
            f"mount point {path} is not empty ({len(leftovers)} entries: {shown}): written while vcfs was "
            "not mounted, so stored as plaintext",
            hint="mount vcfs elsewhere, move the files into it, delete the plaintext copies, then guard again",
        )
    try:
        if is_immutable(path):
            return f"{path} is already immutable"
        set_immutable(path)
    except OSError as exc:
        if exc.errno == errno.EPERM:
            raise MountError(
                f"not allowed to make {path} immutable", hint="run as root (CAP_LINUX_IMMUTABLE)"
            ) from None
        if exc.errno in (errno.ENOTTY, errno.EOPNOTSUPP, errno.EINVAL):
            raise MountError(
                f"the filesystem of {path} has no immutable flag (chattr +i)",
                hint="put the mount point on a filesystem that has one (ext4, xfs, btrfs)",
            ) from None
        raise MountError(f"cannot make {path} immutable: {exc.strerror}") from None
    return f"{path} is now immutable: nothing can be written into it while vcfs is not mounted"
