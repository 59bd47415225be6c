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
    return {r["version"]: r["files"] for r in rows if r["tier"] == "kek"}


def _states(backing: Path) -> dict[int, str]:
    rows = json.loads(run_vcfs("keys", "list", str(backing), "--json").stdout)
    return {r["version"]: r["state"] for r in rows if r["tier"] == "kek"}


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
        busy = ["a"]  # plaintext paths, also where names are encrypted
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


def _keystore(vcfs_home: Path, backing: Path) -> Path:
    store_id = (backing / "vcfs.conf").read_text().split('store_id = "')[1].split('"')[0]
    return vcfs_home / "keystores" / f"{store_id}.toml"


def test_keystore_copies_and_master_rotation(mounted: Mounted, vcfs_home: Path, tmp_path: Path) -> None:
    """What docs/KEYS.md promises about backups: a tar copy of the store holds no KEK; after a
    destroy, an old keystore copy can still unwrap the KEK until the master key is rotated,
    and never after."""
    (mounted.mnt / "old.mp4").write_bytes(b"wrapped under v1" * 1000)
    mounted.umount()
    where = mounted.backing_of("old.mp4")  # its encrypted name stays; reading it later may need a shredded key
    backup = tmp_path / "store.tar"
    subprocess.run(["tar", "-cf", str(backup), "-C", str(mounted.backing), "."], check=True)
    assert b"blob" not in backup.read_bytes()  # the store and its backups carry no wrapped KEK
    keystore = _keystore(vcfs_home, mounted.backing)
    old_keystore = keystore.read_bytes()
    run_vcfs("keys", "rotate", str(mounted.backing), "default")
    # Only the names key moves to v2 (no file is under v2 yet): old.mp4 stays wrapped under v1.
    run_vcfs("keys", "rewrap", str(mounted.backing), "default", "--from", "2")
    run_vcfs("keys", "destroy", str(mounted.backing), "default", "1", "--force")
    out = tmp_path / "out"
    res = run_vcfs("decrypt", str(where), str(out), check=False)
    assert res.returncode == 4 and "was destroyed" in res.stderr
    current_keystore = keystore.read_bytes()
    keystore.write_bytes(old_keystore)  # someone restores a keystore backup from before the destroy...
    conf = mounted.backing / "vcfs.conf"
    current_conf = conf.read_text()
    subprocess.run(["tar", "-xf", str(backup), "-C", str(mounted.backing), "./vcfs.conf"], check=True)
    run_vcfs("decrypt", str(where), str(out))  # ...and v1 is back: not shredded yet
    assert out.read_bytes() == b"wrapped under v1" * 1000
    keystore.write_bytes(current_keystore)
    conf.write_text(current_conf)
    res = run_vcfs("keys", "rotate", str(mounted.backing), "default", "--master")
    assert "1 KEKs rewrapped" in res.stdout  # v2 only; v1 is gone
    current_keystore = keystore.read_bytes()
    keystore.write_bytes(old_keystore)  # the same restore after the master rotation
    subprocess.run(["tar", "-xf", str(backup), "-C", str(mounted.backing), "./vcfs.conf"], check=True)
    res = run_vcfs("decrypt", str(where), str(tmp_path / "never"), check=False)
    assert res.returncode == 4 and "destroyed by a master-key rotation" in res.stderr
    assert not (tmp_path / "never").exists()
    keystore.write_bytes(current_keystore)
    conf.write_text(current_conf)
    mounted.mount()
    (mounted.mnt / "new.mp4").write_bytes(b"v2 under master 2")
    assert (mounted.mnt / "new.mp4").read_bytes() == b"v2 under master 2"


def test_master_rotation_while_mounted_and_writing(mounted: Mounted) -> None:
    (mounted.mnt / "a").write_bytes(b"a" * 70000)
    with open(mounted.mnt / "rec", "ab") as rec:
        rec.write(b"1" * 100000)
        run_vcfs("keys", "rotate", str(mounted.backing), "default", "--master")
        rec.write(b"2" * 100000)
    (mounted.mnt / "b").write_bytes(b"b")  # new wraps use the KEK loaded under the new master key
    rows = json.loads(run_vcfs("keys", "list", str(mounted.backing), "--json").stdout)
    masters = {r["version"]: r["state"] for r in rows if r["tier"] == "master"}
    assert masters == {1: "destroyed", 2: "active"}
    mounted.umount()
    mounted.mount()
    assert (mounted.mnt / "a").read_bytes() == b"a" * 70000
    assert (mounted.mnt / "rec").read_bytes() == b"1" * 100000 + b"2" * 100000
    assert (mounted.mnt / "b").read_bytes() == b"b"


def test_retired_key_wraps_nothing_new(mounted: Mounted) -> None:
    """Even if the config is edited to make a retired version current, nothing is wrapped under it."""
    (mounted.mnt / "old").write_bytes(b"under v1")
    run_vcfs("keys", "rotate", str(mounted.backing), "default")
    run_vcfs("keys", "retire", str(mounted.backing), "default", "1")
    conf = mounted.backing / "vcfs.conf"
    conf.write_text(conf.read_text().replace("current = 2", "current = 1"))
    with pytest.raises(OSError) as info:
        (mounted.mnt / "x").write_bytes(b"x")
    assert info.value.errno == errno.EACCES
    assert (mounted.mnt / "old").read_bytes() == b"under v1"  # decrypt-only, as an archive
    conf.write_text(conf.read_text().replace("current = 1", "current = 2"))
    (mounted.mnt / "y").write_bytes(b"y")
    assert _versions(mounted.backing) == {1: 1, 2: 1}
