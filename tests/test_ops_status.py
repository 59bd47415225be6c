"""``vcfs status`` and the Prometheus endpoint report what a test did through a real mount.

The daemon is started from a host mount config (``vcfs mount --config``) with the metrics
exporter on a loopback port and a textfile; the numbers are checked against bytes this test
wrote and read. The control socket must refuse anyone but root and the mount's owner, even
when its file mode has been loosened.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import tempfile
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import Mounted, is_mounted, require, run_vcfs
from opsutil import pattern, wait_for
from prometheus_client.parser import text_string_to_metric_families

pytestmark = pytest.mark.mount

SIZE = 3 * 65536 + 12345  # three full blocks and a partial one


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def configured(store: Path, tmp_path: Path) -> Iterator[tuple[Mounted, int, Path]]:
    require(os.path.exists("/dev/fuse"), "/dev/fuse")
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    port = _free_port()
    prom = tmp_path / "vcfs.prom"
    cfg = tmp_path / "mount.toml"
    cfg.write_text(
        f'[mount]\nbacking = "{store}"\nmountpoint = "{mnt}"\n\n'
        f'[metrics]\nlisten = "127.0.0.1:{port}"\ntextfile = "{prom}"\ninterval = 1\n'
    )
    run_vcfs("mount", "--config", str(cfg))
    m = Mounted(store, mnt)
    try:
        yield m, port, prom
    finally:
        m.cleanup()


def _status(mnt: Path) -> dict:
    return json.loads(run_vcfs("status", str(mnt), "--json").stdout)


def _metrics(text: str) -> dict[str, float]:
    out = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            key = sample.name + "".join(f",{k}={v}" for k, v in sorted(sample.labels.items()) if k != "mountpoint")
            out[key] = sample.value
    return out


def _read_cold(path: Path) -> bytes:
    """Read through the mount with the page cache for the file dropped, so the daemon decrypts."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        chunks = []
        while chunk := os.read(fd, 1 << 20):
            chunks.append(chunk)
        return b"".join(chunks)
    finally:
        os.close(fd)


def test_status_and_metrics_report_the_bytes_written(configured: tuple[Mounted, int, Path]) -> None:
    m, port, prom = configured
    data = pattern(SIZE)
    with open(m.mnt / "rec.bin", "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    assert _read_cold(m.mnt / "rec.bin") == data

    st = _status(m.mnt)
    assert st["mounted"] and st["backing"] == str(m.backing) and st["mountpoint"] == str(m.mnt)
    assert st["pid"] > 0 and st["mounted_since"].endswith("Z")
    assert st["bytes_encrypted"] >= SIZE and st["blocks_encrypted"] >= 4
    assert st["bytes_decrypted"] >= SIZE and st["blocks_decrypted"] >= 4
    assert st["auth_failures"] == 0 and st["open_files"] == 0
    assert st["keys"]["domains"][0]["current"] == "default/v1"
    assert st["keys"]["in_use"]["default/v1"]["wrap"] >= 1
    assert st["hsm"]["state"] == "ok" and st["hsm"]["calls"]["wrap"] >= 1
    assert st["metrics"]["listen"] == f"127.0.0.1:{port}"

    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=30) as reply:
        scraped = _metrics(reply.read().decode())
    assert scraped["vcfs_bytes_encrypted_total"] >= SIZE
    assert scraped["vcfs_bytes_decrypted_total"] >= SIZE
    assert scraped["vcfs_blocks_encrypted_total"] >= 4
    assert scraped["vcfs_hsm_operations_total,op=wrap"] >= 1
    assert scraped["vcfs_hsm_latency_seconds_count"] >= 2
    assert scraped["vcfs_hsm_up"] == 1
    assert scraped["vcfs_auth_failures_total"] == 0
    assert scraped["vcfs_audit_alerts_total"] == 0
    assert scraped["vcfs_open_files"] == 0

    def textfile_has_bytes() -> bool:
        if not prom.exists():
            return False
        return _metrics(prom.read_text()).get("vcfs_bytes_encrypted_total", 0) >= SIZE

    wait_for("the metrics textfile", textfile_has_bytes, timeout=30)

    with open(m.mnt / "held.bin", "wb") as held:
        held.write(b"x")
        assert _status(m.mnt)["open_files"] == 1
    human = run_vcfs("status", str(m.mnt)).stdout
    assert "encrypted" in human and "default/v1" in human and "HSM" in human


def test_status_counts_authentication_failures(configured: tuple[Mounted, int, Path]) -> None:
    m, _port, _prom = configured
    (m.mnt / "victim.bin").write_bytes(pattern(2 * 65536))
    m.umount()
    backing_file = m.backing_of("victim.bin")
    raw = bytearray(backing_file.read_bytes())
    raw[-100] ^= 0x01  # inside the last block's ciphertext
    backing_file.write_bytes(bytes(raw))
    run_vcfs("mount", "--config", str(m.backing.parent / "mount.toml"))
    with pytest.raises(OSError):
        _read_cold(m.mnt / "victim.bin")
    assert _status(m.mnt)["auth_failures"] >= 1


def _as_nobody(path: Path) -> str:
    """Connect to the control socket as uid 65534 in a forked child; returns what it got."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: no pytest, no threads of ours; just a socket
        os.close(r)
        try:
            os.setgid(65534)
            os.setuid(65534)
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
                s.settimeout(10)
                s.connect(str(path))
                s.sendall(b'{"op": "status"}\n')
                answer = s.recv(4096)
            os.write(w, answer or b"(nothing)")
        except OSError as exc:
            os.write(w, f"OSError {exc.errno}".encode())
        finally:
            os._exit(0)
    os.close(w)
    with os.fdopen(r, "rb") as f:
        got = f.read().decode()
    os.waitpid(pid, 0)
    return got


def test_control_socket_only_answers_root_and_owner(store: Path, tmp_path: Path) -> None:
    require(os.path.exists("/dev/fuse"), "/dev/fuse")
    if os.geteuid() != 0:
        pytest.skip("needs root to act as another user")
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    ctl_dir = Path(tempfile.mkdtemp(prefix="vcfs-ctl-", dir="/tmp"))  # reachable by uid 65534
    try:
        ctl_dir.chmod(0o755)
        sock = ctl_dir / "ctl.sock"
        cfg = tmp_path / "m.toml"
        cfg.write_text(f'[control]\nsocket = "{sock}"\n')
        run_vcfs("mount", "--config", str(cfg), str(store), str(mnt))
        try:
            assert (sock.stat().st_mode & 0o777) == 0o600
            assert _as_nobody(sock) == "OSError 13"  # the file mode stops it first
            os.chmod(sock, 0o666)  # an admin loosened it: SO_PEERCRED still refuses
            reply = _as_nobody(sock)
            assert "permission denied" in reply and "bytes_encrypted" not in reply
            st = json.loads(run_vcfs("status", str(mnt), "--json", "--socket", str(sock)).stdout)
            assert st["mounted"]  # root still gets an answer
        finally:
            Mounted(store, mnt).umount()
        assert not sock.exists()  # removed at unmount
    finally:
        shutil.rmtree(ctl_dir, ignore_errors=True)


def test_status_of_something_that_is_not_a_vcfs_mount(tmp_path: Path, vcfs_home: Path) -> None:
    res = run_vcfs("status", str(tmp_path), check=False)
    assert res.returncode == 2 and "is not a vcfs mount" in res.stderr and "Traceback" not in res.stderr


def test_metrics_port_in_use_refuses_the_mount(store: Path, tmp_path: Path) -> None:
    require(os.path.exists("/dev/fuse"), "/dev/fuse")
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        cfg = tmp_path / "m.toml"
        cfg.write_text(f'[metrics]\nlisten = "127.0.0.1:{port}"\n')
        res = run_vcfs("mount", "--config", str(cfg), str(store), str(mnt), check=False)
    assert res.returncode == 5, res.stderr
    assert f"cannot serve metrics on 127.0.0.1:{port}" in res.stderr
    assert not is_mounted(mnt)
