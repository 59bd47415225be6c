"""scripts/install and scripts/uninstall, for real, into a private root (``--root DIR``).

The live system is left alone: no /opt, /sbin or /etc outside DIR is touched, no user is
created, systemd is not reloaded. The installed commands are run, the installed unit is
verified, the install is repeated (idempotent; a config the admin wrote survives), and the
uninstall removes the program but keeps configs and state (the embedded token). Building the
venv takes half a minute with pip's wheel cache warm, so VCFS_TEST_INSTALL=0 skips it.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest
from conftest import require

REPO = Path(__file__).resolve().parent.parent
FILES = [
    "opt/vcfs/venv/bin/vcfs",
    "usr/local/bin/vcfs",
    "sbin/mount.vcfs",
    "sbin/mount.fuse.vcfs",
    "usr/local/lib/systemd/system/vcfs@.service",
    "usr/local/share/doc/vcfs/examples/recorder-example.service",
    "usr/local/share/doc/vcfs/examples/srv-recordings.mount",
    "usr/local/share/doc/vcfs/CONFIG.md",
    "etc/vcfs/example.toml",
]


def _script(name: str, root: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["bash", str(REPO / "scripts" / name), "--root", str(root), "--no-apt"],
        capture_output=True,
        text=True,
        timeout=600,
    )


@pytest.mark.slow
def test_install_twice_then_uninstall(tmp_path: Path) -> None:
    if os.environ.get("VCFS_TEST_INSTALL", "1") == "0":
        pytest.skip("VCFS_TEST_INSTALL=0")
    require(shutil.which("systemd-analyze") is not None, "systemd (systemd-analyze)")
    root = tmp_path / "root"
    first = _script("install", root)
    assert first.returncode == 0, first.stdout + first.stderr
    for f in FILES:
        assert (root / f).exists(), f
    assert ((root / "etc/vcfs/credstore").stat().st_mode & 0o777) == 0o700

    version = subprocess.run([str(root / "usr/local/bin/vcfs"), "--version"], capture_output=True, text=True)
    assert version.returncode == 0 and version.stdout.startswith("vcfs ")
    fake = subprocess.run([str(root / "sbin/mount.fuse.vcfs"), "/x", "/y", "-f", "-o", "noexec"], capture_output=True)
    assert fake.returncode == 0
    unit = root / "usr/local/lib/systemd/system"
    (unit / "vcfs@srv-recordings.service").symlink_to("vcfs@.service")
    res = subprocess.run(
        ["systemd-analyze", "verify", str(unit / "vcfs@srv-recordings.service")],
        capture_output=True,
        text=True,
        env={**os.environ, "SYSTEMD_UNIT_PATH": f"{unit}:"},
    )
    assert res.returncode == 0 and (res.stdout + res.stderr).strip() == "", res.stdout + res.stderr
    (unit / "vcfs@srv-recordings.service").unlink()

    (root / "etc/vcfs/example.toml").write_text("# edited by the admin\n")
    second = _script("install", root)
    assert second.returncode == 0, second.stdout + second.stderr
    assert (root / "etc/vcfs/example.toml").read_text() == "# edited by the admin\n"
    for f in FILES:
        assert (root / f).exists(), f

    for _ in range(2):  # removing twice is fine too
        gone = _script("uninstall", root)
        assert gone.returncode == 0, gone.stdout + gone.stderr
    for f in FILES[:-2]:
        assert not (root / f).exists() and not (root / f).is_symlink(), f
    assert (root / "etc/vcfs/example.toml").exists() and (root / "var/lib/vcfs").is_dir()
