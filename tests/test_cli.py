"""The CLI as a user meets it: help, and clear one-line errors (never a traceback) that change nothing."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest
from conftest import Mounted, run_vcfs


def _snapshot(root: Path) -> dict[str, tuple[int, int, bytes]]:
    out = {}
    for dirpath, _dirs, files in os.walk(root):
        for name in files:
            p = Path(dirpath, name)
            st = p.stat()
            out[str(p.relative_to(root))] = (st.st_size, st.st_mtime_ns, p.read_bytes())
    return out


def _fails(args: list[str], code: int, pattern: str) -> str:
    res = run_vcfs(*args, check=False)
    assert res.returncode == code, (res.returncode, res.stdout, res.stderr)
    assert "Traceback" not in res.stderr
    assert re.search(pattern, res.stderr), res.stderr
    assert res.stderr.startswith("vcfs: error: ")
    return res.stderr


@pytest.mark.parametrize("sub", [[], ["init"], ["mount"], ["umount"]])
def test_help(sub: list[str]) -> None:
    res = run_vcfs(*sub, "--help")
    assert "usage: vcfs" in res.stdout


def test_bad_arguments_exit_2() -> None:
    res = run_vcfs("mount", check=False)
    assert res.returncode == 2 and "Traceback" not in res.stderr


def test_init_refuses_non_empty_directory(vcfs_home: Path, tmp_path: Path) -> None:
    (tmp_path / "keep.txt").write_text("precious")
    _fails(["init", str(tmp_path)], 2, "not an empty directory")
    assert (tmp_path / "keep.txt").read_text() == "precious"
    assert not (tmp_path / "vcfs.conf").exists()


def test_mount_not_a_store(vcfs_home: Path, tmp_path: Path) -> None:
    (tmp_path / "mnt").mkdir()
    _fails(["mount", str(tmp_path), str(tmp_path / "mnt")], 3, "not a vcfs store")


@pytest.fixture
def filled(mounted: Mounted) -> Mounted:
    (mounted.mnt / "rec.bin").write_bytes(os.urandom(100_000))
    mounted.umount()
    return mounted


def test_corrupt_config_is_refused_and_nothing_written(filled: Mounted) -> None:
    conf = filled.backing / "vcfs.conf"
    conf.write_text(conf.read_text().replace("[keys]", "[keys"))
    before = _snapshot(filled.backing)
    _fails(["mount", str(filled.backing), str(filled.mnt)], 3, "corrupt")
    assert _snapshot(filled.backing) == before


def test_unknown_feature_is_refused(filled: Mounted) -> None:
    conf = filled.backing / "vcfs.conf"
    conf.write_text(conf.read_text().replace("[features]\n", "[features]\nzstd = true\n"))
    _fails(["mount", str(filled.backing), str(filled.mnt)], 3, "features this vcfs does not know: zstd")


def test_missing_token_is_a_clear_error(filled: Mounted, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VCFS_HOME", str(tmp_path / "elsewhere"))
    before = _snapshot(filled.backing)
    _fails(["mount", str(filled.backing), str(filled.mnt)], 4, "embedded SoftHSM2 token is missing")
    assert _snapshot(filled.backing) == before


def _keystore(vcfs_home: Path, backing: Path) -> Path:
    store_id = re.search(r'store_id = "([0-9a-f]+)"', (backing / "vcfs.conf").read_text())
    assert store_id is not None
    return vcfs_home / "keystores" / f"{store_id.group(1)}.toml"


def test_missing_keystore_is_a_clear_error(filled: Mounted, vcfs_home: Path) -> None:
    ks = _keystore(vcfs_home, filled.backing)
    saved = ks.read_text()
    ks.unlink()
    try:
        _fails(["mount", str(filled.backing), str(filled.mnt)], 4, "keystore .* has no keys for domain 'default'")
    finally:
        ks.write_text(saved)


def test_wrong_kek_is_a_clear_error(filled: Mounted, vcfs_home: Path) -> None:
    """Put KEK v2's wrapped copy in v1's place (same master key): refused at mount by the check value."""
    run_vcfs("keys", "rotate", str(filled.backing), "default")
    conf = filled.backing / "vcfs.conf"
    conf.write_text(conf.read_text().replace("current = 2", "current = 1"))
    ks = _keystore(vcfs_home, filled.backing)
    blobs = re.findall(r'blob = "([0-9a-f]+)"', ks.read_text())
    assert len(blobs) == 2
    ks.write_text(ks.read_text().replace(blobs[0], "X").replace(blobs[1], blobs[0]).replace("X", blobs[1]))
    before = _snapshot(filled.backing)
    _fails(["mount", str(filled.backing), str(filled.mnt)], 4, "not the key this store was created with")
    assert _snapshot(filled.backing) == before


def test_modified_keystore_blob_is_a_clear_error(filled: Mounted, vcfs_home: Path) -> None:
    ks = _keystore(vcfs_home, filled.backing)
    blob = re.search(r'blob = "([0-9a-f]+)"', ks.read_text())
    assert blob is not None
    flipped = ("0" if blob.group(1)[0] != "0" else "1") + blob.group(1)[1:]
    ks.write_text(ks.read_text().replace(blob.group(1), flipped))
    _fails(["mount", str(filled.backing), str(filled.mnt)], 4, "does not unwrap under its master key")


def test_busy_mount_point(mounted: Mounted, tmp_path: Path) -> None:
    _fails(["mount", str(mounted.backing), str(mounted.mnt)], 5, "already a mount point")


def test_mount_point_missing(store: Path, tmp_path: Path) -> None:
    _fails(["mount", str(store), str(tmp_path / "nope")], 5, "not a directory")


def test_umount_of_something_else(vcfs_home: Path, tmp_path: Path) -> None:
    _fails(["umount", str(tmp_path)], 2, "not a vcfs mount")


def test_umount_busy_names_the_cause(mounted: Mounted) -> None:
    with open(mounted.mnt / "open.txt", "w"):
        _fails(["umount", str(mounted.mnt)], 5, "could not unmount")


def test_second_mount_of_one_store_is_refused(mounted: Mounted, tmp_path: Path) -> None:
    other = tmp_path / "mnt2"
    other.mkdir()
    _fails(["mount", str(mounted.backing), str(other)], 5, "already mounted by another vcfs daemon")
