"""Logs for journald: ``<N>`` priority prefixes when stderr is the journal, one line per event.

No journald runs here. It recognises its stream by ``$JOURNAL_STREAM`` (device:inode of the
stderr it handed the service); the test points that variable at the file it gives the
daemon as stderr, which is exactly what the daemon checks.
"""

from __future__ import annotations

import logging
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import VCFS, require
from opsutil import Daemon

from vcfs.logsetup import JournalFormatter, PlainFormatter

pytestmark = pytest.mark.mount

PREFIXED = re.compile(r"^<[0-7]>\S")


def _journal_env(stderr_file: Path) -> dict[str, str]:
    stderr_file.touch()
    st = stderr_file.stat()
    return {**os.environ, "JOURNAL_STREAM": f"{st.st_dev}:{st.st_ino}"}


def test_daemon_lines_carry_priorities_under_journald(store: Path, tmp_path: Path) -> None:
    require(os.path.exists("/dev/fuse"), "/dev/fuse")
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    log = tmp_path / "journal.txt"
    daemon = Daemon([str(store), str(mnt)], log, _journal_env(log), mnt)
    try:
        daemon.wait_mounted()
        (mnt / "x").write_bytes(b"1")
        assert daemon.stop() == 0
    finally:
        daemon.cleanup()
    lines = log.read_text().splitlines()
    assert lines and all(PREFIXED.match(line) for line in lines), lines
    assert any(line.startswith("<6>vcfs.service: mount at") for line in lines)
    assert any(line.startswith("<6>vcfs.service: signal SIGTERM") for line in lines)


def test_expected_failure_is_one_error_line_without_traceback(store: Path, tmp_path: Path) -> None:
    log = tmp_path / "journal.txt"
    env = _journal_env(log)
    with open(log, "wb") as err:
        rc = subprocess.run(
            [*VCFS, "mount", "-f", str(store), str(tmp_path / "missing")], stderr=err, env=env, timeout=60
        ).returncode
    text = log.read_text()
    assert rc == 5
    assert text.startswith("<3>vcfs: error: mount point") and "Traceback" not in text
    assert all(PREFIXED.match(line) for line in text.splitlines())


def _record(msg: str, level: int = logging.ERROR) -> logging.LogRecord:
    return logging.LogRecord("vcfs.fs", level, __file__, 1, msg, None, None)


def test_a_newline_in_a_message_cannot_split_or_forge_a_line() -> None:
    forged = "recording\n<2>vcfs.fs: fake critical line"
    out = JournalFormatter().format(_record(f"authentication failed: {forged}"))
    assert "\n" not in out and out.startswith("<3>vcfs.fs: authentication failed: recording\\n<2>")
    plain = PlainFormatter().format(_record(forged, logging.WARNING))
    assert "\n" not in plain and " WARNING vcfs.fs: recording\\n" in plain


def test_a_bug_traceback_keeps_the_priority_on_every_line() -> None:
    try:
        raise RuntimeError("a bug")
    except RuntimeError:
        rec = logging.LogRecord("vcfs.fs", logging.ERROR, __file__, 1, "unexpected", None, sys.exc_info())
    lines = JournalFormatter().format(rec).splitlines()
    assert len(lines) > 2 and all(line.startswith("<3>") for line in lines)
