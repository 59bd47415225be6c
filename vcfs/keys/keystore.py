"""The keystore: each domain's KEKs, wrapped by that domain's master key, kept OUTSIDE the store.

Why outside: a copy of the backing directory (tar, rsync, snapshot) then carries no KEK at
all, not even a wrapped one. Destroying a KEK version deletes its wrapped copy here; a
backup of the store taken earlier still names the version in its headers and config, but
the key to unwrap its DEKs is gone. Old copies of the keystore itself hold the wrapped KEK
until the master key that wraps them is rotated: master rotation rewraps every live KEK under
a new master key and then destroys the old master key in the HSM, which makes every older
keystore copy useless (docs/KEYS.md, "What destroy means for backups").

The file holds no secret in the clear: wrapped blobs (RFC 5649 under a master key that never
leaves the HSM), labels, versions, states. Default place: ``$VCFS_HOME/keystores/<store id>.toml``;
a host points elsewhere with ``--keystore DIR``. Updates are atomic (temp file, fsync, rename)
and serialised between processes by an flock on a lock file beside it.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import tomllib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import tomli_w

from vcfs.errors import ConfigError
from vcfs.keys import embedded
from vcfs.keys.base import STATE_ACTIVE, STATE_DESTROYED
from vcfs.keys.recipients import WrappedSeed, load_keystore_seeds
from vcfs.store import replace_file

KEYSTORE_FORMAT = 1
# Written once a domain has recipient keys (their wrapped seeds): a vcfs that knows only format 1
# refuses the file instead of rewriting it without them, which would shred every recipient.
KEYSTORE_FORMAT_RECIPIENTS = 2
READABLE_KEYSTORE_FORMATS = (KEYSTORE_FORMAT, KEYSTORE_FORMAT_RECIPIENTS)
KEYSTORE_DIRNAME = "keystores"


@dataclass(slots=True)
class MasterEntry:
    """One version of a domain's master key: a token object that never leaves the HSM."""

    version: int
    label: str
    state: str = STATE_ACTIVE  # active | destroyed
    created: str = ""
    changed: str = ""


@dataclass(slots=True)
class WrappedKek:
    """One KEK version, wrapped under master key ``master`` (empty blob once destroyed)."""

    version: int
    master: int
    blob: bytes
    state: str = STATE_ACTIVE  # active | destroyed: the keystore only records that it is gone
    changed: str = ""


@dataclass(slots=True)
class DomainKeys:
    master_current: int = 0
    masters: list[MasterEntry] = field(default_factory=list)
    keks: dict[int, WrappedKek] = field(default_factory=dict)
    recipients: dict[int, WrappedSeed] = field(default_factory=dict)  # ingest recipients' wrapped seeds

    def master(self, version: int) -> MasterEntry | None:
        return next((m for m in self.masters if m.version == version), None)


@dataclass(slots=True)
class Keystore:
    path: Path
    store_id: str
    domains: dict[str, DomainKeys] = field(default_factory=dict)

    def domain(self, name: str) -> DomainKeys:
        return self.domains.setdefault(name, DomainKeys())

    def destroyed(self, domain: str, version: int) -> bool:
        kek = self.domains.get(domain, DomainKeys()).keks.get(version)
        return kek is not None and kek.state == STATE_DESTROYED


def keystore_dir(override: str | None) -> Path:
    return Path(override).expanduser().resolve() if override else embedded.vcfs_home() / KEYSTORE_DIRNAME


def keystore_path(store_id: str, override_dir: str | None) -> Path:
    return keystore_dir(override_dir) / f"{store_id}.toml"


def load_keystore(path: Path, store_id: str) -> Keystore:
    """Read the keystore; a missing file is an empty keystore (stores with token KEKs need none)."""
    try:
        raw = tomllib.loads(path.read_text())
    except FileNotFoundError:
        return Keystore(path, store_id)
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"keystore {path} is corrupt: {exc}") from None
    if raw.get("format") not in READABLE_KEYSTORE_FORMATS:
        raise ConfigError(f"keystore {path}: format {raw.get('format')!r} is not supported")
    if raw.get("store_id") != store_id:
        raise ConfigError(
            f"keystore {path} belongs to store {raw.get('store_id')!r}, not {store_id!r}",
            hint="point --keystore at the keystore directory of this store",
        )
    ks = Keystore(path, store_id)
    try:
        for name, d in raw.get("domains", {}).items():
            ks.domains[name] = DomainKeys(
                int(d["master_current"]),
                [
                    MasterEntry(int(m["version"]), str(m["label"]), str(m["state"]), m["created"], m["changed"])
                    for m in d["master"]
                ],
                {
                    int(k["version"]): WrappedKek(
                        int(k["version"]), int(k["master"]), bytes.fromhex(k["blob"]), str(k["state"]), k["changed"]
                    )
                    for k in d.get("kek", [])
                },
                load_keystore_seeds(d, f"keystore {path}: domains.{name}."),
            )
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise ConfigError(f"keystore {path} is malformed ({type(exc).__name__}: {exc})") from None
    return ks


def save_keystore(ks: Keystore) -> None:
    ks.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    seeds = any(d.recipients for d in ks.domains.values())
    doc: dict[str, Any] = {
        "format": KEYSTORE_FORMAT_RECIPIENTS if seeds else KEYSTORE_FORMAT,
        "store_id": ks.store_id,
        "domains": {
            name: {
                "master_current": d.master_current,
                "master": [
                    {
                        "version": m.version,
                        "label": m.label,
                        "state": m.state,
                        "created": m.created,
                        "changed": m.changed,
                    }
                    for m in d.masters
                ],
                "kek": [
                    {
                        "version": k.version,
                        "master": k.master,
                        "blob": k.blob.hex(),
                        "state": k.state,
                        "changed": k.changed,
                    }
                    for k in sorted(d.keks.values(), key=lambda k: k.version)
                ],
                **({"recipient": [r.to_toml() for _v, r in sorted(d.recipients.items())]} if d.recipients else {}),
            }
            for name, d in ks.domains.items()
        },
    }
    header = "# vcfs keystore: KEKs wrapped by each domain's master key (no key in the clear). Keep it\n"
    header += "# OUTSIDE the backing store and its backups; back it up with the HSM token. See docs/KEYS.md.\n"
    replace_file(ks.path, (header + tomli_w.dumps(doc)).encode(), mode=0o600)


@contextlib.contextmanager
def keystore_lock(path: Path) -> Iterator[None]:
    """Serialise key-management commands on one store (rotate, destroy, master rotate, ...)."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    fd = os.open(path.with_name(path.name + ".lock"), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)
