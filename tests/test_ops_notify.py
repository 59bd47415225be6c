"""The systemd notify protocol against a real datagram socket, as systemd would listen on it.

READY=1 must come only once the mount answers; WATCHDOG=1 keep-alives must follow when
WATCHDOG_USEC is set; STOPPING=1 must come on SIGTERM, and the daemon must exit 0 with the
mount gone. A mount that fails must never say READY. No systemd runs here (PID 1 is not
systemd): the test plays its part with a socket of its own.
"""

from __future__ import annotations

import os
import secrets
import socket
import time
from pathlib import Path

import pytest
from conftest import is_mounted, require
from opsutil import Daemon

from vcfs import sdnotify

pytestmark = pytest.mark.mount


def _listener(tmp_path: Path, abstract: bool) -> tuple[socket.socket, str]:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    if abstract:
        name = f"vcfs-test-{secrets.token_hex(6)}"
        sock.bind("\0" + name)
        return sock, "@" + name
    path = tmp_path / "notify.sock"
    sock.bind(str(path))
    return sock, str(path)


def _receive(sock: socket.socket, until: str, timeout: float = 60.0) -> list[str]:
    """Messages (one string per datagram) up to and including the first containing ``until``."""
    got: list[str] = []
    deadline = time.monotonic() + timeout
    while True:
        sock.settimeout(max(deadline - time.monotonic(), 0.01))
        try:
            msg = sock.recv(4096).decode()
        except TimeoutError:
            raise AssertionError(f"no {until} within {timeout} s; got {got}") from None
        got.append(msg)
        if until in msg.split("\n"):
            return got


def _env(addr: str, watchdog_usec: int | None = None) -> dict[str, str]:
    env = os.environ.copy()
    env["NOTIFY_SOCKET"] = addr
    env.pop("WATCHDOG_PID", None)
    if watchdog_usec:
        env["WATCHDOG_USEC"] = str(watchdog_usec)
    else:
        env.pop("WATCHDOG_USEC", None)
    return env


@pytest.mark.parametrize("abstract", [False, True], ids=["path-socket", "abstract-socket"])
def test_ready_after_mount_answers_watchdog_then_stopping(store: Path, tmp_path: Path, abstract: bool) -> None:
    require(os.path.exists("/dev/fuse"), "/dev/fuse")
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    sock, addr = _listener(tmp_path, abstract)
    daemon = Daemon([str(store), str(mnt)], tmp_path / "daemon.log", _env(addr, watchdog_usec=400_000), mnt)
    try:
        before_ready = _receive(sock, sdnotify.READY)
        # At the moment READY arrives the mount is in place and a request through it is answered.
        assert is_mounted(mnt)
        st = os.stat(mnt)
        assert st.st_ino == 1 and st.st_dev != os.stat(tmp_path).st_dev
        assert not any(sdnotify.WATCHDOG in m or sdnotify.STOPPING in m for m in before_ready)
        assert any(line.startswith("STATUS=serving") for line in before_ready[-1].split("\n"))

        _receive(sock, sdnotify.WATCHDOG)
        _receive(sock, sdnotify.WATCHDOG)  # keep-alives keep coming, not just one

        daemon.proc.send_signal(15)
        _receive(sock, sdnotify.STOPPING)
        assert daemon.proc.wait(timeout=120) == 0, daemon.log.read_text()
        assert not is_mounted(mnt)
    finally:
        daemon.cleanup()
        sock.close()


def test_failed_mount_never_says_ready(store: Path, tmp_path: Path) -> None:
    sock, addr = _listener(tmp_path, abstract=False)
    missing = tmp_path / "no-such-dir"
    daemon = Daemon([str(store), str(missing)], tmp_path / "daemon.log", _env(addr), missing)
    try:
        assert daemon.proc.wait(timeout=60) == 5  # MountError
    finally:
        daemon.cleanup()
    sock.setblocking(False)
    messages = []
    while True:
        try:
            messages.append(sock.recv(4096).decode())
        except BlockingIOError:
            break
    sock.close()
    assert not any(sdnotify.READY in m.split("\n") for m in messages), messages
    assert "is not a directory" in daemon.log.read_text()


def test_notify_is_a_no_op_outside_systemd(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    assert sdnotify.notify(sdnotify.READY) is False
    monkeypatch.setenv("WATCHDOG_USEC", "30000000")
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid() + 1))
    assert sdnotify.watchdog_interval() is None  # meant for another process
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid()))
    assert sdnotify.watchdog_interval() == 15.0
