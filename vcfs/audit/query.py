"""``vcfs audit show`` and ``vcfs audit report``: select and summarise records (no verification here).

Both read the log as it is; ``vcfs audit verify`` is what says whether it can be trusted.
Times: RFC 3339 (``2026-11-28T10:00:00Z``), a date or date and time in the host's local zone
(``2026-11-28``, ``2026-11-28 14:30``), or a span back from now (``90m``, ``24h``, ``7d``).
With hashed names (``[audit] hash_names``) a path filter is hashed the same way in the HSM and
matches that path and everything below it; globs need plain names.
"""

from __future__ import annotations

import json
import re
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from vcfs.audit.record import parse_rfc3339, segments
from vcfs.errors import AuditError, UsageError
from vcfs.policy import glob_to_regex

_SPAN = re.compile(r"^(\d+)\s*([smhdw])$")
_SPAN_SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


def parse_when(text: str, now: float | None = None) -> float:
    now = time.time() if now is None else now
    m = _SPAN.match(text.strip())
    if m:
        return now - int(m.group(1)) * _SPAN_SECONDS[m.group(2)]
    try:
        if text.endswith("Z") or re.search(r"[+-]\d\d:\d\d$", text):
            return parse_rfc3339(text)
        return datetime.fromisoformat(text).timestamp()  # naive: the host's local time
    except ValueError:
        raise UsageError(
            f"cannot read the time {text!r}", hint="use RFC 3339 (2026-11-28T10:00:00Z), a date, or a span like 24h"
        ) from None


def iter_records(directory: Path) -> Iterator[dict[str, Any]]:
    for _seq, path in segments(directory):
        with open(path, "rb") as f:
            for line in f:
                try:
                    rec = json.loads(line)
                except ValueError:
                    continue
                if isinstance(rec, dict):
                    yield rec


def record_time(rec: dict[str, Any]) -> float | None:
    try:
        return parse_rfc3339(str(rec["ts"]))
    except (KeyError, ValueError):
        return None


@dataclass(frozen=True, slots=True)
class Filters:
    since: float | None = None
    until: float | None = None
    uid: int | None = None
    exe: str | None = None
    principal: str | None = None
    path: Callable[[str], bool] | None = None
    events: frozenset[str] | None = None

    def match(self, rec: dict[str, Any]) -> bool:
        if self.events is not None and not any(
            rec.get("event") == e or str(rec.get("event", "")).startswith(e + ".") for e in self.events
        ):
            return False
        if self.since is not None or self.until is not None:
            t = record_time(rec)
            if t is None or (self.since is not None and t < self.since) or (self.until is not None and t >= self.until):
                return False
        if self.uid is not None and rec.get("uid") != self.uid:
            return False
        if self.exe is not None and rec.get("exe") != self.exe:
            return False
        if self.principal is not None and self.principal not in (rec.get("as") or []):
            return False
        return self.path is None or (isinstance(rec.get("path"), str) and self.path(rec["path"]))


def path_matcher(pattern: str, hash_path: Callable[[str], str] | None) -> Callable[[str], bool]:
    """Exact path or anything below it; a glob (``*``, ``?``, ``[``) matches as in the policy."""
    if hash_path is not None:
        if any(c in pattern for c in "*?["):
            raise UsageError("this log stores hashed names: filter by a literal path, not a glob")
        pattern = hash_path(pattern)
    elif any(c in pattern for c in "*?["):
        regex = glob_to_regex(pattern)
        return lambda p: regex.match(p) is not None
    base = pattern.rstrip("/") or "/"
    return lambda p: p == base or p.startswith(base.rstrip("/") + "/")


def select(directory: Path, filters: Filters) -> list[dict[str, Any]]:
    try:
        return [rec for rec in iter_records(directory) if filters.match(rec)]
    except OSError as exc:
        raise AuditError(f"cannot read the audit log in {directory}: {exc.strerror}") from None


def _human(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f}{unit}" if unit == "B" else f"{n:.1f}{unit}"
        n = n / 1024  # type: ignore[assignment]
    return str(n)


def table(records: list[dict[str, Any]]) -> list[str]:
    lines = [f"{'TIME (UTC)':<19} {'EVENT':<17} {'UID':>6} {'PID':>7} {'EXE':<14} {'RESULT':<8} {'R/W':>17}  PATH"]
    for r in records:
        ts = str(r.get("ts", ""))[:19].replace("T", " ")
        exe = str(r.get("exe") or "").rsplit("/", 1)[-1][:14]
        rw = f"{_human(r['read'])}/{_human(r['written'])}" if "read" in r and "written" in r else ""
        result = str(r.get("result", r.get("rule", "")))[:8]
        path = str(r.get("path", ""))
        if r.get("new_path"):
            path += f" -> {r['new_path']}"
        if r.get("event") == "fs.denied":
            result = "DENIED"
            path = f"{r.get('op')} {path}"
        elif r.get("event") == "alert":
            path = str(r.get("message", ""))
        uid = r.get("uid", "")
        pid = r.get("pid", "")
        lines.append(
            f"{ts:<19} {r.get('event', '')!s:<17} {uid!s:>6} {pid!s:>7} {exe:<14} {result:<8} {rw:>17}  {path}"
        )
    return lines


def summarise(records: list[dict[str, Any]], since: float | None, until: float | None) -> dict[str, Any]:
    """Sessions, denials, alerts and other notable events of a time range, grouped by principal."""
    by_principal: dict[tuple[Any, Any], dict[str, Any]] = {}
    denials: Counter[tuple[Any, Any, Any]] = Counter()
    keys: Counter[str] = Counter()
    alerts, reloads, degraded = [], [], []
    mounts = auth_failures = 0
    for r in records:
        event = str(r.get("event", ""))
        if event == "fs.session":
            p = by_principal.setdefault(
                (r.get("uid"), r.get("exe")), {"sessions": 0, "read": 0, "written": 0, "files": set()}
            )
            p["sessions"] += 1
            p["read"] += int(r.get("read") or 0)
            p["written"] += int(r.get("written") or 0)
            p["files"].add(r.get("path"))
        elif event == "fs.denied":
            denials[(r.get("uid"), r.get("exe"), r.get("op"))] += 1
        elif event == "alert":
            alerts.append({"ts": r.get("ts"), "rule": r.get("rule"), "message": r.get("message")})
        elif event == "block.auth_failed":
            auth_failures += 1
        elif event.startswith("key."):
            keys[event] += 1
        elif event == "policy.reload":
            reloads.append({"ts": r.get("ts"), "result": r.get("result"), "error": r.get("error")})
        elif event == "mount":
            mounts += 1
        elif event == "audit.degraded":
            degraded.append({k: r.get(k) for k in ("since", "until", "error", "lost")})
    sessions = [
        {"uid": uid, "exe": exe, "sessions": p["sessions"], "read": p["read"], "written": p["written"],
         "files": len(p["files"])}
        for (uid, exe), p in sorted(by_principal.items(), key=lambda kv: -kv[1]["read"])
    ]  # fmt: skip
    return {
        "since": since,
        "until": until,
        "records": len(records),
        "sessions": sessions,
        "denials": [{"uid": u, "exe": e, "op": o, "count": n} for (u, e, o), n in denials.most_common()],
        "alerts": alerts,
        "auth_failures": auth_failures,
        "key_events": dict(keys),
        "policy_reloads": reloads,
        "mounts": mounts,
        "degraded": degraded,
    }
