"""The systemd notify protocol (sd_notify(3)) in the standard library, no libsystemd.

A service of ``Type=notify`` tells systemd it is ready, alive and stopping by sending
datagrams of newline-separated ``KEY=VALUE`` lines to the AF_UNIX socket named in
``$NOTIFY_SOCKET``. A name starting with ``@`` is in the abstract namespace (a leading NUL
byte on the wire). systemd documents the protocol as stable and meant to be reimplemented.

Everything here is a no-op outside systemd (no ``$NOTIFY_SOCKET``) and never raises: a lost
notification must not take the mount down, so send errors are logged once and dropped.
"""

from __future__ import annotations

import logging
import os
import socket

log = logging.getLogger("vcfs.sdnotify")

READY = "READY=1"
STOPPING = "STOPPING=1"
WATCHDOG = "WATCHDOG=1"


def _address() -> str | bytes | None:
    addr = os.environ.get("NOTIFY_SOCKET", "")
    if not addr or addr.startswith("vsock:"):  # VM guests may get a vsock address: not for us
        return None
    if addr.startswith("@"):
        return b"\0" + addr[1:].encode()
    return addr


def notify(*lines: str) -> bool:
    """Send one datagram with ``lines``; True if it was sent, False outside systemd or on error."""
    addr = _address()
    if addr is None:
        return False
    payload = "\n".join(lines).encode()
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.connect(addr)
            sock.sendall(payload)
    except OSError as exc:
        log.warning("could not notify systemd (%s): %s", os.environ.get("NOTIFY_SOCKET"), exc.strerror or exc)
        return False
    return True


def status(text: str) -> str:
    """A ``STATUS=`` line (shown by ``systemctl status``); one line, so newlines are flattened."""
    return "STATUS=" + " ".join(text.split())


def extend_timeout(seconds: float) -> str:
    """An ``EXTEND_TIMEOUT_USEC=`` line: more time for the start or stop that is under way."""
    return f"EXTEND_TIMEOUT_USEC={int(seconds * 1_000_000)}"


def watchdog_interval() -> float | None:
    """Seconds between keep-alives (half of ``$WATCHDOG_USEC``), or None if no watchdog is asked for.

    ``$WATCHDOG_PID``, when set, names the process the watchdog is meant for; a child that
    inherited the variables must not ping on its parent's behalf.
    """
    try:
        usec = int(os.environ.get("WATCHDOG_USEC", "0") or 0)
    except ValueError:
        return None
    pid = os.environ.get("WATCHDOG_PID")
    if usec <= 0 or (pid and pid != str(os.getpid())):
        return None
    return usec / 2e6
