"""The store config: ``vcfs.conf`` (TOML) at the top of the backing directory.

It holds no secret: format version, store id, feature flags and where each key domain's KEKs
live (PKCS#11 URIs). Nothing security-relevant is decided by it alone: every file header
carries (authenticated) its own format, cipher and KEK reference, so editing the config can
make files unreadable but never weaker.
"""

from __future__ import annotations

import os
import re
import stat
import tomllib
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import tomli_w

from vcfs.domainmap import DomainMap
from vcfs.errors import ConfigError, UsageError
from vcfs.keys.base import KEK_STATES
from vcfs.keys.recipients import FEATURE as RECIPIENTS_FEATURE
from vcfs.keys.recipients import RecipientEntry, config_recipients_toml, load_config_recipients
from vcfs.keys.uri import Pkcs11Uri, parse_pkcs11_uri
from vcfs.store import replace_file
from vcfs.storelayout import TREE_DIR, tree_path

CONFIG_NAME = "vcfs.conf"
CONFIG_MAX_BYTES = 4 << 20  # a real config is a few KiB; refuse what could exhaust memory
# 2 added key domains with path prefixes, a token per domain and KEKs kept wrapped by a master
# key outside the store (docs/FORMAT.md). A store that uses none of that is still written as 1.
STORE_FORMAT = 2
READABLE_FORMATS = (1, 2)
# Where a domain's KEKs live: wrapped by the domain's master key in the keystore kept outside
# the backing store (what vcfs creates), or as token objects named by URI (an HSM admin's key).
KEK_STORE_KEYSTORE, KEK_STORE_TOKEN = "keystore", "token"
KNOWN_FEATURES = {"encrypted_names", RECIPIENTS_FEATURE}
TIME_FORMAT = "%Y-%m-%dT%H:%M:%SZ"
NAMES_SCHEME = 1  # docs/FORMAT.md "Names": AES-SIV-512, PKCS#7 to 16, base64url, long names over 255 bytes
DOMAIN_RE = re.compile(r"^[a-z0-9][a-z0-9_-]{0,63}$")


@dataclass(frozen=True, slots=True)
class KekEntry:
    version: int
    uri: Pkcs11Uri | None  # the token object (kek_store "token"); None for keystore KEKs
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
    token: str = ""  # label of the PKCS#11 token holding this domain's keys
    prefixes: list[str] = field(default_factory=list)  # plaintext path prefixes ("/eu/")
    kek_store: str = KEK_STORE_TOKEN
    pin_source: str | None = None  # "file:/path" of this domain's PIN (never the PIN itself)
    recipients: list[RecipientEntry] = field(default_factory=list)  # ingest recipients (vcfs/keys/recipients.py)
    recipient_current: int = 0  # the version new recipient files are made for; 0: none

    def uses_format_2(self) -> bool:
        return bool(self.prefixes) or self.kek_store != KEK_STORE_TOKEN or self.pin_source is not None


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

    def domain_map(self) -> DomainMap:
        return DomainMap(self.default_domain, {d.name: d.prefixes for d in self.domains.values()})

    def to_toml(self) -> dict[str, Any]:
        v2 = len(self.domains) > 1 or any(d.uses_format_2() for d in self.domains.values())
        return {
            "format": max(self.format, 2 if v2 else 1),
            "store_id": self.store_id,
            "features": dict(self.features),
            "keys": {
                "default_domain": self.default_domain,
                "domains": {
                    d.name: {
                        "module": d.module,
                        "embedded": d.embedded,
                        "current": d.current,
                        **_domain_v2_fields(d),
                        **config_recipients_toml(d.recipient_current, d.recipients),
                        "kek": [
                            {
                                "version": k.version,
                                **({"uri": str(k.uri)} if k.uri is not None else {}),
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


def _domain_v2_fields(d: DomainConfig) -> dict[str, Any]:
    if not d.uses_format_2() and not d.token:
        return {}
    out: dict[str, Any] = {"token": d.token, "prefixes": list(d.prefixes), "kek_store": d.kek_store}
    if d.pin_source:
        out["pin_source"] = d.pin_source
    return out


def save_config(backing: Path, cfg: StoreConfig) -> None:
    """Replace the config atomically (temp file, fsync, rename, fsync of the directory)."""
    data = cfg.to_toml() | cfg.names_toml()
    text = "# vcfs store config: no secrets here. See docs/FORMAT.md.\n" + tomli_w.dumps(data)
    replace_file(config_path(backing), text.encode())


def _want(table: dict[str, Any], key: str, kind: type, where: str) -> Any:
    if key not in table:
        raise ConfigError(f"store config: missing {where}{key}")
    value = table[key]
    if (kind is int and isinstance(value, bool)) or not isinstance(value, kind):
        raise ConfigError(f"store config: {where}{key} must be a {kind.__name__}")
    return value


def _read_config_text(backing: Path) -> str:
    """The config's text; a hostile one (a FIFO, a device, a huge file, a loop) fails cleanly."""
    path = config_path(backing)
    if not backing.is_dir():
        what = "is not a directory" if backing.exists() else "does not exist"
        raise ConfigError(f"backing directory {backing} {what}")
    try:
        # O_NONBLOCK: opening a FIFO must not wait for a writer; it is refused below anyway.
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError:
        raise ConfigError(
            f"{backing} is not a vcfs store (no {CONFIG_NAME})", hint=f"create one with: vcfs init {backing}"
        ) from None
    except OSError as exc:
        raise ConfigError(f"cannot read store config {path}: {exc.strerror}") from None
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode):
        os.close(fd)
        raise ConfigError(f"store config {path} is not a regular file")
    with os.fdopen(fd, "rb") as f:
        if st.st_size > CONFIG_MAX_BYTES:
            raise ConfigError(f"store config {path} is {st.st_size} bytes, more than a config can be")
        try:
            data = f.read(CONFIG_MAX_BYTES + 1)
        except OSError as exc:
            raise ConfigError(f"cannot read store config {path}: {exc.strerror}") from None
    try:
        return data.decode()
    except UnicodeDecodeError as exc:
        raise ConfigError(f"store config {path} is corrupt: {exc}") from None


def _timestamp(value: object, where: str) -> str:
    """An RFC 3339 UTC time as vcfs writes it (utc_now), or empty."""
    if value == "":
        return ""
    if isinstance(value, str):
        try:
            datetime.strptime(value, TIME_FORMAT)
            return value
        except ValueError:
            pass
    raise ConfigError(f"store config: {where} must be a time like 2026-01-31T12:00:00Z")


def load_config(backing: Path) -> StoreConfig:
    path = config_path(backing)
    text = _read_config_text(backing)
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"store config {path} is corrupt: {exc}") from None
    except RecursionError:
        raise ConfigError(f"store config {path} is corrupt: nested too deeply") from None
    fmt = _want(raw, "format", int, "")
    if fmt not in READABLE_FORMATS:
        raise ConfigError(
            f"store format {fmt} is not supported (this vcfs reads {', '.join(map(str, READABLE_FORMATS))})",
            hint="use a vcfs release that supports this store format",
        )
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
                uri = parse_pkcs11_uri(_want(k, "uri", str, where + "kek.")) if "uri" in k or fmt == 1 else None
                check_wrapped = bytes.fromhex(k.get("check_wrapped", ""))
                check_value = bytes.fromhex(k.get("check_value", ""))
            except UsageError as exc:
                raise ConfigError(f"store config: {where}kek.uri: {exc.message}") from None
            except (ValueError, TypeError):
                raise ConfigError(f"store config: {where}kek check values must be hex strings") from None
            state = k.get("state", "active")
            mechanism = _want(k, "mechanism", int, where + "kek.")
            if not 0 <= mechanism <= 0xFFFFFFFF:
                raise ConfigError(f"store config: {where}kek.mechanism {mechanism} is not a PKCS#11 mechanism code")
            if not isinstance(state, str) or state not in KEK_STATES:
                raise ConfigError(f"store config: {where}kek.state must be one of {', '.join(KEK_STATES)}")
            entries.append(
                KekEntry(
                    _want(k, "version", int, where + "kek."),
                    uri,
                    mechanism,
                    check_wrapped,
                    check_value,
                    state,
                    _timestamp(k.get("created", ""), where + "kek.created"),
                    _timestamp(k.get("changed", ""), where + "kek.changed"),
                )
            )
        cfg_domain = DomainConfig(
            name,
            _want(d, "module", str, where),
            _want(d, "embedded", bool, where) if "embedded" in d else False,
            _want(d, "current", int, where),
            entries,
            **_load_domain_v2(d, where, entries),
        )
        if cfg_domain.current not in {k.version for k in entries}:
            raise ConfigError(f"store config: {where}current names a KEK version that is not listed")
        cfg_domain.recipient_current, cfg_domain.recipients = load_config_recipients(d, where)
        if cfg_domain.recipients and not features.get(RECIPIENTS_FEATURE):
            raise ConfigError(f"store config: {where}recipient is listed, but features.{RECIPIENTS_FEATURE} is not set")
        domains[name] = cfg_domain
    default = _want(keys, "default_domain", str, "keys.")
    if default not in domains:
        raise ConfigError(f"store config: default domain {default!r} is not defined")
    if not tree_path(backing).is_dir():
        raise ConfigError(f"store {backing} has no {TREE_DIR}/ directory: it is damaged or only partly copied")
    cfg = StoreConfig(_want(raw, "store_id", str, ""), domains, default, dict(features), fmt)
    try:
        cfg.domain_map()
    except UsageError as exc:
        raise ConfigError(f"store config: {exc.message}") from None
    if cfg.encrypted_names:
        cfg.names_keys = _load_names(raw, domains)
    return cfg


def _load_domain_v2(d: dict[str, Any], where: str, entries: list[KekEntry]) -> dict[str, Any]:
    """Token, prefixes, KEK store and PIN source of a domain (format 2; derived for format 1)."""
    kek_store = d.get("kek_store", KEK_STORE_TOKEN)
    if kek_store not in (KEK_STORE_KEYSTORE, KEK_STORE_TOKEN):
        raise ConfigError(f"store config: {where}kek_store must be {KEK_STORE_KEYSTORE!r} or {KEK_STORE_TOKEN!r}")
    if kek_store == KEK_STORE_TOKEN and any(k.uri is None for k in entries):
        raise ConfigError(f"store config: {where}kek entries of a token KEK store need a uri")
    prefixes = d.get("prefixes", [])
    if not isinstance(prefixes, list) or not all(isinstance(p, str) for p in prefixes):
        raise ConfigError(f"store config: {where}prefixes must be a list of strings")
    token = d.get("token") or next((k.uri.token for k in entries if k.uri is not None and k.uri.token), "")
    pin_source = d.get("pin_source")
    if pin_source is not None and not isinstance(pin_source, str):
        raise ConfigError(f"store config: {where}pin_source must be a string")
    return {"token": str(token), "prefixes": prefixes, "kek_store": kek_store, "pin_source": pin_source}


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
    return datetime.now(UTC).strftime(TIME_FORMAT)
