"""Full disk: ENOSPC reaches the writer, nothing written before is damaged, the daemon keeps serving.

The store lives on a 20 MiB tmpfs (docs/RELIABILITY.md, "Full disk"). A writer fills it through
a real mount; a second file with a partial, fsynced last block is appended to once the disk is
full (the case where a flush would overwrite that block in place and then run out of space).
Afterwards every earlier fsynced byte reads back, through the live mount and after a remount,
the daemon answers, freeing space makes writes work again, and fsck finds every header and
block intact.
"""

from __future__ import annotations

import errno
import json
import os
import random
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import Mounted, force_unmount, is_mounted, require, run_vcfs

from vcfs.core.layout import BLOCK_SIZE

pytestmark = pytest.mark.mount

CHUNK = 256 * 1024
KEEP = random.Random(3).randbytes(BLOCK_SIZE * 8 + 123)  # fsynced before the disk fills
TAIL = random.Random(4).randbytes(100_000)  # ends in a partial block, fsynced


@pytest.fixture
def small_store(vcfs_home: Path, tmp_path: Path) -> Iterator[Mounted]:
    require(os.geteuid() == 0, "root (to mount a tmpfs)")
    require(os.path.exists("/dev/fuse"), "/dev/fuse")
    require(shutil.which("fusermount3") is not None, "fuse3 (apt-get install fuse3)")
    disk = tmp_path / "disk"
    disk.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=20m,mode=0755", "tmpfs-vcfs-test", str(disk)], check=True)
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    m = Mounted(disk / "backing", mnt)
    try:
        run_vcfs("init", str(m.backing))
        m.mount()
        yield m
    finally:
        if is_mounted(mnt):
            try:
                m.umount()
            except AssertionError:
                force_unmount(mnt)
        subprocess.run(["umount", "-l", str(disk)], check=False)


def _write_and_sync(path: Path, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)


def _fill(path: Path) -> tuple[int, int]:
    """Write until ENOSPC; (bytes whose fsync returned, errno seen). ENOSPC may come from any call."""
    rng = random.Random(5)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    durable, written, seen = 0, 0, 0
    try:
        while written < 64 * 1024 * 1024:
            os.write(fd, rng.randbytes(CHUNK))
            written += CHUNK
            if written % (4 * CHUNK) == 0:
                os.fsync(fd)
                durable = written
    except OSError as exc:
        seen = exc.errno or 0
    finally:
        try:
            os.close(fd)
        except OSError as exc:
            seen = seen or exc.errno or 0
    return durable, seen


def _append_and_sync(path: Path, data: bytes) -> int:
    """Append and fsync; the errno of the first call that fails (0 if none did)."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_APPEND)
    except OSError as exc:
        return exc.errno or 0
    err = 0
    try:
        os.write(fd, data)
        os.fsync(fd)
    except OSError as exc:
        err = exc.errno or 0
    finally:
        try:
            os.close(fd)
        except OSError as exc:
            err = err or exc.errno or 0
    return err


def _fsck(backing: Path) -> tuple[int, dict[str, object]]:
    res = run_vcfs("fsck", str(backing), "--json", check=False)
    return res.returncode, json.loads(res.stdout)


def test_full_disk_gives_enospc_and_damages_nothing(small_store: Mounted) -> None:
    m = small_store
    _write_and_sync(m.mnt / "keep.bin", KEEP)
    _write_and_sync(m.mnt / "tail.bin", TAIL)
    fill_rng = random.Random(5)

    durable, err = _fill(m.mnt / "fill.bin")
    assert err == errno.ENOSPC, f"writer got {errno.errorcode.get(err, err)}, not ENOSPC"
    assert durable > 0
    fill_prefix = fill_rng.randbytes(durable)

    # The disk is full: appending to a file whose fsynced last block is partial must fail cleanly
    # without touching that block on disk.
    err = _append_and_sync(m.mnt / "tail.bin", os.urandom(4 * 1024 * 1024))  # more than the space left
    assert err == errno.ENOSPC, errno.errorcode.get(err, err)

    # The daemon keeps serving: listing, stat, reads of every earlier fsynced byte.
    assert {"keep.bin", "tail.bin", "fill.bin"} <= set(os.listdir(m.mnt))
    assert (m.mnt / "keep.bin").read_bytes() == KEEP
    assert (m.mnt / "tail.bin").read_bytes()[: len(TAIL)] == TAIL
    with open(m.mnt / "fill.bin", "rb") as f:
        assert f.read(durable) == fill_prefix
    # A new small write either fits or fails cleanly with ENOSPC; nothing else.
    try:
        _write_and_sync(m.mnt / "new-while-full.bin", os.urandom(3 * BLOCK_SIZE))
    except OSError as exc:
        assert exc.errno == errno.ENOSPC, exc

    # Everything on disk is intact after a remount, too: headers whole, fsynced blocks authentic.
    m.umount()
    code, report = _fsck(m.backing)
    assert code == 0, report["problems"]
    m.mount()
    assert (m.mnt / "keep.bin").read_bytes() == KEEP
    assert (m.mnt / "tail.bin").read_bytes()[: len(TAIL)] == TAIL
    with open(m.mnt / "fill.bin", "rb") as f:
        assert f.read(durable) == fill_prefix

    # Free space: writing works again.
    (m.mnt / "fill.bin").unlink()
    for leftover in ("new-while-full.bin",):
        if (m.mnt / leftover).exists():
            (m.mnt / leftover).unlink()
    fresh = os.urandom(2 * 1024 * 1024 + 5)
    _write_and_sync(m.mnt / "after.bin", fresh)
    more = os.urandom(BLOCK_SIZE + 17)
    assert _append_and_sync(m.mnt / "tail.bin", more) == 0
    m.umount()
    code, report = _fsck(m.backing)
    assert code == 0, report["problems"]
    m.mount()
    assert (m.mnt / "after.bin").read_bytes() == fresh
    assert (m.mnt / "keep.bin").read_bytes() == KEEP
    tail = (m.mnt / "tail.bin").read_bytes()
    assert tail[: len(TAIL)] == TAIL and tail.endswith(more)
