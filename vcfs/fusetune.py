"""How large the mount's FUSE connection is: kernel settings of this mount's own connection, and
how many requests the daemon serves at once.

The kernel's defaults suit an unprivileged FUSE file system that nobody trusts; vcfs runs as
root (or with CAP_SYS_ADMIN and CAP_DAC_OVERRIDE, systemd/vcfs@.service) and serves recorders,
so once the mount answers (after the kernel's INIT handshake, which would otherwise reset the
readahead) and before it reports ready, it sets, for its own mount only (docs/PERFORMANCE.md, "Kernel settings"):

- ``/sys/class/bdi/<dev>/read_ahead_kb`` (default 128): the kernel reads ahead at most this much
  through FUSE, so sequential reads arrive as 128 KiB requests, each paying a round trip and a
  thread hop. At 1024 they arrive as 1 MiB requests (the largest FUSE sends: ``max_pages``).
- ``/sys/class/bdi/<dev>/max_ratio`` (FUSE's default: 1): the share, in percent, of the system's
  dirty-page limit that this mount's written-but-not-yet-written-back pages may use before
  writers are throttled. FUSE mounts are under a strict per-device limit, and 1 % (48 MiB on a
  24 GiB host) is less than 256 recorders at 4 Mbit/s write between two of their fsyncs: their
  write(2) calls stalled for hundreds of milliseconds in balance_dirty_pages. The strict limit
  itself stays on, so the mount can never take more than this share.
- ``/sys/fs/fuse/connections/<dev>/max_background`` (default 12) and ``congestion_threshold``:
  how many writeback and readahead requests the kernel keeps in flight. fusectl is mounted
  there if it is not (systemd normally does that at boot).

Each setting is best effort: without the privilege, or on a kernel without the file, the
default stays and the mount works as before (logged once). Nothing is written for any other
mount, and nothing outlives the mount (the kernel drops a connection's files with it).
"""

from __future__ import annotations

import ctypes
import logging
import os
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger("vcfs.fusetune")

READ_AHEAD_KB = 1024  # = max_pages (256) x 4 KiB: one request per readahead window
DIRTY_MAX_RATIO = 25  # percent of the system's dirty limit (~1.1 GiB of a 24 GiB host)
MAX_BACKGROUND = 64  # kernel-side requests in flight for writeback and readahead
CONGESTION_THRESHOLD = 48  # 3/4 of MAX_BACKGROUND, as the kernel's own default ratio
MAX_TASKS = 256  # requests the daemon reads and serves at once (pyfuse3's default: 99)

BDI_DIR = Path("/sys/class/bdi")
FUSECTL_DIR = Path("/sys/fs/fuse/connections")


@dataclass(frozen=True, slots=True)
class Device:
    major: int
    minor: int

    @property
    def bdi(self) -> str:
        return f"{self.major}:{self.minor}"

    @property
    def connection(self) -> str:
        """The fusectl directory name: the kernel's dev_t in decimal."""
        return str((self.major << 20) | self.minor)


def _unescape(field: str) -> str:
    return field.replace("\\040", " ").replace("\\011", "\t").replace("\\012", "\n").replace("\\134", "\\")


def mount_device(mountpoint: str | os.PathLike[str], mountinfo: str = "/proc/self/mountinfo") -> Device | None:
    """The device number of the FUSE mount at ``mountpoint``, from mountinfo.

    Nothing here may touch the mount itself (not even ``realpath`` of it, which lstat()s it):
    before the FUSE loop runs, nobody would answer, and the daemon would hang in the kernel.
    """
    path = os.path.abspath(mountpoint)
    target = os.path.join(os.path.realpath(os.path.dirname(path)), os.path.basename(path))
    found = None
    with open(mountinfo) as f:
        for line in f:
            fields = line.split()
            if len(fields) < 5 or _unescape(fields[4]) != target:
                continue
            sep = fields.index("-") if "-" in fields else -1
            if sep < 0 or sep + 1 >= len(fields) or not fields[sep + 1].startswith("fuse"):
                continue
            major, _, minor = fields[2].partition(":")
            found = Device(int(major), int(minor))  # the last one is the top of the stack
    return found


def _write(path: Path, value: int) -> bool:
    try:
        path.write_text(f"{value}\n")
        return True
    except OSError as exc:
        log.info("could not set %s to %d: %s (the kernel default stays)", path, value, exc.strerror)
        return False


def _ensure_fusectl() -> bool:
    """fusectl mounted at /sys/fs/fuse/connections (mounted here if it is not and we may)."""
    if not FUSECTL_DIR.is_dir():
        return False
    if os.path.ismount(FUSECTL_DIR):
        return True
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mount.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong, ctypes.c_void_p]
    if libc.mount(b"fusectl", os.fsencode(FUSECTL_DIR), b"fusectl", 0, None) == 0:
        log.info("mounted fusectl at %s", FUSECTL_DIR)
        return True
    err = ctypes.get_errno()
    log.info("fusectl is not mounted and could not be (%s): FUSE request limits stay at the defaults", os.strerror(err))
    return False


def tune(mountpoint: str | os.PathLike[str]) -> dict[str, int]:
    """Apply the settings above to the FUSE mount at ``mountpoint``; returns what was set."""
    dev = mount_device(mountpoint)
    if dev is None:
        log.info("no FUSE mount found at %s in mountinfo: kernel defaults stay", mountpoint)
        return {}
    done: dict[str, int] = {}
    bdi = BDI_DIR / dev.bdi
    for name, value in (("read_ahead_kb", READ_AHEAD_KB), ("max_ratio", DIRTY_MAX_RATIO)):
        if (bdi / name).exists() and _write(bdi / name, value):
            done[name] = value
    if _ensure_fusectl():
        conn = FUSECTL_DIR / dev.connection
        # Raise max_background first: the kernel refuses a congestion threshold above it.
        for name, value in (("max_background", MAX_BACKGROUND), ("congestion_threshold", CONGESTION_THRESHOLD)):
            if (conn / name).exists() and _write(conn / name, value):
                done[name] = value
    log.info("FUSE connection %s: %s", dev.bdi, ", ".join(f"{k}={v}" for k, v in done.items()) or "kernel defaults")
    return done
