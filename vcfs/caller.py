"""Who is asking: the process behind a FUSE request, resolved through /proc.

A FUSE request carries the caller's fs uid and gid (authoritative: the kernel fills them in)
and ``pid``, which is the id of the calling *thread*. The access policy and the audit trail
need the process: its thread-group id (``Tgid:`` in /proc/<tid>/status), its executable
(/proc/<tgid>/exe) and its command line. These are /proc reads, memory-only, but
/proc/<pid>/cmdline takes the target's mmap lock, so a full resolution runs in a worker thread
(``CallerResolver.resolve``); the cheap check that a cached entry still belongs to the same
thread (``cached``: one read of /proc/<tid>/stat for start time and comm) runs inline.

Cache key: (tid, start time, comm, uid, gid). The start time defeats pid reuse; comm changes on
most execve() calls. An exec that keeps comm is seen after at most ``ttl`` seconds.

What /proc cannot tell (documented in docs/AUDIT.md): a caller in another pid namespace
arrives as pid 0; /proc/<pid>/exe needs ptrace access, so a daemon that is not root sees
``exe=None`` for other users' processes; a process that exited before the lookup is
recorded with what could still be read.
"""

from __future__ import annotations

import os
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

CMDLINE_MAX = 160
PF_KTHREAD = 0x00200000  # include/linux/sched.h: the task is a kernel thread


@dataclass(frozen=True, slots=True)
class Caller:
    uid: int
    gid: int
    pid: int  # the process (thread group) id; 0 when the kernel could not name it
    tid: int  # the thread that made the request
    exe: str | None  # None: not readable (no ptrace access, process gone, kernel thread)
    comm: str
    cmdline: str  # shortened, NUL separators turned into spaces
    groups: frozenset[int] = frozenset()  # fs gid plus supplementary groups
    kernel: bool = False  # a kernel thread (writeback flushing cached times on a writer's behalf)

    @property
    def key(self) -> str:
        """The identity alerts are tracked by: uid plus executable."""
        return f"uid={self.uid} exe={self.exe or '?'}"


def _read(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def _stat(proc: str, tid: int) -> tuple[tuple[str, str], int] | None:
    """((start time, comm), flags) of ``tid`` from /proc/<tid>/stat; None if it is gone."""
    try:
        raw = _read(f"{proc}/{tid}/stat")
    except OSError:
        return None
    head, sep, tail = raw.rpartition(b")")
    fields = tail.split()
    if not sep or len(fields) < 20:
        return None
    comm = head.partition(b"(")[2].decode(errors="replace")
    return (fields[19].decode(), comm), int(fields[6])


def _stat_key(proc: str, tid: int) -> tuple[str, str] | None:
    got = _stat(proc, tid)
    return got[0] if got is not None else None


def shorten_cmdline(raw: bytes, limit: int = CMDLINE_MAX) -> str:
    text = raw.rstrip(b"\0").replace(b"\0", b" ").decode(errors="replace")
    return text if len(text) <= limit else text[: limit - 1] + "…"


class CallerResolver:
    """Thread-safe cache of resolved callers; entries live ``ttl`` seconds."""

    def __init__(
        self,
        ttl: float = 5.0,
        proc: str = "/proc",
        clock: Callable[[], float] = time.monotonic,
        max_entries: int = 4096,
    ) -> None:
        self._ttl = ttl
        self._proc = proc
        self._clock = clock
        self._max = max_entries
        self._lock = threading.Lock()
        self._cache: OrderedDict[tuple[int, int, int], tuple[float, tuple[str, str] | None, Caller]] = OrderedDict()

    def cached(self, uid: int, gid: int, tid: int) -> Caller | None:
        """A still-valid cached caller, or None (then call ``resolve`` off the event loop)."""
        with self._lock:
            hit = self._cache.get((tid, uid, gid))
        if hit is None:
            return None
        expires, stat_key, caller = hit
        if self._clock() > expires or tid == 0 or _stat_key(self._proc, tid) != stat_key:
            return None
        return caller

    def resolve(self, uid: int, gid: int, tid: int) -> Caller:
        """Read /proc for ``tid`` (blocking; run it in a worker thread) and cache the result."""
        got = _stat(self._proc, tid) if tid else None
        stat_key, kernel = (got[0], bool(got[1] & PF_KTHREAD)) if got is not None else (None, False)
        pid, groups, exe, cmdline = 0, {gid}, None, ""
        if stat_key is not None:
            try:
                for line in _read(f"{self._proc}/{tid}/status").splitlines():
                    if line.startswith(b"Tgid:"):
                        pid = int(line.split()[1])
                    elif line.startswith(b"Groups:"):
                        groups.update(int(g) for g in line.split()[1:])
            except (OSError, ValueError):
                pid = 0
        if pid:
            try:
                exe = os.readlink(f"{self._proc}/{pid}/exe")
            except OSError:
                exe = None
            try:
                cmdline = shorten_cmdline(_read(f"{self._proc}/{pid}/cmdline"))
            except OSError:
                cmdline = ""
        comm = stat_key[1] if stat_key else ""
        caller = Caller(uid, gid, pid, tid, exe, comm, cmdline, frozenset(groups), kernel)
        if stat_key is not None:
            with self._lock:
                self._cache[(tid, uid, gid)] = (self._clock() + self._ttl, stat_key, caller)
                self._cache.move_to_end((tid, uid, gid))
                while len(self._cache) > self._max:
                    self._cache.popitem(last=False)
        return caller
