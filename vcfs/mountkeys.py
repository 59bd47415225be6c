"""Keys as the mount uses them: a domain per plaintext path, wraps for new files, cached
unwraps for opens, DEK renewal, and picking up key changes made while mounted.

Kept out of the FUSE adapter so that fs.py only asks questions ("which domain?", "unwrap
this") and the key rules stay testable without FUSE. Everything here that reaches the HSM
runs in a worker thread; the provider serialises PKCS#11 itself (one call at a time).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Protocol, cast

from vcfs.config import StoreConfig, config_path, load_config
from vcfs.core.header import WRAP_XWING_KWP
from vcfs.cryptfile import SEAL_BUDGET, CryptFile
from vcfs.domainmap import DomainMap
from vcfs.keys.base import STATE_DESTROYED, KeyRef, Wrapped
from vcfs.keys.dekcache import DEFAULT_TTL, DekCache
from vcfs.keys.dekpool import FILL_BATCH, DekPool
from vcfs.keys.keystore import keystore_path
from vcfs.keys.provider import Pkcs11Provider
from vcfs.keys.setup import HostKeyOptions, refresh_provider
from vcfs.renew import DekRenewer

log = logging.getLogger("vcfs.keys")
RECOVER_EVERY = 2.0  # seconds between attempts to reach a token that went away


class MountProvider(Protocol):
    """What the mount needs of a key provider: the PKCS#11 one, or an ingest mount's (vcfs/ingest.py)."""

    def current(self, domain: str) -> KeyRef: ...
    def wrap(self, ref: KeyRef, dek: bytes | bytearray) -> Wrapped: ...
    def unwrap(self, wrapped: Wrapped) -> bytearray: ...
    def load_for(self, wrapped: Wrapped) -> None: ...
    def is_down(self, domain: str) -> bool: ...
    def domains(self) -> list[str]: ...
    def recover(self) -> list[str]: ...


class MountKeys:
    def __init__(
        self,
        backing: Path,
        provider: MountProvider,
        opts: HostKeyOptions,
        dek_cache_ttl: float = DEFAULT_TTL,
        seal_budget: int = SEAL_BUDGET,
        chown: bool = False,
    ) -> None:
        self.backing = backing
        self.provider = provider
        self._opts = opts
        cfg = load_config(backing)
        self.store_id = cfg.store_id
        self.domains: DomainMap = cfg.domain_map()
        self.cache = DekCache(provider.unwrap, dek_cache_ttl)
        self.pool = DekPool()  # pre-wrapped DEKs for new files (vcfs/keys/dekpool.py)
        self.seal_budget = seal_budget
        self.on_swap: Callable[[int, int], None] | None = None  # set by the FUSE adapter
        self.renewer = DekRenewer(backing, provider.current, provider.wrap, self._swapped, chown)
        self._watched = self._stamps()
        self._last_recover = 0.0

    # ---- key changes made while mounted (rotate, retire, destroy, domain add) -------------

    def _stamps(self) -> tuple[int, int]:
        def mtime(p: Path) -> int:
            try:
                return p.stat().st_mtime_ns
            except FileNotFoundError:
                return 0

        return mtime(config_path(self.backing)), mtime(keystore_path(self.store_id, self._opts.keystore))

    def stale(self) -> bool:
        """True if config or keystore changed since the last ``refresh`` (two stat() calls)."""
        return self._stamps() != self._watched

    def refresh(self) -> None:
        """Re-read config and keystore if either changed: two stat() calls when nothing did."""
        stamps = self._stamps()
        if stamps == self._watched:
            return
        cfg = load_config(self.backing)
        self.take_in(cfg)
        self.domains = cfg.domain_map()
        self._watched = stamps
        self.pool.retain(self.provider.current(d) for d in self.provider.domains())  # rotated: drop
        log.info(
            "keys changed: new files use %s", ", ".join(str(self.provider.current(d)) for d in self.provider.domains())
        )

    def take_in(self, cfg: StoreConfig) -> None:
        """Bring the provider up to date with an edited config or keystore; forget destroyed keys' DEKs."""
        provider = cast(Pkcs11Provider, self.provider)
        refresh_provider(provider, cfg, self._opts)
        for d in cfg.domains.values():
            for k in d.keks:
                ref = KeyRef(d.name, k.version)
                if provider.state(ref) == STATE_DESTROYED:
                    self.cache.drop_kek(ref)
        for r in provider.recipients.known():
            if r.state == STATE_DESTROYED:
                self.cache.drop_kek(r.ref, WRAP_XWING_KWP)

    # ---- per file ------------------------------------------------------------------------

    def domain_for(self, plain_path: str) -> str:
        return self.domains.domain_of(plain_path)

    def wrap_for(self, domain: str) -> Callable[[bytearray], Wrapped]:
        """The wrap for a new file of ``domain`` (call in the HSM worker, after refresh())."""
        ref = self.provider.current(domain)
        return lambda dek: self.provider.wrap(ref, dek)

    def prewrapped(self, domain: str) -> tuple[bytearray, Wrapped] | None:
        """A ready (DEK, wrapping) for a new file of ``domain`` from the pool, or None (then
        wrap in the HSM worker). The caller owns the DEK buffer. Call only when not ``stale()``.

        None while the domain's HSM is known to be down: creates there fail as opens do, instead
        of depending on how many pairs happened to be left."""
        if self.provider.is_down(domain):
            return None
        return self.pool.take(self.provider.current(domain))

    def fill_pool(self) -> int:
        """Wrap a few DEKs ahead for every KEK new files asked for (HSM worker); how many were made."""
        made = 0
        for ref in self.pool.wanted_refs():
            if ref == self.provider.current(ref.domain) and not self.provider.is_down(ref.domain):

                def wrap(dek: bytearray, ref: KeyRef = ref) -> Wrapped:
                    return self.provider.wrap(ref, dek)

                made += self.pool.fill(ref, wrap, FILL_BATCH)
        return made

    def pool_low(self) -> bool:
        """True if a wanted KEK's pool is half empty (then refill it up to full)."""
        return any(self.pool.missing(ref) >= self.pool.size // 2 for ref in self.pool.wanted_refs())

    def unwrap(self, wrapped: Wrapped) -> bytearray:
        """For opens: the token must be reachable and the KEK (or recipient) not destroyed, cache or not."""
        self.provider.load_for(wrapped)
        return self.cache.unwrap(wrapped)

    def opened(self, cf: CryptFile) -> None:
        self.cache.hold(cf.opened_with)

    def closed(self, wrapping: Wrapped) -> None:
        self.cache.release(wrapping)

    def _swapped(self, old_ino: int, new_ino: int) -> None:
        if self.on_swap is not None:
            self.on_swap(old_ino, new_ino)

    # ---- upkeep (from the daemon's event loop, once a second) ----------------------------

    def sweep(self) -> None:
        self.cache.sweep()
        self.pool.sweep()

    def recover_due(self) -> bool:
        if not any(self.provider.is_down(d) for d in self.provider.domains()):
            return False
        now = time.monotonic()
        if now - self._last_recover < RECOVER_EVERY:
            return False
        self._last_recover = now
        return True

    def recover(self) -> None:
        """Reach tokens that went away (HSM worker thread)."""
        self.provider.recover()

    def close(self) -> None:
        self.cache.clear()
        self.pool.clear()
