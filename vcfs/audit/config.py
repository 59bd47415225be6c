"""The ``[audit]`` and ``[alerts]`` tables: parsed from plain dicts so any config file can carry them.

Each parse function takes the table (already loaded by tomllib) and a ``Problems`` collector
that turns key paths into line-numbered messages; unknown keys are mistakes, not ignored, so
a typo never silently switches a protection off. Defaults are listed in docs/AUDIT.md.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import time as dtime
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from vcfs.tomllines import Path as KeyPath
from vcfs.tomllines import Problems

FAIL_CLOSED, FAIL_OPEN = "fail-closed", "fail-open"
ON_FAILURE_WANT = f'"{FAIL_CLOSED}" or "{FAIL_OPEN}"'
FORWARDS = ("syslog", "journal")
OFF_HOURS_OPS = ("read", "write", "create", "delete", "rename", "setattr", "list")
DAYS = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")
_UNITS = {"": 1, "b": 1, "k": 1000, "kb": 1000, "m": 10**6, "mb": 10**6, "g": 10**9, "gb": 10**9, "t": 10**12}
_UNITS |= {"tb": 10**12, "kib": 1 << 10, "mib": 1 << 20, "gib": 1 << 30, "tib": 1 << 40}
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([A-Za-z]*)\s*$")
_HOURS = re.compile(r"^(\d{1,2}):(\d{2})-(\d{1,2}):(\d{2})$")


@dataclass(frozen=True, slots=True)
class AuditConfig:
    dir: Path | None = None  # None: no audit trail
    rotate_bytes: int = 64 << 20
    checkpoint_records: int = 1000
    checkpoint_seconds: float = 60.0
    flush_seconds: float = 0.2
    fsync: bool = True
    fsync_seconds: float = 1.0  # group commit: written every flush_ms, fsynced at most this often (0: every batch)
    on_failure: str = FAIL_CLOSED
    hash_names: bool = False
    hsm_key: str = ""  # label of the HMAC key in the HSM; "" = one key per log, vcfs-audit-<log id>
    exact_reads: bool = True  # audited read sessions start with a cold page cache: bytes_read is what was read
    max_queue: int = 100_000
    forward: tuple[str, ...] = ()
    syslog_socket: str = "/dev/log"
    syslog_sd_id: str = "vcfs@32473"  # 32473: the documentation enterprise number (RFC 5612); use your own
    journal_socket: str = "/run/systemd/journal/socket"


@dataclass(frozen=True, slots=True)
class AlertConfig:
    enabled: bool = True
    window_seconds: float = 600.0
    bulk_read_bytes: int = 10 << 30
    bulk_read_files: int = 200
    working_hours: tuple[dtime, dtime] | None = None  # None: no off-hours rule
    working_days: frozenset[int] = frozenset(range(5))  # 0 = Monday
    timezone: str = "UTC"
    off_hours_ops: frozenset[str] = frozenset({"read", "delete"})
    first_read: bool = True
    known_uids: frozenset[int] = frozenset()
    known_exes: frozenset[str] = frozenset()
    denial_burst: int = 10
    auth_failure_burst: int = 3
    burst_seconds: float = 60.0
    cooldown_seconds: float = 3600.0

    def zone(self) -> ZoneInfo:
        return ZoneInfo(self.timezone)


def parse_size(value: Any) -> int | None:
    """Bytes from an int or a string such as ``"512 MiB"`` or ``"10GB"``; None if not a size."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value if value >= 0 else None
    if isinstance(value, str):
        m = _SIZE.match(value)
        if m and m.group(2).lower() in _UNITS:
            return int(float(m.group(1)) * _UNITS[m.group(2).lower()])
    return None


class _Table:
    """Typed reads from one table, reporting wrong types and unknown keys with their path."""

    def __init__(self, table: Any, where: KeyPath, p: Problems, known: set[str]) -> None:
        self.t = table if isinstance(table, dict) else {}
        self.where = where
        self.p = p
        if not isinstance(table, dict):
            p.add(where, "must be a table")
        for key in sorted(set(self.t) - known):
            p.add((*where, key), f"unknown key (expected one of: {', '.join(sorted(known))})")

    def get(self, key: str, kind: type | tuple[type, ...], default: Any, check: Any = None, want: str = "") -> Any:
        if key not in self.t:
            return default
        value = self.t[key]
        kinds = kind if isinstance(kind, tuple) else (kind,)
        ok = isinstance(value, kinds) and not (isinstance(value, bool) and bool not in kinds)
        if ok and check is not None:
            ok = bool(check(value))
        if not ok:
            self.p.add((*self.where, key), f"must be {want or ' or '.join(k.__name__ for k in kinds)}")
            return default
        return value

    def size(self, key: str, default: int) -> int:
        if key not in self.t:
            return default
        got = parse_size(self.t[key])
        if got is None:
            self.p.add((*self.where, key), 'must be a size in bytes (an integer or a string like "512 MiB")')
            return default
        return got


def _positive(v: float) -> bool:
    return v > 0


def parse_audit(table: Any, p: Problems, where: KeyPath = ("audit",)) -> AuditConfig:
    known = {f for f in AuditConfig.__dataclass_fields__ if f != "rotate_bytes"} | {
        "rotate_size",
        "flush_ms",
        "fsync_ms",
    }
    known -= {"flush_seconds", "fsync_seconds"}
    t = _Table(table, where, p, known)
    d = AuditConfig()
    directory = t.get("dir", str, None, lambda v: v.startswith("/"), "an absolute path")
    forward = t.get("forward", list, [], lambda v: all(x in FORWARDS for x in v), f"a list of {', '.join(FORWARDS)}")
    return AuditConfig(
        dir=Path(directory) if directory else None,
        rotate_bytes=t.size("rotate_size", d.rotate_bytes),
        checkpoint_records=t.get("checkpoint_records", int, d.checkpoint_records, _positive, "a positive integer"),
        checkpoint_seconds=float(
            t.get("checkpoint_seconds", (int, float), d.checkpoint_seconds, _positive, "a positive number")
        ),
        flush_seconds=t.get("flush_ms", int, 200, lambda v: 1 <= v <= 10_000, "milliseconds from 1 to 10000") / 1000,
        fsync=t.get("fsync", bool, d.fsync),
        fsync_seconds=t.get("fsync_ms", int, 1000, lambda v: 0 <= v <= 60_000, "milliseconds from 0 to 60000") / 1000,
        on_failure=t.get("on_failure", str, d.on_failure, lambda v: v in (FAIL_CLOSED, FAIL_OPEN), ON_FAILURE_WANT),
        hash_names=t.get("hash_names", bool, d.hash_names),
        hsm_key=t.get("hsm_key", str, d.hsm_key, lambda v: 0 < len(v) <= 64, "a label of 1 to 64 characters"),
        exact_reads=t.get("exact_reads", bool, d.exact_reads),
        max_queue=t.get("max_queue", int, d.max_queue, lambda v: v >= 100, "an integer of at least 100"),
        forward=tuple(forward),
        syslog_socket=t.get("syslog_socket", str, d.syslog_socket),
        syslog_sd_id=t.get(
            "syslog_sd_id", str, d.syslog_sd_id, lambda v: re.match(r"^[!-~]{1,32}$", v) and "=" not in v, "an SD-ID"
        ),
        journal_socket=t.get("journal_socket", str, d.journal_socket),
    )


def _hours(value: Any, where: KeyPath, p: Problems) -> tuple[dtime, dtime] | None:
    m = _HOURS.match(value) if isinstance(value, str) else None
    if m:
        h1, m1, h2, m2 = (int(x) for x in m.groups())
        if h1 < 24 and h2 <= 24 and m1 < 60 and m2 < 60 and (h2, m2) <= (24, 0):
            end = dtime(23, 59, 59, 999999) if h2 == 24 else dtime(h2, m2)
            return (dtime(h1, m1), end)
    p.add(where, 'must be "HH:MM-HH:MM" (local time in [alerts].timezone; may wrap past midnight)')
    return None


def parse_alerts(table: Any, p: Problems, where: KeyPath = ("alerts",)) -> AlertConfig:
    known = set(AlertConfig.__dataclass_fields__)
    t = _Table(table, where, p, known)
    d = AlertConfig()
    hours = _hours(t.t["working_hours"], (*where, "working_hours"), p) if "working_hours" in t.t else None
    days = t.get("working_days", list, list(DAYS[:5]), lambda v: all(x in DAYS for x in v), f"a list of {DAYS}")
    zone = t.get("timezone", str, d.timezone)
    try:
        ZoneInfo(zone)
    except (ZoneInfoNotFoundError, ValueError):
        p.add((*where, "timezone"), f"unknown time zone {zone!r} (an IANA name such as Europe/Berlin)")
        zone = d.timezone
    ops = t.get(
        "off_hours_ops", list, sorted(d.off_hours_ops), lambda v: all(x in OFF_HOURS_OPS for x in v), str(OFF_HOURS_OPS)
    )
    uids = t.get("known_uids", list, [], lambda v: all(isinstance(x, int) and not isinstance(x, bool) for x in v))
    exes = t.get("known_exes", list, [], lambda v: all(isinstance(x, str) for x in v), "a list of paths")
    count = "a positive integer"
    return AlertConfig(
        enabled=t.get("enabled", bool, d.enabled),
        window_seconds=float(t.get("window_seconds", (int, float), d.window_seconds, _positive, "a positive number")),
        bulk_read_bytes=t.size("bulk_read_bytes", d.bulk_read_bytes),
        bulk_read_files=t.get("bulk_read_files", int, d.bulk_read_files, _positive, count),
        working_hours=hours,
        working_days=frozenset(DAYS.index(x) for x in days),
        timezone=zone,
        off_hours_ops=frozenset(ops),
        first_read=t.get("first_read", bool, d.first_read),
        known_uids=frozenset(uids),
        known_exes=frozenset(exes),
        denial_burst=t.get("denial_burst", int, d.denial_burst, _positive, count),
        auth_failure_burst=t.get("auth_failure_burst", int, d.auth_failure_burst, _positive, count),
        burst_seconds=float(t.get("burst_seconds", (int, float), d.burst_seconds, _positive, "a positive number")),
        cooldown_seconds=float(t.get("cooldown_seconds", (int, float), d.cooldown_seconds, lambda v: v >= 0, "≥ 0")),
    )
