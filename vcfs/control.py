"""The control socket of a running mount: ``vcfs status`` asks it, the daemon answers.

A Unix stream socket, one JSON request line in, one JSON reply line out. Only root and the
user the daemon runs as (the mount's owner) may use it: the socket file is mode 0600, and
the daemon also checks the peer's uid with SO_PEERCRED, so a socket file with loosened
permissions, or one reached through a directory of the wrong mode, still answers nobody
else. The reply never contains key material; it names KEKs by ``domain/vN``.

Requests: ``{"op": "status"}``. Unknown requests get ``{"error": "..."}``.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import stat
import struct
from collections.abc import Callable
from pathlib import Path
from typing import Any

import trio

from vcfs.errors import MountError, UsageError

log = logging.getLogger("vcfs.control")

MAX_REQUEST = 4096
CLIENT_TIMEOUT = 5.0
_UCRED = struct.Struct("3i")  # pid, uid, gid

Handler = Callable[[dict[str, Any]], Any]  # request -> JSON-able reply (may be awaited)


def peer_uid(sock: socket.socket | trio.socket.SocketType) -> int:
    raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size)
    return int(_UCRED.unpack(raw)[1])


def allowed_uids() -> frozenset[int]:
    """Root and the mount's owner (the daemon's own uid)."""
    return frozenset({0, os.geteuid()})


def bind_socket(path: Path) -> socket.socket:
    """Bind a fresh listening socket at ``path`` (mode 0600); a stale socket file is replaced.

    A live socket at ``path`` means another daemon serves it: refused, never stolen.
    """
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    if path.exists() or path.is_symlink():
        if not stat.S_ISSOCK(path.lstat().st_mode):
            raise MountError(f"control socket path {path} exists and is not a socket", hint=f"remove {path}")
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            probe.connect(str(path))
        except OSError:
            path.unlink()  # left by a daemon that died
        else:
            raise MountError(f"control socket {path} is in use by another vcfs daemon")
        finally:
            probe.close()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    old = os.umask(0o177)  # the socket file is created 0600
    try:
        sock.bind(str(path))
        sock.listen(16)
    except OSError as exc:
        sock.close()
        raise MountError(f"cannot create control socket {path}: {exc.strerror}") from None
    finally:
        os.umask(old)
    return sock


async def serve(sock: socket.socket, path: Path, handler: Handler) -> None:
    """Answer requests on ``sock`` (from ``bind_socket``) until cancelled; then remove the socket file."""
    listener = trio.SocketListener(trio.socket.from_stdlib_socket(sock))

    async def answer(stream: trio.SocketStream) -> None:
        await _answer(stream, handler)

    try:
        await trio.serve_listeners(answer, [listener])
    finally:
        with contextlib.suppress(OSError):
            path.unlink()
        with contextlib.suppress(OSError):
            sock.close()


async def _answer(stream: trio.SocketStream, handler: Handler) -> None:  # one connection
    async with stream:
        uid = peer_uid(stream.socket)
        with trio.move_on_after(CLIENT_TIMEOUT):
            request = await _read_line(stream)  # read first, so the client sees the refusal, not EPIPE
            if request is None:
                return
            if uid not in allowed_uids():
                log.warning("control socket: refused uid %d (only root and uid %d)", uid, os.geteuid())
                await _send(stream, {"error": "permission denied: only root and the mount's owner may ask"})
                return
            try:
                msg = json.loads(request)
                if not isinstance(msg, dict):
                    raise ValueError("not an object")
            except ValueError:
                await _send(stream, {"error": "bad request: one JSON object per line"})
                return
            reply = handler(msg)
            if hasattr(reply, "__await__"):
                reply = await reply
            await _send(stream, reply)


async def _read_line(stream: trio.SocketStream) -> bytes | None:
    buf = b""
    while b"\n" not in buf:
        chunk = await stream.receive_some(MAX_REQUEST)
        if not chunk:
            return buf or None
        buf += chunk
        if len(buf) > MAX_REQUEST:
            return None
    return buf.split(b"\n", 1)[0]


async def _send(stream: trio.SocketStream, reply: Any) -> None:
    with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
        await stream.send_all(json.dumps(reply).encode() + b"\n")


# ---- client ------------------------------------------------------------------------------


def request(path: Path, msg: dict[str, Any], timeout: float = 10.0) -> dict[str, Any]:
    """Send one request to the daemon at ``path`` and return its reply (blocking)."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC) as sock:
        sock.settimeout(timeout)
        try:
            sock.connect(str(path))
        except PermissionError:
            raise UsageError(
                f"not allowed to use the control socket {path}",
                hint="only root and the user the mount runs as may ask for its status",
            ) from None
        except OSError as exc:
            raise MountError(f"cannot reach the vcfs daemon at {path}: {exc.strerror}") from None
        try:
            sock.sendall(json.dumps(msg).encode() + b"\n")
            buf = b""
            while not buf.endswith(b"\n"):
                chunk = sock.recv(65536)
                if not chunk:
                    break
                buf += chunk
        except TimeoutError:
            raise MountError(f"the vcfs daemon at {path} did not answer within {timeout:.0f} s") from None
        except OSError as exc:
            raise MountError(f"lost the connection to the vcfs daemon at {path}: {exc.strerror}") from None
    try:
        reply = json.loads(buf)
    except ValueError:
        raise MountError(f"the vcfs daemon at {path} sent no valid reply") from None
    if not isinstance(reply, dict):
        raise MountError(f"the vcfs daemon at {path} sent no valid reply")
    if "error" in reply:
        if "permission denied" in str(reply["error"]):
            raise UsageError(f"control socket {path}: {reply['error']}")
        raise MountError(f"the vcfs daemon refused: {reply['error']}")
    return reply
