"""Building the access guard for a mount: policy file, audit log and its HSM key, SIGHUP reload.

Kept out of vcfs/mount.py so the daemon lifecycle stays one screen: mount.py calls
``open_guard`` once after logging in to the HSM and gets back the guard plus a coroutine
function that re-reads the policy file (None when there is no file to re-read).
"""

from __future__ import annotations

import os
import time
from collections.abc import Awaitable, Callable
from dataclasses import replace
from pathlib import Path

import trio

from vcfs.access import AccessGuard
from vcfs.accessconfig import AccessConfig, load_access_file
from vcfs.audit.hsm import AuditKey, ChainOnlyKey
from vcfs.audit.log import AuditLog
from vcfs.config import StoreConfig
from vcfs.errors import PolicyError, UsageError
from vcfs.keys.provider import Pkcs11Provider

Reload = Callable[[], Awaitable[None]]


def _inside(path: Path, parent: Path) -> bool:
    real, base = os.path.realpath(path), os.path.realpath(parent)
    return real == base or real.startswith(base.rstrip("/") + "/")


def _audit_hsm(
    cfg: StoreConfig, provider: Pkcs11Provider | None, hash_names: bool
) -> tuple[dict[str, str | bool], Callable[[str], AuditKey]]:
    """Where the audit key lives (for the log's start record) and how to open it.

    Without a provider (an ingest mount, which has no HSM) the log is hash-chained only."""
    if provider is None:
        if hash_names:
            raise UsageError(
                "[audit] hash_names needs the HSM's audit key, and an ingest mount has no HSM",
                hint="drop hash_names from the policy file of ingest mounts",
            )
        return {"token": "", "embedded": False, "ingest": True}, lambda _label: ChainOnlyKey()
    domain = cfg.domains[cfg.default_domain]
    current = next((k for k in domain.keks if k.version == domain.current), None)
    token = domain.token or (current.uri.token if current is not None and current.uri else None) or ""
    hsm: dict[str, str | bool] = {"token": token, "embedded": domain.embedded}
    if not domain.embedded:
        hsm["module"] = domain.module

    def key_for(label: str) -> AuditKey:
        return AuditKey(lambda: provider.session_for(cfg.default_domain), label, create=True)

    return hsm, key_for


def load_access(policy_file: Path | None) -> AccessConfig:
    """The access config of a mount (raises PolicyError); defaults when there is no file."""
    return load_access_file(policy_file) if policy_file is not None else AccessConfig()


def open_guard(
    access: AccessConfig,
    policy_file: Path | None,
    audit_dir: Path | None,
    cfg: StoreConfig,
    provider: Pkcs11Provider | None,
    backing: Path,
    mountpoint: Path,
    clock: Callable[[], float] = time.time,
) -> tuple[AccessGuard, Reload | None]:
    audit = replace(access.audit, dir=audit_dir) if audit_dir is not None else access.audit
    audit_log = None
    if audit.dir is not None:
        for other, what in ((backing, "backing store"), (mountpoint, "mount point")):
            if _inside(audit.dir, other):
                raise UsageError(
                    f"the audit directory {audit.dir} is inside the {what} {other}",
                    hint="keep the audit log outside the store and the mount, e.g. /var/log/vcfs/audit",
                )
        hsm, key_for = _audit_hsm(cfg, provider, audit.hash_names)
        start = {"hsm": hsm, "names": "hmac" if audit.hash_names else "plain"}

        audit_log = AuditLog(audit, key_for, start, clock)
        audit_log.open()
    guard = AccessGuard(access.policy, audit_log, audit, access.alerts, clock=clock)
    guard.source = str(policy_file or "")
    if policy_file is None:
        return guard, None

    async def reload() -> None:
        try:
            fresh = await trio.to_thread.run_sync(load_access_file, policy_file)
        except PolicyError as exc:
            guard.apply(None, exc)
        else:
            guard.apply(fresh, None)

    return guard, reload
