"""The FUSE connection settings a mount applies to itself (vcfs/fusetune.py), and the data paths
they serve: mountinfo parsing without touching the mount, the kernel files written for this
mount only, sequential writes sealing each block once, warm reads from the page cache.

Mounted tests use a real vcfs mount (encrypted names, the default) and read the kernel's own
sysfs files; writing them needs root, so without it they skip (under CI=true they fail).
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

from conftest import Mounted, require, run_vcfs

from vcfs import fusetune
from vcfs.core.layout import BLOCK_SIZE

MOUNTINFO = """\
22 1 0:21 / /proc rw,nosuid - proc proc rw
40 27 0:39 / /srv/rec\\040one rw,nosuid - fuse.vcfs /srv/enc rw,user_id=0
41 27 8:1 / /srv/plain rw - ext4 /dev/sda1 rw
42 40 0:45 / /srv/rec\\040one rw,nosuid - fuse.vcfs /srv/enc2 rw,user_id=0
43 27 0:46 / /srv/other rw - fuse.sshfs host: rw
"""


def test_the_device_comes_from_mountinfo_topmost_fuse_mount_wins(tmp_path: Path) -> None:
    info = tmp_path / "mountinfo"
    info.write_text(MOUNTINFO)
    dev = fusetune.mount_device("/srv/rec one", str(info))
    assert dev == fusetune.Device(0, 45) and dev.bdi == "0:45" and dev.connection == "45"
    assert fusetune.mount_device("/srv/plain", str(info)) is None  # not FUSE: left alone
    assert fusetune.mount_device("/srv/none", str(info)) is None
    assert fusetune.Device(8, 1).connection == str(8 << 20 | 1)  # the kernel's dev_t


def _status(m: Mounted) -> dict:
    return json.loads(run_vcfs("status", str(m.mnt), "--json").stdout)


def test_the_mount_sets_its_own_readahead_and_dirty_share(mounted: Mounted) -> None:
    dev = fusetune.mount_device(mounted.mnt)
    assert dev is not None
    bdi = fusetune.BDI_DIR / dev.bdi
    require(os.geteuid() == 0 and os.access(bdi / "read_ahead_kb", os.W_OK), "root and a writable /sys/class/bdi")
    assert int((bdi / "read_ahead_kb").read_text()) == fusetune.READ_AHEAD_KB
    assert int((bdi / "max_ratio").read_text()) == fusetune.DIRTY_MAX_RATIO
    conn = fusetune.FUSECTL_DIR / dev.connection
    if (conn / "max_background").exists():
        assert int((conn / "max_background").read_text()) == fusetune.MAX_BACKGROUND
        assert int((conn / "congestion_threshold").read_text()) == fusetune.CONGESTION_THRESHOLD


def test_a_sequential_write_seals_each_block_about_once(mounted: Mounted) -> None:
    """The kernel writes back several 1 MiB requests at once; taken in any order, the daemon
    would seal zero-filled gaps and then seal those blocks again."""
    blocks = 512  # 32 MiB
    chunk = os.urandom(1 << 20)
    before = _status(mounted)["blocks_encrypted"]
    with open(mounted.mnt / "seq.bin", "wb") as f:
        for _ in range(blocks * BLOCK_SIZE // len(chunk)):
            f.write(chunk)
        os.fsync(f.fileno())
    sealed = _status(mounted)["blocks_encrypted"] - before
    assert blocks <= sealed <= blocks + blocks // 16 + 8, sealed  # + the old last block resealed inner per flush
    assert (mounted.mnt / "seq.bin").read_bytes() == chunk * (blocks * BLOCK_SIZE // len(chunk))


def test_warm_reads_of_an_unchanged_file_come_from_the_page_cache_across_opens(mounted: Mounted) -> None:
    data = os.urandom(4 * BLOCK_SIZE + 100)
    (mounted.mnt / "clip.bin").write_bytes(data)
    assert (mounted.mnt / "clip.bin").read_bytes() == data  # a fresh open: decrypts or is cached
    before = _status(mounted)["blocks_decrypted"]
    for _ in range(3):
        assert (mounted.mnt / "clip.bin").read_bytes() == data
    assert _status(mounted)["blocks_decrypted"] == before  # nothing decrypted again


def test_a_backing_file_changed_behind_the_mount_is_read_again(mounted: Mounted) -> None:
    """The cache is kept only while the backing file's (mtime, size) is what the last close
    left: a restore of an older copy while mounted must not be hidden by cached pages."""
    old, new = b"1" * (BLOCK_SIZE + 10), b"2" * (BLOCK_SIZE + 10)
    (mounted.mnt / "take.bin").write_bytes(old)
    backing = mounted.backing_of("take.bin")
    saved = backing.read_bytes()
    (mounted.mnt / "take.bin").write_bytes(new)  # same file, same key, same size
    assert (mounted.mnt / "take.bin").read_bytes() == new  # now in the page cache
    time.sleep(0.5)  # the releases reach the daemon asynchronously (see the window in docs/PERFORMANCE.md)
    backing.write_bytes(saved)  # an older copy put back (same inode, new mtime)
    assert (mounted.mnt / "take.bin").read_bytes() == old
