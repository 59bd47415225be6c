"""POSIX behaviour that recorders and ordinary tools rely on, through a real vcfs mount.

Every test mounts a real store (conftest ``mounted``) and asserts the plaintext it reads
back and, where it matters, the sizes stat reports; many also unmount and remount so what
is checked is what was stored, not what the kernel still had cached.
"""

from __future__ import annotations

import ctypes
import errno
import mmap
import os
import random
import stat
import threading
from pathlib import Path

import pytest
from conftest import Mounted

from vcfs.core.layout import BLOCK_SIZE, plain_to_cipher_size

pytestmark = pytest.mark.mount


def _data(n: int, seed: int = 0) -> bytes:
    """Deterministic, non-repeating-per-block bytes (a wrong block shows up as a mismatch)."""
    out = bytearray()
    i = 0
    while len(out) < n:
        out += f"<{seed}:{i:09d}>".encode()
        i += 1
    return bytes(out[:n])


def _remount(m: Mounted) -> None:
    m.umount()
    m.mount()


def _pread_all(path: Path) -> bytes:
    with open(path, "rb", buffering=0) as f:
        return f.read()


# ---- reads and writes ------------------------------------------------------------------------


def test_write_at_offsets_and_past_eof_reads_back_with_zero_gaps(mounted: Mounted) -> None:
    p = mounted.mnt / "sparse.bin"
    model = bytearray()

    def put(off: int, data: bytes) -> None:
        if off > len(model):
            model.extend(bytes(off - len(model)))
        model[off : off + len(data)] = data

    fd = os.open(p, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        writes = [
            (0, _data(100, 1)),
            (5000, _data(10, 2)),  # gap inside block 0
            (BLOCK_SIZE - 3, _data(7, 3)),  # across the first block boundary
            (3 * BLOCK_SIZE + 17, _data(BLOCK_SIZE + 5, 4)),  # far past EOF, spans two blocks
            (200, _data(2 * BLOCK_SIZE, 5)),  # overwrite in the middle, across blocks
            (10 * BLOCK_SIZE, b"Z"),  # one byte, far past EOF
        ]
        for off, data in writes:
            assert os.pwrite(fd, data, off) == len(data)
            put(off, data)
            assert os.fstat(fd).st_size == len(model)
        # reads at many offsets, including across blocks and at/after EOF
        for off, n in [
            (0, 10),
            (4990, 40),
            (BLOCK_SIZE - 5, 20),
            (3 * BLOCK_SIZE, 100),
            (9 * BLOCK_SIZE, BLOCK_SIZE + 10),
            (len(model) - 1, 10),
            (len(model), 10),
            (len(model) + 5000, 10),
        ]:
            assert os.pread(fd, n, off) == bytes(model[off : off + n]), (off, n)
        gap = os.pread(fd, 2 * BLOCK_SIZE, 4 * BLOCK_SIZE + 100)
        assert gap == bytes(model[4 * BLOCK_SIZE + 100 : 6 * BLOCK_SIZE + 100])
        assert gap.count(0) == len(gap)  # that range was never written: zeros
    finally:
        os.close(fd)
    assert p.stat().st_size == len(model) == 10 * BLOCK_SIZE + 1
    assert _pread_all(p) == model
    _remount(mounted)
    assert p.stat().st_size == len(model)
    assert _pread_all(p) == model
    assert mounted.backing_of("sparse.bin").stat().st_size == plain_to_cipher_size(len(model))


def test_o_append_always_writes_at_end(mounted: Mounted) -> None:
    p = mounted.mnt / "log.txt"
    p.write_bytes(b"start\n")
    fd = os.open(p, os.O_WRONLY | os.O_APPEND)
    other = os.open(p, os.O_RDWR)
    try:
        os.write(fd, b"one\n")
        os.lseek(fd, 0, os.SEEK_SET)
        os.write(fd, b"two\n")  # O_APPEND ignores the seek
        os.pwrite(other, b"S", 0)  # a normal write through another handle lands where asked
        os.write(fd, _data(BLOCK_SIZE + 10, 7))  # crosses a block boundary
        os.write(fd, b"end\n")
        assert os.fstat(fd).st_size == 6 + 4 + 4 + BLOCK_SIZE + 10 + 4
    finally:
        os.close(fd)
        os.close(other)
    expected = b"Start\none\ntwo\n" + _data(BLOCK_SIZE + 10, 7) + b"end\n"
    assert p.read_bytes() == expected
    with open(p, "ab") as f:  # Python's append mode, as loggers use it
        f.write(b"more\n")
    expected += b"more\n"
    _remount(mounted)
    assert p.read_bytes() == expected
    assert p.stat().st_size == len(expected)


def test_seek_and_rewrite_head_like_a_muxer(mounted: Mounted) -> None:
    """Write a big file, then go back and patch its first bytes and a spot across a block boundary."""
    p = mounted.mnt / "movie.mp4"
    body = _data(3 * 1024 * 1024 + 1234, 11)
    model = bytearray(body)
    with open(p, "wb") as f:
        f.write(b"\0" * 32)  # placeholder header, patched at the end
        model[:32] = b"\0" * 32
        f.write(body[32:])
        f.seek(0)
        f.write(b"ftypisom-PATCHED-HEADER-0123456")
        f.seek(BLOCK_SIZE - 8)
        f.write(b"<-across-block->")
        f.seek(0, os.SEEK_END)
        f.write(b"trailer")
    model[:31] = b"ftypisom-PATCHED-HEADER-0123456"
    model[BLOCK_SIZE - 8 : BLOCK_SIZE + 8] = b"<-across-block->"
    model += b"trailer"
    assert p.stat().st_size == len(model)
    assert p.read_bytes() == model
    _remount(mounted)
    assert p.stat().st_size == len(model)
    assert p.read_bytes() == model
    # rewrite again after remount (blocks now come from disk, not memory)
    with open(p, "r+b") as f:
        f.write(b"moov")
        f.seek(2 * BLOCK_SIZE + 100)
        f.write(b"X" * 70000)
    model[:4] = b"moov"
    model[2 * BLOCK_SIZE + 100 : 2 * BLOCK_SIZE + 100 + 70000] = b"X" * 70000
    _remount(mounted)
    assert p.read_bytes() == model


# ---- truncate --------------------------------------------------------------------------------

TRUNCATE_CASES: dict[str, tuple[int, list[int]]] = {
    # name: (initial size, sizes to truncate to in order)
    "down-to-0": (200000, [0]),
    "down-to-block-boundary": (200000, [BLOCK_SIZE]),
    "down-to-65537": (200000, [BLOCK_SIZE + 1]),
    "down-inside-last-block": (200000, [199999]),
    "up-from-0": (0, [BLOCK_SIZE + 1]),
    "up-to-block-boundary": (10, [BLOCK_SIZE]),
    "up-to-65537": (BLOCK_SIZE, [BLOCK_SIZE + 1]),
    "down-then-up": (200000, [100, 3 * BLOCK_SIZE + 7]),
    "up-then-down": (100, [5 * BLOCK_SIZE, 2 * BLOCK_SIZE]),
    "zero-then-up": (150000, [0, 70000]),
    "same-size": (70000, [70000]),
    "boundary-steps": (3 * BLOCK_SIZE, [2 * BLOCK_SIZE, 2 * BLOCK_SIZE - 1, 2 * BLOCK_SIZE + 1, BLOCK_SIZE]),
}


def _truncated(data: bytes, size: int) -> bytes:
    return data[:size] + bytes(max(0, size - len(data)))


@pytest.mark.parametrize("via", ["path", "fd"])
def test_truncate_down_and_up(mounted: Mounted, via: str) -> None:
    expected: dict[str, bytes] = {}
    for name, (initial, sizes) in TRUNCATE_CASES.items():
        p = mounted.mnt / name
        model = _data(initial, len(expected))
        p.write_bytes(model)
        if via == "path":
            for size in sizes:
                os.truncate(p, size)
                model = _truncated(model, size)
                assert p.stat().st_size == size, (name, size)
        else:
            fd = os.open(p, os.O_RDWR)
            try:
                for size in sizes:
                    os.ftruncate(fd, size)
                    model = _truncated(model, size)
                    assert os.fstat(fd).st_size == size, (name, size)
                    assert os.pread(fd, len(model) + 10, 0) == model, (name, size)
                # and keep writing through the same handle after the truncation
                os.pwrite(fd, b"tail", len(model))
                model += b"tail"
            finally:
                os.close(fd)
        assert p.read_bytes() == model, name
        expected[name] = model
    _remount(mounted)
    for name, model in expected.items():
        p = mounted.mnt / name
        assert p.stat().st_size == len(model), name
        assert p.read_bytes() == model, name
        assert mounted.backing_of(name).stat().st_size == plain_to_cipher_size(len(model)), name


def test_open_with_o_trunc_replaces_content(mounted: Mounted) -> None:
    p = mounted.mnt / "t.bin"
    p.write_bytes(_data(300000))
    p.write_bytes(b"short")  # open(O_WRONLY|O_CREAT|O_TRUNC)
    assert p.read_bytes() == b"short"
    assert p.stat().st_size == 5
    _remount(mounted)
    assert p.read_bytes() == b"short"


# ---- durability --------------------------------------------------------------------------------


def test_fsync_and_fdatasync_then_remount(mounted: Mounted) -> None:
    p = mounted.mnt / "synced.bin"
    data = _data(5 * BLOCK_SIZE + 333, 3)
    fd = os.open(p, os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        os.write(fd, data[:70000])
        assert os.fdatasync(fd) is None
        # after fdatasync the sealed bytes are in the backing file
        assert mounted.backing_of("synced.bin").stat().st_size == plain_to_cipher_size(70000)
        os.write(fd, data[70000:])
        assert os.fsync(fd) is None
        assert mounted.backing_of("synced.bin").stat().st_size == plain_to_cipher_size(len(data))
    finally:
        os.close(fd)
    dfd = os.open(mounted.mnt, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(dfd)  # fsync on a directory works too
    finally:
        os.close(dfd)
    _remount(mounted)
    assert p.read_bytes() == data


def test_empty_file_survives_remount(mounted: Mounted) -> None:
    (mounted.mnt / "empty").touch()
    (mounted.mnt / "emptied").write_bytes(b"x" * 1000)
    os.truncate(mounted.mnt / "emptied", 0)
    _remount(mounted)
    for name in ("empty", "emptied"):
        p = mounted.mnt / name
        assert p.stat().st_size == 0
        assert p.read_bytes() == b""
        assert mounted.backing_of(name).stat().st_size == plain_to_cipher_size(0)
    # and an empty file can grow after the remount
    with open(mounted.mnt / "empty", "ab") as f:
        f.write(b"grown")
    _remount(mounted)
    assert (mounted.mnt / "empty").read_bytes() == b"grown"


def test_recorder_writes_4k_pieces_sequentially(mounted: Mounted) -> None:
    p = mounted.mnt / "rec.ts"
    data = _data(6 * 1024 * 1024 + 777, 21)
    fd = os.open(p, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        for off in range(0, len(data), 4096):
            assert os.write(fd, data[off : off + 4096]) == len(data[off : off + 4096])
            if off % (1024 * 1024) == 0:
                # a reader following the recording sees everything written so far
                assert os.stat(p).st_size == off + len(data[off : off + 4096])
    finally:
        os.close(fd)
    assert p.stat().st_size == len(data)
    assert p.read_bytes() == data
    _remount(mounted)
    assert p.stat().st_size == len(data)
    assert p.read_bytes() == data
    assert mounted.backing_of("rec.ts").stat().st_size == plain_to_cipher_size(len(data))


SIZES = [0, 1, BLOCK_SIZE - 1, BLOCK_SIZE, BLOCK_SIZE + 1, 200000]


def test_stat_reports_exact_plaintext_sizes(mounted: Mounted) -> None:
    for n in SIZES:
        (mounted.mnt / f"s{n}").write_bytes(_data(n, n))
        assert (mounted.mnt / f"s{n}").stat().st_size == n  # while still cached by the kernel
    _remount(mounted)
    listing = {e.name: e.stat().st_size for e in os.scandir(mounted.mnt)}
    assert listing == {f"s{n}": n for n in SIZES}  # sizes seen by readdir(plus)
    for n in SIZES:
        p = mounted.mnt / f"s{n}"
        assert p.stat().st_size == n
        assert p.read_bytes() == _data(n, n)
        assert mounted.backing_of(f"s{n}").stat().st_size == plain_to_cipher_size(n)
        with open(p, "rb") as f:  # fstat on an open file too
            assert os.fstat(f.fileno()).st_size == n


# ---- names -----------------------------------------------------------------------------------


def test_rename_file_over_existing_and_directory_with_children(mounted: Mounted) -> None:
    m = mounted.mnt
    (m / "a").write_bytes(b"content of a")
    (m / "b").write_bytes(b"content of b, which gets replaced")
    os.rename(m / "a", m / "b")
    assert not (m / "a").exists()
    assert (m / "b").read_bytes() == b"content of a"
    assert (m / "b").stat().st_size == len(b"content of a")

    (m / "dir" / "sub").mkdir(parents=True)
    (m / "dir" / "f1").write_bytes(_data(100000, 1))
    (m / "dir" / "sub" / "f2").write_bytes(_data(10, 2))
    os.symlink("f1", m / "dir" / "link")
    with open(m / "dir" / "sub" / "f2", "r+b") as held:  # an open file inside the moved tree
        os.rename(m / "dir", m / "moved")
        assert not (m / "dir").exists()
        assert sorted(os.listdir(m / "moved")) == ["f1", "link", "sub"]
        assert (m / "moved" / "f1").read_bytes() == _data(100000, 1)
        assert (m / "moved" / "link").read_bytes() == _data(100000, 1)
        assert (m / "moved" / "sub" / "f2").read_bytes() == _data(10, 2)
        held.seek(0, os.SEEK_END)
        held.write(b"+written after the move")
        held.flush()
    (m / "moved" / "sub" / "new").write_bytes(b"new child")
    os.rename(m / "moved" / "sub" / "f2", m / "moved" / "f2")  # across directories
    os.rename(m / "moved" / "sub", m / "sub2")  # out to the root
    expect = {
        "b": b"content of a",
        "moved/f1": _data(100000, 1),
        "moved/f2": _data(10, 2) + b"+written after the move",
        "sub2/new": b"new child",
    }
    for rel, data in expect.items():
        assert (m / rel).read_bytes() == data, rel
    _remount(mounted)
    for rel, data in expect.items():
        assert (m / rel).read_bytes() == data, rel
    assert sorted(os.listdir(m)) == ["b", "moved", "sub2"]


def test_rename_open_file_over_another_open_file(mounted: Mounted) -> None:
    m = mounted.mnt
    (m / "old").write_bytes(b"old data")
    (m / "new").write_bytes(b"new data")
    with open(m / "old", "rb") as f_old, open(m / "new", "r+b") as f_new:
        os.rename(m / "new", m / "old")
        assert f_old.read() == b"old data"  # the replaced file is still readable through its handle
        assert os.fstat(f_old.fileno()).st_size == 8
        f_new.seek(0, os.SEEK_END)
        f_new.write(b" appended")
        f_new.flush()
        assert (m / "old").read_bytes() == b"new data appended"
    _remount(mounted)
    assert os.listdir(m) == ["old"]
    assert (m / "old").read_bytes() == b"new data appended"


def test_unlink_open_file_stays_readable_through_fd(mounted: Mounted) -> None:
    p = mounted.mnt / "doomed.bin"
    data = _data(3 * BLOCK_SIZE + 5, 9)
    p.write_bytes(data)
    fd = os.open(p, os.O_RDWR)
    try:
        os.unlink(p)
        assert not p.exists()
        assert "doomed.bin" not in os.listdir(mounted.mnt)
        assert "doomed.bin" not in mounted.backing_names()
        assert os.pread(fd, len(data) + 100, 0) == data
        assert os.fstat(fd).st_size == len(data)
        os.pwrite(fd, b"still writable", BLOCK_SIZE)
        assert os.pread(fd, 14, BLOCK_SIZE) == b"still writable"
        os.ftruncate(fd, 10)
        assert os.fstat(fd).st_size == 10
        assert os.pread(fd, 100, 0) == data[:10]
        # a new file under the old name is a different file
        p.write_bytes(b"replacement")
        assert os.pread(fd, 100, 0) == data[:10]
        assert p.read_bytes() == b"replacement"
    finally:
        os.close(fd)
    _remount(mounted)
    assert p.read_bytes() == b"replacement"
    assert mounted.backing_names() == ["doomed.bin"]


def test_mkdir_rmdir_readdir(mounted: Mounted) -> None:
    m = mounted.mnt
    names = {f"file{i:03d}" for i in range(150)}  # enough entries for several readdir batches
    (m / "d").mkdir()
    for n in names:
        (m / "d" / n).write_bytes(n.encode())
    (m / "d" / "sub").mkdir(mode=0o750)
    assert set(os.listdir(m / "d")) == names | {"sub"}
    assert stat.S_ISDIR((m / "d" / "sub").stat().st_mode)
    assert stat.S_IMODE((m / "d" / "sub").stat().st_mode) == 0o750
    with pytest.raises(FileExistsError):
        (m / "d" / "sub").mkdir()
    with pytest.raises(OSError) as exc:
        os.rmdir(m / "d")
    assert exc.value.errno == errno.ENOTEMPTY
    os.rmdir(m / "d" / "sub")
    assert not (m / "d" / "sub").exists()
    with pytest.raises(FileNotFoundError):
        os.rmdir(m / "d" / "sub")
    for n in sorted(names)[:100]:
        os.unlink(m / "d" / n)
    remaining = set(sorted(names)[100:])
    assert set(os.listdir(m / "d")) == remaining
    with os.scandir(m / "d") as it:
        entries = {e.name: (e.is_file(follow_symlinks=False), e.stat().st_size) for e in it}
    assert entries == {n: (True, len(n)) for n in remaining}
    _remount(mounted)
    assert set(os.listdir(m / "d")) == remaining
    assert set(mounted.backing_names("d")) == remaining
    for n in remaining:
        assert (m / "d" / n).read_bytes() == n.encode()


def test_symlinks(mounted: Mounted) -> None:
    m = mounted.mnt
    (m / "dir").mkdir()
    (m / "dir" / "target.txt").write_bytes(b"through the link")
    os.symlink("dir/target.txt", m / "rel")
    os.symlink("dir", m / "dirlink")
    os.symlink("/nonexistent/elsewhere", m / "dangling")
    for _ in range(2):
        assert os.readlink(m / "rel") == "dir/target.txt"
        assert os.readlink(m / "dangling") == "/nonexistent/elsewhere"
        assert stat.S_ISLNK(os.lstat(m / "rel").st_mode)
        assert os.lstat(m / "rel").st_size == len("dir/target.txt")
        assert (m / "rel").read_bytes() == b"through the link"
        assert (m / "dirlink" / "target.txt").read_bytes() == b"through the link"
        assert os.listdir(m / "dirlink") == ["target.txt"]
        assert not (m / "dangling").exists()
        assert (m / "dangling").is_symlink()
        _remount(mounted)
    # writing through a symlink writes the target
    with open(m / "rel", "ab") as f:
        f.write(b"!")
    assert (m / "dir" / "target.txt").read_bytes() == b"through the link!"
    assert mounted.backing_target("rel") == "dir/target.txt"


def test_hard_links_share_content(mounted: Mounted) -> None:
    m = mounted.mnt
    (m / "sub").mkdir()
    (m / "one").write_bytes(_data(100000, 5))
    os.link(m / "one", m / "sub" / "two")
    st1, st2 = os.stat(m / "one"), os.stat(m / "sub" / "two")
    assert st1.st_ino == st2.st_ino
    assert st1.st_nlink == st2.st_nlink == 2
    assert (m / "sub" / "two").read_bytes() == _data(100000, 5)

    with open(m / "one", "r+b") as w, open(m / "sub" / "two", "rb") as r:
        w.seek(BLOCK_SIZE - 2)
        w.write(b"via one")
        w.flush()
        r.seek(BLOCK_SIZE - 2)
        assert r.read(7) == b"via one"
    with open(m / "sub" / "two", "ab") as f:
        f.write(b"appended via two")
    expected = bytearray(_data(100000, 5))
    expected[BLOCK_SIZE - 2 : BLOCK_SIZE + 5] = b"via one"
    expected += b"appended via two"
    assert (m / "one").read_bytes() == expected
    assert (m / "one").stat().st_size == len(expected)
    _remount(mounted)
    assert (m / "one").read_bytes() == expected
    assert (m / "sub" / "two").read_bytes() == expected
    os.unlink(m / "one")
    assert os.stat(m / "sub" / "two").st_nlink == 1
    assert (m / "sub" / "two").read_bytes() == expected


_libc = ctypes.CDLL(None, use_errno=True)
RENAME_NOREPLACE, RENAME_EXCHANGE = 1, 2


def _renameat2(old: Path, new: Path, flags: int) -> None:
    if _libc.renameat2(-100, os.fsencode(old), -100, os.fsencode(new), ctypes.c_uint(flags)) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


def test_renameat2_noreplace_and_exchange(mounted: Mounted) -> None:
    m = mounted.mnt
    (m / "a").write_bytes(_data(70000, 1))
    (m / "b").write_bytes(b"bee")
    (m / "d").mkdir()
    (m / "d" / "child").write_bytes(b"child")
    with pytest.raises(OSError) as exc:
        _renameat2(m / "a", m / "b", RENAME_NOREPLACE)  # what mv -n and safe savers use
    assert exc.value.errno == errno.EEXIST
    assert (m / "b").read_bytes() == b"bee"
    _renameat2(m / "a", m / "c", RENAME_NOREPLACE)
    with open(m / "b", "rb") as held:  # an open file takes part in the exchange
        _renameat2(m / "b", m / "c", RENAME_EXCHANGE)
        assert held.read() == b"bee"
    assert (m / "b").read_bytes() == _data(70000, 1)
    assert (m / "c").read_bytes() == b"bee"
    _renameat2(m / "d", m / "c", RENAME_EXCHANGE)  # a directory and a file swap places
    assert (m / "c" / "child").read_bytes() == b"child"
    assert (m / "d").read_bytes() == b"bee"
    with open(m / "d", "ab") as f:  # the names keep pointing at the right files for writes too
        f.write(b"!")
    with open(m / "c" / "child", "ab") as f:
        f.write(b"!")
    _remount(mounted)
    assert sorted(os.listdir(m)) == ["b", "c", "d"]
    assert (m / "b").read_bytes() == _data(70000, 1)
    assert (m / "d").read_bytes() == b"bee!"
    assert (m / "c" / "child").read_bytes() == b"child!"


def test_reader_tails_a_file_while_it_is_recorded(mounted: Mounted) -> None:
    """A live reader (like a streaming server) follows a recording written in 4 KiB pieces."""
    p = mounted.mnt / "live.ts"
    data = _data(4 * 1024 * 1024 + 1000, 33)
    p.touch()
    problems: list[str] = []

    def recorder() -> None:
        with open(p, "wb", buffering=0) as f:
            for off in range(0, len(data), 4096):
                f.write(data[off : off + 4096])

    def tail() -> None:
        got = bytearray()
        with open(p, "rb", buffering=0) as f:
            for i in range(200_000):
                if len(got) >= len(data):
                    break
                chunk = f.read(100_000)
                if i % 7 == 0:  # drop cached pages so reads also come from the daemon
                    os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
                if chunk and bytes(chunk) != data[len(got) : len(got) + len(chunk)]:
                    problems.append(f"read at {len(got)} returned {len(chunk)} bytes that were never written there")
                    return
                got += chunk
        if bytes(got) != data:
            problems.append(f"tail ended with {len(got)} of {len(data)} bytes")

    threads = [threading.Thread(target=recorder), threading.Thread(target=tail)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert problems == []
    _remount(mounted)
    assert p.read_bytes() == data


# ---- attributes ------------------------------------------------------------------------------


def test_chmod_chown_utimens(mounted: Mounted) -> None:
    m = mounted.mnt
    p = m / "attrs.bin"
    p.write_bytes(_data(1000))
    os.chmod(p, 0o640)
    os.utime(p, ns=(1_600_000_000_123_456_789, 1_500_000_000_987_654_321))
    (m / "dir").mkdir()
    os.chmod(m / "dir", 0o2750)
    os.utime(m / "dir", ns=(1_400_000_000_000_000_001, 1_400_000_000_000_000_002))
    os.symlink("attrs.bin", m / "link")
    os.utime(m / "link", ns=(1_300_000_000_000_000_000, 1_300_000_000_000_000_003), follow_symlinks=False)
    chown = os.geteuid() == 0
    if chown:
        os.chown(p, 1234, 5678)
        os.lchown(m / "link", 4321, 8765)

    # the pattern of cp -p / tar / rsync: write data, set times on the open file, then close
    q = m / "stamped.bin"
    with open(q, "wb") as f:
        f.write(_data(3 * BLOCK_SIZE + 100, 2))
        os.utime(f.fileno(), ns=(1_234_567_890_111_111_111, 1_234_567_890_222_222_222))
        os.fchmod(f.fileno(), 0o604)

    def check() -> None:
        st = p.stat()
        assert stat.S_IMODE(st.st_mode) == 0o640
        assert st.st_mtime_ns == 1_500_000_000_987_654_321
        assert st.st_atime_ns == 1_600_000_000_123_456_789
        assert st.st_size == 1000
        if chown:
            assert (st.st_uid, st.st_gid) == (1234, 5678)
            lst = os.lstat(m / "link")
            assert (lst.st_uid, lst.st_gid) == (4321, 8765)
        assert os.lstat(m / "link").st_mtime_ns == 1_300_000_000_000_000_003
        dst = os.stat(m / "dir")
        assert stat.S_IMODE(dst.st_mode) == 0o2750
        assert dst.st_mtime_ns == 1_400_000_000_000_000_002
        qst = q.stat()
        assert qst.st_mtime_ns == 1_234_567_890_222_222_222
        assert stat.S_IMODE(qst.st_mode) == 0o604
        assert qst.st_size == 3 * BLOCK_SIZE + 100

    check()
    _remount(mounted)
    check()
    assert q.read_bytes() == _data(3 * BLOCK_SIZE + 100, 2)
    check()  # reading does not change mtime


def test_statvfs(mounted: Mounted) -> None:
    sv = os.statvfs(mounted.mnt)
    assert sv.f_bsize > 0 and sv.f_frsize > 0
    assert sv.f_blocks > 0
    assert 0 < sv.f_bavail <= sv.f_blocks
    assert sv.f_namemax >= 255
    backing = os.statvfs(mounted.tree)
    assert sv.f_blocks * sv.f_frsize == backing.f_blocks * backing.f_frsize


# ---- sharing -----------------------------------------------------------------------------------


def test_two_handles_on_one_file(mounted: Mounted) -> None:
    p = mounted.mnt / "shared.bin"
    with open(p, "wb") as writer:
        writer.write(b"first")
        writer.flush()
        with open(p, "rb") as reader:
            assert reader.read() == b"first"
            writer.write(_data(2 * BLOCK_SIZE, 3))
            writer.flush()
            assert reader.read() == _data(2 * BLOCK_SIZE, 3)  # continues where it stopped
            assert os.fstat(reader.fileno()).st_size == 5 + 2 * BLOCK_SIZE
            writer.seek(1)
            writer.write(b"IRS")
            writer.flush()
            reader.seek(0)
            assert reader.read(5) == b"fIRSt"
        writer.write(b"after the reader closed")
    expected = b"fIRSt" + _data(2 * BLOCK_SIZE, 3)
    expected = expected[:4] + b"after the reader closed" + expected[4 + 23 :]
    assert p.read_bytes() == expected
    # two independent opens, a writer and a reader interleaving
    a = os.open(p, os.O_WRONLY)
    b = os.open(p, os.O_RDONLY)
    try:
        for i in range(20):
            os.pwrite(a, f"[{i:04d}]".encode(), len(expected) + i * 6)
            assert os.pread(b, 6, len(expected) + i * 6) == f"[{i:04d}]".encode()
    finally:
        os.close(a)
        os.close(b)
    expected += b"".join(f"[{i:04d}]".encode() for i in range(20))
    _remount(mounted)
    assert p.read_bytes() == expected


def test_mmap_read_and_write(mounted: Mounted) -> None:
    p = mounted.mnt / "mapped.bin"
    data = _data(3 * BLOCK_SIZE + 4097, 4)
    p.write_bytes(data)
    _remount(mounted)  # map what is on disk, not what the kernel still has
    with open(p, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm:
        assert len(mm) == len(data)
        assert mm[:] == data
        assert mm[BLOCK_SIZE - 10 : BLOCK_SIZE + 10] == data[BLOCK_SIZE - 10 : BLOCK_SIZE + 10]
    with open(p, "r+b") as f, mmap.mmap(f.fileno(), 0) as mm:
        mm[BLOCK_SIZE - 3 : BLOCK_SIZE + 3] = b"MMAPED"
        mm.flush()
    expected = bytearray(data)
    expected[BLOCK_SIZE - 3 : BLOCK_SIZE + 3] = b"MMAPED"
    assert p.read_bytes() == expected
    _remount(mounted)
    assert p.read_bytes() == expected


def test_truncate_by_path_races_with_open_write_close(mounted: Mounted) -> None:
    """truncate(2) by name while other threads open, read, write and close the same file.

    Each request may interleave with the others in the daemon; the file must stay readable
    and consistent (a prefix of the pattern, then zeros), and intact after a remount.
    """
    p = mounted.mnt / "contended.bin"
    pattern = bytes(range(251)) * 2100  # 527100 bytes, no zero runs at block boundaries
    p.write_bytes(pattern)
    sizes = [100000, 300000, BLOCK_SIZE, len(pattern), 7]
    errors: list[str] = []

    def truncator() -> None:
        for i in range(300):
            try:
                os.truncate(p, sizes[i % len(sizes)])
            except OSError as exc:
                errors.append(f"truncate #{i}: {exc}")

    def user(k: int) -> None:
        for i in range(120):
            try:
                fd = os.open(p, os.O_RDWR)
                try:
                    data = os.pread(fd, 600000, 0)
                    body = data.rstrip(b"\0")
                    if body != pattern[: len(body)]:
                        errors.append(f"user {k} #{i}: read {len(data)} bytes that are not pattern + zeros")
                    os.pwrite(fd, pattern[:10], 0)
                finally:
                    os.close(fd)
            except OSError as exc:
                errors.append(f"user {k} #{i}: {exc}")

    threads = [threading.Thread(target=truncator), *(threading.Thread(target=user, args=(k,)) for k in range(2))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    final = p.read_bytes()
    assert len(final) in {*sizes, 10}
    assert final.rstrip(b"\0") == pattern[: len(final.rstrip(b"\0"))]
    _remount(mounted)
    assert p.read_bytes() == final


def test_parallel_writers_on_own_and_shared_files(mounted: Mounted) -> None:
    """Threads write their own files and disjoint byte ranges of one shared file at the same time."""
    m = mounted.mnt
    models = {f"own{k}": bytearray() for k in range(3)}
    shared_len = 5 * BLOCK_SIZE + 1234
    (m / "shared").write_bytes(bytes(shared_len))
    shared = bytearray(shared_len)
    errors: list[str] = []

    def own(k: int) -> None:
        rng = random.Random(k)
        name = f"own{k}"
        model = models[name]
        try:
            fd = os.open(m / name, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                for i in range(150):
                    off = rng.randrange(0, len(model) + 2 * BLOCK_SIZE)
                    data = rng.randbytes(rng.choice([1, 4096, BLOCK_SIZE + 3, rng.randrange(1, 150_000)]))
                    os.pwrite(fd, data, off)
                    if off > len(model):
                        model.extend(bytes(off - len(model)))
                    model[off : off + len(data)] = data
                    if i % 10 == 0:
                        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
                        if os.pread(fd, len(model) + 1, 0) != model:
                            errors.append(f"{name}: content differs after write #{i}")
                            return
            finally:
                os.close(fd)
        except OSError as exc:
            errors.append(f"{name}: {exc}")

    def share(k: int) -> None:
        # writer k owns bytes [j*1000 + k*500, j*1000 + k*500 + 500): neighbours share every block
        try:
            fd = os.open(m / "shared", os.O_RDWR)
            try:
                for j in range(shared_len // 1000):
                    off = j * 1000 + k * 500
                    data = bytes([65 + k]) * 500
                    os.pwrite(fd, data, off)
                    shared[off : off + 500] = data
                    if j % 50 == 0:
                        os.fsync(fd)
            finally:
                os.close(fd)
        except OSError as exc:
            errors.append(f"shared writer {k}: {exc}")

    threads = [threading.Thread(target=own, args=(k,)) for k in range(3)]
    threads += [threading.Thread(target=share, args=(k,)) for k in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    expected = {**{name: bytes(model) for name, model in models.items()}, "shared": bytes(shared)}
    for name, data in expected.items():
        assert (m / name).read_bytes() == data, name
    _remount(mounted)
    for name, data in expected.items():
        assert (m / name).stat().st_size == len(data), name
        assert (m / name).read_bytes() == data, name
