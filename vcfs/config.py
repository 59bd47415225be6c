"""The store config: ``vcfs.conf`` (TOML) at the top of the backing directory.

It holds no secret: format version, store id, feature flags and where each key domain's KEKs
live (PKCS#11 URIs). Nothing security-relevant is decided by it alone: every file header
carries (authenticated) its own format, cipher and KEK reference, so editing the config can
make files unreadable but never weaker.
"""

from __future__ import annotations

import os
import re
import tomllib
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import tomli_w

from vcfs.errors import ConfigError, UsageError
from vcfs.keys.base import KEK_STATES
from vcfs.keys.uri import Pkcs11Uri, parse_pkcs11_uri

CONFIG_NAME = "vcfs.conf"
STORE_FORMAT = 1
KNOWN_FEATURES = {"encrypted_names"}
NAMES_SCHEME = 1  # docs/FORMAT.md "Names": AES-SIV-512, PKCS#7 to 16, base64url, long names over 255 bytes
DOMAIN_RE = re.compile(r"^[a-z0-9][a-z0-9_-]{0,63}$")


@dataclass(frozen=True, slots=True)
class KekEntry:
    version: int
    uri: Pkcs11Uri
    mechanism: int
    check_wrapped: bytes = b""  # a probe key wrapped under this KEK (see aead.kek_check_value)
    check_value: bytes = b""
    state: str = "active"  # active | retired (unwrap only) | destroyed (crypto-shredded)
    created: str = ""  # RFC 3339 UTC
    changed: str = ""  # when the state last changed


@dataclass(frozen=True, slots=True)
class NamesKeyEntry:
    """The names secret of one key domain, wrapped (RFC 5649, like a DEK) under one of its KEKs."""

    kek_version: int
    wrapped: bytes
    wrap_alg: int = 1


@dataclass(slots=True)
class DomainConfig:
    name: str
    module: str
    embedded: bool
    current: int
    keks: list[KekEntry] = field(default_factory=list)


@dataclass(slots=True)
class StoreConfig:
    store_id: str
    domains: dict[str, DomainConfig]
    default_domain: str = "default"
    features: dict[str, bool] = field(default_factory=lambda: {"encrypted_names": False})
    format: int = STORE_FORMAT
    names_keys: dict[str, NamesKeyEntry] = field(default_factory=dict)  # key domain -> its names key

    @property
    def encrypted_names(self) -> bool:
        return bool(self.features.get("encrypted_names"))

    def names_toml(self) -> dict[str, Any]:
        """The ``[names]`` table (only in stores with encrypted names)."""
        if not self.encrypted_names:
            return {}
        keys = {
            d: {"kek_version": k.kek_version, "wrap_alg": k.wrap_alg, "wrapped": k.wrapped.hex()}
            for d, k in self.names_keys.items()
        }
        return {"names": {"scheme": NAMES_SCHEME, "keys": keys}}

    def to_toml(self) -> dict[str, Any]:
        return {
            "format": self.format,
            "store_id": self.store_id,
            "features": dict(self.features),
            "keys": {
                "default_domain": self.default_domain,
                "domains": {
                    d.name: {
                        "module": d.module,
                        "embedded": d.embedded,
                        "current": d.current,
                        "kek": [
                            {
                                "version": k.version,
                                "uri": str(k.uri),
                                "mechanism": k.mechanism,
                                "check_wrapped": k.check_wrapped.hex(),
                                "check_value": k.check_value.hex(),
                                "state": k.state,
                                "created": k.created,
                                "changed": k.changed,
                            }
                            for k in d.keks
                        ],
                    }
                    for d in self.domains.values()
                },
            },
        }


def config_path(backing: Path) -> Path:
    return backing / CONFIG_NAME


def save_config(backing: Path, cfg: StoreConfig) -> None:
    """Replace the config atomically (temp file, fsync, rename, fsync of the directory)."""
    data = cfg.to_toml() | cfg.names_toml()
    text = "# vcfs store config: no secrets here. See docs/FORMAT.md.\n" + tomli_w.dumps(data)
    tmp = backing / (CONFIG_NAME + ".tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, config_path(backing))
    dfd = os.open(backing, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)


def _want(table: dict[str, Any], key: str, kind: type, where: str) -> Any:
    if key not in table:
        raise ConfigError(f"store config: missing {where}{key}")
    value = table[key]
    if (kind is int and isinstance(value, bool)) or not isinstance(value, kind):
        raise ConfigError(f"store config: {where}{key} must be a {kind.__name__}")
    return value


def load_config(backing: Path) -> StoreConfig:
    path = config_path(backing)
    if not backing.is_dir():
        raise ConfigError(f"backing directory {backing} does not exist")
    try:
        raw = tomllib.loads(path.read_text())
    except FileNotFoundError:
        raise ConfigError(
            f"{backing} is not a vcfs store (no {CONFIG_NAME})", hint=f"create one with: vcfs init {backing}"
        ) from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"store config {path} is corrupt: {exc}") from None
    fmt = _want(raw, "format", int, "")
    if fmt != STORE_FORMAT:
        raise ConfigError(f"store format {fmt} is not supported (this vcfs reads {STORE_FORMAT})")
    features = _want(raw, "features", dict, "")
    unknown = set(features) - KNOWN_FEATURES
    if unknown:
        raise ConfigError(f"store uses features this vcfs does not know: {', '.join(sorted(unknown))}")
    keys = _want(raw, "keys", dict, "")
    domains: dict[str, DomainConfig] = {}
    for name, d in _want(keys, "domains", dict, "keys.").items():
        where = f"keys.domains.{name}."
        if not isinstance(d, dict) or not DOMAIN_RE.match(name):
            raise ConfigError(f"store config: bad key domain {name!r}")
        entries = []
        for k in _want(d, "kek", list, where):
            if not isinstance(k, dict):
                raise ConfigError(f"store config: {where}kek entries must be tables")
            try:
                uri = parse_pkcs11_uri(_want(k, "uri", str, where + "kek."))
                check_wrapped = bytes.fromhex(k.get("check_wrapped", ""))
                check_value = bytes.fromhex(k.get("check_value", ""))
            except UsageError as exc:
                raise ConfigError(f"store config: {where}kek.uri: {exc.message}") from None
            except (ValueError, TypeError):
                raise ConfigError(f"store config: {where}kek check values must be hex strings") from None
            state = k.get("state", "active")
            if state not in KEK_STATES:
                raise ConfigError(f"store config: {where}kek.state must be one of {', '.join(KEK_STATES)}")
            entries.append(
                KekEntry(
                    _want(k, "version", int, where + "kek."),
                    uri,
                    _want(k, "mechanism", int, where + "kek."),
                    check_wrapped,
                    check_value,
                    state,
                    str(k.get("created", "")),
                    str(k.get("changed", "")),
                )
            )
        cfg_domain = DomainConfig(
            name,
            _want(d, "module", str, where),
            bool(d.get("embedded", False)),
            _want(d, "current", int, where),
            entries,
        )
        if cfg_domain.current not in {k.version for k in entries}:
            raise ConfigError(f"store config: {where}current names a KEK version that is not listed")
        domains[name] = cfg_domain
    default = _want(keys, "default_domain", str, "keys.")
    if default not in domains:
        raise ConfigError(f"store config: default domain {default!r} is not defined")
    cfg = StoreConfig(_want(raw, "store_id", str, ""), domains, default, dict(features), fmt)
    if cfg.encrypted_names:
        cfg.names_keys = _load_names(raw, domains)
    return cfg


def _load_names(raw: dict[str, Any], domains: dict[str, DomainConfig]) -> dict[str, NamesKeyEntry]:
    """The ``[names]`` table of a store with encrypted names: one wrapped names key per key domain."""
    names = _want(raw, "names", dict, "")
    scheme = _want(names, "scheme", int, "names.")
    if scheme != NAMES_SCHEME:
        raise ConfigError(f"store uses name encryption scheme {scheme}; this vcfs reads scheme {NAMES_SCHEME}")
    out: dict[str, NamesKeyEntry] = {}
    for domain, k in _want(names, "keys", dict, "names.").items():
        where = f"names.keys.{domain}."
        if domain not in domains or not isinstance(k, dict):
            raise ConfigError(f"store config: names key for unknown key domain {domain!r}")
        version = _want(k, "kek_version", int, where)
        if version not in {e.version for e in domains[domain].keks}:
            raise ConfigError(f"store config: {where}kek_version names a KEK version that is not listed")
        try:
            wrapped = bytes.fromhex(_want(k, "wrapped", str, where))
        except ValueError:
            raise ConfigError(f"store config: {where}wrapped must be a hex string") from None
        out[domain] = NamesKeyEntry(version, wrapped, _want(k, "wrap_alg", int, where))
    missing = set(domains) - set(out)
    if missing:
        raise ConfigError(f"store config: no names key for key domain {', '.join(sorted(missing))}")
    return out


def utc_now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
