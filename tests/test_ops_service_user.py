"""The privilege model of vcfs@.service, for real: a dedicated uid with four ambient capabilities.

The unit runs the daemon as user vcfs with CAP_SYS_ADMIN (mount(2) without fusermount3),
CAP_CHOWN and CAP_FOWNER (files belong to the recorder that wrote them) and CAP_DAC_OVERRIDE
(backing files owned by those users). No systemd runs here, so util-linux ``setpriv`` sets up
the same credentials: uid/gid 65534, exactly those capabilities ambient and in the bounding
set. The daemon must mount with allow_other, let another user write its own files, answer
root's ``vcfs status``, and stop cleanly on SIGTERM.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest
from conftest import VCFS, force_unmount, is_mounted, require
from opsutil import wait_for

pytestmark = pytest.mark.mount

CAPS = "+sys_admin,+chown,+fowner,+dac_override"
SERVICE_UID = 65534
RECORDER_UID = 4242


def _as(uid: int, *argv: str, caps: bool = False) -> list[str]:
    cmd = ["setpriv", f"--reuid={uid}", f"--regid={uid}", "--clear-groups"]
    if caps:
        cmd += [f"--inh-caps={CAPS}", f"--ambient-caps={CAPS}", f"--bounding-set=-all,{CAPS}"]
    return [*cmd, *argv]


def test_daemon_as_service_user_with_the_units_capabilities(tmp_path: Path) -> None:
    require(os.path.exists("/dev/fuse"), "/dev/fuse")
    require(shutil.which("setpriv") is not None, "util-linux setpriv")
    require(shutil.which("softhsm2-util") is not None, "softhsm2")
    if os.geteuid() != 0:
        pytest.skip("needs root to drop to another uid")
    home, backing = tmp_path / "home", tmp_path / "backing"
    reachable = Path(tempfile.mkdtemp(prefix="vcfs-svc-", dir="/tmp"))  # the recorder uid must reach it
    reachable.chmod(0o755)
    mnt = reachable / "mnt"
    env = {**os.environ, "VCFS_HOME": str(home)}  # a token of its own, owned by the service uid
    subprocess.run([*VCFS, "init", str(backing)], check=True, capture_output=True, env=env)
    mnt.mkdir()
    for path in (home, backing):
        subprocess.run(["chown", "-R", f"{SERVICE_UID}:{SERVICE_UID}", str(path)], check=True)
    log = tmp_path / "daemon.log"
    with open(log, "wb") as err:
        daemon = subprocess.Popen(
            _as(
                SERVICE_UID,
                *VCFS,
                "mount",
                "-f",
                "--allow-other",
                str(backing),
                str(mnt),
                caps=True,
            ),
            stdout=err,
            stderr=err,
            env=env,
        )
    try:
        wait_for("the mount", lambda: is_mounted(mnt) or daemon.poll() is not None)
        assert daemon.poll() is None, log.read_text()
        mounts = Path("/proc/self/mounts").read_text().splitlines()
        opts = next(line.split()[3] for line in mounts if line.split()[1] == str(mnt))
        assert f"user_id={SERVICE_UID}" in opts and "allow_other" in opts

        os.chown(mnt, RECORDER_UID, RECORDER_UID)  # root hands the tree to the recorder, through vcfs
        target = mnt / "rec.bin"
        # /bin/sh, not Python: the recorder uid cannot reach this checkout's interpreter.
        write = f"umask 077; yes vcfs | head -c 100000 > {target}"
        res = subprocess.run(_as(RECORDER_UID, "/bin/sh", "-c", write), capture_output=True, text=True)
        assert res.returncode == 0, res.stderr
        st = os.stat(target)
        assert (st.st_uid, st.st_gid, st.st_mode & 0o777) == (RECORDER_UID, RECORDER_UID, 0o600)
        (entry,) = [p for p in (backing / "files").iterdir() if p.name != "vcfs.dirid"]  # the name is encrypted
        assert entry.stat().st_uid == RECORDER_UID
        assert target.read_bytes() == (b"vcfs\n" * 20_000)[:100_000]

        status = subprocess.run([*VCFS, "status", str(mnt), "--json"], capture_output=True, text=True, env=env)
        assert status.returncode == 0, status.stderr
        reply = json.loads(status.stdout)
        assert reply["owner_uid"] == SERVICE_UID and reply["bytes_encrypted"] >= 100_000

        daemon.send_signal(15)
        assert daemon.wait(timeout=120) == 0, log.read_text()
        assert not is_mounted(mnt)
    finally:
        if daemon.poll() is None:
            daemon.kill()
            daemon.wait(timeout=30)
        if is_mounted(mnt):
            force_unmount(mnt)
        shutil.rmtree(reachable, ignore_errors=True)
