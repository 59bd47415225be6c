"""mount(8) and umount(8) with vcfs: ``mount -t fuse.vcfs BACKING MNT -o config=...``, the guard.

mount(8) looks for its helper only in /sbin (``/sbin/mount.fuse.vcfs``), so the helper test
links this checkout's console script there for its duration (as root, and only if no
helper is installed already) and removes it afterwards. ``umount`` needs no helper.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import Mounted, force_unmount, is_mounted, require, run_vcfs
from opsutil import pattern, wait_for

from vcfs.guard import is_immutable, set_immutable

pytestmark = pytest.mark.mount

HELPER = Path("/sbin/mount.fuse.vcfs")


@pytest.fixture
def helper() -> Iterator[Path]:
    require(os.path.exists("/dev/fuse"), "/dev/fuse")
    require(shutil.which("mount") is not None, "util-linux mount")
    if os.geteuid() != 0:
        pytest.skip("mount(8) with a helper in /sbin needs root")
    ours = Path(sys.prefix) / "bin" / "mount.fuse.vcfs"
    if HELPER.exists() or HELPER.is_symlink():
        if HELPER.resolve() != ours.resolve():
            pytest.skip(f"{HELPER} belongs to an installed vcfs; not replacing it")
        yield HELPER
        return
    HELPER.symlink_to(ours)
    try:
        yield HELPER
    finally:
        HELPER.unlink()


def _run(*argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, capture_output=True, text=True, timeout=120, env=os.environ.copy())


def test_mount_t_fuse_vcfs_and_umount(helper: Path, store: Path, tmp_path: Path) -> None:
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    cfg = tmp_path / "host.toml"
    cfg.write_text("[mount]\nallow_other = true\n")
    # nofail, _netdev and x-systemd.* are fstab/systemd options: accepted and dropped.
    opts = f"config={cfg},noexec,nodev,nosuid,nofail,_netdev,x-systemd.device-timeout=10s"
    res = _run("mount", "-t", "fuse.vcfs", str(store), str(mnt), "-o", opts)
    try:
        assert res.returncode == 0, res.stdout + res.stderr
        assert is_mounted(mnt)
        line = next(x for x in Path("/proc/self/mounts").read_text().splitlines() if x.split()[1] == str(mnt))
        source, _where, fstype, flags = line.split()[:4]
        assert (source, fstype) == (str(store), "fuse.vcfs")
        assert {"noexec", "nodev", "nosuid", "allow_other"} <= set(flags.split(","))
        data = pattern(200_000)
        (mnt / "rec.bin").write_bytes(data)
        pid = json.loads(run_vcfs("status", str(mnt), "--json").stdout)["pid"]

        res = _run("umount", str(mnt))
        assert res.returncode == 0, res.stderr
        assert not is_mounted(mnt)
        wait_for("the daemon to exit", lambda: not _alive(pid))
        assert os.listdir(mnt) == []
    finally:
        if is_mounted(mnt):
            force_unmount(mnt)
    m = Mounted(store, mnt)
    m.mount()
    try:
        assert (mnt / "rec.bin").read_bytes() == data
    finally:
        m.umount()


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ("pin=1234", "would put the HSM PIN on a command line"),
        ("allow_otter", "unknown mount option 'allow_otter'"),
        ("config", "needs a value"),
    ],
)
def test_helper_refuses_bad_options(tmp_path: Path, options: str, message: str, vcfs_home: Path) -> None:
    script = Path(sys.prefix) / "bin" / "mount.fuse.vcfs"
    res = _run(str(script), str(tmp_path), str(tmp_path), "-o", options)
    assert res.returncode == 2 and message in res.stderr and "Traceback" not in res.stderr


def test_fake_mount_does_nothing(tmp_path: Path) -> None:
    script = Path(sys.prefix) / "bin" / "mount.vcfs"
    res = _run(str(script), str(tmp_path / "nope"), str(tmp_path), "-f", "-o", "noexec")
    assert res.returncode == 0 and not is_mounted(tmp_path)


def test_guard_keeps_plaintext_out_of_the_bare_mount_point(store: Path, tmp_path: Path) -> None:
    require(os.path.exists("/dev/fuse"), "/dev/fuse")
    if os.geteuid() != 0:
        pytest.skip("chattr +i needs CAP_LINUX_IMMUTABLE")
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    res = run_vcfs("guard", str(mnt), check=False)
    try:
        if res.returncode != 0 and "no immutable flag" in res.stderr:
            pytest.skip(f"the filesystem of {tmp_path} has no chattr +i")
        assert res.returncode == 0, res.stderr
        assert is_immutable(mnt)
        with pytest.raises(PermissionError) as err:
            (mnt / "leak.mp4").write_bytes(b"plaintext")  # even root is refused
        assert err.value.errno == errno.EPERM
        m = Mounted(store, mnt)
        m.mount()  # mounting over the immutable directory still works
        try:
            (mnt / "rec.mp4").write_bytes(b"through vcfs")
        finally:
            m.umount()
        assert os.listdir(mnt) == [] and is_immutable(mnt)
        assert "already immutable" in run_vcfs("guard", str(mnt)).stdout
    finally:
        set_immutable(mnt, False)  # or pytest cannot remove tmp_path
    (mnt / "left.mp4").write_bytes(b"written while vcfs was down")
    res = run_vcfs("guard", str(mnt), check=False)
    assert res.returncode == 5 and "is not empty" in res.stderr and "left.mp4" in res.stderr
    assert not is_immutable(mnt)
