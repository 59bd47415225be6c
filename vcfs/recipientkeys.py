"""The recipient keys of a store: making one, which KEK wraps each seed, moving seeds to the current KEK.

A recipient's private key is a 32-byte X-Wing seed (vcfs/core/xwing.py). It is generated in this
process from ``os.urandom`` (SoftHSM2 and most HSMs cannot do X-Wing, so the seed cannot be born
in the token), wrapped at once through the HSM under the domain's current KEK (C_WrapKey,
RFC 5649, exactly like a DEK or a names secret), and the clear copy is overwritten. Only the
wrapped seed is stored, in the keystore (why there: vcfs/keys/recipients.py).

Kept apart from the recipient commands (vcfs/recipientops.py) so that KEK rewrap and destroy,
which must keep seeds readable, can use it without importing the command layer.
"""

from __future__ import annotations

from vcfs.config import StoreConfig, utc_now
from vcfs.core import kemwrap, xwing
from vcfs.core.header import WRAP_PKCS11_AES_KWP
from vcfs.keys.base import STATE_DESTROYED, KeyRef, Wrapped
from vcfs.keys.keystore import Keystore, keystore_lock, save_keystore
from vcfs.keys.provider import Pkcs11Provider
from vcfs.keys.recipient import RecipientPublic
from vcfs.keys.recipients import RecipientEntry, WrappedSeed, recipient_name
from vcfs.keys.setup import HostKeyOptions, store_keystore


def new_recipient(
    provider: Pkcs11Provider, store_id: str, ref: KeyRef, kek: KeyRef
) -> tuple[WrappedSeed, RecipientEntry, RecipientPublic]:
    """Recipient ``ref`` with a fresh seed wrapped under KEK ``kek`` (same domain)."""
    seed = bytearray(xwing.new_seed())
    try:
        public = xwing.expand(seed).public
        wrapped = provider.wrap(kek, seed)
    finally:
        seed[:] = bytes(len(seed))
    now = utc_now()
    stored = WrappedSeed(ref.version, kek.version, wrapped.blob, public, changed=now)
    entry = RecipientEntry(ref.version, kemwrap.fingerprint(public), created=now)
    return stored, entry, RecipientPublic(store_id, ref.domain, ref.version, public)


def seeds_under(ks: Keystore, kek: KeyRef) -> list[str]:
    """The recipients whose seed is wrapped under KEK ``kek`` (destroying it would shred them)."""
    keys = ks.domains.get(kek.domain)
    if keys is None:
        return []
    return [
        recipient_name(KeyRef(kek.domain, s.version))
        for s in keys.recipients.values()
        if s.kek_version == kek.version and s.blob and s.state != STATE_DESTROYED
    ]


def rewrap_seeds(cfg: StoreConfig, provider: Pkcs11Provider, opts: HostKeyOptions, domain: str | None) -> list[str]:
    """Move the seeds of ``domain`` (or of every domain) to its current KEK, like the names keys.

    The seed itself stays the same, so nothing wrapped to a recipient changes and ingest hosts
    keep their public files. Returns the recipients moved (``default/r1``)."""
    ks = store_keystore(cfg, opts)
    with keystore_lock(ks.path):
        ks = store_keystore(cfg, opts)
        moved = []
        for name in [domain] if domain is not None else list(cfg.domains):
            keys = ks.domains.get(name)
            if keys is None or provider.is_down(name):
                continue
            target = KeyRef(name, cfg.domains[name].current)
            for s in keys.recipients.values():
                if not s.blob or s.state == STATE_DESTROYED or s.kek_version == target.version:
                    continue
                old = Wrapped(KeyRef(name, s.kek_version), WRAP_PKCS11_AES_KWP, s.blob)
                secret, new = provider.rewrap(old, target)
                secret[:] = bytes(len(secret))
                s.blob, s.kek_version, s.changed = new.blob, target.version, utc_now()
                moved.append(recipient_name(KeyRef(name, s.version)))
        if moved:
            save_keystore(ks)
    return moved
