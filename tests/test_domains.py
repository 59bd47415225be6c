"""Key domains for data residency, with two real SoftHSM2 tokens standing for two regions' HSMs.

/eu/ is wrapped under the eu token's keys, /us/ under the us token's; taking one token away
(its SoftHSM2 token directory moved out of the token directory) leaves the other region
fully working, and the mount recovers by itself when the token comes back.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import Mounted, require, run_vcfs

from vcfs.core.header import parse_header
from vcfs.core.layout import HEADER_LEN

pytestmark = pytest.mark.mount


def _token_dir(vcfs_home: Path, label: str) -> Path:
    padded = label.encode().ljust(32)
    for d in (vcfs_home / "tokens").iterdir():
        obj = d / "token.object"
        if obj.exists() and padded in obj.read_bytes():
            return d
    raise AssertionError(f"no token {label!r} under {vcfs_home}")


@contextlib.contextmanager
def token_away(vcfs_home: Path, label: str) -> Iterator[None]:
    """The token disappears, as an unplugged HSM does (moved outside SoftHSM2's token directory)."""
    d = _token_dir(vcfs_home, label)
    away = vcfs_home / f"away-{label}"
    d.rename(away)
    try:
        yield
    finally:
        away.rename(d)


def _header_domains(backing_file: Path) -> set[str]:
    """The domains any key slot of the file names (both slots, the older one included)."""
    header = parse_header(backing_file.read_bytes()[:HEADER_LEN])
    return {s.domain for s in header.slots if s is not None}


def _daemon_log(vcfs_home: Path, mnt: Path) -> str:
    name = os.path.realpath(mnt).strip("/").replace("/", "-")
    return (vcfs_home / "logs" / f"{name}.log").read_text()


@pytest.fixture
def regions(store: Path, tmp_path: Path) -> Iterator[Mounted]:
    require(os.path.exists("/dev/fuse"), "/dev/fuse")
    run_vcfs("keys", "domain", "add", str(store), "eu", "--prefix", "/eu/", "--token", "eu-hsm")
    run_vcfs("keys", "domain", "add", str(store), "us", "--prefix", "/us/", "--token", "us-hsm")
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    m = Mounted(store, mnt)
    m.mount()
    (mnt / "eu").mkdir()
    (mnt / "us").mkdir()
    try:
        yield m
    finally:
        m.cleanup()


def test_each_region_decrypts_only_with_its_own_token(regions: Mounted, vcfs_home: Path, tmp_path: Path) -> None:
    data = {"eu/a.ts": b"eu " * 30000, "us/b.ts": b"us " * 30000, "c.ts": b"default " * 100}
    for name, content in data.items():
        (regions.mnt / name).write_bytes(content)
    regions.umount()
    assert _header_domains(regions.backing_of("eu/a.ts")) == {"eu"}
    assert _header_domains(regions.backing_of("us/b.ts")) == {"us"}
    assert _header_domains(regions.backing_of("c.ts")) == {"default"}
    where = {name: regions.backing_of(name) for name in data}  # names under /eu/ need the eu token too
    for gone, readable, unreadable in (("eu-hsm", "us/b.ts", "eu/a.ts"), ("us-hsm", "eu/a.ts", "us/b.ts")):
        with token_away(vcfs_home, gone):
            out = tmp_path / f"out-{gone}"
            run_vcfs("decrypt", str(where[readable]), str(out))
            assert out.read_bytes() == data[readable]
            res = run_vcfs("decrypt", str(where[unreadable]), str(tmp_path / "never"), check=False)
            assert res.returncode == 4 and "HSM unavailable" in res.stderr and "Traceback" not in res.stderr
            assert not (tmp_path / "never").exists()


def test_token_outage_while_mounted(regions: Mounted, vcfs_home: Path) -> None:
    """One region's HSM goes away: open files keep working, new opens there fail with EIO and
    are logged, the other region works fully, and service comes back with the token."""
    mnt = regions.mnt
    (mnt / "eu" / "cold.ts").write_bytes(b"cold" * 1000)
    (mnt / "us" / "cold.ts").write_bytes(b"cold" * 1000)
    time.sleep(0.3)  # the writes' release reaches the daemon asynchronously
    recording = open(mnt / "eu" / "live.ts", "ab")  # noqa: SIM115 - held across the outage
    try:
        recording.write(b"before ")
        recording.flush()
        with token_away(vcfs_home, "eu-hsm"):
            for _ in range(200):  # an open file keeps recording (seal reservations need no HSM)
                recording.write(b"during " * 100)
            recording.flush()
            os.fsync(recording.fileno())
            with pytest.raises(OSError) as info:
                (mnt / "eu" / "cold.ts").read_bytes()
            assert info.value.errno == errno.EIO
            with pytest.raises(OSError) as info:
                (mnt / "eu" / "new.ts").write_bytes(b"x")
            assert info.value.errno == errno.EIO
            # The other region is untouched: new files, existing files, writes.
            (mnt / "us" / "new.ts").write_bytes(b"us during outage")
            assert (mnt / "us" / "new.ts").read_bytes() == b"us during outage"
            assert (mnt / "us" / "cold.ts").read_bytes() == b"cold" * 1000
            (mnt / "root.ts").write_bytes(b"default domain too")
            assert "HSM unavailable: key domain eu" in _daemon_log(vcfs_home, mnt)
        recording.write(b"after")
    finally:
        recording.close()
    deadline = time.monotonic() + 30
    while True:  # the daemon reconnects by itself within a few seconds
        try:
            assert (mnt / "eu" / "cold.ts").read_bytes() == b"cold" * 1000
            break
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.25)
    assert (mnt / "eu" / "live.ts").read_bytes() == b"before " + b"during " * 100 * 200 + b"after"
    (mnt / "eu" / "after.ts").write_bytes(b"eu is back")
    assert (mnt / "eu" / "after.ts").read_bytes() == b"eu is back"
    assert "HSM available again: key domain eu" in _daemon_log(vcfs_home, mnt)


def test_rename_across_domains_is_exdev_and_mv_reencrypts(regions: Mounted) -> None:
    mnt = regions.mnt
    (mnt / "eu" / "a.ts").write_bytes(b"moving to the us")
    with pytest.raises(OSError) as info:
        os.rename(mnt / "eu" / "a.ts", mnt / "us" / "a.ts")
    assert info.value.errno == errno.EXDEV
    with pytest.raises(OSError) as info:
        os.link(mnt / "eu" / "a.ts", mnt / "a.ts")
    assert info.value.errno == errno.EXDEV
    with pytest.raises(OSError) as info:
        os.rename(mnt / "eu", mnt / "eu-old")  # would take /eu/ files out of their domain
    assert info.value.errno == errno.EXDEV
    os.rename(mnt / "eu" / "a.ts", mnt / "eu" / "b.ts")  # within a domain: a plain rename
    subprocess.run(["mv", str(mnt / "eu" / "b.ts"), str(mnt / "us" / "b.ts")], check=True)
    assert (mnt / "us" / "b.ts").read_bytes() == b"moving to the us"
    assert not (mnt / "eu" / "b.ts").exists()
    assert _header_domains(regions.backing_of("us/b.ts")) == {"us"}


def test_new_prefix_and_rewrap_move_files_to_their_domain(vcfs_home: Path, tmp_path: Path) -> None:
    """Files written before a domain existed move to it on rewrap; the old domain's slot goes.

    A store with plain names: there a domain may take a path that already holds files, while
    mounted (with encrypted names that is refused, see the next test).
    """
    require(os.path.exists("/dev/fuse"), "/dev/fuse")
    store = tmp_path / "plain"
    run_vcfs("init", str(store), "--plain-names")
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    m = Mounted(store, mnt)
    m.mount()
    try:
        (mnt / "tenant-42").mkdir()
        (mnt / "tenant-42" / "r.mp4").write_bytes(b"t42" * 5000)
        (mnt / "other.mp4").write_bytes(b"o" * 10)
        run_vcfs("keys", "domain", "add", str(store), "t42", "--prefix", "/tenant-42/", "--token", "eu-hsm")
        (mnt / "tenant-42" / "new.mp4").write_bytes(b"new")  # a running mount picks the domain up
        assert _header_domains(store / "files" / "tenant-42" / "new.mp4") == {"t42"}
        assert _header_domains(store / "files" / "tenant-42" / "r.mp4") == {"default"}
        res = run_vcfs("keys", "rewrap", str(store), "t42", "--json")
        assert '"moved": 1' in res.stdout
        assert _header_domains(store / "files" / "tenant-42" / "r.mp4") == {"t42"}  # no default slot left
        assert _header_domains(store / "files" / "other.mp4") == {"default"}
        assert (mnt / "tenant-42" / "r.mp4").read_bytes() == b"t42" * 5000
    finally:
        m.umount()


def test_domain_add_with_encrypted_names_needs_a_new_path_and_an_unmounted_store(
    mounted: Mounted, tmp_path: Path
) -> None:
    """Names are encrypted under their directory's domain: a domain cannot take over existing entries."""
    (mounted.mnt / "old").mkdir()
    (mounted.mnt / "old" / "a.mp4").write_bytes(b"a" * 100)
    busy = run_vcfs("keys", "domain", "add", str(mounted.backing), "t1", "--prefix", "/new/", check=False)
    assert busy.returncode == 5 and "already mounted" in busy.stderr and "Traceback" not in busy.stderr
    mounted.umount()
    taken = run_vcfs("keys", "domain", "add", str(mounted.backing), "t1", "--prefix", "/old/", check=False)
    assert taken.returncode == 2 and "/old/ already exists" in taken.stderr
    run_vcfs("keys", "domain", "add", str(mounted.backing), "t1", "--prefix", "/new/", "--token", "eu-hsm")
    mounted.mount()
    (mounted.mnt / "new").mkdir()
    (mounted.mnt / "new" / "b.mp4").write_bytes(b"b" * 100)
    assert _header_domains(mounted.backing_of("new/b.mp4")) == {"t1"}
    assert sorted(os.listdir(mounted.mnt / "new")) == ["b.mp4"]
    assert (mounted.mnt / "old" / "a.mp4").read_bytes() == b"a" * 100
    mounted.umount()
    mounted.mount()  # the names under /new/ are under t1's names key, which a fresh mount unwraps
    assert (mounted.mnt / "new" / "b.mp4").read_bytes() == b"b" * 100


def test_init_with_domains_and_overlapping_prefixes(vcfs_home: Path, tmp_path: Path) -> None:
    backing = tmp_path / "b"
    res = run_vcfs("init", str(backing), "--domain", "eu=/eu/", "--domain", "us=/us/,/tenant-7/")
    assert "domain eu (files under /eu/)" in res.stdout
    bad = run_vcfs("init", str(tmp_path / "b2"), "--domain", "a=/x/", "--domain", "b=/x/", check=False)
    assert bad.returncode == 2 and "two key domains" in bad.stderr and not (tmp_path / "b2").exists()
    shutil.rmtree(backing)
