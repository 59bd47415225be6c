"""Crash at every write: CryptFile with its journal, under kill -9 and under power loss.

The random-kill test (test_reliability_crash.py) rarely lands inside the one write that
rewrites a block in place. This test does not leave that to chance: it runs a fixed
recorder-like workload on a real backing file (real SoftHSM2 keys, real journal directory)
and crashes it at *every* mutating system call it makes, in two ways:

- **kill -9**: the call is cut short at a page boundary (how Linux stops a write to a regular
  file on SIGKILL) and nothing after it happens; the page cache survives, so the files are
  left exactly as they are.
- **power loss**: additionally, every 512-byte sector written since that file's last
  fdatasync/fsync independently keeps its new or its last synced content, the file size is
  any size it had since its last sync, and a journal file created or removed since the last
  sync of its directory may or may not exist (seeded choices, several per crash point).

The system calls are intercepted in this process to stop them (the fault injection this test
is about); everything else is the real code path. After each crash the file is opened as the
mount would (journal applied) and every promise of docs/RELIABILITY.md "Crash" is checked:
it opens; every byte of the content at the last *returned* fsync that no later write touched
reads back; no block holding such a byte fails; after kill -9 only the last block may fail;
the file is never shorter than at the last fsync (unless a later truncate made it so) and
never holds bytes that were not written.
"""

from __future__ import annotations

import os
import random
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from vcfs.config import load_config
from vcfs.core.layout import BLOCK_SIZE
from vcfs.cryptfile import CryptFile, create_cryptfile, open_cryptfile
from vcfs.errors import IntegrityError
from vcfs.journal import Journal
from vcfs.keys.provider import Pkcs11Provider
from vcfs.keys.setup import HostKeyOptions, open_provider

SECTOR = 512
PAGE = 4096
POWER_SAMPLES = 3  # power-loss outcomes tried per crash point


class Crash(BaseException):
    """The simulated process death (BaseException: nothing in vcfs may catch it)."""


@dataclass
class Tracked:
    """What the disk holds for one file: its content at the last sync, sizes since."""

    synced: bytes
    sizes: set[int]


@dataclass
class Disk:
    """Intercepts os-level writes under ``root``; counts them and crashes at ``crash_at``."""

    root: str
    crash_at: int = -1
    cut_rng: random.Random = field(default_factory=random.Random)
    calls: int = 0
    files: dict[str, Tracked] = field(default_factory=dict)
    dir_pending: dict[str, bytes | None] = field(default_factory=dict)  # name -> content if removed
    real: dict[str, Callable[..., object]] = field(default_factory=dict)

    def path_of(self, fd: int) -> str | None:
        try:
            path = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            return None
        return path if path.startswith(self.root) else None

    def track(self, path: str) -> Tracked:
        if path not in self.files:
            with open(path, "rb") as f:
                data = f.read()
            self.files[path] = Tracked(data, {len(data)})
        return self.files[path]

    def tick(self) -> bool:
        """Count a mutating call; True if this is the one that dies."""
        self.calls += 1
        return self.calls - 1 == self.crash_at

    # ---- the intercepted calls ---------------------------------------------------------

    def pwrite(self, fd: int, data: bytes | memoryview, offset: int) -> int:
        return self.pwritev(fd, [data], offset)

    def pwritev(self, fd: int, buffers: list[bytes], offset: int) -> int:
        path = self.path_of(fd)
        if path is None:
            return self.real["pwritev"](fd, buffers, offset)  # type: ignore[return-value]
        t = self.track(path)
        data = b"".join(bytes(b) for b in buffers)
        if self.tick():
            # kill -9 stops a write to a regular file at a page boundary
            stops = [p - offset for p in range(-(-offset // PAGE) * PAGE, offset + len(data), PAGE)]
            cut = self.cut_rng.choice([0, *stops])
            if cut:
                self.real["pwrite"](fd, data[:cut], offset)
                t.sizes.add(os.fstat(fd).st_size)
            raise Crash
        n = self.real["pwritev"](fd, buffers, offset)
        t.sizes.add(os.fstat(fd).st_size)
        return n  # type: ignore[return-value]

    def ftruncate(self, fd: int, size: int) -> None:
        path = self.path_of(fd)
        if path is not None:
            self.track(path)
            if self.tick():
                raise Crash
        self.real["ftruncate"](fd, size)
        if path is not None:
            self.files[path].sizes.add(size)

    def sync(self, name: str, fd: int) -> None:
        path = self.path_of(fd)
        if path is None:
            self.real[name](fd)
            return
        if self.tick():
            raise Crash
        # No real sync: durability is what this class models (and it keeps the test fast).
        if os.path.isdir(path):
            for entry in [e for e in self.dir_pending if os.path.dirname(e) == path]:
                del self.dir_pending[entry]
            return
        with open(path, "rb") as f:
            data = f.read()
        self.files[path] = Tracked(data, {len(data)})

    def open(self, path: str | bytes | Path, flags: int, mode: int = 0o777, **kw: object) -> int:
        p = os.fsdecode(path)
        new = p.startswith(self.root) and flags & os.O_CREAT and not os.path.exists(p)
        fd = self.real["open"](path, flags, mode, **kw)
        if new:
            self.dir_pending.setdefault(p, None)
            self.files[p] = Tracked(b"", {0})
        return fd  # type: ignore[return-value]

    def unlink(self, path: str | bytes | Path, **kw: object) -> None:
        p = os.fsdecode(path)
        if p.startswith(self.root):
            if self.tick():
                raise Crash
            with open(p, "rb") as f:
                self.dir_pending[p] = f.read()
        self.real["unlink"](path, **kw)

    def install(self, mp: pytest.MonkeyPatch) -> None:
        for name in ("pwrite", "pwritev", "ftruncate", "fdatasync", "fsync", "open", "unlink"):
            self.real[name] = getattr(os, name)
        mp.setattr(os, "pwrite", self.pwrite)
        mp.setattr(os, "pwritev", self.pwritev)
        mp.setattr(os, "ftruncate", self.ftruncate)
        mp.setattr(os, "fdatasync", lambda fd: self.sync("fdatasync", fd))
        mp.setattr(os, "fsync", lambda fd: self.sync("fsync", fd))
        mp.setattr(os, "open", self.open)
        mp.setattr(os, "unlink", self.unlink)

    # ---- after the crash ------------------------------------------------------------------

    def lose_power(self, rng: random.Random) -> None:
        """Turn the files (page cache) into one state a power loss could leave on the disk."""
        for path, t in self.files.items():
            if not os.path.exists(path):
                continue
            with open(path, "rb") as f:
                cur = f.read()
            size = rng.choice(sorted(t.sizes | {len(cur)}))
            out = bytearray(size)
            for off in range(0, size, SECTOR):
                new, old = cur[off : off + SECTOR], t.synced[off : off + SECTOR]
                pick = new if rng.random() < 0.5 else old
                out[off : off + SECTOR] = pick.ljust(min(SECTOR, size - off), b"\0")[: min(SECTOR, size - off)]
            with open(path, "wb") as f:
                f.write(out)
        for path, content in self.dir_pending.items():
            if rng.random() < 0.5:
                continue  # this name change reached the disk
            if content is None and os.path.exists(path):
                os.remove(path)  # created, but the name never made it
            elif content is not None and not os.path.exists(path):
                with open(path, "wb") as f:
                    f.write(content)  # removed, but the removal never made it


# ---- the workload -----------------------------------------------------------------------


@dataclass
class Model:
    """What the application knows: the content, and what the last returned fsync promised."""

    content: bytearray = field(default_factory=bytearray)
    durable: bytes = b""
    touched: list[tuple[int, int]] = field(default_factory=list)  # ranges written since that fsync
    floor: int | None = None  # smallest size a truncate since that fsync asked for


def _bytes(rng: random.Random, n: int) -> bytes:
    return rng.randbytes(n)


def workload(rng: random.Random) -> list[tuple[str, int, int]]:
    """A fixed mix: recorder appends with fsyncs, a muxer's seek-rewrite, truncates, reopen;
    some appends are large enough to make CryptFile seal in the middle (16 dirty blocks)."""
    ops: list[tuple[str, int, int]] = [("write", 0, 100_000), ("fsync", 0, 0)]
    size = 100_000
    for i in range(18):
        n = rng.choice([4096, 30_000, 70_000, 140_000, 1_200_000])
        ops.append(("write", size, n))
        size += n
        if i % 3 == 2:
            ops.append(("fsync", 0, 0))
        if i == 6:
            ops += [("write", 10, 200), ("write", BLOCK_SIZE + 5, 3 * BLOCK_SIZE), ("fsync", 0, 0)]
        if i == 8:
            ops += [("reopen", 0, 0), ("write", size, 5000)]
            size += 5000
        if i == 10:
            size = size - 100_000
            ops += [("truncate", size, 0), ("write", 2 * BLOCK_SIZE, 100)]
    ops += [("truncate", 3 * BLOCK_SIZE + 17, 0), ("fsync", 0, 0), ("write", 3 * BLOCK_SIZE + 17, 9000)]
    return ops


class Run:
    def __init__(self, provider: Pkcs11Provider, backing: Path, path: Path, seed: int) -> None:
        self.provider, self.path, self.journal = provider, path, Journal(backing)
        self.rng = random.Random(seed)
        self.model = Model()
        self.cf: CryptFile | None = None

    def open(self) -> CryptFile:
        fd = os.open(self.path, os.O_RDWR)
        return open_cryptfile(fd, str(self.path), self.provider.unwrap, journal=self.journal)

    def create(self) -> None:
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        ref = self.provider.current("default")
        self.cf = create_cryptfile(fd, str(self.path), lambda dek: self.provider.wrap(ref, dek), self.journal)
        os.fsync(fd)  # the empty file exists for sure before the workload starts

    def step(self, op: str, a: int, b: int) -> None:
        m, cf = self.model, self.cf
        assert cf is not None
        if op == "write":
            data = _bytes(self.rng, b)
            m.touched.append((a, a + b))  # before the call: it may half happen
            cf.write(a, data)
            if a > len(m.content):
                m.content.extend(bytes(a - len(m.content)))
            m.content[a : a + b] = data
        elif op == "truncate":
            m.touched.append((a, max(a, len(m.content))))
            m.floor = a if m.floor is None else min(m.floor, a)
            cf.truncate(a)
            del m.content[a:]
            m.content.extend(bytes(a - len(m.content)))
        elif op == "fsync":
            snapshot = bytes(m.content)
            cf.fsync()
            m.durable, m.touched, m.floor = snapshot, [], None
        elif op == "reopen":
            cf.close()
            self.cf = self.open()

    def abandon(self) -> None:
        """The process died: its descriptors close, nothing is flushed."""
        cf = self.cf
        if cf is None:
            return
        for fd in (cf.fd, cf.journal._fd if cf.journal else -1):
            if fd >= 0:
                os.close(fd)
        self.cf = None


def check(run: Run, killed_only: bool, what: str) -> None:
    """Open the crashed file as the mount would and assert the crash promises."""
    m = run.model
    cf = run.open()
    try:
        size = cf.size
        nblocks = -(-size // BLOCK_SIZE)
        data, bad = bytearray(), []
        for blk in range(nblocks):
            try:
                data += cf.read(blk * BLOCK_SIZE, BLOCK_SIZE)
            except IntegrityError:
                bad.append(blk)
                data += bytes(min(BLOCK_SIZE, size - blk * BLOCK_SIZE))
    finally:
        cf.close()
    need = len(m.durable) if m.floor is None else min(len(m.durable), m.floor)
    assert size >= need, f"{what}: {size} bytes, {need} were fsynced"
    written = max([len(m.content), len(m.durable)] + [e for _, e in m.touched])
    assert size <= written, f"{what}: grew to {size}, only {written} bytes were written"
    for blk in bad:
        assert blk * BLOCK_SIZE >= need, f"{what}: block {blk} holds fsynced bytes and fails"
        if killed_only:
            assert blk == nblocks - 1, f"{what}: block {blk} of {nblocks} fails inside the file after kill -9"
    expect, got = bytearray(m.durable[:need]), bytearray(data[:need])
    for s, e in m.touched:
        got[s:e] = expect[s:e]
    assert got == expect, f"{what}: fsynced bytes differ"


@pytest.fixture
def provider(store: Path) -> Iterator[Pkcs11Provider]:
    p = open_provider(load_config(store), HostKeyOptions())
    yield p
    p.close()


def _run_until(provider: Pkcs11Provider, store: Path, disk: Disk, seed: int, mp: pytest.MonkeyPatch) -> Run | None:
    """Run the workload with ``disk`` intercepting; the Run if it crashed, None if it finished."""
    path = store / "files" / "rec.bin"
    (store / "journal").mkdir(exist_ok=True)  # so every run makes the same calls
    for p in (path, *(store / "journal").glob("*")):
        p.unlink(missing_ok=True)
    run = Run(provider, store, path, seed)
    run.create()
    with mp.context() as m:
        disk.install(m)
        try:
            for op in workload(random.Random(seed)):
                run.step(*op)
            assert run.cf is not None
            run.cf.close()
            return None
        except Crash:
            run.abandon()
            return run


@pytest.mark.parametrize("mode", ["kill", "power"])
def test_crash_at_every_write_keeps_fsynced_bytes(
    provider: Pkcs11Provider, store: Path, monkeypatch: pytest.MonkeyPatch, mode: str
) -> None:
    root = str(store)
    probe = Disk(root)
    assert _run_until(provider, store, probe, 7, monkeypatch) is None
    total = probe.calls
    assert total > 30, f"the workload made only {total} mutating calls"
    rng = random.Random(2026)
    restored = 0
    for point in range(total):
        disk = Disk(root, crash_at=point, cut_rng=random.Random(point))
        run = _run_until(provider, store, disk, 7, monkeypatch)
        assert run is not None, f"no crash at call {point}"
        restored += bool(run.journal.entries())
        if mode == "kill":
            check(run, killed_only=True, what=f"kill at call {point}")
            continue
        files = {p: (t.synced, set(t.sizes)) for p, t in disk.files.items()}
        snapshot = {p: Path(p).read_bytes() for p in files if os.path.exists(p)}
        pending = dict(disk.dir_pending)
        for sample in range(POWER_SAMPLES):
            for p, content in snapshot.items():  # back to the page-cache state of the crash
                Path(p).write_bytes(content)
            for p in files:
                if p not in snapshot and os.path.exists(p):
                    os.remove(p)
            disk.files = {p: Tracked(s, set(z)) for p, (s, z) in files.items()}
            disk.dir_pending = dict(pending)
            disk.lose_power(rng)
            if not os.path.exists(run.path) or os.path.getsize(run.path) < 4096:
                pytest.fail(f"power loss at call {point}: the backing file lost its header")
            check(run, killed_only=False, what=f"power loss at call {point} (sample {sample})")
    print(f"\n{mode}: {total} crash points, journal in use after {restored}")
    assert restored > 0, "no crash point left anything in the journal: the test exercises nothing"


def test_without_the_journal_a_torn_rewrite_loses_fsynced_bytes(
    provider: Pkcs11Provider, store: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The control: the same crash with the journal switched off does lose fsynced bytes."""
    root = str(store)
    monkeypatch.setattr(CryptFile, "_preserve", lambda self, blocks: [])
    probe = Disk(root)
    assert _run_until(provider, store, probe, 7, monkeypatch) is None
    failures = 0
    for point in range(probe.calls):
        run = _run_until(provider, store, Disk(root, crash_at=point, cut_rng=random.Random(point)), 7, monkeypatch)
        assert run is not None
        try:
            check(run, killed_only=True, what=f"kill at call {point}")
        except (AssertionError, IntegrityError) as exc:
            failures += 1
            assert "fsynced" in str(exc) or "inside the file" in str(exc) or isinstance(exc, IntegrityError)
    print(f"\nwithout the journal: {failures} of {probe.calls} crash points lose fsynced bytes")
    assert failures > 0, "without the journal no crash point lost data: the workload does not rewrite in place"
