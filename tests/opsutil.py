"""Helpers for the operations tests: a foreground daemon as systemd runs it, a recorder-like writer.

Nothing is mocked: the daemon is the real ``vcfs mount -f`` in a subprocess, the writer a
separate process appending to a file in the real mount.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

from conftest import VCFS, force_unmount, is_mounted

PATTERN = bytes(range(251))  # the byte at offset o of a test recording is o % 251


def pattern(n: int, start: int = 0) -> bytes:
    reps = (start % 251 + n) // 251 + 2
    off = start % 251
    return (PATTERN * reps)[off : off + n]


# A recorder stand-in: appends 100000-byte pieces (not block aligned) of the pattern and
# records, after each write(2) returned, how many bytes the kernel has accepted.
WRITER = r"""
import os, sys, time
path, count = sys.argv[1], sys.argv[2]
pat = bytes(range(251)) * 800
fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
n = 0
while True:
    off = n % 251
    piece = pat[off:off + 100000]
    try:
        os.write(fd, piece)
    except OSError:
        break
    n += len(piece)
    with open(count + ".tmp", "w") as f:
        f.write(str(n))
    os.replace(count + ".tmp", count)
    time.sleep(0.005)
"""


def wait_for(what: str, check: Callable[[], bool], timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


class Daemon:
    """``vcfs mount -f`` in a subprocess, stderr to a file (like journald would get it)."""

    def __init__(self, args: list[str], log: Path, env: dict[str, str] | None = None, mnt: Path | None = None) -> None:
        self.log = log
        self.mnt = mnt
        with open(log, "wb") as err:
            self.proc = subprocess.Popen(
                [*VCFS, "mount", "-f", *args],
                stdin=subprocess.DEVNULL,
                stdout=err,
                stderr=err,
                env=env if env is not None else os.environ.copy(),
            )

    def wait_mounted(self) -> None:
        assert self.mnt is not None
        wait_for("the mount", lambda: is_mounted(self.mnt) or self.proc.poll() is not None)
        if self.proc.poll() is not None:
            raise AssertionError(f"daemon exited {self.proc.returncode}:\n{self.log.read_text()}")

    def stop(self, timeout: float = 120.0) -> int:
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout=timeout)

    def cleanup(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=30)
        if self.mnt is not None and is_mounted(self.mnt):
            force_unmount(self.mnt)


def start_writer(target: Path, count: Path) -> subprocess.Popen[bytes]:
    return subprocess.Popen([sys.executable, "-c", WRITER, str(target), str(count)], stdin=subprocess.DEVNULL)


def written(count: Path) -> int:
    try:
        return int(count.read_text() or 0)
    except FileNotFoundError:
        return 0
