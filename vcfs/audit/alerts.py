"""Online anomaly rules over what the access guard sees; pure, with an injectable clock.

Rules (thresholds in ``[alerts]``, docs/AUDIT.md):
- bulk read: one principal (uid + executable) reads more than ``bulk_read_bytes`` or opens more
  than ``bulk_read_files`` distinct files for reading within ``window_seconds``;
- off hours: a plaintext read (or another operation listed in ``off_hours_ops``) outside
  ``working_hours`` on ``working_days`` in ``timezone`` (zoneinfo, so DST is right);
- first reader: a uid, or an executable, reads plaintext for the first time (the known set is
  persisted by the audit log, HSM-authenticated, and can be seeded in the config);
- bursts: more than ``denial_burst`` denials for one principal, or more than
  ``auth_failure_burst`` block authentication failures overall, within ``burst_seconds``.
Each (rule, principal) pair fires at most once per ``cooldown_seconds``. Recording does not
trigger anything: writes, creates and read-back of one's own recording are not plaintext reads.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from vcfs.audit.config import AlertConfig
from vcfs.caller import Caller

Scalar = str | int | bool | None


@dataclass(frozen=True, slots=True)
class Alert:
    rule: str
    principal: str
    message: str
    fields: dict[str, Scalar] = field(default_factory=dict)


@dataclass(slots=True)
class _Reads:
    chunks: deque[tuple[float, int]] = field(default_factory=deque)
    total: int = 0
    files: dict[str, float] = field(default_factory=dict)


class Detector:
    """Thread-safe: the FUSE loop and event sinks on other threads both feed it."""

    def __init__(self, cfg: AlertConfig, clock: Callable[[], float] = time.time, known: Any = None) -> None:
        self._clock = clock
        self._lock = threading.Lock()
        self._reads: dict[str, _Reads] = {}
        self._denials: dict[str, deque[float]] = {}
        self._auth: deque[float] = deque()
        self._fired: dict[tuple[str, str], float] = {}
        known = known if isinstance(known, dict) else {}
        self._known_uids: set[int] = {u for u in known.get("uids", []) if isinstance(u, int)}
        self._known_exes: set[str] = {e for e in known.get("exes", []) if isinstance(e, str)}
        self.changed = False  # the known readers grew: persist them
        self.cfg = cfg
        self.reconfigure(cfg)

    def reconfigure(self, cfg: AlertConfig) -> None:
        with self._lock:
            self.cfg = cfg
            self._known_uids |= cfg.known_uids
            self._known_exes |= cfg.known_exes

    def known_state(self) -> dict[str, list[Any]]:
        with self._lock:
            return {"uids": sorted(self._known_uids), "exes": sorted(self._known_exes)}

    # ---- inputs --------------------------------------------------------------------------------

    def read_opened(self, who: Caller, path: str) -> list[Alert]:
        """A session that may read plaintext was opened."""
        now = self._clock()
        out: list[Alert] = []
        with self._lock:
            if not self.cfg.enabled:
                return out
            self._off_hours(out, who, "read", path, now)
            self._first_reader(out, who, path, now)
            reads = self._reads.setdefault(who.key, _Reads())
            reads.files[path] = now
            self._prune(reads, now)
            if len(reads.files) > self.cfg.bulk_read_files:
                self._fire(
                    out, "bulk_read_files", who.key, now,
                    f"{who.key} opened {len(reads.files)} files for reading within {self.cfg.window_seconds:g} s "
                    f"(threshold {self.cfg.bulk_read_files})",
                    files=len(reads.files), uid=who.uid, exe=who.exe,
                )  # fmt: skip
        return out

    def bytes_read(self, who: Caller, n: int) -> list[Alert]:
        now = self._clock()
        out: list[Alert] = []
        with self._lock:
            if not self.cfg.enabled or n <= 0:
                return out
            reads = self._reads.setdefault(who.key, _Reads())
            reads.chunks.append((now, n))
            reads.total += n
            self._prune(reads, now)
            if reads.total > self.cfg.bulk_read_bytes:
                self._fire(
                    out, "bulk_read_bytes", who.key, now,
                    f"{who.key} read {reads.total} bytes of plaintext within {self.cfg.window_seconds:g} s "
                    f"(threshold {self.cfg.bulk_read_bytes})",
                    bytes=reads.total, uid=who.uid, exe=who.exe,
                )  # fmt: skip
        return out

    def operation(self, who: Caller, op: str, path: str) -> list[Alert]:
        """Any other operation, for the off-hours rule (create, write, delete, rename, ...)."""
        out: list[Alert] = []
        with self._lock:
            if self.cfg.enabled:
                self._off_hours(out, who, op, path, self._clock())
        return out

    def denied(self, who: Caller) -> list[Alert]:
        now = self._clock()
        out: list[Alert] = []
        with self._lock:
            if not self.cfg.enabled:
                return out
            times = self._denials.setdefault(who.key, deque())
            times.append(now)
            while times and times[0] < now - self.cfg.burst_seconds:
                times.popleft()
            if len(times) > self.cfg.denial_burst:
                self._fire(
                    out, "denial_burst", who.key, now,
                    f"{who.key} was denied {len(times)} times within {self.cfg.burst_seconds:g} s",
                    denials=len(times), uid=who.uid, exe=who.exe,
                )  # fmt: skip
        return out

    def auth_failure(self) -> list[Alert]:
        now = self._clock()
        out: list[Alert] = []
        with self._lock:
            if not self.cfg.enabled:
                return out
            self._auth.append(now)
            while self._auth and self._auth[0] < now - self.cfg.burst_seconds:
                self._auth.popleft()
            if len(self._auth) > self.cfg.auth_failure_burst:
                self._fire(
                    out, "auth_failure_burst", "", now,
                    f"{len(self._auth)} block authentication failures within {self.cfg.burst_seconds:g} s: "
                    "the backing store is being tampered with or is failing",
                    failures=len(self._auth),
                )  # fmt: skip
        return out

    # ---- rules (caller holds the lock) ---------------------------------------------------------

    def _prune(self, reads: _Reads, now: float) -> None:
        horizon = now - self.cfg.window_seconds
        while reads.chunks and reads.chunks[0][0] < horizon:
            reads.total -= reads.chunks.popleft()[1]
        for path in [p for p, t in reads.files.items() if t < horizon]:
            del reads.files[path]

    def in_working_hours(self, t: float) -> bool:
        hours = self.cfg.working_hours
        if hours is None:
            return True
        local = datetime.fromtimestamp(t, self.cfg.zone())
        if local.weekday() not in self.cfg.working_days:
            return False
        start, end = hours
        now = local.time()
        return start <= now < end if start <= end else (now >= start or now < end)

    def _off_hours(self, out: list[Alert], who: Caller, op: str, path: str, now: float) -> None:
        if op not in self.cfg.off_hours_ops or self.in_working_hours(now):
            return
        local = datetime.fromtimestamp(now, self.cfg.zone()).strftime("%a %H:%M %Z")
        self._fire(
            out, "off_hours", who.key, now, f"{who.key}: {op} of {path} outside working hours ({local})",
            op=op, path=path, uid=who.uid, exe=who.exe,
        )  # fmt: skip

    def _first_reader(self, out: list[Alert], who: Caller, path: str, now: float) -> None:
        if not self.cfg.first_read:
            return
        if who.uid not in self._known_uids:
            self._known_uids.add(who.uid)
            self.changed = True
            self._fire(
                out, "first_reader_uid", who.key, now, f"uid {who.uid} reads plaintext for the first time ({path})",
                uid=who.uid, exe=who.exe, path=path, cooldown=False,
            )  # fmt: skip
        if who.exe is not None and who.exe not in self._known_exes:
            self._known_exes.add(who.exe)
            self.changed = True
            self._fire(
                out, "first_reader_exe", who.key, now, f"{who.exe} reads plaintext for the first time ({path})",
                uid=who.uid, exe=who.exe, path=path, cooldown=False,
            )  # fmt: skip

    def _fire(self, out: list[Alert], rule: str, principal: str, now: float, message: str, **fields: Any) -> None:
        if fields.pop("cooldown", True):
            last = self._fired.get((rule, principal))
            if last is not None and now - last < self.cfg.cooldown_seconds:
                return
            self._fired[(rule, principal)] = now
        out.append(Alert(rule, principal, message, fields))
