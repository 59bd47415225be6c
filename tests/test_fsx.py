"""fsx-style exerciser: thousands of seeded random operations on one file, checked after each.

Like the classic fsx, one file on the mount and an in-memory model of what it must hold.
Operations: write (anywhere, also far past EOF, 1 byte to 200 KiB), truncate (down, up, to
0), read through the writing descriptor and through a second read-only one, mmap read,
posix_fallocate (glibc falls back to writing zeros when fallocate(2) is unsupported),
fallocate(2) itself in its modes, fsync, and close/reopen of both descriptors. After every
operation the size is compared, and the range it touched plus a random range are read back;
every 64 operations, and at the end after a remount, the whole file is compared. A failure
names the seed, the operation number and the last operations.

VCFS_FSX_OPS (default 4000) and VCFS_FSX_SEEDS (default "1") set the size of the run.
"""

from __future__ import annotations

import ctypes
import errno
import mmap
import os
import random
from pathlib import Path

import pytest
from conftest import Mounted

from vcfs.core.layout import BLOCK_SIZE

pytestmark = pytest.mark.mount

OPS = int(os.environ.get("VCFS_FSX_OPS", "4000"))
SEEDS = [int(s) for s in os.environ.get("VCFS_FSX_SEEDS", "1").split(",")]
MAX_SIZE = 3 * 1024 * 1024 + 777  # 49 blocks: offsets land in every position of a block
FALLOC_FL_KEEP_SIZE, FALLOC_FL_PUNCH_HOLE, FALLOC_FL_ZERO_RANGE = 0x01, 0x02, 0x10
MODES = [0, FALLOC_FL_KEEP_SIZE, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, FALLOC_FL_ZERO_RANGE]
_libc = ctypes.CDLL(None, use_errno=True)
_libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]


def _fallocate(fd: int, mode: int, offset: int, length: int) -> None:
    if _libc.fallocate(fd, mode, offset, length) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


class Fsx:
    def __init__(self, path: Path, seed: int) -> None:
        self.path, self.seed = path, seed
        self.rng = random.Random(seed)
        self.model = bytearray()
        self.log: list[str] = []
        self.fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
        self.ro = os.open(path, os.O_RDONLY)
        self.falloc_unsupported = 0

    def fail(self, what: str) -> None:
        tail = "\n  ".join(self.log[-12:])
        pytest.fail(f"seed {self.seed}, op {len(self.log)}: {what}\n  last operations:\n  {tail}")

    def check(self, off: int, length: int, fd: int | None = None) -> None:
        got = os.pread(self.fd if fd is None else fd, length, off)
        want = bytes(self.model[off : off + length])
        if got != want:
            first = next((i for i in range(min(len(got), len(want))) if got[i] != want[i]), min(len(got), len(want)))
            self.fail(f"read {length}@{off}: {len(got)} bytes, first difference at {off + first}")

    def check_size(self) -> None:
        for fd in (self.fd, self.ro):
            if os.fstat(fd).st_size != len(self.model):
                self.fail(f"size {os.fstat(fd).st_size}, model {len(self.model)}")

    def offset(self) -> int:
        size = len(self.model)
        r = self.rng.random()
        if r < 0.3 or size == 0:
            return self.rng.randrange(0, MAX_SIZE)
        if r < 0.5:
            return size  # append
        if r < 0.7:  # near a block boundary
            b = self.rng.randrange(0, max(1, size // BLOCK_SIZE + 2))
            return max(0, min(MAX_SIZE, b * BLOCK_SIZE + self.rng.randint(-3, 3)))
        return self.rng.randrange(0, size)

    def step(self) -> None:
        rng, m = self.rng, self.model
        op = rng.choices(
            ["write", "truncate", "read", "read2", "mapread", "posix_fallocate", "fallocate", "fsync", "reopen"],
            weights=[30, 8, 15, 8, 8, 4, 4, 3, 3],
        )[0]
        size = len(m)
        if op == "write":
            off = self.offset()
            n = max(1, min(rng.choice([1, 7, 4096, 65536, 65537, rng.randint(1, 200_000)]), MAX_SIZE - off))
            data = rng.randbytes(n)
            self.log.append(f"write {n}@{off}")
            if os.pwrite(self.fd, data, off) != n:
                self.fail("short write")
            if off > size:
                m.extend(bytes(off - size))
            m[off : off + n] = data
            self.check(max(0, off - 10), n + 20)
        elif op == "truncate":
            new = rng.choice([0, rng.randrange(0, MAX_SIZE), max(0, size - rng.randint(1, 3 * BLOCK_SIZE)), size])
            self.log.append(f"truncate {new}")
            os.ftruncate(self.fd, new)
            del m[new:]
            m.extend(bytes(new - len(m)))
            self.check(max(0, new - 100), 200)
        elif op in ("read", "read2"):
            off = self.offset()
            n = rng.randint(1, 300_000)
            self.log.append(f"{op} {n}@{off}")
            self.check(off, n, self.ro if op == "read2" else None)
        elif op == "mapread":
            if size == 0:
                return
            off = rng.randrange(0, size)
            n = rng.randint(1, size - off)
            self.log.append(f"mapread {n}@{off}")
            with mmap.mmap(self.ro, size, access=mmap.ACCESS_READ) as mm:
                if mm[off : off + n] != m[off : off + n]:
                    self.fail(f"mmap read {n}@{off} differs")
        elif op == "posix_fallocate":
            off, n = self.offset(), rng.randint(1, 3 * BLOCK_SIZE)
            n = max(1, min(n, MAX_SIZE - off))
            self.log.append(f"posix_fallocate {n}@{off}")
            os.posix_fallocate(self.fd, off, n)
            m.extend(bytes(max(0, off + n - len(m))))  # allocates; the content stays
            self.check(max(0, off - 10), n + 20)
        elif op == "fallocate":
            mode = rng.choice(MODES)
            off, n = self.offset(), rng.randint(1, 2 * BLOCK_SIZE)
            self.log.append(f"fallocate mode {mode:#x} {n}@{off}")
            try:
                _fallocate(self.fd, mode, off, n)
            except OSError as exc:
                # pyfuse3 passes no FALLOCATE requests on: every mode is unsupported, and nothing changes.
                if exc.errno != errno.EOPNOTSUPP:
                    self.fail(f"fallocate gave {errno.errorcode.get(exc.errno or 0)}, not EOPNOTSUPP")
                self.falloc_unsupported += 1
            else:  # a filesystem that supports it (when this runs on a plain directory)
                if mode & (FALLOC_FL_PUNCH_HOLE | FALLOC_FL_ZERO_RANGE):
                    end = min(off + n, len(m)) if mode & FALLOC_FL_KEEP_SIZE else off + n
                    m.extend(bytes(max(0, end - len(m))))
                    m[off:end] = bytes(max(0, end - off))
                elif not mode & FALLOC_FL_KEEP_SIZE:
                    m.extend(bytes(max(0, off + n - len(m))))
        elif op == "fsync":
            self.log.append("fsync")
            os.fsync(self.fd)
        else:
            self.log.append("close and reopen")
            os.close(self.fd)
            os.close(self.ro)
            self.fd = os.open(self.path, os.O_RDWR)
            self.ro = os.open(self.path, os.O_RDONLY)
        self.check_size()
        if len(self.log) % 64 == 0:
            self.check(0, len(m) + 1)

    def close(self) -> None:
        os.close(self.fd)
        os.close(self.ro)


def _run(path: Path, seed: int) -> Fsx:
    fsx = Fsx(path, seed)
    try:
        for _ in range(OPS):
            fsx.step()
        fsx.check(0, len(fsx.model) + 1)
    finally:
        fsx.close()
    return fsx


@pytest.mark.parametrize("seed", SEEDS)
def test_fsx_random_operations_match_the_model(mounted: Mounted, seed: int) -> None:
    fsx = _run(mounted.mnt / f"fsx-{seed}.bin", seed)
    assert fsx.falloc_unsupported > 0  # the fallocate path ran (and was refused cleanly)
    mounted.umount()
    mounted.mount()
    assert (mounted.mnt / f"fsx-{seed}.bin").read_bytes() == bytes(fsx.model), "after remount"


def test_fsx_model_agrees_with_a_plain_filesystem(tmp_path: Path) -> None:
    """The model itself is right: the same run on a plain directory (where fallocate(2) works)."""
    fsx = Fsx(tmp_path / "plain.bin", SEEDS[0])
    try:
        for _ in range(min(OPS, 1000)):
            fsx.step()
        fsx.check(0, len(fsx.model) + 1)
    finally:
        fsx.close()
