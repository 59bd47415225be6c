"""Seeded randomized model test: the same operations on a vcfs mount and on a plain directory.

A few files, several handles per file (read-write, read-only, O_APPEND), and operations that
recorders and editors do: pwrite anywhere (also far past EOF), append, truncate, read, rename,
unlink while open, open and close. After every read, and at the end (also after a remount),
the mount must hold exactly what the plain directory holds. A failure names the seed and the
index of the operation, with the operations that led up to it.
"""

from __future__ import annotations

import errno
import os
import random
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from conftest import Mounted

from vcfs.core.layout import BLOCK_SIZE

pytestmark = pytest.mark.mount

NAMES = [f"f{i}" for i in range(5)]
MAX_SIZE = 1_500_000  # keeps every seed fast; still 23 blocks
# More seeds on demand, e.g. VCFS_MODEL_SEEDS=1-50 (a range) or VCFS_MODEL_SEEDS=7,9
_SEEDS_ENV = os.environ.get("VCFS_MODEL_SEEDS", "1,2,3")
SEEDS = (
    list(range(int(_SEEDS_ENV.split("-")[0]), int(_SEEDS_ENV.split("-")[1]) + 1))
    if "-" in _SEEDS_ENV
    else [int(s) for s in _SEEDS_ENV.split(",")]
)
OPS_PER_SEED = 1000


@dataclass
class Handle:
    mfd: int  # on the mount
    pfd: int  # on the plain directory
    mode: str  # "rw", "ro" or "append"
    name: str  # name it was opened under (it may have been renamed or unlinked since)


class Model:
    def __init__(self, mnt: Path, plain: Path, seed: int) -> None:
        self.mnt, self.plain = mnt, plain
        self.seed = seed
        self.rng = random.Random(seed)
        self.handles: list[Handle] = []
        self.log: list[str] = []

    # ---- helpers ---------------------------------------------------------------------------

    def both(self, what: str, fn: Callable[[Path], Any]) -> tuple[Any, Any]:
        """Run ``fn`` against both roots; both must succeed, or fail with the same errno."""
        results = []
        for root in (self.mnt, self.plain):
            try:
                results.append(("ok", fn(root)))
            except OSError as exc:
                results.append(("err", exc.errno))
        (km, vm), (kp, vp) = results
        assert km == kp and (km == "ok" or vm == vp), f"{what}: mount gave {results[0]}, plain dir gave {results[1]}"
        return vm, vp

    def names(self) -> list[str]:
        return sorted(os.listdir(self.plain))

    def size(self, h: Handle) -> int:
        return os.fstat(h.pfd).st_size

    def offset(self, size: int) -> int:
        r = self.rng.random()
        if r < 0.25:
            return size  # append position
        if r < 0.45:
            return min(MAX_SIZE, size + self.rng.randrange(1, 2 * BLOCK_SIZE + 100))  # past EOF: a gap
        if r < 0.65 and size > BLOCK_SIZE:
            boundary = self.rng.randrange(1, size // BLOCK_SIZE + 1) * BLOCK_SIZE
            return max(0, boundary + self.rng.randrange(-40, 40))
        return self.rng.randrange(0, size + 1)

    def length(self) -> int:
        return self.rng.choice(
            [1, 3, 100, 4096, 4096, 8192, BLOCK_SIZE - 1, BLOCK_SIZE, BLOCK_SIZE + 1, self.rng.randrange(1, 200_000)]
        )

    def payload(self, n: int) -> bytes:
        return self.rng.randbytes(n)

    def check_sizes(self, h: Handle) -> None:
        ms, ps = os.fstat(h.mfd).st_size, os.fstat(h.pfd).st_size
        assert ms == ps, f"fstat size: mount {ms}, plain {ps}"

    def compare_handle(self, h: Handle) -> None:
        self.check_sizes(h)
        n = self.size(h)
        got, want = os.pread(h.mfd, n + 10, 0), os.pread(h.pfd, n + 10, 0)
        assert got == want, f"content differs (len {len(got)} vs {len(want)}, first diff at {_first_diff(got, want)})"

    def compare_tree(self) -> None:
        mnames, pnames = sorted(os.listdir(self.mnt)), self.names()
        assert mnames == pnames, f"listing: mount {mnames}, plain {pnames}"
        for name in pnames:
            got, want = (self.mnt / name).read_bytes(), (self.plain / name).read_bytes()
            where = _first_diff(got, want)
            assert got == want, f"{name}: content differs (len {len(got)} vs {len(want)}, first diff at {where})"
            assert (self.mnt / name).stat().st_size == len(want), name

    # ---- operations ------------------------------------------------------------------------

    def op_open(self) -> str:
        existing = self.names()
        name = self.rng.choice(NAMES)
        mode = self.rng.choices(["rw", "ro", "append"], [5, 2, 3])[0]
        if mode == "ro" and name not in existing:
            if not existing:
                return "open skipped"
            name = self.rng.choice(existing)
        flags = {"rw": os.O_RDWR, "ro": os.O_RDONLY, "append": os.O_WRONLY | os.O_APPEND}[mode]
        if mode != "ro":
            flags |= os.O_CREAT
            if self.rng.random() < 0.05:
                flags |= os.O_TRUNC
        mfd, pfd = self.both(f"open {name}", lambda root: os.open(root / name, flags, 0o644))
        h = Handle(mfd, pfd, mode, name)
        self.handles.append(h)
        self.check_sizes(h)
        trunc = " O_TRUNC" if flags & os.O_TRUNC else ""
        return f"open {name} {mode}{trunc} -> h{len(self.handles) - 1}"

    def op_close(self) -> str:
        if not self.handles:
            return "close skipped"
        i = self.rng.randrange(len(self.handles))
        h = self.handles.pop(i)
        self.check_sizes(h)
        os.close(h.mfd)
        os.close(h.pfd)
        return f"close h{i} ({h.name})"

    def _writable(self) -> Handle | None:
        cands = [h for h in self.handles if h.mode == "rw"]
        return self.rng.choice(cands) if cands else None

    def op_pwrite(self) -> str:
        h = self._writable()
        if h is None:
            return self.op_open()
        off = self.offset(self.size(h))
        n = min(self.length(), MAX_SIZE - off)
        if n <= 0:
            return self.op_truncate()
        data = self.payload(n)
        wm, wp = self.both("pwrite", lambda root: os.pwrite(h.mfd if root == self.mnt else h.pfd, data, off))
        assert wm == wp == n, f"pwrite returned {wm} on the mount, {wp} on the plain dir"
        self.check_sizes(h)
        return f"pwrite {h.name} off={off} len={n}"

    def op_append(self) -> str:
        cands = [h for h in self.handles if h.mode == "append"]
        if not cands:
            return self.op_open()
        h = self.rng.choice(cands)
        n = self.length()
        if self.size(h) + n > MAX_SIZE:
            return self.op_truncate()
        data = self.payload(n)
        if self.rng.random() < 0.3:  # a seek does not move O_APPEND writes
            pos = self.rng.randrange(0, self.size(h) + 1)
            os.lseek(h.mfd, pos, os.SEEK_SET)
            os.lseek(h.pfd, pos, os.SEEK_SET)
        wm, wp = os.write(h.mfd, data), os.write(h.pfd, data)
        assert wm == wp == n
        self.check_sizes(h)
        return f"append {h.name} len={n}"

    def op_truncate(self) -> str:
        size_choices = [0, 1, BLOCK_SIZE - 1, BLOCK_SIZE, BLOCK_SIZE + 1, 2 * BLOCK_SIZE]
        h = self._writable()
        if h is not None and self.rng.random() < 0.7:
            cur = self.size(h)
            new = self.rng.choice([*size_choices, self.rng.randrange(0, cur + 1), min(MAX_SIZE, cur + 100_000)])
            os.ftruncate(h.mfd, new)
            os.ftruncate(h.pfd, new)
            self.check_sizes(h)
            return f"ftruncate {h.name} {cur} -> {new}"
        existing = self.names()
        if not existing:
            return self.op_open()
        name = self.rng.choice(existing)
        new = self.rng.choice([*size_choices, self.rng.randrange(0, MAX_SIZE // 4)])
        self.both(f"truncate {name}", lambda root: os.truncate(root / name, new))
        return f"truncate {name} -> {new}"

    def op_read(self) -> str:
        if not self.handles:
            return self.op_open()
        h = self.rng.choice([h for h in self.handles if h.mode != "append"] or self.handles)
        if h.mode == "append":
            return self.op_append()
        size = self.size(h)
        off = self.rng.choice([0, self.rng.randrange(0, size + 1), max(0, size - 10), size, size + 5])
        n = self.rng.choice([1, 100, 4096, BLOCK_SIZE, BLOCK_SIZE + 7, self.rng.randrange(1, 300_000)])
        got, want = os.pread(h.mfd, n, off), os.pread(h.pfd, n, off)
        assert got == want, (
            f"pread {h.name} off={off} len={n}: got {len(got)} bytes, expected {len(want)}, "
            f"first diff at {_first_diff(got, want)}"
        )
        return f"pread {h.name} off={off} len={n}"

    def op_compare(self) -> str:
        for h in self.handles:
            if h.mode != "append":
                self.compare_handle(h)
            else:
                self.check_sizes(h)
        self.compare_tree()
        return "compare all"

    def op_rename(self) -> str:
        existing = self.names()
        if not existing:
            return self.op_open()
        src, dst = self.rng.choice(existing), self.rng.choice(NAMES)
        self.both(f"rename {src} {dst}", lambda root: os.rename(root / src, root / dst))
        assert sorted(os.listdir(self.mnt)) == self.names()
        return f"rename {src} -> {dst}"

    def op_unlink(self) -> str:
        existing = self.names()
        if not existing:
            return self.op_open()
        name = self.rng.choice(existing)
        self.both(f"unlink {name}", lambda root: os.unlink(root / name))
        assert sorted(os.listdir(self.mnt)) == self.names()
        return f"unlink {name}"

    def op_sync_or_drop(self) -> str:
        if not self.handles:
            return self.op_open()
        h = self.rng.choice(self.handles)
        r = self.rng.random()
        if r < 0.3:
            os.fsync(h.mfd)
            return f"fsync {h.name}"
        if r < 0.5:
            os.fdatasync(h.mfd)
            return f"fdatasync {h.name}"
        # drop the kernel's clean pages so later reads go to the daemon (and its disk blocks)
        os.posix_fadvise(h.mfd, 0, 0, os.POSIX_FADV_DONTNEED)
        return f"fadvise DONTNEED {h.name}"

    def step(self) -> str:
        ops = [
            (self.op_pwrite, 26),
            (self.op_append, 10),
            (self.op_truncate, 7),
            (self.op_read, 22),
            (self.op_compare, 2),
            (self.op_rename, 4),
            (self.op_unlink, 3),
            (self.op_open, 9),
            (self.op_close, 8),
            (self.op_sync_or_drop, 5),
        ]
        fn = self.rng.choices([f for f, _ in ops], [w for _, w in ops])[0]
        return fn()

    def close_all(self, ignore_errors: bool = False) -> None:
        while self.handles:
            h = self.handles.pop()
            for fd in (h.mfd, h.pfd):
                try:
                    os.close(fd)  # the descriptor is released even when close reports an error
                except OSError:
                    if not ignore_errors:
                        raise


def _first_diff(a: bytes, b: bytes) -> int | None:
    for i, (x, y) in enumerate(zip(a, b, strict=False)):
        if x != y:
            return i
    return None if len(a) == len(b) else min(len(a), len(b))


@pytest.mark.parametrize("seed", SEEDS)
def test_random_operations_match_a_plain_directory(mounted: Mounted, tmp_path: Path, seed: int) -> None:
    plain = tmp_path / "plain"
    plain.mkdir()
    model = Model(mounted.mnt, plain, seed)
    print(f"model test seed={seed}")
    phase = "ops"
    i = -1
    try:
        for i in range(OPS_PER_SEED):
            model.log.append(f"#{i} {model.step()}")
            if i == OPS_PER_SEED // 2:  # halfway: everything to disk and back, then carry on
                phase = "mid-run remount"
                model.close_all()
                mounted.umount()
                mounted.mount()
                model.compare_tree()
                model.log.append(f"#{i} remount")
                phase = "ops"
        phase = "final compare"
        model.op_compare()
        model.close_all()
        model.compare_tree()
        phase = "after remount"
        mounted.umount()
        mounted.mount()
        model.compare_tree()
        # and the remounted files keep working: one more round of appends and a compare
        for name in model.names():
            with open(mounted.mnt / name, "ab") as fm, open(plain / name, "ab") as fp:
                tail = model.payload(5000)
                fm.write(tail)
                fp.write(tail)
        model.compare_tree()
    except Exception as exc:
        model.close_all(ignore_errors=True)
        recent = "\n  ".join(model.log[-25:])
        raise AssertionError(f"seed={seed} phase={phase} op index={i}: {exc}\nlast operations:\n  {recent}") from exc
    assert model.names(), "the run should leave files to compare"


def test_unlinked_name_reused_while_old_file_open(mounted: Mounted, tmp_path: Path) -> None:
    """A fixed corner of the model: a name unlinked and recreated while the old file is held open."""
    m = mounted.mnt
    old = os.open(m / "x", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        os.pwrite(old, b"A" * 70000, 0)
        os.unlink(m / "x")
        new = os.open(m / "x", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            os.pwrite(new, b"B" * 10, 0)
            os.pwrite(old, b"C" * 10, 69995)
            assert os.pread(old, 100000, 0) == b"A" * 69995 + b"C" * 10
            assert os.pread(new, 100, 0) == b"B" * 10
            with pytest.raises(OSError) as exc:
                os.rename(m / "missing", m / "x")
            assert exc.value.errno == errno.ENOENT
        finally:
            os.close(new)
    finally:
        os.close(old)
    assert (m / "x").read_bytes() == b"B" * 10
    assert os.listdir(m) == ["x"]
