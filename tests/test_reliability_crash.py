"""Crash safety: kill -9 of the daemon during concurrent writes never loses fsynced data.

One long test (docs/RELIABILITY.md, "Crash"): several writer threads append to and rewrite
their files through a real mount, fsync now and then, and the daemon is killed with SIGKILL
at a seeded random moment, over and over. The test process records, per file, the content as
of the last fsync that *returned* (``durable``) and every range written since (``pending``).
After each kill: lazy-unmount the dead mount, remount, and check

- every file opens, the untouched control files read back exactly, the journal is empty
  (the mount applied it before serving);
- no block that holds an fsynced byte fails, and every fsynced byte that no later write
  touched reads back exactly; the file is at least as long as it was at the last fsync;
- only the file's last block may fail (a write of unsynced bytes that the kill cut short);
  then a live fsck reports it as a ``tail``, and ``vcfs fsck --repair`` cuts it so the file
  reads cleanly again with all its fsynced bytes.

VCFS_CRASH_KILLS and VCFS_CRASH_SEED override the number of kills (default 50) and the seed.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import random
import signal
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from conftest import Mounted, force_unmount, is_mounted, run_vcfs

from vcfs.core.layout import BLOCK_SIZE
from vcfs.runpaths import mount_key

pytestmark = [pytest.mark.mount, pytest.mark.slow]

KILLS = int(os.environ.get("VCFS_CRASH_KILLS", "50"))
SEED = int(os.environ.get("VCFS_CRASH_SEED", "20261128"))
WRITERS = 3
MAX_SIZE = 3 * 1024 * 1024
CONTROL = {"control-a.bin": random.Random(1).randbytes(5 * BLOCK_SIZE + 77), "control-b.bin": b"small file\n"}


@dataclass
class Model:
    """What the test process knows about one file."""

    content: bytearray = field(default_factory=bytearray)  # as the writer wrote it
    durable: bytes = b""  # content when the last fsync returned
    pending: list[tuple[int, int]] = field(default_factory=list)  # (start, end) written since
    created: bool = True  # False while a create has not returned

    def touched(self, start: int, end: int) -> bool:
        return any(s < end and start < e for s, e in self.pending)


class Writer(threading.Thread):
    """Appends, rewrites and fsyncs one file until the mount dies under it."""

    def __init__(self, path: Path, model: Model, seed: int) -> None:
        super().__init__(daemon=True)
        self.path, self.model, self.rng = path, model, random.Random(seed)
        self.error: BaseException | None = None
        self.fsyncs = 0

    def run(self) -> None:
        m, rng = self.model, self.rng
        try:
            if not m.created:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)
                m.created = True
            else:
                fd = os.open(self.path, os.O_RDWR)
        except OSError as exc:
            if exc.errno not in (errno.ENOTCONN, errno.ECONNABORTED):
                self.error = exc
            return
        try:
            while True:
                op = rng.random()
                size = len(m.content)
                if op < 0.15:
                    snapshot = bytes(m.content)
                    (os.fdatasync if rng.random() < 0.5 else os.fsync)(fd)
                    m.durable, m.pending = snapshot, []  # counted only once fsync returned
                    self.fsyncs += 1
                    continue
                if op < 0.7 and size < MAX_SIZE:
                    off, data = size, rng.randbytes(rng.randint(1, 3 * BLOCK_SIZE))
                else:
                    if size == 0:
                        continue
                    off = rng.randrange(size)
                    data = rng.randbytes(min(rng.randint(1, 2 * BLOCK_SIZE), size - off))
                m.pending.append((off, off + len(data)))  # before the call: it may half happen
                os.pwrite(fd, data, off)
                m.content[off : off + len(data)] = data
        except OSError as exc:
            if exc.errno not in (errno.ENOTCONN, errno.ECONNABORTED, errno.EIO):
                self.error = exc
        finally:
            with contextlib.suppress(OSError):
                os.close(fd)


def _daemon_pid(vcfs_home: Path, mnt: Path) -> int:
    return int((vcfs_home / "run" / f"{mount_key(mnt)}.pid").read_text())


def _kill_and_wait(pid: int) -> None:
    os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            with open(f"/proc/{pid}/stat") as f:
                if f.read().rsplit(")", 1)[-1].split()[0] in ("Z", "X"):
                    return
        except OSError:
            return
        time.sleep(0.01)
    raise AssertionError(f"daemon {pid} survived SIGKILL")


def _read_blocks(path: Path) -> tuple[bytes, list[int], int]:
    """(content with failed blocks zero-filled, numbers of blocks that gave EIO, st_size)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        size = os.fstat(fd).st_size
        parts, bad = [], []
        for b in range(-(-size // BLOCK_SIZE)):
            try:
                parts.append(os.pread(fd, BLOCK_SIZE, b * BLOCK_SIZE))
            except OSError as exc:
                assert exc.errno == errno.EIO, f"{path.name} block {b}: {exc}"
                bad.append(b)
                parts.append(bytes(min(BLOCK_SIZE, size - b * BLOCK_SIZE)))
        return b"".join(parts), bad, size
    finally:
        os.close(fd)


def _fsck(backing: Path, *extra: str) -> tuple[int, dict[str, object]]:
    res = run_vcfs("fsck", str(backing), "--json", *extra, check=False)
    assert res.returncode in (0, 1, 2), res.stderr
    return res.returncode, json.loads(res.stdout)


def _check_file(name: str, m: Model, data: bytes, bad: list[int], size: int) -> None:
    """Assert the crash promises for one file (strict: no fsynced byte may be lost)."""
    nblocks = -(-size // BLOCK_SIZE)
    for b in bad:
        assert b * BLOCK_SIZE >= len(m.durable), f"{name}: block {b} holds fsynced bytes and fails"
        assert b == nblocks - 1, f"{name}: block {b} of {nblocks} fails inside the file"
    assert size >= len(m.durable), f"{name}: {size} bytes after the crash, {len(m.durable)} were fsynced"
    assert size <= max(len(m.content), len(m.durable)), f"{name}: grew to {size}, only {len(m.content)} written"
    # Bytes a write since the last fsync touched may hold the old or a new value (both authentic).
    expect = bytearray(m.durable)
    got = bytearray(data[: len(m.durable)])
    for s, e in m.pending:
        got[s:e] = expect[s:e]
    assert got == expect, f"{name}: fsynced bytes differ after the crash"


def test_kill_9_during_concurrent_writes_keeps_fsynced_data(mounted: Mounted, vcfs_home: Path, tmp_path: Path) -> None:
    mnt, rng = mounted.mnt, random.Random(SEED)
    for name, data in CONTROL.items():
        with open(mnt / name, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
    models = {f"rec-{i}.bin": Model() for i in range(WRITERS)}
    for name in models:
        (mnt / name).touch()
    segments = 0
    events: list[str] = []
    stats = {"kills": 0, "fsyncs": 0, "torn_tail": 0, "lost_creates": 0, "restored": 0}
    journal = mounted.backing / "journal"
    log = vcfs_home / "logs" / (os.path.realpath(mnt).strip("/").replace("/", "-") + ".log")
    for it in range(KILLS):
        # A recorder-like segment file: created inside the crash window, like a new recording.
        seg = f"seg-{segments}.bin"
        segments += 1
        models[seg] = Model(created=False)
        pid = _daemon_pid(vcfs_home, mnt)
        writers = [Writer(mnt / n, models[n], rng.randrange(2**32)) for n in (*list(models)[:WRITERS], seg)]
        for w in writers:
            w.start()
        time.sleep(rng.uniform(0.02, 0.5))
        _kill_and_wait(pid)
        stats["kills"] += 1
        for w in writers:
            w.join(timeout=60)
            assert not w.is_alive(), "a writer hangs on the dead mount"
            assert w.error is None, f"iteration {it}: writer failed with {w.error!r}"
            stats["fsyncs"] += w.fsyncs
        force_unmount(mnt)
        assert not is_mounted(mnt)
        mounted.mount()  # the store lock died with the daemon

        for name, data in CONTROL.items():
            assert (mnt / name).read_bytes() == data, f"iteration {it}: untouched {name} changed"
        assert not journal.exists() or not any(journal.iterdir()), f"iteration {it}: journal left after mount"
        repair = []
        for name, m in list(models.items()):
            path = mnt / name
            if not m.created:
                # Killed before its create returned: missing, or a 0-byte backing file if killed
                # between the O_EXCL create and the header write (FORMAT.md, "New files").
                backing = mounted.backing_if_exists(name)
                if backing is not None:
                    if os.path.getsize(backing) < 4096:
                        stats["lost_creates"] += 1
                    path.unlink()
                del models[name]
                continue
            data, bad, size = _read_blocks(path)  # every created file opens
            _check_file(f"iteration {it}: {name}", m, data, bad, size)
            if bad:
                stats["torn_tail"] += 1
                events.append(f"iteration {it}: {name} last block {bad} fails ({len(m.durable)} bytes fsynced)")
                repair.append((name, len(m.durable)))
            models[name] = Model(bytearray(data), data)
        if repair:
            # A live fsck sees the damage; repair needs the store unmounted.
            code, report = _fsck(mounted.backing)
            assert code == 2, report
            problems = report["problems"]
            assert isinstance(problems, list)
            for name, _ in repair:
                kinds = {p["kind"] for p in problems if p["path"] == name}
                assert kinds == {"tail"}, (name, problems)
            mounted.umount()
            code, report = _fsck(mounted.backing, "--repair")
            assert code == 1, report
            mounted.mount()
            for name, durable in repair:
                data, bad, size = _read_blocks(mnt / name)
                assert not bad, f"{name} still damaged after fsck --repair"
                # Cut after the last authentic block (an authentic inner-sealed end is kept).
                assert size >= durable and data[:durable] == models[name].durable[:durable]
                models[name] = Model(bytearray(data), data)
        # Keep the store small: old segments have been checked once.
        for name in [n for n in models if n.startswith("seg-")][:-3]:
            (mnt / name).unlink()
            del models[name]

    mounted.umount()
    code, report = _fsck(mounted.backing)
    assert code == 0, report
    stats["restored"] = log.read_text().count("restored its last synced version")
    print(f"\ncrash test (seed {SEED}): {stats} {events}")
    assert stats["kills"] >= KILLS and stats["fsyncs"] > KILLS  # the workload really synced
