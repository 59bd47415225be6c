"""vcfs shred: a file or tree crypto-shredded in the live store; what it does not reach (backups)."""

from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path

import pytest
from conftest import Mounted, run_vcfs

from vcfs.core.header import SLOT_LEN, slot_offset

pytestmark = pytest.mark.mount


def test_shred_a_file_in_the_mount(mounted: Mounted, tmp_path: Path) -> None:
    secret = os.urandom(150_000)
    (mounted.mnt / "leak.mp4").write_bytes(secret)
    (mounted.mnt / "keep.mp4").write_bytes(b"keep")
    time.sleep(0.2)  # the write's release reaches the daemon asynchronously
    leak_backing = mounted.backing_of("leak.mp4")
    before = leak_backing.read_bytes()
    backup = tmp_path / "backup"
    subprocess.run(["cp", "-a", str(mounted.backing), str(backup)], check=True)
    with open(mounted.mnt / "leak.mp4", "rb"):
        res = run_vcfs("shred", str(mounted.mnt / "leak.mp4"), "--json", check=False)
        assert res.returncode == 1 and json.loads(res.stdout)["busy"] == [str(mounted.mnt / "leak.mp4")]
    time.sleep(0.2)
    # Keep the shredded backing file's inode reachable to look at its bytes after the unlink.
    os.link(mounted.backing_of("leak.mp4"), tmp_path / "inode")
    res = run_vcfs("shred", str(mounted.mnt / "leak.mp4"), "--json")
    assert json.loads(res.stdout)["shredded"] == [str(mounted.mnt / "leak.mp4")]
    assert not (mounted.mnt / "leak.mp4").exists() and mounted.backing_if_exists("leak.mp4") is None
    after = (tmp_path / "inode").read_bytes()
    for i in range(2):  # both key slots overwritten; the blocks are left, but without any key
        assert after[slot_offset(i) : slot_offset(i) + SLOT_LEN] != before[slot_offset(i) : slot_offset(i) + SLOT_LEN]
    res = run_vcfs("decrypt", str(tmp_path / "inode"), str(tmp_path / "out"), check=False)
    assert res.returncode != 0 and "Traceback" not in res.stderr
    assert (mounted.mnt / "keep.mp4").read_bytes() == b"keep"
    # What shred does not reach, as docs/KEYS.md says: a copy taken before still decrypts.
    run_vcfs("decrypt", str(backup / "files" / leak_backing.relative_to(mounted.tree)), str(tmp_path / "from-backup"))
    assert (tmp_path / "from-backup").read_bytes() == secret


def test_shred_a_tree_in_the_backing_store(store: Path) -> None:
    tree = store / "files"
    (tree / "cam1" / "day1").mkdir(parents=True)
    mounted_file = tree / "cam1" / "day1" / "a.ts"
    mounted_file.write_bytes(b"not even a vcfs file")  # shred needs no key and no valid header
    (tree / "cam1" / "link").symlink_to("day1/a.ts")
    (tree / "other").mkdir()
    res = run_vcfs("shred", str(tree / "cam1"), "--json")
    report = json.loads(res.stdout)
    assert len(report["shredded"]) == 1 and report["removed"] == 3  # the symlink and two directories
    assert not (tree / "cam1").exists() and (tree / "other").is_dir()
    bad = run_vcfs("shred", str(tree), check=False)
    assert bad.returncode == 2 and "whole store" in bad.stderr
