"""Daemon logging: one line per event on stderr, with journald priority prefixes under systemd.

journald reads a leading ``<N>`` on a line written to a service's stderr as the syslog
priority of that line (sd-daemon(3); ``SyslogLevelPrefix=`` is on by default), and stamps
time, unit and pid itself. So when stderr is the journal (``$JOURNAL_STREAM`` names the
device and inode of stderr) lines are ``<3>vcfs.fs: message``; anywhere else (a terminal,
the background daemon's log file) they carry a timestamp and the level name instead.

One event, one line: newlines inside a message are escaped, so a log line can never be
split into two journal entries or forged by a file name containing a newline. Tracebacks
are for bugs only (expected failures are VcfsError and are logged as their message); when
one is logged, every line of it carries the priority of the record.
"""

from __future__ import annotations

import logging
import os
import sys
from typing import TextIO

# sd-daemon(3) / syslog(3) priorities.
PRIORITY = {
    logging.CRITICAL: 2,  # crit
    logging.ERROR: 3,  # err
    logging.WARNING: 4,  # warning
    logging.INFO: 6,  # info
    logging.DEBUG: 7,  # debug
}


def priority(level: int) -> int:
    for threshold in (logging.CRITICAL, logging.ERROR, logging.WARNING, logging.INFO):
        if level >= threshold:
            return PRIORITY[threshold]
    return PRIORITY[logging.DEBUG]


def stderr_is_journal(stream: TextIO | None = None) -> bool:
    """True if ``stream`` (default stderr) is connected to journald (``$JOURNAL_STREAM``)."""
    expected = os.environ.get("JOURNAL_STREAM", "")
    if not expected:
        return False
    try:
        st = os.fstat((stream or sys.stderr).fileno())
    except (OSError, ValueError):
        return False
    return expected == f"{st.st_dev}:{st.st_ino}"


def _one_line(text: str) -> str:
    return text.replace("\\", "\\\\").replace("\r", "\\r").replace("\n", "\\n")


class JournalFormatter(logging.Formatter):
    """``<N>logger: message``; tracebacks (bugs) keep one prefixed line per traceback line."""

    def format(self, record: logging.LogRecord) -> str:
        prefix = f"<{priority(record.levelno)}>"
        line = f"{prefix}{record.name}: {_one_line(record.getMessage())}"
        if record.exc_info:
            trace = self.formatException(record.exc_info)
            line += "".join(f"\n{prefix}  {t}" for t in trace.splitlines())
        return line


class PlainFormatter(logging.Formatter):
    """``2026-01-01 12:00:00,123 ERROR vcfs.fs: message`` for terminals and log files."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s")

    def formatMessage(self, record: logging.LogRecord) -> str:
        record.message = _one_line(record.message)
        return super().formatMessage(record)


def setup_daemon_logging(debug: bool = False, stream: TextIO | None = None) -> None:
    """Send vcfs's log records to ``stream`` (default stderr) in the format its reader expects."""
    out = stream or sys.stderr
    handler = logging.StreamHandler(out)
    handler.setFormatter(JournalFormatter() if stderr_is_journal(out) else PlainFormatter())
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(logging.DEBUG if debug else logging.INFO)


def error_prefix() -> str:
    """``<3>`` when stderr is the journal (for the CLI's own ``vcfs: error:`` lines), else ``""``."""
    return f"<{PRIORITY[logging.ERROR]}>" if stderr_is_journal() else ""
