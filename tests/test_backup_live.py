"""Backups taken while recorders write: cp -a, tar and rsync of a live backing store.

Recorder threads append to their files through a real mount and fsync now and then, and a
segmenter creates new files, while the backing directory is copied with each tool. A copy
taken mid-write may hold, per file, a tail block caught in the middle of its rewrite, a
partial last block, a file created a moment ago with no header yet, a header slot being
rewritten, or a journal in any state. Each copy is then restored with the real CLI (export,
fsck --repair + decrypt) and by mounting it, and compared with what the writers wrote:

- a restored file is always an exact prefix of what was written (never a wrong byte);
- it reaches at least up to the last block that was complete and no longer being rewritten
  when the copy started (everything fsynced before it, but the last one or two blocks);
- a file restored only in part is never written under its real name.

A second test does the same inside one process with a tiny seal reservation step, so the
header's two slots are rewritten all the time while the copies are taken.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from conftest import Mounted, force_unmount, is_mounted, run_vcfs

from vcfs import cryptfile
from vcfs.config import load_config
from vcfs.core.layout import BLOCK_SIZE
from vcfs.cryptfile import create_cryptfile, open_cryptfile
from vcfs.errors import IntegrityError
from vcfs.journal import Journal
from vcfs.keys.provider import Pkcs11Provider
from vcfs.keys.setup import HostKeyOptions, open_provider

pytestmark = [pytest.mark.mount, pytest.mark.slow]
WRITERS = 3
RATE = 3_000_000  # bytes per second per recorder


@dataclass
class Recording:
    content: bytearray = field(default_factory=bytearray)
    durable: int = 0  # bytes fsynced
    lock: threading.Lock = field(default_factory=threading.Lock)

    def view(self) -> tuple[bytes, int]:
        with self.lock:
            return bytes(self.content), self.durable


def _record(path: Path, rec: Recording, stop: threading.Event, seed: int) -> None:
    rng = random.Random(seed)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    start, since_sync = time.monotonic(), 0
    try:
        while not stop.is_set():
            if len(rec.content) > RATE * (time.monotonic() - start):
                time.sleep(0.005)
                continue
            data = rng.randbytes(rng.randint(4096, 65536))
            os.write(fd, data)
            with rec.lock:
                rec.content += data
            since_sync += len(data)
            if since_sync > 120_000:
                os.fdatasync(fd)
                since_sync = 0
                with rec.lock:
                    rec.durable = len(rec.content)
    finally:
        os.close(fd)


def _segments(mnt: Path, stop: threading.Event, made: dict[str, bytes]) -> None:
    i = 0
    while not stop.is_set():
        data = os.urandom(100_000 + i)
        with open(mnt / f"seg-{i}.bin", "wb") as f:
            f.write(data)
        made[f"seg-{i}.bin"] = data
        i += 1
        time.sleep(0.05)


def _copy(tool: str, src: Path, dest: Path, tmp: Path) -> None:
    if tool == "cp":
        res = subprocess.run(["cp", "-a", str(src), str(dest)], capture_output=True, text=True)
        assert res.returncode == 0, res.stderr
    elif tool == "tar":
        archive = tmp / "backup.tar"
        res = subprocess.run(["tar", "-C", str(src), "-cf", str(archive), "."], capture_output=True, text=True)
        assert res.returncode in (0, 1), res.stderr  # 1: "file changed as we read it"
        dest.mkdir()
        subprocess.run(["tar", "-C", str(dest), "-xf", str(archive)], check=True)
    else:
        res = subprocess.run(["rsync", "-a", f"{src}/", f"{dest}/"], capture_output=True, text=True)
        assert res.returncode in (0, 24), res.stderr  # 24: a file vanished (none should)


def _floor(durable: int) -> int:
    """Bytes a copy must hold: whole blocks that were no longer rewritten when it started (the
    partial last block grows in place, and a full last block is resealed inner once passed)."""
    return max(0, durable // BLOCK_SIZE - 1) * BLOCK_SIZE


def _restored(dest: Path, name: str) -> tuple[bytes | None, bool]:
    """(content, complete?) of one file in an export."""
    if (dest / name).exists():
        assert not (dest / f"{name}.vcfs-partial").exists()
        return (dest / name).read_bytes(), True
    partial = dest / f"{name}.vcfs-partial"
    return (partial.read_bytes() if partial.exists() else None), False


@pytest.fixture
def live(mounted: Mounted) -> Iterator[tuple[Mounted, dict[str, Recording], dict[str, bytes], threading.Event]]:
    stop = threading.Event()
    recs = {f"rec-{i}.bin": Recording() for i in range(WRITERS)}
    segs: dict[str, bytes] = {}
    threads = [
        threading.Thread(target=_record, args=(mounted.mnt / n, r, stop, i)) for i, (n, r) in enumerate(recs.items())
    ]
    threads.append(threading.Thread(target=_segments, args=(mounted.mnt, stop, segs)))
    for t in threads:
        t.start()
    try:
        yield mounted, recs, segs, stop
    finally:
        stop.set()
        for t in threads:
            t.join(timeout=30)


def test_cp_tar_rsync_of_a_live_store_restore_to_what_was_written(
    live: tuple[Mounted, dict[str, Recording], dict[str, bytes], threading.Event], tmp_path: Path
) -> None:
    m, recs, segs, stop = live
    time.sleep(0.6)  # every recording has fsynced blocks before the first copy
    floors: dict[str, dict[str, int]] = {}
    for tool in ("cp", "tar", "rsync"):
        floors[tool] = {n: _floor(r.view()[1]) for n, r in recs.items()}
        _copy(tool, m.backing, tmp_path / f"copy-{tool}", tmp_path)
        time.sleep(0.2)
    stop.set()
    time.sleep(0.3)
    written = {n: r.view()[0] for n, r in recs.items()}
    assert all(len(w) > 3 * BLOCK_SIZE for w in written.values())

    for tool in ("cp", "tar", "rsync"):
        copy, dest = tmp_path / f"copy-{tool}", tmp_path / f"restore-{tool}"
        res = run_vcfs("export", str(copy), str(dest), "--json", check=False)
        assert res.returncode in (0, 2) and "Traceback" not in res.stderr, res.stderr
        report = json.loads(res.stdout)
        for name, data in written.items():
            got, _complete = _restored(dest, name)
            assert got is not None, f"{tool}: {name} missing from the restore: {report['problems']}"
            assert got == data[: len(got)], f"{tool}: {name} is not a prefix of what was written"
            assert len(got) >= floors[tool][name], f"{tool}: {name} restored {len(got)} of {floors[tool][name]}"
        for name, data in segs.items():
            got, _complete = _restored(dest, name)
            if got is not None:  # a segment created during the copy may be missing or headerless
                assert got == data[: len(got)], f"{tool}: {name} is not a prefix of what was written"
        for p in report["problems"]:  # only the files being written may be torn in a copy
            assert p["path"].startswith(("/rec-", "/seg-")), p
        print(f"\n{tool}: {report['files']} files restored whole, damaged: {[p['path'] for p in report['problems']]}")

    # A copy repaired for good: fsck --repair cuts torn tails, then every file decrypts whole.
    copy = tmp_path / "copy-rsync"
    res = run_vcfs("fsck", str(copy), "--repair", "--json", check=False)
    assert res.returncode in (0, 1, 2), res.stderr
    for name, data in written.items():
        out = tmp_path / f"{name}.decrypted"
        run_vcfs("decrypt", str(copy / "files" / m.backing_of(name).relative_to(m.tree)), str(out))
        got = out.read_bytes()
        assert got == data[: len(got)] and len(got) >= floors["rsync"][name]

    # A copy mounted as a store: the mount applies the copied journal, the files read back.
    mnt2 = tmp_path / "mnt-copy"
    mnt2.mkdir()
    run_vcfs("mount", str(tmp_path / "copy-cp"), str(mnt2))
    try:
        for name, data in written.items():
            with open(mnt2 / name, "rb") as f:
                try:
                    got = f.read()
                except OSError:
                    got = b""
                    for off in range(0, os.fstat(f.fileno()).st_size, BLOCK_SIZE):
                        try:
                            got += os.pread(f.fileno(), BLOCK_SIZE, off)
                        except OSError:
                            break  # a torn tail of the copy: EIO from here on
            assert got == data[: len(got)] and len(got) >= floors["cp"][name], name
    finally:
        run_vcfs("umount", str(mnt2), check=False)
        if is_mounted(mnt2):
            force_unmount(mnt2)


@pytest.fixture
def provider(store: Path) -> Iterator[Pkcs11Provider]:
    p = open_provider(load_config(store), HostKeyOptions())
    yield p
    p.close()


def test_copies_taken_while_header_slots_are_rewritten(
    provider: Pkcs11Provider, store: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Byte copies of a file taken while its seal reservation (the A/B header slots) changes at
    every few blocks: each copy opens through one of its slots and decrypts to a prefix."""
    monkeypatch.setattr(cryptfile, "SEAL_RESERVE_STEP", 3)
    path = store / "files" / "busy.bin"
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
    ref = provider.current("default")
    cf = create_cryptfile(fd, str(path), lambda dek: provider.wrap(ref, dek), Journal(store))
    written = bytearray()
    done = threading.Event()

    def write() -> None:
        rng = random.Random(5)
        try:
            while len(written) < 6_000_000:
                data = rng.randbytes(rng.randint(1000, 3 * BLOCK_SIZE))
                cf.write(len(written), data)
                written.extend(data)
                if rng.random() < 0.3:
                    cf.fsync()
        finally:
            done.set()

    t = threading.Thread(target=write)
    t.start()
    copies = []
    while not done.is_set():
        copy = tmp_path / f"copy-{len(copies)}"
        shutil.copyfile(path, copy)
        copies.append(copy)
    t.join()
    generations, torn = set(), 0
    for copy in copies:
        data = copy.read_bytes()
        generations.add(data[64:72])
        c = open_cryptfile(os.open(copy, os.O_RDONLY), str(copy), provider.unwrap)
        try:
            got = b""
            for off in range(0, c.size, BLOCK_SIZE):
                try:
                    got += c.read(off, BLOCK_SIZE)
                except IntegrityError:
                    torn += 1
                    break
            assert got == bytes(written[: len(got)]), copy.name
        finally:
            c.close()
    cf.close()
    print(f"\n{len(copies)} copies, {len(generations)} slot generations seen, {torn} with a torn end")
    assert len(copies) >= 5 and len(generations) >= 3, (len(copies), len(generations))
