"""What a running mount reports about itself: one snapshot for ``vcfs status`` and for metrics.

The snapshot is built from the counters (vcfs/counters.py), the filesystem's open files, the
store config (which key domains and KEK versions exist, re-read when it changes) and the
events seen since the mount started (vcfs/events.py: audit alerts, HSM outages). It holds
no secret: KEKs are named ``domain/vN``, nothing else about them is known here.

Thread use: ``snapshot`` is called from the trio thread (control socket) and from the
Prometheus exporter's thread; everything it reads is either immutable, a copy taken under a
lock, or a single ``len()`` of a dict.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from vcfs import __version__, counters, events
from vcfs.config import StoreConfig, config_path, load_config
from vcfs.errors import VcfsError

AUDIT_ALERT = "audit.alert"  # emitted by the audit trail (vcfs/audit) when an anomaly rule fires
HSM_UNAVAILABLE = "hsm.unavailable"  # emitted by the key layer when a token stops answering
HSM_AVAILABLE = "hsm.available"
STALLED_AFTER = 10.0  # seconds an HSM call may run before the HSM counts as stalled


def rfc3339(t: float) -> str:
    return datetime.fromtimestamp(t, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


@dataclass
class EventTally:
    """Counts every event by kind, and remembers the last HSM availability event."""

    counts: dict[str, int] = field(default_factory=dict)
    hsm_down: str | None = None  # reason of the last hsm.unavailable not yet followed by hsm.available
    lock: threading.Lock = field(default_factory=threading.Lock)

    def __call__(self, event: events.Event) -> None:
        with self.lock:
            self.counts[event.kind] = self.counts.get(event.kind, 0) + 1
            if event.kind == HSM_UNAVAILABLE:
                self.hsm_down = str(event.fields.get("reason") or "unavailable")
            elif event.kind == HSM_AVAILABLE:
                self.hsm_down = None

    def copy(self) -> tuple[dict[str, int], str | None]:
        with self.lock:
            return dict(self.counts), self.hsm_down


class MountState:
    def __init__(self, backing: Path, mountpoint: Path, open_files: Callable[[], int]) -> None:
        self.backing = backing
        self.mountpoint = mountpoint
        self.started = time.time()
        self.mounted_since: float | None = None  # set when the mount first answered
        self._open_files = open_files
        self.tally = EventTally()
        self._unsubscribe = events.subscribe(self.tally)
        self._cfg: StoreConfig | None = None
        self._cfg_stamp = -1
        self._cfg_lock = threading.Lock()
        self.exports: dict[str, str] = {}  # where metrics go: {"listen": "127.0.0.1:9477", ...}
        self.ingest: list[str] = []  # an ingest mount: the recipients new files go to ("default/r1")

    def close(self) -> None:
        self._unsubscribe()

    def store_config(self) -> StoreConfig | None:
        """The store config, re-read when its mtime changed (a rotate or retire meanwhile)."""
        with self._cfg_lock:
            try:
                stamp = config_path(self.backing).stat().st_mtime_ns
                if stamp != self._cfg_stamp:
                    self._cfg = load_config(self.backing)
                    self._cfg_stamp = stamp
            except (OSError, VcfsError):
                pass  # keep the last good copy; status must not fail on a half-edited config
            return self._cfg

    def hsm_state(self, hsm: counters.HsmStats, down: str | None) -> str:
        if down is not None:
            return "unavailable"
        if hsm.in_flight_since is not None and time.monotonic() - hsm.in_flight_since > STALLED_AFTER:
            return "stalled"
        if hsm.last_error_time is not None and (hsm.last_ok is None or hsm.last_error_time > hsm.last_ok):
            return "failing"
        return "ok"

    def snapshot(self) -> dict[str, Any]:
        now = time.time()
        totals = counters.totals()
        hsm = counters.hsm_stats()
        counts, down = self.tally.copy()
        calls = sum(hsm.calls.values())
        cfg = self.store_config()
        domains = []
        if cfg is not None:
            for d in cfg.domains.values():
                domains.append(
                    {
                        "name": d.name,
                        "current": f"{d.name}/v{d.current}",
                        "versions": [{"version": k.version, "state": k.state} for k in d.keks],
                    }
                )
        return {
            "version": __version__,
            "pid": os.getpid(),
            "owner_uid": os.geteuid(),
            "mountpoint": str(self.mountpoint),
            "backing": str(self.backing),
            "store_id": cfg.store_id if cfg is not None else None,
            "mounted": self.mounted_since is not None,
            "mounted_since": rfc3339(self.mounted_since) if self.mounted_since else None,
            "mounted_since_epoch": self.mounted_since,
            "uptime_seconds": round(now - self.mounted_since, 3) if self.mounted_since else 0.0,
            "keys": {
                "default_domain": cfg.default_domain if cfg is not None else None,
                "domains": domains,
                "in_use": hsm.kek_use,
                "ingest": list(self.ingest) or None,
            },
            "open_files": self._open_files(),
            **totals,
            "hsm": {
                "state": self.hsm_state(hsm, down),
                "unavailable_reason": down,
                "calls": hsm.calls,
                "errors": hsm.errors,
                "last_latency_ms": round(hsm.last_seconds * 1000, 3),
                "mean_latency_ms": round(hsm.seconds_total / calls * 1000, 3) if calls else 0.0,
                "max_latency_ms": round(hsm.max_seconds * 1000, 3),
                "seconds_total": hsm.seconds_total,
                "buckets": dict(zip([str(b) for b in counters.HSM_BUCKETS] + ["+Inf"], hsm.buckets, strict=True)),
                "last_error": hsm.last_error or None,
                "last_error_time": rfc3339(hsm.last_error_time) if hsm.last_error_time else None,
            },
            "audit_alerts": counts.get(AUDIT_ALERT, 0),
            "events": counts,
            "metrics": dict(self.exports),
        }
