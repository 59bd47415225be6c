"""KEK lifecycle against a real SoftHSM2 token and real mounts: rotate, rewrap, retire, destroy."""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import subprocess
import threading
import time
from pathlib import Path

import pytest
from conftest import VCFS, Mounted, run_vcfs

from vcfs.keyops import usage_by_version
from vcfs.keys.base import KeyRef

pytestmark = pytest.mark.mount
v2 = KeyRef("default", 2)


def _versions(backing: Path) -> dict[int, int]:
    rows = json.loads(run_vcfs("keys", "list", str(backing), "--json").stdout)
    return {r["version"]: r["files"] for r in rows}


def _states(backing: Path) -> dict[int, str]:
    rows = json.loads(run_vcfs("keys", "list", str(backing), "--json").stdout)
    return {r["version"]: r["state"] for r in rows}


def test_rotate_while_a_writer_appends(mounted: Mounted) -> None:
    chunks = [os.urandom(4096 + i) for i in range(400)]
    errors: list[BaseException] = []

    def writer() -> None:
        try:
            with open(mounted.mnt / "rec.bin", "ab") as f:
                for c in chunks:
                    f.write(c)
                    f.flush()
                    time.sleep(0.002)
        except BaseException as exc:  # reported below
            errors.append(exc)

    t = threading.Thread(target=writer)
    t.start()
    run_vcfs("keys", "rotate", str(mounted.backing), "default")
    (mounted.mnt / "after.bin").write_bytes(b"new")
    t.join()
    assert not errors
    assert (mounted.mnt / "rec.bin").read_bytes() == b"".join(chunks)
    assert (mounted.mnt / "after.bin").read_bytes() == b"new"
    assert _versions(mounted.backing) == {1: 1, 2: 1}  # the new file took the new KEK at once


def test_rewrap_is_header_only_and_resumable_after_kill(mounted: Mounted) -> None:
    n = 400
    for i in range(n):
        (mounted.mnt / f"f{i:04}").write_bytes(f"file {i} ".encode() * (i % 7 + 1))
    mounted.umount()
    blocks_before = {p.name: p.read_bytes()[4096:] for p in mounted.tree.iterdir()}
    run_vcfs("keys", "rotate", str(mounted.backing), "default")
    proc = subprocess.Popen(
        [*VCFS, "keys", "rewrap", str(mounted.backing)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    deadline = time.monotonic() + 60
    while usage_by_version(mounted.backing).get(v2, 0) < 20 and time.monotonic() < deadline:
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert 0 < usage_by_version(mounted.backing).get(v2, 0) < n  # really killed midway
    res = run_vcfs("keys", "rewrap", str(mounted.backing), "--json")
    report = json.loads(res.stdout)
    assert report["failed"] == [] and report["busy"] == []
    assert report["rewrapped"] + report["already"] == n
    assert _versions(mounted.backing) == {1: 0, 2: n}
    assert {p.name: p.read_bytes()[4096:] for p in mounted.tree.iterdir()} == blocks_before  # no block touched
    run_vcfs("keys", "retire", str(mounted.backing), "default", "1")
    run_vcfs("keys", "destroy", str(mounted.backing), "default", "1")  # nothing uses it any more
    mounted.mount()
    for i in range(0, n, 37):
        assert (mounted.mnt / f"f{i:04}").read_bytes() == f"file {i} ".encode() * (i % 7 + 1)


def test_rewrap_skips_files_open_in_the_mount(mounted: Mounted) -> None:
    (mounted.mnt / "a").write_bytes(b"a" * 1000)
    run_vcfs("keys", "rotate", str(mounted.backing), "default")
    with open(mounted.mnt / "a", "rb") as held:
        res = run_vcfs("keys", "rewrap", str(mounted.backing), "--json", check=False)
        busy = [str(mounted.backing_of("a").relative_to(mounted.tree))]  # backing paths: names may be encrypted
        assert res.returncode == 1 and json.loads(res.stdout)["busy"] == busy
        assert held.read() == b"a" * 1000
    time.sleep(0.2)  # release reaches the daemon asynchronously
    assert run_vcfs("keys", "rewrap", str(mounted.backing)).returncode == 0
    assert _versions(mounted.backing) == {1: 0, 2: 1}


def test_retire_keeps_reads_and_refuses_the_current_key(mounted: Mounted) -> None:
    (mounted.mnt / "old").write_bytes(b"old data")
    res = run_vcfs("keys", "retire", str(mounted.backing), "default", "1", check=False)
    assert res.returncode == 2 and "is current" in res.stderr
    run_vcfs("keys", "rotate", str(mounted.backing), "default")
    run_vcfs("keys", "retire", str(mounted.backing), "default", "1")
    assert _states(mounted.backing) == {1: "retired", 2: "active"}
    mounted.umount()
    mounted.mount()
    assert (mounted.mnt / "old").read_bytes() == b"old data"
    (mounted.mnt / "new").write_bytes(b"x")
    assert _versions(mounted.backing) == {1: 1, 2: 1}


def test_destroy_crypto_shreds_files_and_their_backups(mounted: Mounted, tmp_path: Path) -> None:
    (mounted.mnt / "secret.mp4").write_bytes(os.urandom(200_000))
    mounted.umount()
    backup = tmp_path / "backup.tar"
    subprocess.run(["tar", "-cf", str(backup), "-C", str(mounted.backing), "."], check=True)
    backing_rel = mounted.backing_of("secret.mp4").relative_to(mounted.backing)
    run_vcfs("keys", "rotate", str(mounted.backing), "default")
    res = run_vcfs("keys", "destroy", str(mounted.backing), "default", "1", "--force", check=False)
    assert res.returncode == 2 and "still wraps the names key" in res.stderr  # even --force does not shred names
    # Move only the names key to v2 (no file is under v2, so --from 2 rewraps no file).
    run_vcfs("keys", "rewrap", str(mounted.backing), "default", "--from", "2")
    res = run_vcfs("keys", "destroy", str(mounted.backing), "default", "1", check=False)
    assert res.returncode == 2 and "1 files are still wrapped" in res.stderr
    run_vcfs("keys", "destroy", str(mounted.backing), "default", "1", "--force")
    assert _states(mounted.backing)[1] == "destroyed"
    mounted.mount()
    with pytest.raises(OSError) as info:
        (mounted.mnt / "secret.mp4").read_bytes()
    assert info.value.errno == errno.EKEYREVOKED
    mounted.umount()
    # The backup copy, restored with its own (older) config, cannot be decrypted either.
    restored = tmp_path / "restored"
    restored.mkdir()
    subprocess.run(["tar", "-xf", str(backup), "-C", str(restored)], check=True)
    res = run_vcfs("decrypt", str(restored / backing_rel), str(tmp_path / "out"), check=False)
    assert res.returncode == 4 and "Traceback" not in res.stderr
    shutil.rmtree(restored)
