"""Copies of audit records for a SIEM: syslog (RFC 5424 over a local datagram socket) and journald.

The JSON log stays the source of truth; these are best-effort copies sent from the writer
thread after a batch is on disk. A copy off the host is also what makes a cut-off tail
visible even before the next checkpoint (docs/AUDIT.md). A receiver that is down or slow never
blocks the writer: sends are non-blocking and failures are counted and logged at most once a
minute.
"""

from __future__ import annotations

import logging
import os
import socket
import time
from typing import Any

log = logging.getLogger("vcfs.audit")

FACILITY_AUTHPRIV = 10
SEVERITY = {"alert": 4, "fs.denied": 5, "block.auth_failed": 3, "audit.degraded": 2, "policy.reload": 5}
SD_FIELDS = ("seq", "uid", "gid", "pid", "exe", "path", "new_path", "op", "result", "rule")
BOM = b"\xef\xbb\xbf"


def severity(record: dict[str, Any]) -> int:
    return SEVERITY.get(str(record.get("event")), 6)


def _sd_value(value: Any) -> str:
    return str(value).replace("\\", "\\\\").replace('"', '\\"').replace("]", "\\]")


def _printable(text: str, limit: int) -> str:
    return "".join(ch if "!" <= ch <= "~" else "_" for ch in text)[:limit] or "-"


def rfc5424(record: dict[str, Any], line: bytes, sd_id: str, hostname: str, procid: int) -> bytes:
    """One syslog message: header, structured data with the who/what fields, then the JSON record."""
    pri = FACILITY_AUTHPRIV * 8 + severity(record)
    params = " ".join(f'{k}="{_sd_value(record[k])}"' for k in SD_FIELDS if record.get(k) is not None)
    sd = f"[{sd_id} {params}]" if params else f"[{sd_id}]"
    header = (
        f"<{pri}>1 {record.get('ts', '-')} {_printable(hostname, 255)} vcfs {procid} "
        f"{_printable(str(record.get('event', '-')), 32)} {sd} "
    )
    return header.encode("ascii", "replace") + BOM + line


def journal_entry(record: dict[str, Any], line: bytes) -> bytes:
    """The journald native protocol: KEY=value lines (the JSON line has no raw newline)."""
    fields = [
        b"MESSAGE=" + line,
        f"PRIORITY={severity(record)}".encode(),
        f"SYSLOG_FACILITY={FACILITY_AUTHPRIV}".encode(),
        b"SYSLOG_IDENTIFIER=vcfs",
        f"VCFS_EVENT={record.get('event', '')}".encode(),
        f"VCFS_SEQ={record.get('seq', '')}".encode(),
    ]
    return b"\n".join(fields) + b"\n"


class Forwarder:
    """Sends each written record to one datagram socket in one of the two formats."""

    def __init__(self, kind: str, address: str, sd_id: str = "vcfs@32473") -> None:
        self.kind = kind
        self.address = address
        self._sd_id = sd_id
        self._host = socket.gethostname()
        self._pid = os.getpid()
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self._sock.setblocking(False)
        self.failures = 0
        self._last_warning = 0.0

    def send(self, record: dict[str, Any], line: bytes) -> None:
        if self.kind == "syslog":
            msg = rfc5424(record, line, self._sd_id, self._host, self._pid)
        else:
            msg = journal_entry(record, line)
        try:
            self._sock.sendto(msg, self.address)
        except OSError as exc:
            self.failures += 1
            now = time.monotonic()
            if now - self._last_warning > 60:
                self._last_warning = now
                log.warning("audit: cannot forward records to %s %s: %s", self.kind, self.address, exc.strerror)

    def close(self) -> None:
        self._sock.close()
