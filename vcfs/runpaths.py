"""Where a running mount keeps its pid file and control socket, found again from the mount point.

A mount is named by a short hash of its real mount-point path: socket paths are limited to
107 bytes, and an escaped deep path would not fit. The daemon and ``vcfs status`` compute
the same name, so the client needs nothing but the mount point.

Places, in the order the client tries them:
1. ``$RUNTIME_DIRECTORY`` (systemd ``RuntimeDirectory=vcfs``: ``/run/vcfs``) when the daemon
   runs in a unit;
2. ``/run/vcfs`` for daemons run by root;
3. ``$VCFS_HOME/run`` (default ``~/.local/share/vcfs/run``) for everyone else.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from vcfs.keys import embedded

SYSTEM_RUN_DIR = Path("/run/vcfs")


def mount_key(mountpoint: Path | str) -> str:
    real = os.path.realpath(mountpoint)
    return hashlib.sha256(real.encode()).hexdigest()[:16]


def user_run_dir() -> Path:
    return embedded.vcfs_home() / "run"


def pid_file(mountpoint: Path | str) -> Path:
    return user_run_dir() / f"{mount_key(mountpoint)}.pid"


def _run_dirs() -> list[Path]:
    dirs = []
    runtime = os.environ.get("RUNTIME_DIRECTORY", "").split(":")[0]
    if runtime:
        dirs.append(Path(runtime))
    dirs.append(SYSTEM_RUN_DIR)
    dirs.append(user_run_dir())
    return list(dict.fromkeys(dirs))


def default_socket(mountpoint: Path | str) -> Path:
    """Where a daemon serving ``mountpoint`` puts its control socket when none is configured."""
    name = f"{mount_key(mountpoint)}.sock"
    runtime = os.environ.get("RUNTIME_DIRECTORY", "").split(":")[0]
    if runtime:
        return Path(runtime) / name
    if os.geteuid() == 0:
        return SYSTEM_RUN_DIR / name
    return user_run_dir() / name


def socket_candidates(mountpoint: Path | str) -> list[Path]:
    """Every place a daemon serving ``mountpoint`` may have put its control socket."""
    name = f"{mount_key(mountpoint)}.sock"
    return [d / name for d in _run_dirs()]
