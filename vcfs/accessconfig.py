"""The access config file: ``[policy]``, ``[audit]`` and ``[alerts]`` tables in one TOML file.

``vcfs mount --policy FILE`` reads it at mount time and again on SIGHUP. The three tables are
parsed by functions over plain dicts (vcfs/policy.py, vcfs/audit/config.py), so a host mount
config can carry the same tables; this module only adds the file around them: reading,
syntax errors with their line, and one error that lists every problem with its line.
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives import hashes

from vcfs.audit.config import AlertConfig, AuditConfig, parse_alerts, parse_audit
from vcfs.errors import PolicyError
from vcfs.policy import Policy, parse_policy
from vcfs.tomllines import LineMap, Problems

TABLES = ("policy", "audit", "alerts")


@dataclass(frozen=True, slots=True)
class AccessConfig:
    policy: Policy | None = None  # None: plain POSIX, no access policy
    audit: AuditConfig = field(default_factory=AuditConfig)
    alerts: AlertConfig = field(default_factory=AlertConfig)
    source: str = ""
    digest: str = ""  # SHA-256 of the file, recorded with every (re)load


def parse_access(doc: dict[str, Any], p: Problems, source: str = "", digest: str = "") -> AccessConfig:
    """Build the config from a loaded document; a missing table takes its defaults."""
    for key in sorted(set(doc) - set(TABLES)):
        p.add((key,), f"unknown table (expected {', '.join(TABLES)})")
    policy = parse_policy(doc["policy"], p) if "policy" in doc else None
    audit = parse_audit(doc.get("audit", {}), p)
    alerts = parse_alerts(doc.get("alerts", {}), p)
    return AccessConfig(policy, audit, alerts, source, digest)


def _digest(raw: bytes) -> str:
    h = hashes.Hash(hashes.SHA256())
    h.update(raw)
    return h.finalize().hex()


def load_access_file(path: Path) -> AccessConfig:
    """Read and check ``path``; PolicyError lists every problem with its line number."""
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise PolicyError(f"policy file {path} not found", []) from None
    except OSError as exc:
        raise PolicyError(f"cannot read policy file {path}: {exc.strerror}", []) from None
    try:
        text = raw.decode()
        doc = tomllib.loads(text)
    except UnicodeDecodeError:
        raise PolicyError(f"policy file {path} is not UTF-8 text", []) from None
    except tomllib.TOMLDecodeError as exc:
        problem = str(exc)  # tomllib says "... (at line N, column M)"
        raise PolicyError(f"policy file {path} is not valid TOML: {problem}", [problem]) from None
    p = Problems(str(path), LineMap(text))
    cfg = parse_access(doc, p, str(path), _digest(raw))
    if p:
        more = f" (and {len(p.items) - 1} more: {'; '.join(p.items[1:])})" if len(p.items) > 1 else ""
        raise PolicyError(
            f"policy file {path} is invalid: {p.items[0]}{more}",
            p.items,
            hint="fix the file; a running mount keeps its current policy until a good file is loaded",
        )
    return cfg
