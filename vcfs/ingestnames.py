"""The names-key file: what an ingest host needs to encrypt and list names in a store with
encrypted names, without an HSM.

Why an ingest host holds the names keys: it must create entries under encrypted names and
look up and list the directories it records into (a muxer stats and reopens its own output).
AES-SIV names need the names secret for both, and an ingest host has no HSM to unwrap it
from the store config. The alternatives were worse: requiring plain names for stores with
ingest hosts would show every name to everyone who can read the backing store or a backup,
while this shows them only to a compromised ingest host, which sees the names it records
anyway. File *contents* stay sealed against the ingest host after close either way: names
keys open no DEK. The consequence is stated in docs/THREAT_MODEL.md ("Ingest hosts").

The file is a secret (mode 0600, refused otherwise, like a PIN file): it is written on a
trusted host by ``vcfs keys recipient names`` and copied to the ingest host. Names secrets
never change (a KEK rewrap rewraps them), so the file does not go stale.
"""

from __future__ import annotations

import stat
import tomllib
from pathlib import Path

import tomli_w

from vcfs.config import StoreConfig
from vcfs.core.aead import NAMES_SECRET_LEN
from vcfs.errors import ConfigError, KeyProviderError
from vcfs.store import replace_file

KIND = "vcfs-names-keys"
FORMAT = 1
HEADER = (
    "# vcfs names keys for ingest hosts. SECRET: with it and the store, every file and directory\n"
    "# name can be read (never file contents). Keep it mode 0600 on the ingest host only.\n"
)


def names_file_text(cfg: StoreConfig, secrets: dict[str, bytes]) -> str:
    body = {
        "kind": KIND,
        "format": FORMAT,
        "store_id": cfg.store_id,
        "domains": {d: {"secret": s.hex()} for d, s in sorted(secrets.items())},
    }
    return HEADER + tomli_w.dumps(body)


def write_names_file(path: Path, cfg: StoreConfig, secrets: dict[str, bytes]) -> None:
    replace_file(path, names_file_text(cfg, secrets).encode(), mode=0o600)


def read_names_file(path: Path, cfg: StoreConfig) -> dict[str, bytes]:
    """The names secret of every key domain of ``cfg``; every defect is named."""
    try:
        if stat.S_IMODE(path.stat().st_mode) & 0o077:
            raise KeyProviderError(f"names-key file {path} is readable by group or others", hint=f"chmod 600 {path}")
        raw = tomllib.loads(path.read_text())
    except FileNotFoundError:
        raise KeyProviderError(f"names-key file {path} not found") from None
    except OSError as exc:
        raise KeyProviderError(f"cannot read names-key file {path}: {exc.strerror}") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"names-key file {path} is not valid TOML: {exc}") from None
    if raw.get("kind") != KIND or raw.get("format") != FORMAT:
        raise ConfigError(f"{path} is not a vcfs names-key file (format {FORMAT})")
    if raw.get("store_id") != cfg.store_id:
        raise ConfigError(
            f"names-key file {path} belongs to store {raw.get('store_id')!r}, not {cfg.store_id!r}",
            hint="make one for this store on a trusted host: vcfs keys recipient names BACKING --out FILE",
        )
    out: dict[str, bytes] = {}
    domains = raw.get("domains", {})
    for name in cfg.names_keys:
        try:
            secret = bytes.fromhex(domains[name]["secret"])
        except (KeyError, TypeError, ValueError, AttributeError):
            raise ConfigError(
                f"names-key file {path} has no names key for key domain {name!r}",
                hint="make it again on a trusted host (the store got a domain since): vcfs keys recipient names",
            ) from None
        if len(secret) != NAMES_SECRET_LEN:
            raise ConfigError(f"names-key file {path}: the key of domain {name!r} is not {NAMES_SECRET_LEN} bytes")
        out[name] = secret
    return out
