"""The access guard: the FUSE adapter's one hook for the access policy, the audit trail and alerts.

vcfs/fs.py calls it at every operation that carries a caller (open, create, setattr, unlink,
rename, mkdir, ...) and counts bytes per handle on read and write. It resolves the caller
(vcfs/caller.py), asks the policy (vcfs/policy.py), refuses with EACCES, and queues audit
records (vcfs/audit/log.py). With neither a policy nor an audit log it is inert: every hook
returns at once, so a plain mount pays nothing.

Permission is checked at open, as POSIX does. The kernel may then serve reads from its page
cache without asking the daemon (vcfs keeps the cache of unchanged files across opens), but
only through a file descriptor that a successful open returned; a refused open yields no
descriptor, so cached plaintext never reaches a denied caller (mmap and splice need one too).
Handles opened before a policy reload keep the access they were granted, like a file
descriptor after chmod. With ``exact_reads`` a read-only session on a file nobody else has
open starts with a cold page cache, so its ``read`` byte count is what it actually read.

Recorder read-back: a caller without ``read`` but with ``readback`` may open a file for
reading only while its own process holds a write handle on it that created or truncated it,
i.e. only bytes it wrote itself in this session (ffmpeg -movflags +faststart re-opens its
output read-only to move the index to the front).

Between awaits: ``_sessions`` and the per-inode counters are only touched on the trio loop,
without an await in between (caller resolution happens before any of them is read).
"""

from __future__ import annotations

import errno
import logging
import os
import time
from collections.abc import AsyncIterator, Callable, Iterable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any

import pyfuse3
import trio

from vcfs import events
from vcfs.accessconfig import AccessConfig
from vcfs.audit.alerts import Alert, Detector
from vcfs.audit.config import FAIL_CLOSED, AlertConfig, AuditConfig
from vcfs.audit.log import AuditLog
from vcfs.audit.record import rfc3339
from vcfs.caller import Caller, CallerResolver
from vcfs.errors import PolicyError
from vcfs.namespace import Namespace
from vcfs.policy import Policy

log = logging.getLogger("vcfs.audit")

# what a fail-closed mount refuses while its audit log cannot be written: everything that
# reveals or destroys recordings; recorders keep creating, writing and reading back
DEGRADED_DENY = frozenset({"read", "delete", "rename", "setattr"})
REPORT_BYTES = 16 << 20  # bytes read are fed to the bulk-read rule in steps of this size
READERS_STATE = "readers"


def errname(code: int) -> str:
    return errno.errorcode.get(code, str(code))


@dataclass(slots=True)
class Session:
    """One open file handle, from open/create to release."""

    caller: Caller
    names: tuple[str, ...]
    path: str
    inode: int
    read: bool  # may read through this handle
    write: bool
    readback: bool  # reading is allowed only as read-back of its own writing
    fresh: bool  # created or truncated by this open: all content is the opener's
    flags: tuple[str, ...]
    opened: float
    fh: int = 0
    bytes_read: int = 0
    bytes_written: int = 0
    reported: int = 0
    error: int = 0


class Grant:
    """What ``open``/``create`` return: a context that audits a failed open, and binds the handle."""

    def __init__(self, guard: AccessGuard, session: Session | None) -> None:
        self._guard = guard
        self.session = session

    def __enter__(self) -> Grant:
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        if exc is not None and self.session is not None:
            code = exc.errno if isinstance(exc, pyfuse3.FUSEError) else errno.EIO
            self._guard._open_failed(self.session, code)

    def bind(self, fi: pyfuse3.FileInfo, inode: int | None = None) -> pyfuse3.FileInfo:
        if self.session is not None:
            if inode is not None:
                self.session.inode = inode
            self._guard._bind(self.session, fi)
        return fi


@dataclass(slots=True)
class _Counts:
    open: int = 0
    fresh_writers: dict[int, int] = field(default_factory=dict)  # tgid -> handles


class AccessGuard:
    def __init__(
        self,
        policy: Policy | None = None,
        audit_log: AuditLog | None = None,
        audit: AuditConfig | None = None,
        alerts: AlertConfig | None = None,
        resolver: CallerResolver | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.policy = policy
        self.log = audit_log
        self.audit = audit or AuditConfig()
        self.active = policy is not None or audit_log is not None
        self._clock = clock
        self._resolver = resolver or CallerResolver()
        self.detector: Detector | None = None
        if audit_log is not None and alerts is not None:
            self.detector = Detector(alerts, clock, audit_log.load_state(READERS_STATE))
        self._sessions: dict[int, Session] = {}
        self._counts: dict[int, _Counts] = {}
        self._inodes: Namespace | None = None
        self._unsubscribe: Callable[[], None] | None = None
        self.source = ""  # the policy file, for reload records

    # ---- wiring ---------------------------------------------------------------------------------

    def attach(self, inodes: Namespace) -> None:
        self._inodes = inodes

    def start(self, **mount_fields: Any) -> None:
        """Audit the mount and listen to key and block events."""
        if self.log is None:
            return
        self.log.start()
        self._unsubscribe = events.subscribe(self._on_event)
        self.log.submit("mount", pid=os.getpid(), **mount_fields)
        for problem in self.log.startup_problems:
            self._alert([Alert("log_tampered", "", problem)])

    def close(self, **fields: Any) -> None:
        if self.log is None:
            return
        if self._unsubscribe is not None:
            self._unsubscribe()
        for fh in list(self._sessions):  # still open at unmount: record what they did
            self.release(fh)
        self.log.submit("unmount", **fields)
        self.log.close()

    # ---- callers, paths, decisions --------------------------------------------------------------

    async def caller(self, ctx: pyfuse3.RequestContext) -> Caller:
        hit = self._resolver.cached(ctx.uid, ctx.gid, ctx.pid)
        if hit is not None:
            return hit
        return await trio.to_thread.run_sync(self._resolver.resolve, ctx.uid, ctx.gid, ctx.pid)

    def path_of(self, inode: int) -> str | None:
        """The plaintext path (as the mount shows it) of ``inode``: what policy globs and records name."""
        assert self._inodes is not None
        try:
            return os.fsdecode(self._inodes.plain_path(inode))
        except FileNotFoundError:
            for s in self._sessions.values():  # unlinked but open: the name it was opened under
                if s.inode == inode:
                    return s.path
            return None

    def child_of(self, parent: int, name: bytes) -> str | None:
        base = self.path_of(parent)
        if base is None:
            return None
        return (base.rstrip("/") + "/" + os.fsdecode(name)) if base != "/" else "/" + os.fsdecode(name)

    def _names(self, who: Caller) -> tuple[str, ...]:
        return self.policy.names_of(who) if self.policy is not None else ()

    def _allows(self, names: tuple[str, ...], op: str, path: str | None) -> bool:
        if self.policy is None:
            return True
        if path is None:
            return False  # no name to decide on: refuse
        if op == "times":  # utimens: whoever may write a file may set its times
            return self.policy.allows(names, "write", path) or self.policy.allows(names, "setattr", path)
        return self.policy.allows(names, op, path)

    def _degraded(self, op: str) -> bool:
        return (
            self.log is not None
            and not self.log.healthy
            and self.audit.on_failure == FAIL_CLOSED
            and op in DEGRADED_DENY
        )

    def _decide(self, who: Caller, names: tuple[str, ...], op: str, path: str | None, **detail: Any) -> None:
        """Raise EACCES (after auditing the denial) unless ``op`` on ``path`` is allowed."""
        policy_op = "setattr" if op == "times" else op
        if self._degraded(policy_op):
            self._deny(who, names, op, path, "audit log unavailable", True, **detail)
        elif not self._allows(names, op, path):
            self._deny(who, names, op, path, "policy", self.policy is None or self.policy.enforce, **detail)

    def _deny(
        self, who: Caller, names: tuple[str, ...], op: str, path: str | None, reason: str, enforced: bool, **detail: Any
    ) -> None:
        self._record("fs.denied", who, names, path, op=op, reason=reason, enforced=enforced, **detail)
        if self.log is None:
            log.warning("denied: %s %s by uid %d pid %d (%s): %s", op, path, who.uid, who.pid, who.exe, reason)
        if self.detector is not None:
            self._alert(self.detector.denied(who))
        if enforced:
            raise pyfuse3.FUSEError(errno.EACCES)

    # ---- records and alerts ---------------------------------------------------------------------

    def _subject(self, who: Caller, names: tuple[str, ...]) -> dict[str, Any]:
        subject: dict[str, Any] = {
            "uid": who.uid,
            "gid": who.gid,
            "pid": who.pid,
            "tid": who.tid,
            "exe": who.exe,
            "comm": who.comm,
            "cmd": who.cmdline,
        }
        if self.policy is not None:
            subject["as"] = list(names)
        return subject

    def _record(self, event: str, who: Caller, names: tuple[str, ...], path: str | None, **fields: Any) -> None:
        if self.log is not None:
            self.log.submit(event, **self._subject(who, names), path=path if path is not None else "?", **fields)

    def _alert(self, alerts: Iterable[Alert]) -> None:
        for a in alerts:
            log.warning("audit alert (%s): %s", a.rule, a.message)
            if self.log is not None:
                self.log.submit("alert", rule=a.rule, principal=a.principal, message=a.message, **a.fields)
            events.emit(events.AUDIT_ALERT, rule=a.rule, principal=a.principal)
        if self.detector is not None and self.detector.changed and self.log is not None:
            self.detector.changed = False
            self.log.save_state(READERS_STATE, self.detector.known_state())

    def _on_event(self, ev: events.Event) -> None:
        """Key and block events from anywhere in vcfs become audit records (any thread)."""
        if ev.kind.startswith("audit.") or self.log is None:
            return
        detail = dict(ev.fields)
        path = detail.pop("path", None)
        extra: dict[str, Any] = {}
        if isinstance(path, str):  # as the producer names it: plaintext path, backing path, or both
            extra["path"] = path
        self.log.submit(ev.kind, ts=rfc3339(ev.time), detail=detail, **extra)
        if ev.kind == events.BLOCK_AUTH_FAILED and self.detector is not None:
            self._alert(self.detector.auth_failure())

    # ---- operations without a handle -------------------------------------------------------------

    @asynccontextmanager
    async def op(
        self,
        ctx: pyfuse3.RequestContext,
        op: str,
        event: str,
        path: Callable[[], str | None],
        also: Iterable[tuple[str, Callable[[], str | None]]] = (),
        record: bool = True,
        **detail: Any,
    ) -> AsyncIterator[None]:
        """Decide ``op`` (and the ``also`` checks), then audit the outcome of the body as ``event``."""
        if not self.active:
            yield
            return
        who = await self.caller(ctx)
        where = path()
        if op == "times" and (who.kernel or where is None or "ctime" in detail.get("fields", ())):
            # The kernel writing back cached times (only it sets ctime): part of writing, which a
            # writer's session covers; it must work whenever writing does (also fail-closed).
            yield
            return
        names = self._names(who)
        self._decide(who, names, op, where, **detail)
        for extra_op, extra_path in also:
            self._decide(who, names, extra_op, extra_path(), **detail)
        if self.detector is not None and record:
            self._alert(self.detector.operation(who, op, where or "?"))
        try:
            yield
        except pyfuse3.FUSEError as exc:
            if record:
                self._record(event, who, names, where, result=errname(exc.errno), **detail)
            raise
        if record:
            self._record(event, who, names, where, result="ok", **detail)

    def rename(
        self, ctx: pyfuse3.RequestContext, old_parent: int, old: bytes, new_parent: int, new: bytes, exchange: bool
    ) -> AbstractAsyncContextManager[None]:
        """rename needs ``rename`` on both names, and ``delete`` on a file it replaces."""
        new_path = self.child_of(new_parent, new) if self.active else None
        also = [("rename", lambda: new_path)]
        assert self._inodes is not None
        if self.active and not exchange and self._inodes.inode_at(new_parent, new) is not None:
            also.append(("delete", lambda: new_path))
        return self.op(ctx, "rename", "fs.rename", lambda: self.child_of(old_parent, old), also, new_path=new_path)

    def link(
        self, ctx: pyfuse3.RequestContext, inode: int, new_parent: int, new: bytes
    ) -> AbstractAsyncContextManager[None]:
        """A second name may fall under a more generous rule: it needs read and write on the file itself."""
        source = [("read", lambda: self.path_of(inode)), ("write", lambda: self.path_of(inode))]
        return self.op(ctx, "create", "fs.link", lambda: self.child_of(new_parent, new), source)

    def setattr_op(self, fields: pyfuse3.SetattrFields, fh: int | None) -> tuple[str, list[str], bool]:
        """(operation to decide, fields changed, whether to audit it) for a setattr request.

        Times alone need write or setattr; the kernel sets mtime/ctime through the writer's
        handle when it flushes cached writes, which the file's session already covers.
        """
        names = ("mode", "uid", "gid", "size", "atime", "mtime", "ctime")
        changed = [n for n in names if getattr(fields, "update_" + n)]
        if fields.update_mode or fields.update_uid or fields.update_gid:
            return "setattr", changed, True
        if fields.update_size:
            return "write", changed, True
        return "times", changed, fh is None

    # ---- file sessions ---------------------------------------------------------------------------

    async def open(self, ctx: pyfuse3.RequestContext, inode: int, flags: int) -> Grant:
        if not self.active:
            return Grant(self, None)
        who = await self.caller(ctx)
        return self._grant(who, self.path_of(inode), inode, flags, created=False)

    async def create(self, ctx: pyfuse3.RequestContext, parent: int, name: bytes, flags: int) -> Grant:
        if not self.active:
            return Grant(self, None)
        who = await self.caller(ctx)
        return self._grant(who, self.child_of(parent, name), 0, flags, created=True)

    def _grant(self, who: Caller, path: str | None, inode: int, flags: int, created: bool) -> Grant:
        names = self._names(who)
        acc = flags & os.O_ACCMODE
        write = acc != os.O_RDONLY or bool(flags & os.O_TRUNC)
        read = acc != os.O_WRONLY
        fresh = created or (write and bool(flags & os.O_TRUNC))
        tags = tuple(
            t for t, on in (("create", created), ("trunc", flags & os.O_TRUNC), ("append", flags & os.O_APPEND)) if on
        )
        if created:
            self._decide(who, names, "create", path)
        if write:
            self._decide(who, names, "write", path)
        readback = False
        if read and not (self._allows(names, "read", path) and not self._degraded("read")):
            own = fresh or (inode in self._counts and who.pid in self._counts[inode].fresh_writers)
            if own and self._allows(names, "readback", path):
                readback = True
            else:
                self._decide(who, names, "read", path, flags=list(tags))
        return Grant(self, Session(who, names, path or "?", inode, read, write, readback, fresh, tags, self._clock()))

    def _bind(self, s: Session, fi: pyfuse3.FileInfo) -> None:
        s.fh = fi.fh
        self._sessions[fi.fh] = s
        counts = self._counts.setdefault(s.inode, _Counts())
        others = counts.open
        counts.open += 1
        if s.fresh and s.write:
            counts.fresh_writers[s.caller.pid] = counts.fresh_writers.get(s.caller.pid, 0) + 1
        plaintext_read = s.read and not s.readback
        if self.audit.exact_reads and self.log is not None and plaintext_read and not s.write and not others:
            fi.keep_cache = False  # count what this session reads, not what an earlier one left cached
        if self.detector is not None:
            if plaintext_read:
                self._alert(self.detector.read_opened(s.caller, s.path))
            if s.write:
                self._alert(self.detector.operation(s.caller, "create" if "create" in s.flags else "write", s.path))

    def _open_failed(self, s: Session, code: int) -> None:
        self._record(
            "fs.session", s.caller, s.names, s.path, opened=rfc3339(s.opened), mode=_mode(s), flags=list(s.flags),
            read=0, written=0, result=errname(code),
        )  # fmt: skip

    def read(self, fh: int, n: int) -> None:
        s = self._sessions.get(fh)
        if s is None:
            return
        s.bytes_read += n
        if self.detector is not None and s.read and not s.readback and s.bytes_read - s.reported >= REPORT_BYTES:
            self._alert(self.detector.bytes_read(s.caller, s.bytes_read - s.reported))
            s.reported = s.bytes_read

    def wrote(self, fh: int, n: int) -> None:
        s = self._sessions.get(fh)
        if s is not None:
            s.bytes_written += n

    def failed(self, fh: int, code: int) -> None:
        s = self._sessions.get(fh)
        if s is not None and not s.error:
            s.error = code

    def release(self, fh: int) -> None:
        s = self._sessions.pop(fh, None)
        if s is None:
            return
        counts = self._counts[s.inode]
        counts.open -= 1
        if s.fresh and s.write:
            left = counts.fresh_writers[s.caller.pid] - 1
            if left:
                counts.fresh_writers[s.caller.pid] = left
            else:
                del counts.fresh_writers[s.caller.pid]
        if not counts.open:
            del self._counts[s.inode]
        if self.detector is not None and s.read and not s.readback and s.bytes_read > s.reported:
            self._alert(self.detector.bytes_read(s.caller, s.bytes_read - s.reported))
        ops = [op for op, on in (("create", "create" in s.flags), ("truncate", "trunc" in s.flags)) if on]
        ops += ["write"] if s.bytes_written else []
        ops += (["readback"] if s.readback else ["read"]) if s.bytes_read and s.read else []
        self._record(
            "fs.session", s.caller, s.names, s.path, opened=rfc3339(s.opened), mode=_mode(s), flags=list(s.flags),
            ops=ops, read=s.bytes_read, written=s.bytes_written, result=errname(s.error) if s.error else "ok",
            **({"readback": True} if s.readback else {}),
        )  # fmt: skip

    # ---- policy reload --------------------------------------------------------------------------

    def apply(self, cfg: AccessConfig | None, error: PolicyError | None) -> None:
        """Install a reloaded config, or audit why it was refused (the current one stays)."""
        if error is not None or cfg is None:
            problems = error.problems if error is not None else []
            message = error.message if error is not None else "no config"
            log.error("policy reload refused, the current policy stays in force: %s", message)
            if self.log is not None:
                self.log.submit("policy.reload", file=self.source, result="rejected", error=message, problems=problems)
            return
        self.policy = cfg.policy
        self.active = self.policy is not None or self.log is not None
        if self.detector is not None:
            self.detector.reconfigure(cfg.alerts)
        note = None
        if self.log is not None and _audit_fields(cfg.audit) != _audit_fields(self.audit):
            note = "[audit] settings changed; they apply at the next mount"
            log.warning("policy reload: %s", note)
        log.info("policy reloaded from %s (sha256 %s)", self.source, cfg.digest[:16])
        if self.log is not None:
            self.log.submit(
                "policy.reload", file=self.source, result="ok", sha256=cfg.digest, enforced=cfg.policy is not None,
                **({"note": note} if note else {}),
            )  # fmt: skip


def _audit_fields(cfg: AuditConfig) -> tuple[Any, ...]:
    return tuple(getattr(cfg, f) for f in cfg.__dataclass_fields__ if f != "dir")


def _mode(s: Session) -> str:
    return ("r" if s.read else "") + ("w" if s.write else "")
