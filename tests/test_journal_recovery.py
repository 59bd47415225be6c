"""A store a crash left with a torn block and its journal: fsck, export, decrypt and mount.

The crash is made in this process: a recording was fsynced through a real mount, then the
engine (real keys, real journal) appends to it and dies in the middle of rewriting its
partial last block in place (the write is cut at a page boundary, as SIGKILL cuts it; the
cut is the only thing simulated). Then the real CLI runs on the store as a user would, and a
real mount serves it.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import Mounted, run_vcfs

from vcfs.config import load_config
from vcfs.core.layout import BLOCK_SIZE
from vcfs.cryptfile import open_cryptfile
from vcfs.errors import IntegrityError
from vcfs.journal import Journal
from vcfs.keys.setup import HostKeyOptions, open_provider

pytestmark = pytest.mark.mount
FSYNCED = os.urandom(2 * BLOCK_SIZE + 5000)  # ends in a partial block: the next append rewrites it


class Killed(BaseException):
    pass


def _crash_while_appending(m: Mounted, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Leave rec.bin with its last block torn and its fsynced version in the journal."""
    with open(m.mnt / "rec.bin", "wb") as f:
        f.write(FSYNCED)
        os.fsync(f.fileno())
    (m.mnt / "other.bin").write_bytes(b"unrelated")
    m.umount()
    path = m.backing_of("rec.bin")
    provider = open_provider(load_config(m.backing), HostKeyOptions())
    real = os.pwritev
    try:
        cf = open_cryptfile(os.open(path, os.O_RDWR), str(path), provider.unwrap, journal=Journal(m.backing))

        def cut(fd: int, buffers: list[bytes], offset: int) -> int:
            if fd == cf.fd:
                os.pwrite(fd, b"".join(buffers)[:8192], offset)  # two pages, then SIGKILL
                raise Killed
            return real(fd, buffers, offset)

        monkeypatch.setattr(os, "pwritev", cut)
        cf.write(len(FSYNCED), os.urandom(3 * BLOCK_SIZE))
        with pytest.raises(Killed):
            cf.fsync()
    finally:
        monkeypatch.setattr(os, "pwritev", real)
        provider.close()
    os.close(cf.fd)  # the process died: nothing else is flushed or closed
    os.close(cf.journal._fd)  # type: ignore[union-attr]
    assert len(list((m.backing / "journal").iterdir())) == 1
    return path


@pytest.fixture
def crashed(mounted: Mounted, monkeypatch: pytest.MonkeyPatch) -> Iterator[Mounted]:
    _crash_while_appending(mounted, monkeypatch)
    yield mounted


def test_the_crash_really_tore_fsynced_bytes(crashed: Mounted, vcfs_home: Path) -> None:
    """Without the journal the torn block is lost: what the journal is for."""
    path = crashed.backing_of("rec.bin")
    provider = open_provider(load_config(crashed.backing), HostKeyOptions())
    try:
        cf = open_cryptfile(os.open(path, os.O_RDONLY), str(path), provider.unwrap)  # no journal
        with pytest.raises(IntegrityError):
            cf.read(2 * BLOCK_SIZE, BLOCK_SIZE)
        cf.close()
    finally:
        provider.close()


def test_fsck_reports_then_repairs_from_the_journal(crashed: Mounted) -> None:
    res = run_vcfs("fsck", str(crashed.backing), "--json", check=False)
    report = json.loads(res.stdout)
    assert res.returncode == 2, report
    assert [(p["path"], p["kind"], p["block"], p["repaired"]) for p in report["problems"]] == [
        ("rec.bin", "journal", 2, False)
    ]
    res = run_vcfs("fsck", str(crashed.backing), "--repair", "--json", check=False)
    report = json.loads(res.stdout)
    assert res.returncode == 1 and report["problems"][0]["repaired"], report
    assert not list((crashed.backing / "journal").iterdir())
    assert run_vcfs("fsck", str(crashed.backing), check=False).returncode == 0
    crashed.mount()
    assert (crashed.mnt / "rec.bin").read_bytes() == FSYNCED


def test_export_and_decrypt_of_the_crashed_store_use_the_journal(crashed: Mounted, tmp_path: Path) -> None:
    """Offline restore (e.g. of a backup taken right after the crash) sees every fsynced byte,
    without writing to the store."""
    before = {p.name: p.read_bytes() for p in (crashed.backing / "journal").iterdir()}
    dest = tmp_path / "restore"
    res = run_vcfs("export", str(crashed.backing), str(dest), "--json")
    assert json.loads(res.stdout)["problems"] == []
    assert (dest / "rec.bin").read_bytes() == FSYNCED
    assert (dest / "other.bin").read_bytes() == b"unrelated"
    run_vcfs("decrypt", str(crashed.backing_of("rec.bin")), str(tmp_path / "one.bin"))
    assert (tmp_path / "one.bin").read_bytes() == FSYNCED
    assert {p.name: p.read_bytes() for p in (crashed.backing / "journal").iterdir()} == before  # untouched


def test_mount_applies_the_journal_before_serving(crashed: Mounted, vcfs_home: Path) -> None:
    crashed.mount()
    assert not list((crashed.backing / "journal").iterdir())
    assert os.stat(crashed.mnt / "rec.bin").st_size == len(FSYNCED)  # right at once, before any open
    assert (crashed.mnt / "rec.bin").read_bytes() == FSYNCED
    logs = "".join(p.read_text() for p in (vcfs_home / "logs").glob("*.log"))
    assert any("/rec.bin" in line and "block 2 was torn by a crash; restored" in line for line in logs.splitlines())
    crashed.umount()
    assert run_vcfs("fsck", str(crashed.backing), check=False).returncode == 0


def test_orphan_journal_is_counted_and_removed_by_repair(crashed: Mounted) -> None:
    os.unlink(crashed.backing_of("rec.bin"))  # the file was deleted before the crash was recovered
    report = json.loads(run_vcfs("fsck", str(crashed.backing), "--json").stdout)
    assert report["orphan_journals"] == 1 and report["problems"] == []
    report = json.loads(run_vcfs("fsck", str(crashed.backing), "--repair", "--json").stdout)
    assert not list((crashed.backing / "journal").iterdir())
