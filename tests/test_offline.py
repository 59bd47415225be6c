"""fsck, export and decrypt on real stores written through a real mount, run as a user would."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from conftest import Mounted, run_vcfs

from vcfs.core.layout import BLOCK_SIZE, block_no_to_cipher_off

pytestmark = pytest.mark.mount
BIG = os.urandom(5 * BLOCK_SIZE + 1234)


@pytest.fixture
def filled(mounted: Mounted) -> Mounted:
    m = mounted.mnt
    (m / "rec").mkdir()
    (m / "rec" / "big.mp4").write_bytes(BIG)
    (m / "rec" / "empty").write_bytes(b"")
    (m / "note.txt").write_text("hello")
    os.chmod(m / "note.txt", 0o640)
    os.utime(m / "note.txt", ns=(1_700_000_000_000_000_000, 1_700_000_000_000_000_000))
    os.symlink("rec/big.mp4", m / "latest")
    mounted.umount()
    return mounted


def _fsck(m: Mounted, *extra: str) -> tuple[int, dict]:  # type: ignore[type-arg]
    res = run_vcfs("fsck", str(m.backing), "--json", *extra, check=False)
    assert "Traceback" not in res.stderr
    return res.returncode, json.loads(res.stdout)


def test_fsck_clean_store(filled: Mounted) -> None:
    code, report = _fsck(filled)
    assert code == 0 and report["problems"] == [] and report["files"] == 3
    assert report["bytes"] == len(BIG) + 5


@pytest.mark.parametrize("cut", ["torn", "boundary"])
def test_fsck_repairs_a_cut_tail(filled: Mounted, cut: str) -> None:
    backing = filled.backing_of("rec/big.mp4")
    end = block_no_to_cipher_off(3) + (777 if cut == "torn" else 0)
    os.truncate(backing, end)
    code, report = _fsck(filled)
    assert code == 2 and [p["kind"] for p in report["problems"]] == ["tail"]
    code, report = _fsck(filled, "--repair")
    assert code == 1 and report["problems"][0]["repaired"]
    assert (filled.backing / report["problems"][0]["quarantined"]).exists()
    assert _fsck(filled)[0] == 0
    filled.mount()
    # Blocks 0..2 are whole and authentic: the file now ends after them.
    assert (filled.mnt / "rec" / "big.mp4").read_bytes() == BIG[: 3 * BLOCK_SIZE]


def test_fsck_reports_inner_damage_and_does_not_drop_data(filled: Mounted) -> None:
    backing = filled.backing_of("rec/big.mp4")
    raw = bytearray(backing.read_bytes())
    raw[block_no_to_cipher_off(2) + 50] ^= 0x80
    backing.write_bytes(raw)
    code, report = _fsck(filled, "--repair")
    assert code == 2
    assert [(p["kind"], p["block"], p["repaired"]) for p in report["problems"]] == [("block", 2, False)]
    assert backing.stat().st_size == len(raw)


def test_fsck_repair_refused_while_mounted(mounted: Mounted) -> None:
    res = run_vcfs("fsck", str(mounted.backing), "--repair", check=False)
    assert res.returncode == 5 and "already mounted" in res.stderr


def test_fsck_check_works_while_mounted(mounted: Mounted) -> None:
    (mounted.mnt / "live.bin").write_bytes(b"z" * 100_000)
    assert _fsck(mounted)[0] == 0


def test_export_round_trips_the_tree(filled: Mounted, tmp_path: Path) -> None:
    dest = tmp_path / "restore"
    res = run_vcfs("export", str(filled.backing), str(dest), "--json")
    assert json.loads(res.stdout)["files"] == 3
    assert (dest / "rec" / "big.mp4").read_bytes() == BIG
    assert (dest / "rec" / "empty").read_bytes() == b""
    assert os.readlink(dest / "latest") == "rec/big.mp4"
    st = (dest / "note.txt").stat()
    assert (st.st_mode & 0o777, st.st_mtime_ns) == (0o640, 1_700_000_000_000_000_000)


def test_export_subpath_and_damaged_file(filled: Mounted, tmp_path: Path) -> None:
    backing = filled.backing_of("rec/big.mp4")
    raw = bytearray(backing.read_bytes())
    raw[block_no_to_cipher_off(4) + 9] ^= 1
    backing.write_bytes(raw)
    dest = tmp_path / "out"
    res = run_vcfs("export", str(filled.backing), "rec", str(dest), check=False)
    assert res.returncode == 2
    assert not (dest / "big.mp4").exists()
    assert (dest / "big.mp4.vcfs-partial").read_bytes() == BIG[: 4 * BLOCK_SIZE]
    assert (dest / "empty").exists()


def test_decrypt_one_file(filled: Mounted, tmp_path: Path) -> None:
    out = tmp_path / "one.mp4"
    run_vcfs("decrypt", str(filled.backing_of("rec/big.mp4")), str(out))
    assert out.read_bytes() == BIG
    res = run_vcfs("decrypt", str(filled.backing_of("note.txt")), "-")
    assert res.stdout == "hello"
    res = run_vcfs("decrypt", str(filled.backing_of("note.txt")), str(out), check=False)
    assert res.returncode == 2 and "refusing to overwrite" in res.stderr
