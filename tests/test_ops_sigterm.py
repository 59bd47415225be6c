"""SIGTERM while a recorder is still writing: flush, fsync, unmount, exit 0, nothing lost.

This is how systemd stops vcfs@.service (KillMode=mixed: SIGTERM to the daemon only). It used
to hang: the signal task called pyfuse3.syncfs, which holds the GIL through syncfs(2) while
the kernel waits for our FUSE loop to take the dirty pages.
"""

from __future__ import annotations

import os
import shutil
import signal
from pathlib import Path

import pytest
from conftest import Mounted, is_mounted, require, run_vcfs
from opsutil import Daemon, pattern, start_writer, wait_for, written

pytestmark = pytest.mark.mount

MIN_BEFORE_SIGNAL = 3 * 1024 * 1024  # the writer has crossed several 64 KiB blocks and a MiB of dirty data


def test_sigterm_while_writer_active_keeps_every_written_byte(store: Path, tmp_path: Path) -> None:
    require(os.path.exists("/dev/fuse"), "/dev/fuse")
    require(shutil.which("fusermount3") is not None, "fuse3")
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    count = tmp_path / "count"
    daemon = Daemon([str(store), str(mnt)], tmp_path / "daemon.log", mnt=mnt)
    writer = None
    try:
        daemon.wait_mounted()
        writer = start_writer(mnt / "rec.bin", count)
        wait_for("the writer", lambda: written(count) >= MIN_BEFORE_SIGNAL or writer.poll() is not None)
        assert writer.poll() is None, "the writer died before the signal"
        before = written(count)  # every write(2) counted here returned before the signal was sent

        assert daemon.stop() == 0, daemon.log.read_text()
        assert not is_mounted(mnt)
        assert os.listdir(mnt) == [], "the bare mount point must stay empty"
        assert "Traceback" not in daemon.log.read_text()
    finally:
        if writer is not None:
            writer.send_signal(signal.SIGKILL)
            writer.wait(timeout=30)
        daemon.cleanup()

    m = Mounted(store, mnt)
    m.mount()
    try:
        data = (mnt / "rec.bin").read_bytes()
    finally:
        m.umount()
    assert len(data) >= before
    assert data == pattern(len(data)), "bytes after restart differ from what the writer wrote"
    res = run_vcfs("fsck", str(store), check=False)
    assert res.returncode == 0, res.stdout + res.stderr
