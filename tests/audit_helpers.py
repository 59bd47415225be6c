"""Shared pieces of the audit tests: a real token session, a real AuditLog, the real verify CLI."""

from __future__ import annotations

import json
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

from conftest import run_vcfs

from vcfs.audit.config import AuditConfig
from vcfs.audit.hsm import AuditKey
from vcfs.audit.log import AuditLog
from vcfs.keys import embedded


def open_log(directory: Path, session: Any, **settings: Any) -> AuditLog:
    cfg = replace(AuditConfig(dir=directory, flush_seconds=0.02), **settings)
    start = {"hsm": {"token": embedded.TOKEN_LABEL, "embedded": True}, "names": "hmac" if cfg.hash_names else "plain"}
    log = AuditLog(cfg, lambda label: AuditKey(lambda: session, label, create=True), start, time.time)
    log.open()
    log.start()
    return log


def lines(directory: Path) -> list[tuple[Path, int, dict[str, Any]]]:
    """Every record with its file and 0-based line index, oldest first."""
    out = []
    for path in sorted(directory.glob("audit-*.jsonl")):
        for i, raw in enumerate(path.read_bytes().splitlines()):
            out.append((path, i, json.loads(raw)))
    return out


def verify(directory: Path, *extra: str) -> tuple[int, dict[str, Any]]:
    res = run_vcfs("audit", "verify", "--json", *extra, str(directory), check=False)
    assert res.returncode in (0, 1, 2), res.stderr
    return res.returncode, json.loads(res.stdout)


def wait_for(predicate: Any, timeout: float = 20.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)
