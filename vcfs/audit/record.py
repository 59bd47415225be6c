"""One audit record = one line of canonical JSON; each line carries the SHA-256 of the line before.

Canonical means: keys sorted, no spaces, ASCII only (``\\u`` escapes; names that are not
UTF-8 survive as surrogate escapes), integers and strings only (no floats, so a parse and
re-serialisation gives back the same bytes). ``prev`` of the first record is 64 zeros. A
checkpoint's ``mac`` is the HSM's HMAC-SHA256 over the canonical JSON of the checkpoint
without its ``mac`` key. docs/AUDIT.md specifies this so a log can be checked by other tools.
"""

from __future__ import annotations

import json
import re
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives import hashes

FORMAT = 1
GENESIS = "0" * 64
SEGMENT_RE = re.compile(r"^audit-(\d{12})\.jsonl$")
STATE_SUFFIX = ".state.json"

# events that are written (and checkpointed) promptly: a reviewer wants them first
URGENT = frozenset({"fs.denied", "alert", "block.auth_failed", "policy.reload", "audit.degraded"})


def canonical(record: dict[str, Any]) -> bytes:
    return json.dumps(record, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()


def sha256_hex(data: bytes) -> str:
    h = hashes.Hash(hashes.SHA256())
    h.update(data)
    return h.finalize().hex()


def mac_input(record: dict[str, Any]) -> bytes:
    return canonical({k: v for k, v in record.items() if k != "mac"})


def rfc3339(t: float) -> str:
    """UTC, microseconds, ``Z``: 2026-11-28T10:00:00.123456Z."""
    return datetime.fromtimestamp(t, UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def parse_rfc3339(text: str) -> float:
    return datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()


def segment_name(first_seq: int) -> str:
    return f"audit-{first_seq:012d}.jsonl"


def segments(directory: Path) -> list[tuple[int, Path]]:
    """The log's files, oldest first: each is named after the seq of its first record."""
    out = []
    for entry in directory.iterdir():
        m = SEGMENT_RE.match(entry.name)
        if m:
            out.append((int(m.group(1)), entry))
    return sorted(out)
