"""The names keys of a store: which one a directory uses, creating, unwrapping and rewrapping them.

A names key is a random 32-byte secret per key domain, wrapped by one of the domain's KEKs
exactly like a DEK (RFC 5649 through the key provider, so it never leaves the HSM boundary in
the clear on disk) and kept in the store config as ``[names.keys.DOMAIN]``. The AES-SIV key
is derived from it (vcfs/core/aead.py ``NamesKey``).
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from pathlib import Path

from vcfs.config import NamesKeyEntry, StoreConfig, load_config, save_config
from vcfs.core.aead import NAMES_SECRET_LEN, NamesKey, new_names_secret
from vcfs.core.names import NameCodec
from vcfs.domainmap import DomainMap
from vcfs.errors import HeaderAuthError, KeyProviderError
from vcfs.keys.base import KeyProvider, KeyRef, Wrapped
from vcfs.keys.setup import HostKeyOptions, open_provider
from vcfs.names import EncryptedNames, NameLayer, PlainNames


def domain_of(domains: DomainMap, plain_dir: bytes) -> str:
    """The key domain whose names key encrypts the entries of the directory at ``plain_dir``.

    The one place for this rule: the domain of the longest path prefix covering the
    directory's entries (a directory's own name sits in its parent, so ``/eu`` itself is
    named under the root's domain while the entries of ``/eu/`` are named under ``eu``). A
    rename that would move a directory into another domain is refused with EXDEV by the mount
    (vcfs/domainmap.py ``same_domain_move``), because the names below it are encrypted under
    the old domain's key.
    """
    return domains.domain_of(os.fsdecode(plain_dir).rstrip("/") + "/")


def name_layer(cfg: StoreConfig, provider: KeyProvider, skip: Callable[[str], bool] = lambda _d: False) -> NameLayer:
    """The name layer of a store: plain names, or encrypted names.

    Every names key is unwrapped now (a wrong one fails here, not at a first lookup), except
    those of domains ``skip`` names (a token that is down at mount): those are unwrapped on
    first use, and their directories answer EIO until the token is back.
    """
    return names_from_secrets(cfg, lambda d: unwrap_names_secret(provider, d, cfg.names_keys[d]), skip)


def names_from_secrets(
    cfg: StoreConfig, secret_of: Callable[[str], bytes], skip: Callable[[str], bool] = lambda _d: False
) -> NameLayer:
    """The name layer over names secrets from ``secret_of(domain)``: unwrapped by the HSM, or (an
    ingest mount, which has no HSM) read from the names-key file it was given (vcfs/ingestnames.py)."""
    if not cfg.encrypted_names:
        return PlainNames()
    codecs: dict[str, NameCodec] = {}
    lock = threading.Lock()

    def codec(domain: str) -> NameCodec:
        with lock:
            found = codecs.get(domain)
            if found is None:
                found = codecs[domain] = NameCodec(NamesKey(secret_of(domain)))
            return found

    for d in cfg.names_keys:
        if not skip(d):
            codec(d)
    domains = cfg.domain_map()
    return EncryptedNames(lambda plain_dir: codec(domain_of(domains, plain_dir)))


def create_names_key(provider: KeyProvider, ref: KeyRef) -> NamesKeyEntry:
    """A fresh names secret wrapped under KEK ``ref`` (for ``vcfs init``, or a new key domain)."""
    wrapped = provider.wrap(ref, new_names_secret())
    return NamesKeyEntry(ref.version, wrapped.blob, wrapped.wrap_alg)


def enable_encrypted_names(cfg: StoreConfig, opts: HostKeyOptions) -> None:
    """Turn on encrypted names in a new store's config: a names key for each domain (``vcfs init``)."""
    provider = open_provider(cfg, opts)
    try:
        for name, domain in cfg.domains.items():
            cfg.names_keys[name] = create_names_key(provider, KeyRef(name, domain.current))
    finally:
        provider.close()
    cfg.features["encrypted_names"] = True


def unwrap_names_secret(provider: KeyProvider, domain: str, entry: NamesKeyEntry) -> bytes:
    ref = KeyRef(domain, entry.kek_version)
    try:
        secret = provider.unwrap(Wrapped(ref, entry.wrap_alg, entry.wrapped))
    except HeaderAuthError:
        raise KeyProviderError(
            f"the names key of key domain {domain!r} does not unwrap under KEK {ref}",
            hint="the [names] table of the store config was changed, or was copied from another store",
        ) from None
    if len(secret) != NAMES_SECRET_LEN:
        raise KeyProviderError(f"the names key of key domain {domain!r} unwraps to a key of the wrong length")
    return bytes(secret)


def names_keys_under(cfg: StoreConfig, ref: KeyRef) -> list[str]:
    """The key domains whose names key is wrapped under KEK ``ref`` (destroying it shreds their names)."""
    return [d for d, e in cfg.names_keys.items() if d == ref.domain and e.kek_version == ref.version]


def rewrap_names_key(backing: Path, provider: KeyProvider, domain: str) -> bool:
    """Rewrap the domain's names key under its current KEK; True if it was under an older one.

    The secret stays the same, so no name in the tree changes and a running mount is unaffected.
    """
    cfg = load_config(backing)
    entry = cfg.names_keys.get(domain)
    target = KeyRef(domain, cfg.domains[domain].current)
    if entry is None or entry.kek_version == target.version:
        return False
    wrapped = provider.wrap(target, unwrap_names_secret(provider, domain, entry))
    cfg.names_keys[domain] = NamesKeyEntry(target.version, wrapped.blob, wrapped.wrap_alg)
    save_config(backing, cfg)
    return True
