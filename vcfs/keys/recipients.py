"""Recipient key versions as the store config and the keystore record them.

A key domain may have recipient key pairs (X-Wing, vcfs/core/xwing.py) that ingest hosts wrap
new DEKs to (wrap algorithm 2). Each version N is recorded in two places, like a KEK:

- the store config (``vcfs.conf``, inside the store, no secret): version, fingerprint, state,
  times, and which version is current. Ingest hosts read it to check that the public file they
  were given belongs to this store and has not been destroyed; trusted hosts check that the seed
  the HSM unwraps is the recipient the store names.
- the keystore (outside the store, like the wrapped KEKs): the recipient's 32-byte private seed
  wrapped (RFC 5649 through the HSM) under one of the domain's KEK versions, and its public key.

Why the wrapped seed is kept in the keystore and not in the store config (where the names key
is): a recipient private key opens every file wrapped to it, as a KEK does, so it follows the
KEKs' rule that no backup of the backing store carries one, not even wrapped. Destroying a
recipient then deletes its only wrapped copy outside keystore backups, and an ingest host,
which reads the store config, never holds even the wrapped seed. What the keystore still needs
for a full crypto-shred (older keystore copies) is in docs/KEYS.md.

Pure data and (de)serialisation; no HSM, no I/O.
"""

from __future__ import annotations

import base64
import re
from dataclasses import dataclass
from typing import Any

from vcfs.core import kemwrap, xwing
from vcfs.errors import ConfigError
from vcfs.keys.base import STATE_ACTIVE, STATE_DESTROYED, KeyRef

RECIPIENT_STATES = (STATE_ACTIVE, STATE_DESTROYED)
FEATURE = "recipients"  # the store config's feature flag: older vcfs builds refuse such a store
_TIME = re.compile(r"^$|^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ$")


def recipient_name(ref: KeyRef) -> str:
    """How recipients are named in messages: ``default/r2`` (KEKs are ``default/v2``)."""
    return f"{ref.domain}/r{ref.version}"


@dataclass(frozen=True, slots=True)
class RecipientEntry:
    """One recipient version in the store config. Holds no secret."""

    version: int
    fingerprint: bytes  # kemwrap.fingerprint(public key), 16 bytes
    state: str = STATE_ACTIVE  # active | destroyed
    created: str = ""
    changed: str = ""

    def to_toml(self) -> dict[str, Any]:
        return {
            "version": self.version,
            "fingerprint": self.fingerprint.hex(),
            "state": self.state,
            "created": self.created,
            "changed": self.changed,
        }


@dataclass(slots=True)
class WrappedSeed:
    """One recipient version in the keystore: its private seed wrapped under a KEK of the domain."""

    version: int
    kek_version: int  # the KEK (same domain) the seed is wrapped under
    blob: bytes  # RFC 5649 wrap of the 32-byte seed, 40 bytes; empty once destroyed
    public: bytes  # the X-Wing public key (1216 bytes), so the public file can be made again
    state: str = STATE_ACTIVE
    changed: str = ""

    def to_toml(self) -> dict[str, Any]:
        return {
            "version": self.version,
            "kek_version": self.kek_version,
            "seed": self.blob.hex(),
            "public_key": base64.b64encode(self.public).decode(),
            "state": self.state,
            "changed": self.changed,
        }


def _field(table: dict[str, Any], key: str, kind: type, where: str) -> Any:
    value = table.get(key)
    if value is None or (kind is int and isinstance(value, bool)) or not isinstance(value, kind):
        raise ConfigError(f"{where}{key} is missing or not a {kind.__name__}")
    return value


def _state(table: dict[str, Any], where: str) -> str:
    state = table.get("state", STATE_ACTIVE)
    if state not in RECIPIENT_STATES:
        raise ConfigError(f"{where}state must be one of {', '.join(RECIPIENT_STATES)}")
    return str(state)


def _time(table: dict[str, Any], key: str, where: str) -> str:
    value = table.get(key, "")
    if not isinstance(value, str) or not _TIME.match(value):
        raise ConfigError(f"{where}{key} must be a time like 2026-01-31T12:00:00Z")
    return value


def load_config_recipients(d: dict[str, Any], where: str) -> tuple[int, list[RecipientEntry]]:
    """``recipient_current`` and ``[[...recipient]]`` of one domain table of the store config."""
    raw = d.get("recipient", [])
    if not isinstance(raw, list):
        raise ConfigError(f"store config: {where}recipient must be an array of tables")
    entries = []
    for r in raw:
        if not isinstance(r, dict):
            raise ConfigError(f"store config: {where}recipient entries must be tables")
        at = f"store config: {where}recipient."
        try:
            fp = bytes.fromhex(_field(r, "fingerprint", str, at))
        except ValueError:
            raise ConfigError(f"{at}fingerprint must be hex") from None
        if len(fp) != kemwrap.FINGERPRINT_LEN:
            raise ConfigError(f"{at}fingerprint must be {kemwrap.FINGERPRINT_LEN} bytes")
        entry = RecipientEntry(
            _field(r, "version", int, at), fp, _state(r, at), _time(r, "created", at), _time(r, "changed", at)
        )
        if not 1 <= entry.version <= 0xFFFFFFFF:
            raise ConfigError(f"{at}version must be 1..{0xFFFFFFFF}")
        entries.append(entry)
    versions = [e.version for e in entries]
    if len(set(versions)) != len(versions):
        raise ConfigError(f"store config: {where}recipient versions are listed twice")
    current = d.get("recipient_current", 0)
    if isinstance(current, bool) or not isinstance(current, int):
        raise ConfigError(f"store config: {where}recipient_current must be an integer")
    if entries and current not in versions:
        raise ConfigError(f"store config: {where}recipient_current names a recipient version that is not listed")
    return current, entries


def config_recipients_toml(current: int, entries: list[RecipientEntry]) -> dict[str, Any]:
    if not entries:
        return {}
    return {"recipient_current": current, "recipient": [e.to_toml() for e in entries]}


def load_keystore_seeds(d: dict[str, Any], where: str) -> dict[int, WrappedSeed]:
    """The ``[[domains.NAME.recipient]]`` entries of a keystore."""
    out: dict[int, WrappedSeed] = {}
    raw = d.get("recipient", [])
    if not isinstance(raw, list):
        raise ConfigError(f"{where}recipient must be an array of tables")
    for r in raw:
        at = f"{where}recipient."
        if not isinstance(r, dict):
            raise ConfigError(f"{at} entries must be tables")
        try:
            blob = bytes.fromhex(_field(r, "seed", str, at))
            public = base64.b64decode(_field(r, "public_key", str, at), validate=True)
        except ValueError:
            raise ConfigError(f"{at}seed or public_key is not valid hex / base64") from None
        if len(public) != xwing.PUBLIC_KEY_LEN:
            raise ConfigError(f"{at}public_key must be {xwing.PUBLIC_KEY_LEN} bytes")
        seed = WrappedSeed(
            _field(r, "version", int, at),
            _field(r, "kek_version", int, at),
            blob,
            public,
            _state(r, at),
            _time(r, "changed", at),
        )
        out[seed.version] = seed
    return out
