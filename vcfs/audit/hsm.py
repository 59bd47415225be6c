"""The audit trail's use of the HSM: checkpoint MACs, keyed hashes of names, the checkpoint anchor.

Everything goes through the PKCS#11 helpers at the end of vcfs/keys/pkcs11.py (the one door
to python-pkcs11, one call at a time). The key never leaves the token; what leaves is MACs.

Anchor: a private data object per log (``vcfs-audit-anchor-<log id>``) holding the seq and line
hash of the newest checkpoint. Someone who can write the log files but cannot log in to the
token cannot move it, so a log cut back to an older checkpoint no longer matches it.
"""

from __future__ import annotations

import json
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from vcfs.errors import KeyProviderError
from vcfs.keys import embedded
from vcfs.keys.pin import resolve_pin
from vcfs.keys.pkcs11 import (
    audit_anchor_read,
    audit_anchor_write,
    audit_hmac,
    audit_hmac_verify,
    audit_key,
    open_session,
)

NAME_PREFIX = b"vcfs-audit-name\0"  # domain separation: name hashes never collide with checkpoint MACs
NAME_HEX = 32  # 128 bits of the HMAC per path component


@dataclass(frozen=True, slots=True)
class Anchor:
    log_id: str
    seq: int
    hash: str  # SHA-256 of the checkpoint line
    final: bool

    def to_bytes(self) -> bytes:
        return json.dumps(
            {"log_id": self.log_id, "seq": self.seq, "hash": self.hash, "final": self.final}, sort_keys=True
        ).encode()


class AuditKey:
    """One token session's view of the audit key; safe to call from any thread (the pkcs11 lock)."""

    keyed = True  # checkpoints carry an HSM MAC and move an HSM anchor

    def __init__(self, session: Callable[[], Any], label: str, create: bool) -> None:
        self._session = session
        self.label = label
        self._key = audit_key(session(), label, create)
        self._names: OrderedDict[str, str] = OrderedDict()

    def mac(self, data: bytes) -> bytes:
        return audit_hmac(self._key, data)

    def check(self, data: bytes, mac: bytes) -> bool:
        return audit_hmac_verify(self._key, data, mac)

    def name(self, component: str) -> str:
        """Keyed hash of one path component (cached: recorders reuse directory names)."""
        hit = self._names.get(component)
        if hit is None:
            raw = component.encode("utf-8", "surrogateescape")
            hit = "~" + self.mac(NAME_PREFIX + raw).hex()[:NAME_HEX]
            self._names[component] = hit
            if len(self._names) > 65536:
                self._names.popitem(last=False)
        return hit

    def hash_path(self, path: str) -> str:
        """``/cam1/a.mp4`` -> ``/~<hash>/~<hash>``: components hashed one by one so prefixes still group."""
        return "/" + "/".join(self.name(c) for c in path.strip("/").split("/")) if path.strip("/") else "/"

    def anchor(self, log_id: str) -> Anchor | None:
        best: Anchor | None = None
        for raw in audit_anchor_read(self._session(), _anchor_label(log_id)):
            try:
                d = json.loads(raw)
                a = Anchor(str(d["log_id"]), int(d["seq"]), str(d["hash"]), bool(d["final"]))
            except (ValueError, KeyError, TypeError):
                continue
            if a.log_id == log_id and (best is None or a.seq > best.seq):
                best = a
        return best

    def set_anchor(self, anchor: Anchor) -> None:
        audit_anchor_write(self._session(), _anchor_label(anchor.log_id), anchor.to_bytes())


class ChainOnlyKey(AuditKey):
    """The audit "key" of a mount without an HSM (an ingest host, docs/AUDIT.md).

    Records are hash-chained as always, and checkpoints are still written (rotation and the
    final checkpoint at unmount keep their meaning), but they carry no MAC and there is no anchor:
    anyone who can write the log can rebuild the chain. Forward the log off the host
    (``[audit] forward``) for records the ingest host cannot rewrite; verify with ``--no-hsm``.
    """

    keyed = False

    def __init__(self) -> None:  # no token, no session
        self.label = ""

    def mac(self, data: bytes) -> bytes:
        return b""

    def check(self, data: bytes, mac: bytes) -> bool:
        return False

    def name(self, component: str) -> str:
        raise KeyProviderError("hashed names in the audit log need the HSM's audit key")

    def anchor(self, log_id: str) -> Anchor | None:
        return None

    def set_anchor(self, anchor: Anchor) -> None:
        return None


def _anchor_label(log_id: str) -> str:
    return f"vcfs-audit-anchor-{log_id}"


def open_offline_key(hsm: dict[str, Any], module: str | None, pin_file: str | None) -> tuple[AuditKey, Any]:
    """Log in for ``vcfs audit verify/show`` from what the log's start record says about its HSM.

    Returns the key and the session (close it when done). The embedded token is the one under
    VCFS_HOME, as for every other command.
    """
    token = str(hsm.get("token") or "")
    label = str(hsm.get("key") or "")
    if not token or not label:
        raise KeyProviderError("the log does not name its HSM token and audit key (not a vcfs audit log?)")
    emb = bool(hsm.get("embedded"))
    if emb:
        home = embedded.vcfs_home()
        if not embedded.conf_path(home).exists():
            raise KeyProviderError(
                f"the log's checkpoints were made with the embedded token, which is missing under {home}",
                hint="set VCFS_HOME to the directory the mount used",
            )
        embedded.activate(home)
    path = module or (embedded.softhsm_module() if emb else str(hsm.get("module") or ""))
    if not path:
        raise KeyProviderError("no PKCS#11 module for the audit key", hint="pass --pkcs11-module PATH")
    pin = resolve_pin(pin_file, None, embedded.pin_path(embedded.vcfs_home()) if emb else None)
    session = open_session(path, token, pin)
    try:
        return AuditKey(lambda: session, label, create=False), session
    except BaseException:
        session.close()
        raise
