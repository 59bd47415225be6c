"""Recipient lifecycle on a store: new, rotate, export, destroy, and the names-key file for ingest hosts.

Like the KEK commands (vcfs/keyops.py) these are safe while the store is mounted: they take
the keystore's lock, write the keystore before the config names a new recipient (a crash
leaves an unused wrapped seed), and delete a destroyed recipient's seed from the keystore (the
shred) before the config marks it. A running trusted mount re-reads both before its next open;
an ingest mount re-reads the config before its next create and stops wrapping to a recipient
the store says was destroyed.

What applies to recipients (docs/KEYS.md, "Recipient keys"): rotate makes a new key pair that
new ingest mounts use (hosts keep wrapping to the recipient their public file names until they
get the new one); destroy crypto-shreds every file still wrapped to it. Retire does not apply:
no trusted host wraps anything to a recipient. ``vcfs keys adopt`` moves ingest-wrapped files
under the domain's KEKs, after which every KEK operation applies to them.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from vcfs import events
from vcfs.config import load_config, save_config, utc_now
from vcfs.core.header import WRAP_XWING_KWP
from vcfs.errors import UsageError
from vcfs.keyops import _lock, domain_of, usage_by_wrap
from vcfs.keys.base import STATE_DESTROYED, KeyRef
from vcfs.keys.keystore import save_keystore
from vcfs.keys.recipient import RecipientPublic
from vcfs.keys.recipients import FEATURE, WrappedSeed, recipient_name
from vcfs.keys.setup import HostKeyOptions, open_provider, store_keystore
from vcfs.namekeys import unwrap_names_secret
from vcfs.recipientkeys import new_recipient


def create(backing: Path, domain_name: str, opts: HostKeyOptions, rotate: bool) -> RecipientPublic:
    """Recipient version N+1 of the domain (1 for ``new``), made current; returns its public part."""
    cfg = load_config(backing)
    with _lock(cfg, opts):
        cfg = load_config(backing)
        domain = domain_of(cfg, domain_name)
        if rotate and not domain.recipients:
            raise UsageError(
                f"key domain {domain.name!r} has no recipient key yet",
                hint=f"vcfs keys recipient new {backing} {domain.name} --out FILE",
            )
        if not rotate and domain.recipients:
            current = recipient_name(KeyRef(domain.name, domain.recipient_current))
            raise UsageError(
                f"key domain {domain.name!r} already has recipient {current}",
                hint=f"a new key pair is a rotation: vcfs keys recipient rotate {backing} {domain.name} --out FILE",
            )
        version = max((r.version for r in domain.recipients), default=0) + 1
        ref = KeyRef(domain.name, version)
        provider = open_provider(cfg, opts)
        try:
            ks = store_keystore(cfg, opts)
            seed, entry, public = new_recipient(provider, cfg.store_id, ref, KeyRef(domain.name, domain.current))
        finally:
            provider.close()
        ks.domain(domain.name).recipients[version] = seed
        save_keystore(ks)  # before the config names it: a crash leaves an unused wrapped seed only
        previous = domain.recipient_current
        domain.recipients.append(entry)
        domain.recipient_current = version
        cfg.features[FEATURE] = True
        save_config(backing, cfg)
    events.emit(events.KEY_GENERATE, domain=domain.name, version=version, tier="recipient")
    events.emit(events.KEY_ROTATE, domain=domain.name, version=version, previous=previous, tier="recipient")
    return public


def export_public(backing: Path, domain_name: str, version: int | None, opts: HostKeyOptions) -> RecipientPublic:
    """The public file of a recipient (default: the current one) again, from the keystore; no HSM."""
    cfg = load_config(backing)
    domain = domain_of(cfg, domain_name)
    if not domain.recipients:
        raise UsageError(
            f"key domain {domain.name!r} has no recipient key", hint=f"vcfs keys recipient new {backing} {domain.name}"
        )
    version = version or domain.recipient_current
    entry = next((r for r in domain.recipients if r.version == version), None)
    name = recipient_name(KeyRef(domain.name, version))
    if entry is None:
        raise UsageError(f"key domain {domain.name!r} has no recipient version {version}")
    if entry.state == STATE_DESTROYED:
        raise UsageError(f"recipient {name} was destroyed: files wrapped to it now would be unreadable")
    seed = store_keystore(cfg, opts).domain(domain.name).recipients.get(version)
    if seed is None or not seed.public:
        raise UsageError(
            f"the keystore holds no recipient {name}", hint="point --keystore at this store's keystore directory"
        )
    public = RecipientPublic(cfg.store_id, domain.name, version, seed.public)
    if public.fingerprint != entry.fingerprint:
        raise UsageError(f"the keystore's recipient {name} is not the one the store config names (fingerprint)")
    return public


def destroy(backing: Path, domain_name: str, version: int, force: bool, opts: HostKeyOptions) -> int:
    """Crypto-shred recipient ``version``: its wrapped seed leaves the keystore. Returns the files
    that made unreadable (those whose newest key slot is wrapped to it)."""
    cfg = load_config(backing)
    with _lock(cfg, opts):
        cfg = load_config(backing)
        domain = domain_of(cfg, domain_name)
        name = recipient_name(KeyRef(domain.name, version))
        entry = next((r for r in domain.recipients if r.version == version), None)
        if entry is None:
            raise UsageError(f"key domain {domain.name!r} has no recipient version {version}")
        if version == domain.recipient_current:
            raise UsageError(
                f"recipient {name} is current (ingest hosts may still wrap new files to it)",
                hint=f"vcfs keys recipient rotate {backing} {domain.name} --out FILE, and give hosts the new file",
            )
        in_use = usage_by_wrap(backing).get((WRAP_XWING_KWP, KeyRef(domain.name, version)), 0)
        if in_use and not force:
            raise UsageError(
                f"{in_use} files are still wrapped to recipient {name}; destroying it shreds them",
                hint=f"vcfs keys adopt {backing} first, or pass --force to shred them",
            )
        ks = store_keystore(cfg, opts)
        keys = ks.domain(domain.name)
        old = keys.recipients.get(version)
        keys.recipients[version] = WrappedSeed(
            version, old.kek_version if old else 0, b"", old.public if old else b"", STATE_DESTROYED, utc_now()
        )
        save_keystore(ks)  # the shred: the only wrapped copy of the seed outside keystore backups is gone
        domain.recipients = [
            replace(r, state=STATE_DESTROYED, changed=utc_now()) if r.version == version else r
            for r in domain.recipients
        ]
        save_config(backing, cfg)
    events.emit(events.KEY_DESTROY, domain=domain.name, version=version, tier="recipient", files=in_use)
    return in_use


def names_secrets(backing: Path, opts: HostKeyOptions) -> dict[str, bytes]:
    """Every domain's names secret, unwrapped through the HSM, for an ingest host's names-key file."""
    cfg = load_config(backing)
    if not cfg.encrypted_names:
        raise UsageError(
            f"store {backing} has plain names: ingest hosts need no names-key file",
            hint="mount with --ingest RECIPIENT.pub alone",
        )
    provider = open_provider(cfg, opts)
    try:
        return {d: unwrap_names_secret(provider, d, e) for d, e in cfg.names_keys.items()}
    finally:
        provider.close()
