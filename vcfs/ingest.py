"""Ingest (write-only) mounts: the keys and names of a recorder host that has no HSM.

An ingest mount is given recipient public files (``vcfs mount --ingest FILE``) instead of an
HSM. Every new file gets a fresh DEK wrapped to its domain's recipient (wrap algorithm 2,
vcfs/core/kemwrap.py); the DEK lives only in the open file's derived keys, so once the last
handle is closed nothing on the host can open the file again: a reopen fails with EACCES, is
logged, and is audited like any refused open. No PKCS#11 module is loaded, no token touched.

What is trusted: only the public files this host was given. The store config is read (key
domains, names, which recipients exist), but a public key is never taken from it: whoever can
write the backing store could otherwise put in a key of their own and read every new
recording. The config can only make this host refuse to work (a recipient it names as
destroyed, a fingerprint that differs), never make it wrap to another key.
"""

from __future__ import annotations

import logging
from pathlib import Path

from vcfs.config import StoreConfig
from vcfs.errors import ConfigError, KeyDestroyedError, UsageError
from vcfs.ingestnames import read_names_file
from vcfs.keys.base import STATE_DESTROYED, KeyRef, Wrapped
from vcfs.keys.recipient import IngestProvider, RecipientPublic, load_public
from vcfs.keys.recipients import recipient_name
from vcfs.keys.setup import HostKeyOptions
from vcfs.mountkeys import MountKeys
from vcfs.namekeys import names_from_secrets
from vcfs.names import NameLayer

log = logging.getLogger("vcfs.keys")


def destroyed_recipients(cfg: StoreConfig) -> list[KeyRef]:
    return [KeyRef(d.name, r.version) for d in cfg.domains.values() for r in d.recipients if r.state == STATE_DESTROYED]


def check_recipient(pub: RecipientPublic, cfg: StoreConfig, where: Path) -> None:
    """Refuse a public file that is not one of this store's live recipients; warn if it is not current."""
    name = recipient_name(pub.ref)
    if pub.store_id != cfg.store_id:
        raise ConfigError(
            f"recipient key {where} belongs to store {pub.store_id!r}, not to this store ({cfg.store_id!r})",
            hint="export this store's recipient on a trusted host: vcfs keys recipient export BACKING DOMAIN",
        )
    domain = cfg.domains.get(pub.domain)
    entry = next((r for r in domain.recipients if r.version == pub.version), None) if domain else None
    if entry is None:
        raise ConfigError(f"recipient key {where} ({name}) is not listed in this store's config")
    if entry.fingerprint != pub.fingerprint:
        raise ConfigError(
            f"recipient key {where} ({name}) is not the key this store's config names (fingerprint differs)",
            hint="the file or the store config was changed; export the recipient again on a trusted host",
        )
    if entry.state == STATE_DESTROYED:
        raise KeyDestroyedError(
            f"recipient {name} ({where}) was destroyed in this store: files wrapped to it would be unreadable",
            hint="give this host the current recipient file (vcfs keys recipient export BACKING DOMAIN --out FILE)",
        )
    assert domain is not None
    if domain.recipient_current != pub.version:
        log.warning(
            "recipient %s is no longer current in this store (%s is): new files still go to %s until this host "
            "gets the new public file",
            name,
            recipient_name(KeyRef(pub.domain, domain.recipient_current)),
            name,
        )


def open_ingest_provider(cfg: StoreConfig, paths: tuple[Path, ...]) -> IngestProvider:
    pubs: list[RecipientPublic] = []
    for path in paths:
        pub = load_public(path)
        check_recipient(pub, cfg, path)
        if any(p.domain == pub.domain for p in pubs):
            raise UsageError(f"two recipient files for key domain {pub.domain!r}", hint="give one --ingest per domain")
        pubs.append(pub)
    if not pubs:
        raise UsageError("an ingest mount needs at least one recipient file (--ingest FILE)")
    provider = IngestProvider(pubs)
    provider.sync(destroyed_recipients(cfg))
    return provider


def ingest_names(cfg: StoreConfig, names_file: Path | None, tree: bytes) -> NameLayer:
    """The name layer of an ingest mount: plain names, or the secrets of a names-key file.

    A file of another store is refused by its store id; one whose keys do not open the names
    already in the root directory is refused too (it would create names nobody can read)."""
    if not cfg.encrypted_names:
        return names_from_secrets(cfg, lambda _d: b"")
    if names_file is None:
        raise UsageError(
            "this store encrypts names: an ingest mount needs its names keys (--ingest-names FILE)",
            hint="make the file on a trusted host: vcfs keys recipient names BACKING --out FILE (it is a secret)",
        )
    secrets = read_names_file(names_file, cfg)
    names = names_from_secrets(cfg, lambda d: secrets[d])
    good, bad = names.list_dir(tree, names.dir_key(tree, b"/"))
    if bad and not good:
        raise ConfigError(
            f"the names keys in {names_file} do not open the names in this store",
            hint="make the file again on a trusted host: vcfs keys recipient names BACKING --out FILE",
        )
    return names


def open_ingest(
    cfg: StoreConfig, recipients: tuple[Path, ...], names_file: Path | None, tree: bytes
) -> tuple[IngestProvider, NameLayer]:
    """Everything an ingest mount has instead of an HSM: its recipients, checked, and its names."""
    provider = open_ingest_provider(cfg, recipients)
    for domain in provider.domains():
        provider.self_test(domain)
    return provider, ingest_names(cfg, names_file, tree)


def report_torn(journal_entries: int) -> None:
    """Crash journals cannot be applied here: the DEKs of the files they belong to are gone."""
    if journal_entries:
        log.warning(
            "%d files have crash journals (torn by a crash of this ingest mount); an ingest host cannot open "
            "them: run vcfs fsck --repair BACKING on a trusted host while the store is unmounted",
            journal_entries,
        )


class IngestKeys(MountKeys):
    """MountKeys for an ingest mount: wraps to recipients, caches no DEK, never unwraps.

    The DEK cache is off (TTL 0) and the provider refuses every unwrap before the cache would be
    asked, so after a file's last close no key of it is left in the daemon.
    """

    def __init__(self, backing: Path, provider: IngestProvider, chown: bool = False) -> None:
        super().__init__(backing, provider, HostKeyOptions(), dek_cache_ttl=0.0, chown=chown)
        self.ingest = provider

    def prewrapped(self, domain: str) -> tuple[bytearray, Wrapped] | None:
        """Never: a recipient wrap needs no HSM trip to save, and a DEK waiting in a pool would
        outlive a recipient's destruction and the promise that no key is left after a close."""
        return None

    def take_in(self, cfg: StoreConfig) -> None:
        """After a config change: stop wrapping to a recipient the store says was destroyed."""
        gone = destroyed_recipients(cfg)
        self.ingest.sync(gone)
        for pub in self.ingest.recipients():
            if pub.ref in gone:
                log.error(
                    "recipient %s was destroyed in this store: new files in key domain %s are refused until this "
                    "host gets the current recipient file",
                    recipient_name(pub.ref),
                    pub.domain,
                )
